"""The member's HTTP listeners: /metrics, /health, /version and the placement
API on --listen-metrics-urls, etcd's JSON gateway (api/gateway.py) on
--listen-client-http-urls.

A small HTTP/1.1 server on the node's asyncio event loop (`asyncio.start_server`,
no thread, no dependency), so a route's handler is an ordinary coroutine that
can await the Node like the gRPC services do. Routes are (method, path pattern)
-> async handler; a pattern names path segments in braces:

    router.add("PUT", "/api/v2/captures/{member}/drain", drain)

    async def drain(req: Request) -> tuple[int, Any]:
        member = req.params["member"]     # percent-decoded segment
        body = req.json()                 # 400 with {"error": ...} if not JSON
        return 200, {"draining": member}  # JSON-encoded

A handler returns (status, json-able body), a `Response` (any bytes and
content type) or a `StreamResponse` (chunks sent as they come), or raises
`HTTPError(status, message)`. Every error is JSON
`{"error": "..."}`: 400 for a malformed request, 404 for an unknown path, 405
(with Allow) for a method the path does not take, 500 for a handler bug; the
server keeps serving. HEAD is answered for every GET route.

The parser takes what HTTP/1.1 clients send: Content-Length or chunked bodies,
`Expect: 100-continue`, keep-alive (HTTP/1.1's default; HTTP/1.0 with
`Connection: keep-alive`). It refuses what would make a request's end
ambiguous (both Content-Length and Transfer-Encoding, conflicting lengths,
folded headers) with 400 and closes the connection.
"""
from __future__ import annotations

import asyncio
import contextlib
import email.utils
import http
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

from metastore import ETCD_COMPAT_VERSION, errors
from metastore.api.pb import rpc_pb2
from metastore.cluster import hostport

log = logging.getLogger("metastore.http")

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_HTTP_1 = re.compile(r"^HTTP/1\.[01]$")
_HTTP_ANY = re.compile(r"^HTTP/[0-9]\.[0-9]$")
_CONTENT_LENGTH = re.compile(r"^[0-9]+$")
_CHUNK_SIZE = re.compile(r"^[0-9A-Fa-f]{1,15}$")

MAX_LINE_BYTES = 16 * 1024  # request line or one header line
MAX_HEADER_BYTES = 64 * 1024  # all header lines of one request
MAX_HEADERS = 100
# How often a request still being answered checks whether its client left.
DISCONNECT_POLL_SECONDS = 0.5

T = TypeVar("T")


class HTTPError(Exception):
    """Raised by a handler (or the parser): answered as `{"error": message}`."""

    def __init__(self, status: int, message: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)


class _Malformed(HTTPError):
    """The request cannot be read to its end: answer, then close the connection."""


@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: dict[str, str]  # lower-case names; repeated fields joined with ", "
    body: bytes = b""
    path: str = "/"
    query: dict[str, list[str]] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)  # from the route's {name} segments

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens

    def json(self) -> Any:
        """The body as JSON; HTTPError 400 when it is empty or not JSON."""
        if not self.body:
            raise HTTPError(400, "request body is empty; expected JSON")
        try:
            return json.loads(self.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HTTPError(400, f"request body is not valid JSON: {exc}") from None


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class StreamResponse:
    """A response sent as it is produced (chunked): each item of `chunks` goes
    out as soon as it is ready. It ends when `chunks` does, or when the client
    goes away (then `chunks` is closed)."""
    status: int
    chunks: AsyncIterator[bytes]
    content_type: str = "application/json"


def json_response(status: int, body: Any, headers: Sequence[tuple[str, str]] = ()) -> Response:
    data = json.dumps(body, separators=(",", ":")).encode()
    return Response(status, data, "application/json", list(headers))


def error_response(status: int, message: str, headers: Sequence[tuple[str, str]] = ()) -> Response:
    return json_response(status, {"error": message}, headers)


Handler = Callable[[Request], Awaitable["Response | StreamResponse | tuple[int, Any]"]]


class Router:
    """(method, path pattern) -> async handler. A pattern is a path whose
    `{name}` segments each match one non-empty segment."""

    def __init__(self) -> None:
        # (segments, method -> handler); a segment "{name}" is a parameter.
        self._routes: list[tuple[list[str], dict[str, Handler]]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        if not pattern.startswith("/"):
            raise ValueError(f"route pattern {pattern!r} must start with '/'")
        segments = pattern.split("/")[1:]
        for existing, methods in self._routes:
            if existing == segments:
                if method.upper() in methods:
                    raise ValueError(f"route {method} {pattern} is already registered")
                methods[method.upper()] = handler
                return
        self._routes.append((segments, {method.upper(): handler}))

    def route(self, method: str, pattern: str) -> Callable[[Handler], Handler]:
        """Decorator form of `add`."""

        def register(handler: Handler) -> Handler:
            self.add(method, pattern, handler)
            return handler

        return register

    def match(self, method: str, path: str) -> tuple[Handler, dict[str, str], bool]:
        """(handler, params, whether it is HEAD answered by a GET route);
        HTTPError 404 or 405 when nothing matches."""
        parts = [unquote(p) for p in path.split("/")[1:]]
        for segments, methods in self._routes:
            params = self._match(segments, parts)
            if params is None:
                continue
            if method in methods:
                return methods[method], params, False
            if method == "HEAD" and "GET" in methods:
                return methods["GET"], params, True
            allow = sorted(set(methods) | ({"HEAD"} if "GET" in methods else set()))
            raise HTTPError(405, f"method {method} not allowed on {path}; allowed: {', '.join(allow)}",
                            [("Allow", ", ".join(allow))])
        raise HTTPError(404, f"no such path: {path}")

    @staticmethod
    def _match(segments: list[str], parts: list[str]) -> dict[str, str] | None:
        if len(segments) != len(parts):
            return None
        params: dict[str, str] = {}
        for seg, part in zip(segments, parts):
            if len(seg) > 2 and seg[0] == "{" and seg[-1] == "}":
                if not part:
                    return None
                params[seg[1:-1]] = part
            elif seg != part:
                return None
        return params


class HTTPServer:
    """Serves a Router on each of `urls` (http://host:port), on the running loop.

    `bind()` opens the ports (failing loudly, like the client and peer ports);
    `start()` begins answering; `stop()` closes the ports and every connection.
    """

    def __init__(self, router: Router, urls: Sequence[str], *, what: str = "metrics",
                 max_body_bytes: int = 4 * 1024 * 1024, idle_timeout: float = 60.0,
                 request_timeout: float = 10.0) -> None:
        self.router = router
        self.urls = list(urls)
        self.what = what
        self.max_body_bytes = max_body_bytes
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self._servers: list[asyncio.base_events.Server] = []
        self._tasks: set[asyncio.Task] = set()
        self._closing = False

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) of every bound socket (useful after binding port 0)."""
        return [sock.getsockname()[:2] for server in self._servers for sock in server.sockets]

    async def bind(self) -> None:
        for url in self.urls:
            address = hostport(url)
            parts = urlsplit(url)
            try:
                server = await asyncio.start_server(
                    self.serve_connection, parts.hostname, parts.port, start_serving=False,
                    limit=MAX_LINE_BYTES)
            except OSError as exc:
                await self.stop()
                reason = exc.strerror or str(exc)
                raise RuntimeError(f"cannot listen for {self.what} on {address}: {reason} "
                                   f"(port in use or address not available)") from None
            self._servers.append(server)

    async def start(self) -> None:
        if not self._servers:
            await self.bind()
        for server in self._servers:
            await server.start_serving()

    async def stop(self) -> None:
        self._closing = True
        for server in self._servers:
            server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    # -- one connection ------------------------------------------------------
    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one HTTP/1.1 connection until it closes (also what the
        client port hands over when a connection does not speak HTTP/2)."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            while not self._closing:
                try:
                    req = await self._read_request(reader, writer)
                except _Malformed as err:
                    await self._write(writer, error_response(err.status, err.message, err.headers),
                                      head=False, keep_alive=False, version="HTTP/1.1")
                    return
                if req is None:
                    return  # the client closed, or stayed idle too long
                answered = await self._unless_gone(reader, self._dispatch(req))
                if answered is None:
                    return  # the client went away before its answer
                resp, head = answered
                keep_alive = req.keep_alive and not self._closing
                if isinstance(resp, StreamResponse):
                    keep_alive = await self._stream(reader, writer, resp, head=head, keep_alive=keep_alive,
                                                    version=req.version)
                else:
                    await self._write(writer, resp, head=head, keep_alive=keep_alive, version=req.version)
                if not keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            pass
        except asyncio.CancelledError:
            pass  # stop(): this connection ends with the server
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    @staticmethod
    async def _unless_gone(reader: asyncio.StreamReader, work: Awaitable[T]) -> T | None:
        """`work`'s result; None (and `work` cancelled) if the client closes
        the connection first -- a Lock through the gateway must not be taken
        for a client that gave up, nor a watch stream kept for it. Polls,
        since reading to find out would take a byte of the client's next
        request (it may send one the moment it has the last answer)."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait([task], timeout=DISCONNECT_POLL_SECONDS)
                if done:
                    return task.result()
                if reader.at_eof():
                    return None
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _dispatch(self, req: Request) -> tuple[Response | StreamResponse, bool]:
        head = False
        try:
            handler, req.params, head = self.router.match(req.method, req.path)
            result = await handler(req)
        except HTTPError as err:
            return error_response(err.status, err.message, err.headers), req.method == "HEAD"
        except Exception as exc:  # a bug in a handler: say so, keep serving
            log.exception("HTTP %s %s failed", req.method, req.target)
            return error_response(500, f"internal error: {exc}"), req.method == "HEAD"
        if isinstance(result, (Response, StreamResponse)):
            return result, head
        status, body = result
        return json_response(status, body), head

    async def _write(self, writer: asyncio.StreamWriter, resp: Response, *, head: bool, keep_alive: bool,
                     version: str) -> None:
        lines = [f"Content-Length: {len(resp.body)}"] + [f"{name}: {value}" for name, value in resp.headers]
        self._write_head(writer, resp.status, resp.content_type, lines, keep_alive=keep_alive, version=version)
        if not head:
            writer.write(resp.body)
        await writer.drain()

    @staticmethod
    def _write_head(writer: asyncio.StreamWriter, status: int, content_type: str, lines: list[str], *,
                    keep_alive: bool, version: str) -> None:
        try:
            reason = http.HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
        lines = [f"HTTP/1.1 {status} {reason}",
                 f"Date: {email.utils.formatdate(usegmt=True)}",
                 f"Content-Type: {content_type}"] + lines
        if not keep_alive:
            lines.append("Connection: close")
        elif version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    async def _stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, resp: StreamResponse, *,
                      head: bool, keep_alive: bool, version: str) -> bool:
        """Send a StreamResponse chunked (HTTP/1.0: until the connection
        closes); whether the connection may carry another request. A client
        that closes its side ends the stream (see _unless_gone): nothing else
        would tell while no chunk is due."""
        chunked = version != "HTTP/1.0"
        keep_alive = keep_alive and chunked and not head
        self._write_head(writer, resp.status, resp.content_type,
                         ["Transfer-Encoding: chunked"] if chunked else [], keep_alive=keep_alive, version=version)
        await writer.drain()

        async def send() -> bool:
            async with contextlib.aclosing(resp.chunks) as chunks:
                if head:
                    return True
                async for chunk in chunks:
                    writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                    await writer.drain()
            if chunked:
                writer.write(b"0\r\n\r\n")
                await writer.drain()
            return True

        sent = await self._unless_gone(reader, send())
        return keep_alive and sent is not None

    # -- parsing -------------------------------------------------------------
    async def _read_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Request | None:
        """The next request on the connection; None at a clean end (EOF or
        idle timeout between requests); _Malformed for what cannot be read."""
        try:
            first = await asyncio.wait_for(self._read_line(reader, allow_eof=True), self.idle_timeout)
            # RFC 9112: ignore empty lines before a request line.
            for _ in range(4):
                if first != b"":
                    break
                first = await asyncio.wait_for(self._read_line(reader, allow_eof=True), self.idle_timeout)
        except asyncio.TimeoutError:
            return None
        if first is None:
            return None
        return await asyncio.wait_for(self._read_rest(first, reader, writer), self.request_timeout)

    @staticmethod
    async def _read_line(reader: asyncio.StreamReader, allow_eof: bool = False) -> bytes | None:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            if allow_eof and not exc.partial:
                return None
            raise
        except asyncio.LimitOverrunError:
            raise _Malformed(431, "request line or header line too long") from None
        line = line[:-1]
        if line.endswith(b"\r"):
            line = line[:-1]
        return line

    async def _read_rest(self, first: bytes, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> Request:
        try:
            text = first.decode("ascii")
        except UnicodeDecodeError:
            raise _Malformed(400, "malformed request line") from None
        parts = text.split(" ")
        if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1]:
            raise _Malformed(400, "malformed request line")
        method, target, version = parts
        if not _HTTP_1.match(version):
            if _HTTP_ANY.match(version):
                raise _Malformed(505, f"HTTP version {version} not supported")
            raise _Malformed(400, "malformed request line")
        headers = await self._read_headers(reader)
        if not target.startswith("/") and not target.lower().startswith(("http://", "https://")):
            raise _Malformed(400, f"malformed request target {target!r}")
        try:
            split = urlsplit(target)
        except ValueError:  # e.g. "//[::1/x": an unclosed IPv6 bracket
            raise _Malformed(400, f"malformed request target {target!r}") from None
        req = Request(method=method, target=target, version=version, headers=headers,
                      path=split.path or "/", query=parse_qs(split.query, keep_blank_values=True))
        req.body = await self._read_body(req, reader, writer)
        return req

    @staticmethod
    async def _read_headers(reader: asyncio.StreamReader) -> dict[str, str]:
        headers: dict[str, str] = {}
        total = 0
        while True:
            line = await HTTPServer._read_line(reader)
            if line == b"":
                return headers
            total += len(line)
            if total > MAX_HEADER_BYTES or len(headers) >= MAX_HEADERS:
                raise _Malformed(431, "request headers too large")
            if line[:1] in (b" ", b"\t"):
                raise _Malformed(400, "folded header lines are not allowed")
            name, sep, value = line.partition(b":")
            try:
                name_s = name.decode("ascii")
            except UnicodeDecodeError:
                raise _Malformed(400, "malformed header name") from None
            if not sep or not _TOKEN.match(name_s):
                raise _Malformed(400, f"malformed header line {line[:80]!r}")
            key = name_s.lower()
            val = value.decode("latin-1").strip(" \t")
            if key == "content-length" and key in headers and headers[key] != val:
                raise _Malformed(400, "conflicting Content-Length headers")
            if key in headers and key != "content-length":
                headers[key] = f"{headers[key]}, {val}"
            else:
                headers[key] = val

    async def _read_body(self, req: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        te = req.headers.get("transfer-encoding")
        cl = req.headers.get("content-length")
        if te is not None and cl is not None:
            raise _Malformed(400, "both Transfer-Encoding and Content-Length given")
        if te is not None:
            if te.strip().lower() != "chunked" or req.version == "HTTP/1.0":
                raise _Malformed(501, f"unsupported Transfer-Encoding {te!r}")
            await self._continue(req, writer)
            return await self._read_chunked(reader)
        if cl is None:
            return b""
        if not _CONTENT_LENGTH.match(cl):
            raise _Malformed(400, f"malformed Content-Length {cl!r}")
        length = int(cl)
        if length > self.max_body_bytes:
            raise _Malformed(413, f"request body of {length} bytes is over the limit of {self.max_body_bytes}")
        if length == 0:
            return b""
        await self._continue(req, writer)
        return await reader.readexactly(length)

    @staticmethod
    async def _continue(req: Request, writer: asyncio.StreamWriter) -> None:
        if req.version == "HTTP/1.1" and req.headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()

    async def _read_chunked(self, reader: asyncio.StreamReader) -> bytes:
        body = bytearray()
        while True:
            line = await self._read_line(reader)
            size_s = line.split(b";", 1)[0].strip().decode("latin-1")
            if not _CHUNK_SIZE.match(size_s):
                raise _Malformed(400, "malformed chunk size")
            size = int(size_s, 16)
            if size == 0:
                break
            if len(body) + size > self.max_body_bytes:
                raise _Malformed(413, f"request body is over the limit of {self.max_body_bytes} bytes")
            body += await reader.readexactly(size)
            if await self._read_line(reader) != b"":
                raise _Malformed(400, "malformed chunk")
        # Trailer fields (ignored) up to the empty line.
        total = 0
        while (line := await self._read_line(reader)) != b"":
            total += len(line)
            if total > MAX_HEADER_BYTES:
                raise _Malformed(431, "request trailers too large")
        return bytes(body)


# -- etcd's endpoints ------------------------------------------------------------
HEALTH_TIMEOUT = 1.0  # etcd 3.4's /health read timeout


def add_member_routes(router: Router, node: Any, metrics: Any, *, health_timeout: float = HEALTH_TIMEOUT) -> None:
    """GET /metrics, /health and /version, as etcd serves them."""

    async def get_metrics(req: Request) -> Response:
        accept = req.headers.get("accept", "")
        # Off the event loop: collecting reads /proc and the store's sizes.
        body, content_type = await asyncio.get_running_loop().run_in_executor(None, metrics.render, accept)
        return Response(200, body, content_type)

    async def get_health(req: Request) -> tuple[int, Any]:
        healthy, reason = await check_health(node, serializable=req.query.get("serializable") == ["true"],
                                             timeout=health_timeout)
        return (200 if healthy else 503), {"health": "true" if healthy else "false", "reason": reason}

    async def get_version(req: Request) -> tuple[int, Any]:
        # etcd reports the cluster version as major.minor.0.
        major_minor = ".".join(ETCD_COMPAT_VERSION.split(".")[:2])
        return 200, {"etcdserver": ETCD_COMPAT_VERSION, "etcdcluster": f"{major_minor}.0"}

    router.add("GET", "/metrics", get_metrics)
    router.add("GET", "/health", get_health)
    router.add("GET", "/version", get_version)


async def check_health(node: Any, *, serializable: bool = False, timeout: float = HEALTH_TIMEOUT) -> tuple[bool, str]:
    """etcd's /health: (healthy, reason). Healthy means this member knows a
    leader and answers a read -- linearizable (through Raft) unless
    `serializable`, which checks only that the local store answers."""
    if not serializable and node.raft_status().leader_id == 0:
        return False, "RAFT NO LEADER"
    try:
        await asyncio.wait_for(
            node.range(rpc_pb2.RangeRequest(key=b"health", keys_only=True, limit=1, serializable=serializable)),
            timeout)
    except asyncio.TimeoutError:
        return False, f"RANGE ERROR:{errors.TIMEOUT.message}"
    except errors.EtcdError as err:
        return False, f"RANGE ERROR:{err.message}"
    return True, ""
