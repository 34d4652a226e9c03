# One home for the core's dtypes: resources are int64, indices intp, scores float64.
from libc.stdint cimport int64_t, uint64_t, uint8_t, int32_t
from numpy cimport npy_intp as intp_t, float64_t
