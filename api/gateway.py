"""etcd's JSON gateway: the gRPC API as HTTP/1.1 POSTs of JSON, for clients
that speak HTTP rather than gRPC (curl, lua-resty-etcd in APISIX, Patroni).

etcd 3.4 answers `POST /v3/kv/range` and its siblings on its client port;
etcd 3.5 can move them to `--listen-client-http-urls`. metastore's client
port speaks only gRPC, so the gateway is served where that flag says. The
paths, the JSON (proto field names, 64-bit integers as strings, bytes in
base64, default values left out) and the errors (`{"error", "message",
"code"}` with grpc-gateway's HTTP status for the gRPC code) are etcd's.

Each call goes to the same servicer a gRPC call reaches, with a stand-in for
grpc's context, so the two cannot drift apart. Streams (watch, lease
keep-alive, election observe) read every JSON object of the request body
as a request and answer `{"result": ...}` objects, one per line, until the
stream ends or the client goes away; an error mid-stream is sent as
`{"error": {...}}`.
"""
from __future__ import annotations

import json
import logging
import re
from http import HTTPStatus
from typing import Any, AsyncIterator, Callable

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from metastore.api.auth import AuthService
from metastore.api.cluster import ClusterService
from metastore.api.election import ElectionService
from metastore.api.http import Handler, Request, Response, Router, StreamResponse, json_response
from metastore.api.kv import KVService
from metastore.api.lease import LeaseService
from metastore.api.lock import LockService
from metastore.api.maintenance import MaintenanceService
from metastore.api.pb import rpc_pb2, v3election_pb2, v3lock_pb2
from metastore.api.watch import WatchService
from metastore.node import Node

log = logging.getLogger("metastore.api.gateway")

# grpc-gateway's HTTP status for each gRPC code (what etcd's gateway answers).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200, grpc.StatusCode.CANCELLED: 408, grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 412, grpc.StatusCode.ABORTED: 409, grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.INTERNAL: 500, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}

# path -> (gRPC service, method), as etcd 3.4's gateway maps them.
ROUTES = {
    "/v3/kv/range": ("KV", "Range"),
    "/v3/kv/put": ("KV", "Put"),
    "/v3/kv/deleterange": ("KV", "DeleteRange"),
    "/v3/kv/txn": ("KV", "Txn"),
    "/v3/kv/compaction": ("KV", "Compact"),
    "/v3/watch": ("Watch", "Watch"),
    "/v3/lease/grant": ("Lease", "LeaseGrant"),
    "/v3/lease/revoke": ("Lease", "LeaseRevoke"),
    "/v3/kv/lease/revoke": ("Lease", "LeaseRevoke"),
    "/v3/lease/keepalive": ("Lease", "LeaseKeepAlive"),
    "/v3/lease/timetolive": ("Lease", "LeaseTimeToLive"),
    "/v3/kv/lease/timetolive": ("Lease", "LeaseTimeToLive"),
    "/v3/lease/leases": ("Lease", "LeaseLeases"),
    "/v3/kv/lease/leases": ("Lease", "LeaseLeases"),
    "/v3/cluster/member/add": ("Cluster", "MemberAdd"),
    "/v3/cluster/member/remove": ("Cluster", "MemberRemove"),
    "/v3/cluster/member/update": ("Cluster", "MemberUpdate"),
    "/v3/cluster/member/list": ("Cluster", "MemberList"),
    "/v3/cluster/member/promote": ("Cluster", "MemberPromote"),
    "/v3/maintenance/alarm": ("Maintenance", "Alarm"),
    "/v3/maintenance/status": ("Maintenance", "Status"),
    "/v3/maintenance/defragment": ("Maintenance", "Defragment"),
    "/v3/maintenance/hash": ("Maintenance", "Hash"),  # etcd maps HashKV here too; Hash answers
    "/v3/maintenance/snapshot": ("Maintenance", "Snapshot"),
    "/v3/maintenance/transfer-leadership": ("Maintenance", "MoveLeader"),
    "/v3/auth/enable": ("Auth", "AuthEnable"),
    "/v3/auth/disable": ("Auth", "AuthDisable"),
    "/v3/auth/authenticate": ("Auth", "Authenticate"),
    "/v3/auth/user/add": ("Auth", "UserAdd"),
    "/v3/auth/user/get": ("Auth", "UserGet"),
    "/v3/auth/user/list": ("Auth", "UserList"),
    "/v3/auth/user/delete": ("Auth", "UserDelete"),
    "/v3/auth/user/changepw": ("Auth", "UserChangePassword"),
    "/v3/auth/user/grant": ("Auth", "UserGrantRole"),
    "/v3/auth/user/revoke": ("Auth", "UserRevokeRole"),
    "/v3/auth/role/add": ("Auth", "RoleAdd"),
    "/v3/auth/role/get": ("Auth", "RoleGet"),
    "/v3/auth/role/list": ("Auth", "RoleList"),
    "/v3/auth/role/delete": ("Auth", "RoleDelete"),
    "/v3/auth/role/grant": ("Auth", "RoleGrantPermission"),
    "/v3/auth/role/revoke": ("Auth", "RoleRevokePermission"),
    "/v3/lock/lock": ("Lock", "Lock"),
    "/v3/lock/unlock": ("Lock", "Unlock"),
    "/v3/election/campaign": ("Election", "Campaign"),
    "/v3/election/proclaim": ("Election", "Proclaim"),
    "/v3/election/leader": ("Election", "Leader"),
    "/v3/election/observe": ("Election", "Observe"),
    "/v3/election/resign": ("Election", "Resign"),
}


class _Aborted(grpc.aio.AbortError):
    """context.abort's exception (an AbortError, so that etcd_errors lets it through)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _Context:
    """What the servicers (and the gRPC metrics around them) use of grpc.aio's
    ServicerContext."""

    def __init__(self) -> None:
        self._code: grpc.StatusCode | None = None

    async def abort(self, code: grpc.StatusCode, details: str = "", *args: Any) -> None:
        self._code = code
        raise _Aborted(code, details)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def time_remaining(self) -> None:
        return None


def _error_body(code: grpc.StatusCode, message: str) -> dict[str, Any]:
    return {"error": message, "message": message, "code": code.value[0]}


def _to_json(msg: Message) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


class _BadBody(ValueError):
    """A request body the gateway cannot turn into requests."""


def _parse(body: bytes, message_type: type[Message], stream: bool) -> list[Message]:
    """The requests in the body: its first JSON object for a unary call (what
    follows it is ignored, as etcd's gateway does; an empty body is an empty
    request), every object in order for a stream -- up to the first one that
    is not a valid request, as long as one came before it."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _BadBody(str(exc)) from None
    decoder, pos, found = json.JSONDecoder(), 0, []
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            return found if found or stream else [message_type()]
        try:
            value, pos = decoder.raw_decode(text, pos)
            if not isinstance(value, dict):
                raise ValueError(f"expected a JSON object, not {type(value).__name__}")
            _check_strictly(value, message_type.DESCRIPTOR)
            found.append(json_format.ParseDict(value, message_type(), ignore_unknown_fields=True))
        except (ValueError, json_format.ParseError, RecursionError) as exc:
            if stream and found:
                return found
            raise _BadBody(str(exc) if not isinstance(exc, RecursionError) else "request body nests too deeply")
        if not stream:
            return found


_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


def _check_strictly(value: dict[str, Any], desc: Descriptor) -> None:
    """What protobuf's JSON parser lets through but etcd's (Go) refuses:
    bytes that are not standard, padded base64 (Python's parser drops bad
    characters and takes the URL-safe alphabet, storing a key the client
    never meant), and enum names the enum does not have (ignored fields
    would make them the default: a typo in a txn compare would run as
    VERSION EQUAL). Unknown field names stay ignored, as in etcd."""
    fields = {f.name: f for f in desc.fields}
    fields.update({f.json_name: f for f in desc.fields})
    for name, item in value.items():
        field = fields.get(name)
        if field is None or item is None:
            continue
        items = item if isinstance(item, list) else [item]  # a list for a single field: ParseDict refuses it
        for one in items:
            if field.type == FieldDescriptor.TYPE_BYTES and isinstance(one, str):
                text = one.replace("\r", "").replace("\n", "")
                if len(text) % 4 or not _BASE64.fullmatch(text):
                    bad = next((i for i, c in enumerate(text) if not (c.isalnum() or c in "+/=")),
                               len(text) - len(text) % 4)  # Go's offset: where the short group starts
                    raise ValueError(f"illegal base64 data at input byte {bad}")
            elif field.type == FieldDescriptor.TYPE_ENUM and isinstance(one, str):
                if field.enum_type.values_by_name.get(one) is None:
                    raise ValueError(f'unknown value "{one}" for enum {field.enum_type.full_name}')
            elif field.type == FieldDescriptor.TYPE_MESSAGE and isinstance(one, dict):
                _check_strictly(one, field.message_type)


async def _requests(items: list[Message]) -> AsyncIterator[Message]:
    for item in items:
        yield item


# (full gRPC method name, the servicer's method, client streaming, server
# streaming) -> the method to call: how the server counts calls in its
# grpc_server_* metrics (GrpcMetrics.instrument).
Instrument = Callable[[str, Callable[..., Any], bool, bool], Callable[..., Any]]


def add_gateway_routes(router: Router, node: Node, instrument: Instrument | None = None) -> None:
    """Register every path of ROUTES on `router`, served by `node`. With
    `instrument`, each call is counted as the gRPC call it stands for (etcd's
    gateway is a gRPC client of its own server, so its calls show in the
    grpc_server_* metrics)."""
    services = {"KV": KVService(node), "Watch": WatchService(node), "Lease": LeaseService(node),
                "Cluster": ClusterService(node), "Maintenance": MaintenanceService(node),
                "Auth": AuthService(node), "Lock": LockService(node), "Election": ElectionService(node)}
    files = {"KV": rpc_pb2, "Watch": rpc_pb2, "Lease": rpc_pb2, "Cluster": rpc_pb2, "Maintenance": rpc_pb2,
             "Auth": rpc_pb2, "Lock": v3lock_pb2, "Election": v3election_pb2}
    for path, (service, method) in ROUTES.items():
        pb = files[service]
        desc = pb.DESCRIPTOR.services_by_name[service].methods_by_name[method]
        request_type = getattr(pb, desc.input_type.name)
        handler = getattr(services[service], method)
        if instrument is not None:
            handler = instrument(f"/{pb.DESCRIPTOR.package}.{service}/{method}", handler,
                                 desc.client_streaming, desc.server_streaming)
        route = _route(handler, request_type, desc.client_streaming, desc.server_streaming)
        router.add("POST", path, route)
        # etcd 3.4 still answers 3.3's prefix, which older clients use.
        router.add("POST", "/v3beta/" + path[len("/v3/"):], route)


def _route(handler: Callable[..., Any], request_type: type[Message], client_streaming: bool,
           server_streaming: bool) -> Handler:
    async def serve(req: Request) -> Response | StreamResponse:
        try:
            requests = _parse(req.body, request_type, client_streaming)
        except _BadBody as exc:
            # etcd's gateway: 400 for a unary call, 500 (UNKNOWN) for a stream.
            code = grpc.StatusCode.UNKNOWN if client_streaming else grpc.StatusCode.INVALID_ARGUMENT
            return json_response(HTTP_STATUS[code], _error_body(code, str(exc)))
        arg = _requests(requests) if client_streaming else requests[0]
        if server_streaming:
            return StreamResponse(200, _stream(handler(arg, _Context())))
        try:
            resp = await handler(arg, _Context())
        except _Aborted as err:
            return json_response(HTTP_STATUS.get(err.code, 500), _error_body(err.code, err.details))
        return json_response(200, _to_json(resp))
    return serve


def _stream_error(code: grpc.StatusCode, message: str) -> bytes:
    """grpc-gateway's error object for a stream that already answered 200."""
    status = HTTP_STATUS.get(code, 500)
    return json.dumps({"error": {"grpc_code": code.value[0], "http_code": status, "message": message,
                                 "http_status": HTTPStatus(status).phrase}}, separators=(",", ":")).encode() + b"\n"


async def _stream(responses: AsyncIterator[Message]) -> AsyncIterator[bytes]:
    try:
        async for resp in responses:
            yield json.dumps({"result": _to_json(resp)}, separators=(",", ":")).encode() + b"\n"
    except _Aborted as err:
        yield _stream_error(err.code, err.details)
    except Exception as exc:  # a bug: say so in the stream, keep serving
        log.exception("gateway stream failed")
        yield _stream_error(grpc.StatusCode.INTERNAL, f"etcdserver: internal error: {exc}")
    finally:
        await responses.aclose()  # type: ignore[attr-defined]
