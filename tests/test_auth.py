"""The Auth service of an etcd with authentication disabled and no users:
clients given credentials still work, reads answer "none", changes are
refused with a reason, and the member keeps serving."""
from __future__ import annotations

import grpc
import pytest

from metastore.api.pb import rpc_pb2, rpc_pb2_grpc
from metastore.testing import LocalCluster

pytestmark = pytest.mark.usefixtures("etcdctl_installed")


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(1) as c:
        yield c


def test_a_client_given_credentials_goes_on_without_a_token(cluster):
    # etcdctl authenticates first; "authentication is not enabled" lets it go on.
    assert cluster.etcdctl("--user", "root:secret", "put", "k", "v").stdout == "OK\n"
    assert cluster.etcdctl("--user", "alice", "--password", "pw", "get", "k").stdout == "k\nv\n"
    stub = rpc_pb2_grpc.AuthStub(cluster.members[0].channel())
    with pytest.raises(grpc.RpcError) as info:
        stub.Authenticate(rpc_pb2.AuthenticateRequest(name="root", password="secret"), timeout=5)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details() == "etcdserver: authentication is not enabled"
    status = stub.AuthStatus(rpc_pb2.AuthStatusRequest(), timeout=5)
    assert not status.enabled and status.header.member_id


def test_no_users_or_roles_and_changes_refused(cluster):
    assert cluster.etcdctl("user", "list").stdout == ""
    assert cluster.etcdctl("role", "list").stdout == ""
    for args, message in [
            (("user", "get", "alice"), "etcdserver: user name not found"),
            (("user", "delete", "alice"), "etcdserver: user name not found"),
            (("user", "grant-role", "alice", "r"), "etcdserver: user name not found"),
            (("role", "get", "r"), "etcdserver: role name not found"),
            (("role", "grant-permission", "r", "read", "k"), "etcdserver: role name not found"),
            (("auth", "enable"), "etcdserver: root user does not exist"),
            (("user", "add", "alice:pw"), "users and roles are not supported"),
            (("role", "add", "r"), "users and roles are not supported")]:
        proc = cluster.etcdctl(*args, check=False)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)
    assert cluster.etcdctl("auth", "disable").stdout == "Authentication Disabled\n"
    assert cluster.etcdctl("get", "k", "--print-value-only").stdout == "v\n"
