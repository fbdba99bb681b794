"""What every `metastore ctl` command shares: global flags, connections
(dial and command timeouts, several endpoints), errors and exit codes, and
etcdctl 3.4's output formats (simple lines, tables, JSON)."""
from __future__ import annotations

import base64
import json
import math
import os
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence, TypeVar

import click
import grpc

T = TypeVar("T")

# etcdctl's exit codes (etcdctl/ctlv3/command/error.go).
EXIT_ERROR = 1
EXIT_BAD_FEATURE = 4
EXIT_INTERRUPTED = 5
EXIT_BAD_ARGS = 128

OUTPUT_FORMATS = ("simple", "json", "table")
DEFAULT_ENDPOINTS = "127.0.0.1:2379"
DEFAULT_DIAL_TIMEOUT = 2.0
DEFAULT_COMMAND_TIMEOUT = 5.0

_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 2**31 - 1),
                    ("grpc.max_send_message_length", 2**31 - 1),
                    # A member that comes back (a watch resuming) is retried soon.
                    ("grpc.initial_reconnect_backoff_ms", 100),
                    ("grpc.min_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 1000)]


# -- errors --------------------------------------------------------------------------
class CtlError(click.ClickException):
    """A failure reported as etcdctl does: `Error: <message>` on stderr."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class BadArgs(CtlError):
    """A mistake in the command line (etcdctl's ExitBadArgs)."""

    exit_code = EXIT_BAD_ARGS


def rpc_error_message(err: grpc.RpcError, endpoint: str | None = None, timeout: float | None = None) -> str:
    code = err.code()
    details = err.details() or (code.name if code is not None else "request failed")
    if details.startswith("etcdserver:") or details.startswith("mvcc:"):
        return details
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        limit = f" after {timeout:g}s (--command-timeout)" if timeout else ""
        return f"context deadline exceeded: {endpoint or 'the endpoint'} did not answer{limit}"
    if code is grpc.StatusCode.UNAVAILABLE:
        return f"{endpoint or 'endpoint'} is unavailable: {details}"
    if code is grpc.StatusCode.UNIMPLEMENTED:
        return f"{endpoint or 'the endpoint'} does not implement this request: {details}"
    name = code.name if code is not None else "UNKNOWN"
    return f"{details} ({name}{', ' + endpoint if endpoint else ''})"


class _BadArgsExit:
    """Usage mistakes exit with etcdctl's ExitBadArgs (128), not click's 2."""

    def make_context(self, info_name, args, parent=None, **extra):  # type: ignore[no-untyped-def]
        try:
            return super().make_context(info_name, args, parent=parent, **extra)  # type: ignore[misc]
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            exc.exit_code = EXIT_BAD_ARGS
            raise


class CtlCommand(_BadArgsExit, click.Command):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            # `metastore ctl get --prefix '' | head`: stop quietly, as a
            # pipeline expects.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise click.exceptions.Exit(EXIT_ERROR) from None
        except grpc.RpcError as err:  # not mapped closer to the call: still no traceback
            raise CtlError(rpc_error_message(err)) from None
        except OSError as exc:  # a file a command writes or reads (snapshot save)
            raise CtlError(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)) from None


class CtlGroup(_BadArgsExit, click.Group):
    command_class = CtlCommand
    group_class = type  # subgroups are CtlGroups too

    def resolve_command(self, ctx: click.Context, args: list[str]):  # type: ignore[no-untyped-def]
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as exc:
            exc.exit_code = EXIT_BAD_ARGS
            raise


# -- global flags ----------------------------------------------------------------------
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """A Go duration as etcdctl takes it ("2s", "500ms", "1m30s"), or a bare
    number of seconds; in seconds."""
    s = text.strip()
    try:
        seconds = float(s)
    except ValueError:
        pos, seconds = 0, 0.0
        for m in _GO_PART.finditer(s):
            if m.start() != pos:
                break
            seconds += float(m.group(1)) * _GO_UNITS[m.group(2)]
            pos = m.end()
        if pos != len(s) or not s:
            raise ValueError(f"{text!r} is not a duration (e.g. 2s, 500ms, 1m30s)") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{text!r}: the duration must be positive")
    return seconds


@dataclass(frozen=True)
class Endpoint:
    shown: str   # as the user (or MemberList) gave it: printed in output
    target: str  # host:port for gRPC


_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[^\s:/\[\]]+):(\d{1,5})$")


def parse_endpoint(text: str) -> Endpoint:
    raw = text.strip()
    rest = raw
    if rest.startswith("https://"):
        raise ValueError(f"endpoint {raw}: TLS is not supported yet (metastore serves plain gRPC)")
    for scheme in ("http://", "grpc://"):
        if rest.startswith(scheme):
            rest = rest[len(scheme):]
    rest = rest.rstrip("/")
    m = _HOST_PORT.match(rest)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise ValueError(f"endpoint {raw!r} is not host:port (or http://host:port)")
    return Endpoint(raw, rest)


def parse_endpoints(text: str) -> list[Endpoint]:
    eps = [parse_endpoint(part) for part in text.split(",") if part.strip()]
    if not eps:
        raise ValueError("no endpoint given")
    return eps


@dataclass
class Settings:
    endpoints: list[Endpoint] = field(default_factory=lambda: parse_endpoints(DEFAULT_ENDPOINTS))
    write_out: str = "simple"
    dial_timeout: float = DEFAULT_DIAL_TIMEOUT
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT
    hex: bool = False


def _setter(attr: str, convert: Callable[[Any], Any] | None = None
            ) -> Callable[[click.Context, click.Parameter, Any], None]:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        settings = ctx.ensure_object(Settings)
        if value is None or (attr == "hex" and not value):
            return
        if convert is not None:
            try:
                value = convert(value)
            except ValueError as exc:
                raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
        setattr(settings, attr, value)
    return callback


def _write_out(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None and value not in OUTPUT_FORMATS:
        # etcdctl: ExitBadFeature, not a usage error.
        raise CtlError(f"unsupported output format {value!r} (use {', '.join(OUTPUT_FORMATS)})", EXIT_BAD_FEATURE)
    _setter("write_out")(ctx, param, value)


def global_options(hidden: bool) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """etcdctl's global flags. On `ctl` itself they are documented; every
    subcommand takes them too (hidden), so `ctl get k -w json` works as
    `etcdctl get k -w json` does. Their values land in the context's Settings."""
    opts = [
        click.option("--endpoints", default=None, expose_value=False, hidden=hidden,
                     callback=_setter("endpoints", parse_endpoints),
                     help="Comma-separated gRPC endpoints, host:port or http://host:port  "
                          f"[default: {DEFAULT_ENDPOINTS}]"),
        click.option("-w", "--write-out", default=None, expose_value=False, hidden=hidden,
                     metavar="simple|table|json", callback=_write_out,
                     help="Output format: simple (etcdctl's lines), table, or json (stable, for scripts)  "
                          "[default: simple]"),
        click.option("--dial-timeout", default=None, expose_value=False, hidden=hidden,
                     callback=_setter("dial_timeout", parse_duration),
                     help="How long to wait for a connection to an endpoint (Go duration or seconds)  [default: 2s]"),
        click.option("--command-timeout", default=None, expose_value=False, hidden=hidden,
                     callback=_setter("command_timeout", parse_duration),
                     help="Timeout of each request, not counting the dial  [default: 5s]"),
        click.option("--hex", is_flag=True, default=False, expose_value=False, hidden=hidden,
                     callback=_setter("hex"), help="Print keys and values as hex-escaped bytes (\\x..)."),
    ]

    def decorate(f: Callable[..., T]) -> Callable[..., T]:
        for opt in reversed(opts):
            f = opt(f)
        return f
    return decorate


def settings(*formats: str) -> Settings:
    """The global flags of this invocation. With `formats`, the output
    formats the command supports: another -w is refused (as etcdctl refuses
    `get -w table`, exit 4), before any request is sent."""
    s = click.get_current_context().ensure_object(Settings)
    if formats and s.write_out not in formats:
        raise CtlError(f"{s.write_out} not supported as output format", EXIT_BAD_FEATURE)
    return s


def command(name: str, **kwargs: Any) -> Callable[[Callable[..., T]], click.Command]:
    """A `metastore ctl` subcommand; it also takes the global flags."""
    def decorate(f: Callable[..., T]) -> click.Command:
        return click.command(name, cls=CtlCommand, **kwargs)(global_options(hidden=True)(f))
    return decorate


def group(name: str, **kwargs: Any) -> Callable[[Callable[..., T]], click.Group]:
    """A group of `metastore ctl` subcommands (`member`, `endpoint`, ...)."""
    def decorate(f: Callable[..., T]) -> click.Group:
        return click.group(name, cls=CtlGroup, **kwargs)(global_options(hidden=True)(f))
    return decorate


def parse_hex_id(text: str, what: str = "member ID") -> int:
    """A u64 id as etcdctl prints it (hex, no 0x)."""
    s = text.strip()
    if not re.fullmatch(r"[0-9a-fA-F]{1,16}", s):
        raise BadArgs(f"bad {what} arg ({text!r}), expecting ID in Hex (as `member list` prints it)")
    return int(s, 16)


# -- connections ------------------------------------------------------------------------
class Session:
    """Connections to some endpoints. Dialling (a TCP connect, retried until
    the dial timeout) runs for all endpoints in parallel; a request goes to
    the first connected endpoint in --endpoints order, and none connecting
    within the dial timeout is an error that names the endpoints and why."""

    def __init__(self, s: Settings, endpoints: Sequence[Endpoint] | None = None) -> None:
        self.settings = s
        self.endpoints = list(endpoints or s.endpoints)
        self._cond = threading.Condition()
        self._ready: set[Endpoint] = set()
        self._errors: dict[Endpoint, str] = {}
        self._dialling = len(self.endpoints)
        self._channels: dict[Endpoint, grpc.Channel] = {}
        self._closed = False
        self._deadline = time.monotonic() + s.dial_timeout
        for ep in self.endpoints:
            threading.Thread(target=self._dial, args=(ep,), name=f"dial-{ep.target}", daemon=True).start()

    def _dial(self, ep: Endpoint) -> None:
        host, _, port = ep.target.rpartition(":")
        host = host.strip("[]")
        try:
            while not self._closed:
                left = self._deadline - time.monotonic()
                if left <= 0:
                    return
                try:
                    socket.create_connection((host, int(port)), timeout=left).close()
                except OSError as exc:
                    reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
                    with self._cond:
                        self._errors[ep] = reason[:1].lower() + reason[1:]
                    time.sleep(min(0.1, max(self._deadline - time.monotonic(), 0)))
                    continue
                with self._cond:
                    self._ready.add(ep)
                return
        finally:
            with self._cond:
                self._dialling -= 1
                self._cond.notify_all()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()

    def channel(self, ep: Endpoint) -> grpc.Channel:
        with self._cond:
            channel = self._channels.get(ep)
            if channel is None:
                channel = self._channels[ep] = grpc.insecure_channel(ep.target, options=_CHANNEL_OPTIONS)
            return channel

    def connected(self, exclude: Iterable[Endpoint] = (), wait: bool = True) -> Endpoint:
        """An endpoint that is connected and not in `exclude`, the earliest in
        --endpoints order; waits for one until the dial timeout (counted
        from the session's start) has passed."""
        skip = set(exclude)
        with self._cond:
            while True:
                for ep in self.endpoints:
                    if ep in self._ready and ep not in skip:
                        # An earlier endpoint still dialling may win shortly;
                        # do not wait for it: the first that connects serves.
                        return ep
                left = self._deadline - time.monotonic()
                if not wait or left <= 0 or not self._dialling:
                    break
                self._cond.wait(min(left, 0.05))
            errors = dict(self._errors)
        candidates = [ep for ep in self.endpoints if ep not in skip] or self.endpoints
        limit = f"within the dial timeout ({self.settings.dial_timeout:g}s)"
        if len(candidates) == 1:
            ep = candidates[0]
            why = errors.get(ep, "timed out")
            raise CtlError(f"cannot connect to {ep.shown} {limit}: {why}; is a member running there?")
        whys = ", ".join(f"{ep.shown} ({errors.get(ep, 'timed out')})" for ep in candidates)
        raise CtlError(f"cannot connect to any endpoint {limit}: {whys}")

    def call(self, fn: Callable[[grpc.Channel, float], T], *, repeatable: bool,
             timeout: float | None = None) -> T:
        """`fn(channel, timeout)` on a connected endpoint. UNAVAILABLE moves on
        to another endpoint for a repeatable request (a read), and for a
        write only when it never reached the server."""
        tried: list[Endpoint] = []
        limit = timeout if timeout is not None else self.settings.command_timeout
        while True:
            ep = self.connected(tried, wait=not tried)
            try:
                return fn(self.channel(ep), limit)
            except grpc.RpcError as err:
                tried.append(ep)
                details = (err.details() or "").lower()
                never_sent = "failed to connect" in details or "connection refused" in details
                if err.code() is grpc.StatusCode.UNAVAILABLE and (repeatable or never_sent):
                    try:
                        self.connected(tried, wait=False)
                        continue
                    except CtlError:
                        pass
                raise CtlError(rpc_error_message(err, ep.shown, limit)) from None


def per_endpoint(s: Settings, endpoints: Sequence[Endpoint],
                 fn: Callable[[Session, Endpoint], T]) -> list[tuple[Endpoint, T | None, str | None]]:
    """Run `fn` against each endpoint on its own connection, all in parallel
    (so unreachable ones cost one dial timeout, not one each); results in
    the order of `endpoints`: (endpoint, result, None) or (endpoint, None,
    error message)."""
    results: list[tuple[Endpoint, T | None, str | None]] = [(ep, None, "not run") for ep in endpoints]

    def run(i: int, ep: Endpoint) -> None:
        try:
            with Session(s, [ep]) as session:
                results[i] = (ep, fn(session, ep), None)
        except click.ClickException as exc:
            results[i] = (ep, None, exc.format_message())
        except grpc.RpcError as err:
            results[i] = (ep, None, rpc_error_message(err, ep.shown, s.command_timeout))
        except Exception as exc:  # noqa: BLE001 - reported per endpoint, never a traceback
            results[i] = (ep, None, f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run, args=(i, ep), daemon=True) for i, ep in enumerate(endpoints)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# -- output ----------------------------------------------------------------------------
def out(data: bytes | str) -> None:
    """Write to stdout as bytes (keys and values need not be UTF-8)."""
    if isinstance(data, str):
        data = data.encode()
    sys.stdout.buffer.write(data)


def flush() -> None:
    sys.stdout.buffer.flush()


def hex_escape(data: bytes) -> bytes:
    """etcdctl --hex: every byte as \\xNN."""
    return "".join(f"\\x{b:02x}" for b in data).encode()


def kv_text(kv: Any, hex_: bool = False, value_only: bool = False) -> bytes:
    """etcdctl's printKV: the key line (unless value_only), then the value line."""
    key, value = bytes(kv.key), bytes(kv.value)
    if hex_:
        key, value = hex_escape(key), hex_escape(value)
    return (b"" if value_only else key + b"\n") + value + b"\n"


def go_json(msg: Any) -> dict:
    """A protobuf message as etcdctl's JSON writer prints it (Go's
    encoding/json on the generated structs): fields by their .proto names,
    in field-number order, zero values omitted, bytes in base64, enums and
    64-bit integers as numbers."""
    return {fd.name: _go_value(fd, value) for fd, value in msg.ListFields()}


def _go_scalar(fd: Any, value: Any) -> Any:
    if fd.type == fd.TYPE_MESSAGE:
        return go_json(value)
    if fd.type == fd.TYPE_BYTES:
        return base64.b64encode(value).decode()
    return value


def _go_value(fd: Any, value: Any) -> Any:
    if fd.is_repeated:
        return [_go_scalar(fd, v) for v in value]
    return _go_scalar(fd, value)


def json_text(obj: Any) -> str:
    """Compact JSON on one line, escaped as Go's encoding/json escapes."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text + "\n"


def print_json(obj: Any) -> None:
    out(json_text(obj))


def table_text(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """etcdctl's tables (olekukonko/tablewriter as etcdctl configures it):
    upper-case centred header, right-aligned cells."""
    head = [h.upper() for h in header]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def centre(s: str, w: int) -> str:
        gap = w - len(s)
        return " " * (gap // 2) + s + " " * (gap - gap // 2)

    lines = [line, "| " + " | ".join(centre(h, w) for h, w in zip(head, widths)) + " |", line]
    lines += ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.append(line)
    return "\n".join(lines) + "\n"


def humanize_bytes(n: int) -> str:
    """go-humanize's Bytes (SI units), as etcdctl prints DB SIZE."""
    if n < 10:
        return f"{n} B"
    sizes = ["B", "kB", "MB", "GB", "TB", "PB", "EB"]
    e = min(int(math.floor(math.log(n) / math.log(1000))), len(sizes) - 1)
    val = math.floor(n / 1000 ** e * 10 + 0.5) / 10
    return f"{val:.0f} {sizes[e]}" if val >= 10 else f"{val:.1f} {sizes[e]}"
