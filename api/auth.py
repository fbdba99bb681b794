"""etcdserverpb.Auth, as an etcd whose authentication is disabled and has
no users or roles -- which metastore always is.

Why serve it at all: a client given a user name and password (etcdctl
`--user`, the Go client's Username/Password) first calls Authenticate, and
goes on without a token when the answer is etcd's "authentication is not
enabled". Without this service it got UNIMPLEMENTED and gave up, although
the same client works against an etcd with authentication off.

Reads answer as such an etcd does: no users, no roles, any name "not found".
Adding a user or a role is refused with a message saying why; `auth
enable` gets etcd's own answer while there is no root user. A learner
refuses all of it, as etcd's learners refuse every rpc but Status and
serializable reads.
"""
from __future__ import annotations

from typing import Any, Callable

import grpc

from metastore import errors
from metastore.api.errors import etcd_errors
from metastore.api.pb import rpc_pb2, rpc_pb2_grpc
from metastore.errors import EtcdError
from metastore.node import Node

Handler = Callable[..., Any]


def _refused(error: EtcdError) -> Handler:
    """A handler that answers `error`."""
    @etcd_errors
    async def handler(self: "AuthService", request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._node.refuse_on_learner()
        raise error
    return handler


def _empty(response_type: Any) -> Handler:
    """A handler that answers `response_type` with only a header: no users,
    no roles, or nothing to disable."""
    @etcd_errors
    async def handler(self: "AuthService", request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._node.refuse_on_learner()
        return response_type(header=self._node.header())
    return handler


class AuthService(rpc_pb2_grpc.AuthServicer):
    def __init__(self, node: Node) -> None:
        self._node = node

    @etcd_errors
    async def AuthStatus(self, request: rpc_pb2.AuthStatusRequest,
                         context: grpc.aio.ServicerContext) -> rpc_pb2.AuthStatusResponse:
        self._node.refuse_on_learner()
        return rpc_pb2.AuthStatusResponse(header=self._node.header(), enabled=False, authRevision=0)

    Authenticate = _refused(errors.AUTH_NOT_ENABLED)
    AuthEnable = _refused(errors.ROOT_USER_NOT_EXIST)
    AuthDisable = _empty(rpc_pb2.AuthDisableResponse)  # already disabled

    UserAdd = RoleAdd = _refused(errors.USERS_NOT_SUPPORTED)
    UserList = _empty(rpc_pb2.AuthUserListResponse)
    RoleList = _empty(rpc_pb2.AuthRoleListResponse)
    UserGet = UserDelete = UserChangePassword = UserGrantRole = UserRevokeRole = _refused(errors.USER_NOT_FOUND)
    RoleGet = RoleDelete = RoleGrantPermission = RoleRevokePermission = _refused(errors.ROLE_NOT_FOUND)
