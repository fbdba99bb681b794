"""The protobuf descriptor pool metastore's own messages are registered in.

Not protobuf's default pool: every Python etcd client library registers the
same etcd message names (mvccpb.KeyValue, etcdserverpb.RangeRequest, ...) in
the default pool, and two definitions of one name in a pool is an import
error. With ours kept apart, an application can import metastore (to embed
it, or for metastore.testing) and any etcd client in one process. Message
names never reach the wire, so clients see no difference.
"""
from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
