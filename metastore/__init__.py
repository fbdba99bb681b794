"""metastore: a Raft-replicated key-value store that speaks etcd's v3 gRPC API.

The repository's top-level folders are installed as subpackages of this one
namespace: ``metastore.raft``, ``metastore.engines.memory``,
``metastore.engines.rocksdb``, ``metastore.api`` and ``metastore.cmd``.
"""

__version__ = "0.1.0"

# The etcd API version metastore is wire-compatible with; reported where etcd
# reports its own version (Maintenance.Status, /version) because clients
# compare it against the features they need.
ETCD_COMPAT_VERSION = "3.4.0"
