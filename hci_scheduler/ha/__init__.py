"""High availability on etcd: the etcd client (generated from etcd's own protos) and the
leader election whose token fences the leader's writes (see store/etcd.py)."""
