from .fixtures import etcd_prefix, etcd_server  # noqa: F401 (fixtures)
