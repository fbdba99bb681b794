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

import grpc

from metastore import errors
from metastore.api.errors import etcd_errors
from metastore.cluster import NOT_SUPPORTED_FOR_LEARNER
from metastore.api.pb import rpc_pb2, rpc_pb2_grpc
from metastore.node import Node


class AuthService(rpc_pb2_grpc.AuthServicer):
    def __init__(self, node: Node) -> None:
        self._node = node

    def _refuse_on_learner(self) -> None:
        if self._node.is_learner():
            raise NOT_SUPPORTED_FOR_LEARNER

    @etcd_errors
    async def Authenticate(self, request: rpc_pb2.AuthenticateRequest,
                           context: grpc.aio.ServicerContext) -> rpc_pb2.AuthenticateResponse:
        self._refuse_on_learner()
        raise errors.AUTH_NOT_ENABLED

    @etcd_errors
    async def AuthStatus(self, request: rpc_pb2.AuthStatusRequest,
                         context: grpc.aio.ServicerContext) -> rpc_pb2.AuthStatusResponse:
        self._refuse_on_learner()
        return rpc_pb2.AuthStatusResponse(header=self._node.header(), enabled=False, authRevision=0)

    @etcd_errors
    async def AuthEnable(self, request: rpc_pb2.AuthEnableRequest,
                         context: grpc.aio.ServicerContext) -> rpc_pb2.AuthEnableResponse:
        self._refuse_on_learner()
        raise errors.ROOT_USER_NOT_EXIST

    @etcd_errors
    async def AuthDisable(self, request: rpc_pb2.AuthDisableRequest,
                          context: grpc.aio.ServicerContext) -> rpc_pb2.AuthDisableResponse:
        self._refuse_on_learner()
        return rpc_pb2.AuthDisableResponse(header=self._node.header())  # already disabled

    # -- users -------------------------------------------------------------------
    @etcd_errors
    async def UserAdd(self, request: rpc_pb2.AuthUserAddRequest,
                      context: grpc.aio.ServicerContext) -> rpc_pb2.AuthUserAddResponse:
        self._refuse_on_learner()
        raise errors.USERS_NOT_SUPPORTED

    @etcd_errors
    async def UserList(self, request: rpc_pb2.AuthUserListRequest,
                       context: grpc.aio.ServicerContext) -> rpc_pb2.AuthUserListResponse:
        self._refuse_on_learner()
        return rpc_pb2.AuthUserListResponse(header=self._node.header())

    @etcd_errors
    async def UserGet(self, request: rpc_pb2.AuthUserGetRequest,
                      context: grpc.aio.ServicerContext) -> rpc_pb2.AuthUserGetResponse:
        self._refuse_on_learner()
        raise errors.USER_NOT_FOUND

    @etcd_errors
    async def UserDelete(self, request: rpc_pb2.AuthUserDeleteRequest,
                         context: grpc.aio.ServicerContext) -> rpc_pb2.AuthUserDeleteResponse:
        self._refuse_on_learner()
        raise errors.USER_NOT_FOUND

    @etcd_errors
    async def UserChangePassword(self, request: rpc_pb2.AuthUserChangePasswordRequest,
                                 context: grpc.aio.ServicerContext) -> rpc_pb2.AuthUserChangePasswordResponse:
        self._refuse_on_learner()
        raise errors.USER_NOT_FOUND

    @etcd_errors
    async def UserGrantRole(self, request: rpc_pb2.AuthUserGrantRoleRequest,
                            context: grpc.aio.ServicerContext) -> rpc_pb2.AuthUserGrantRoleResponse:
        self._refuse_on_learner()
        raise errors.USER_NOT_FOUND

    @etcd_errors
    async def UserRevokeRole(self, request: rpc_pb2.AuthUserRevokeRoleRequest,
                             context: grpc.aio.ServicerContext) -> rpc_pb2.AuthUserRevokeRoleResponse:
        self._refuse_on_learner()
        raise errors.USER_NOT_FOUND

    # -- roles -------------------------------------------------------------------
    @etcd_errors
    async def RoleAdd(self, request: rpc_pb2.AuthRoleAddRequest,
                      context: grpc.aio.ServicerContext) -> rpc_pb2.AuthRoleAddResponse:
        self._refuse_on_learner()
        raise errors.USERS_NOT_SUPPORTED

    @etcd_errors
    async def RoleList(self, request: rpc_pb2.AuthRoleListRequest,
                       context: grpc.aio.ServicerContext) -> rpc_pb2.AuthRoleListResponse:
        self._refuse_on_learner()
        return rpc_pb2.AuthRoleListResponse(header=self._node.header())

    @etcd_errors
    async def RoleGet(self, request: rpc_pb2.AuthRoleGetRequest,
                      context: grpc.aio.ServicerContext) -> rpc_pb2.AuthRoleGetResponse:
        self._refuse_on_learner()
        raise errors.ROLE_NOT_FOUND

    @etcd_errors
    async def RoleDelete(self, request: rpc_pb2.AuthRoleDeleteRequest,
                         context: grpc.aio.ServicerContext) -> rpc_pb2.AuthRoleDeleteResponse:
        self._refuse_on_learner()
        raise errors.ROLE_NOT_FOUND

    @etcd_errors
    async def RoleGrantPermission(self, request: rpc_pb2.AuthRoleGrantPermissionRequest,
                                  context: grpc.aio.ServicerContext) -> rpc_pb2.AuthRoleGrantPermissionResponse:
        self._refuse_on_learner()
        raise errors.ROLE_NOT_FOUND

    @etcd_errors
    async def RoleRevokePermission(self, request: rpc_pb2.AuthRoleRevokePermissionRequest,
                                   context: grpc.aio.ServicerContext) -> rpc_pb2.AuthRoleRevokePermissionResponse:
        self._refuse_on_learner()
        raise errors.ROLE_NOT_FOUND
