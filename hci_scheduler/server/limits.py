"""What one request may carry: its bytes decoded, and the bounds on its strings and lists.

Why: the server keeps what it is sent, in the Cluster, the event log, every listing and
every watch, so one oversized or strange request poisons all of them for good (issue 13:
300 hosts with a 1 MB label made ListHosts fail on every call, even after a restart; a
workload with 99 nested unknown groups made the Python client fail on ListAllocations
and WatchEvents). Every bound below is checked before anything is stored and answered
with INVALID_ARGUMENT naming the field.

The caps follow Kubernetes where it has one: ids and label-key prefixes are DNS subdomains
(253 characters), label names and values, tenants (a namespace), groups (an app label)
and pools are at most 63 characters, a label key is `[prefix/]name`.
"""
from __future__ import annotations

from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from ..errors import ValidationError

#: The largest request gRPC receives (RESOURCE_EXHAUSTED above it): 100,000 hosts or
#: workloads of a few hundred bytes each fit.
MAX_REQUEST_BYTES = 64 << 20
MAX_WORKLOADS_PER_CALL = 100_000
MAX_HOSTS_PER_CALL = 100_000
#: Host, workload and volume ids, gang ids, label-key prefixes (a DNS subdomain).
MAX_ID_LENGTH = 253
#: Label names and values, taint and selector values, tenants, groups, pools.
MAX_NAME_LENGTH = 63
#: Labels of one host.
MAX_LABELS = 128
#: Taints of one host, tolerations of one workload.
MAX_TAINTS = 64
#: Per workload: node-selector entries plus expressions, values of one expression,
#: affinities, anti-affinities, spreads, volumes; per host: NUMA nodes.
MAX_TERMS = 64
#: A rebalance search's time limit when the request gives none, and the most it may ask for (s).
DEFAULT_REBALANCE_SECONDS = 30.0
MAX_REBALANCE_SECONDS = 600.0
#: The largest search seed (CP-SAT's random_seed is a 32-bit signed integer).
MAX_SEED = 2**31 - 1
#: Messages nested in a request, unknown groups included (the schema's own go 4 deep).
MAX_NESTING = 16

_START_GROUP = 3  # protobuf wire type of a group


def check_id(field: str, value: str) -> None:
    if not value:
        raise ValidationError(f"{field} must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise ValidationError(f"{field} is longer than {MAX_ID_LENGTH} characters: {value[:40]!r}...")


def check_name(field: str, value: str) -> None:
    """A tenant, group, pool or value: at most MAX_NAME_LENGTH characters (may be empty)."""
    if len(value) > MAX_NAME_LENGTH:
        raise ValidationError(f"{field} is longer than {MAX_NAME_LENGTH} characters: {value[:40]!r}...")


def check_label_key(field: str, key: str) -> None:
    """A label, taint, selector or topology key: `[prefix/]name`, name 1..63 characters,
    prefix 1..253 (Kubernetes' qualified name, by length)."""
    prefix, slash, name = key.rpartition("/")
    if len(key) > MAX_ID_LENGTH + 1 + MAX_NAME_LENGTH or len(name) > MAX_NAME_LENGTH \
            or len(prefix) > MAX_ID_LENGTH:
        raise ValidationError(f"{field} {key[:40]!r}... is too long: a key is a name of at most "
                              f"{MAX_NAME_LENGTH} characters after an optional prefix of at most "
                              f"{MAX_ID_LENGTH} and '/'")
    if slash and (not prefix or not name or "/" in prefix):
        raise ValidationError(f"{field} {key[:40]!r} must be a name or prefix/name")


def check_count(field: str, n: int, cap: int) -> None:
    if n > cap:
        raise ValidationError(f"{field}: at most {cap}, got {n}")


def check_labels(field: str, labels) -> None:
    """Labels (or a node selector): count, keys and values."""
    check_count(field, len(labels), MAX_LABELS)
    for k, v in labels.items():
        check_label_key(f"{field} key", k)
        check_name(f"{field}[{k!r}]", v)


def decode(message_class, data: bytes):
    """The request of `data`, without unknown fields: they would be stored with it and
    sent back in every listing and event. Malformed bytes, and unknown fields nested
    deeper than MAX_NESTING, raise ValidationError."""
    try:
        message = message_class.FromString(data)
    except DecodeError as exc:
        raise ValidationError(f"malformed {message_class.DESCRIPTOR.name}: {exc}") from None
    message.DiscardUnknownFields()
    if message.ByteSize() != len(data):
        # Something was dropped (or the encoding is not protobuf's own): measure the
        # nesting on a fresh copy, which still holds what was dropped.
        depth = nesting(message_class.FromString(data))
        if depth > MAX_NESTING:
            raise ValidationError(f"{message_class.DESCRIPTOR.name} nests messages {depth} deep, "
                                  f"at most {MAX_NESTING}")
    return message


def nesting(message) -> int:
    """How deep messages nest in `message` (1 for one without sub-messages), unknown
    groups included."""
    deepest = _group_depth(UnknownFieldSet(message))
    for fd, value in message.ListFields():
        if fd.message_type is None:
            continue
        if fd.message_type.GetOptions().map_entry:
            if fd.message_type.fields_by_name["value"].message_type is None:
                deepest = max(deepest, 1)
                continue
            value = value.values()
        elif isinstance(value, Message):
            value = (value,)
        for sub in value:
            deepest = max(deepest, nesting(sub))
    return 1 + deepest


def _group_depth(fields: UnknownFieldSet) -> int:
    deepest = 0
    for f in fields:
        if f.wire_type == _START_GROUP:
            deepest = max(deepest, 1 + _group_depth(f.data))
    return deepest
