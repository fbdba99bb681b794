"""`metastore ctl drain start|status|cancel|list`: drain a member from the
command line, and see every member's liveness.

The drain API is HTTP (api/placement_http.py, on each member's
--listen-metrics-urls listener), while the ctl's --endpoints are gRPC. So
the HTTP listener is found through metastorepb.Raft/GetRaftStatus, whose
`http_urls` says where the answering member serves HTTP; `--http-url`
skips that step. Any member answers the API (it forwards nothing: every
answer comes from the replicated store after a read barrier), so one
listener is enough. `ctl_cluster` uses the same client for the LIVENESS
column of `member list -w table`.

Only the standard library speaks HTTP here (http.client): the ctl gains no
dependency for a handful of JSON requests.
"""
from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence, TypeVar
from urllib.parse import quote, urlsplit

import click
import grpc

from metastore.api.pb import metastore_pb2, metastore_pb2_grpc
from metastore.cmd.ctl_common import (
    EXIT_INTERRUPTED, BadArgs, CtlError, Endpoint, Session, Settings, command, flush, group, out, parse_duration,
    print_json, rpc_error_message, settings, table_text)

T = TypeVar("T")

_HTTP_URL_KEY = "metastore.ctl.http_urls"  # in click's ctx.meta: shared by the group and its subcommands
DEFAULT_INTERVAL = 0.5
_WILDCARD_HOSTS = {"", "0.0.0.0", "::"}


# -- the HTTP client ---------------------------------------------------------------------
class Unavailable(CtlError):
    """No listener answered, or every one answered 5xx: worth retrying later
    (a poll of `--watch` does), unlike a refusal (4xx)."""


@dataclass(frozen=True)
class PlacementApi:
    """JSON requests to the placement API at `urls`, tried in order: a
    listener that cannot be reached or answers 5xx (no leader right now)
    passes the request to the next, since any member answers; a 4xx is the
    server's final word and is raised as `Error: <its message>`."""

    urls: Sequence[str]
    dial_timeout: float
    command_timeout: float

    def request(self, method: str, path: str, body: Any = None) -> Any:
        failures: list[str] = []
        answered = False  # some listener answered, with a 5xx
        for url in self.urls:
            try:
                status, doc = self._once(url, method, path, body)
            except (OSError, http.client.HTTPException) as exc:
                failures.append(f"{url}: {_os_reason(exc)}")
                continue
            if status >= 500:
                answered = True
                failures.append(f"{url}: {_error_text(doc, status)} (HTTP {status})")
                continue
            if status >= 400:
                raise CtlError(_refusal(url, path, doc, status))
            return doc
        if answered:
            raise Unavailable("the placement API is unavailable, retry: " + "; ".join(failures))
        raise Unavailable("cannot reach the placement API at " + "; ".join(failures))

    def _once(self, url: str, method: str, path: str, body: Any) -> tuple[int, Any]:
        """One request on its own connection: connect within the dial
        timeout, then the command timeout for the answer (as gRPC requests
        count them)."""
        parts = urlsplit(url)
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(parts.hostname or "127.0.0.1", parts.port, timeout=self.dial_timeout)
        try:
            conn.connect()
            conn.sock.settimeout(self.command_timeout)
            data = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json", "Accept": "application/json"} if data else \
                {"Accept": "application/json"}
            conn.request(method, parts.path.rstrip("/") + path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            doc = json.loads(raw) if raw else None
        except ValueError:
            doc = {"error": raw.decode(errors="replace").strip()[:300]}
        return resp.status, doc

    def get(self, path: str) -> Any:
        return self.request("GET", path)


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text[:1].lower() + text[1:]


def _error_text(doc: Any, status: int) -> str:
    if isinstance(doc, dict) and isinstance(doc.get("error"), str) and doc["error"]:
        return doc["error"]
    return f"HTTP {status}"


def _refusal(url: str, path: str, doc: Any, status: int) -> str:
    """The server's message; a 404 for the path itself means the member's
    listener has no placement API (an older metastore), which its bare
    "no such path" would not tell."""
    text = _error_text(doc, status)
    if status == 404 and text.startswith("no such path"):
        return f"{url} does not serve the placement API ({text}); is it an older metastore?"
    return text


# -- finding the listener ------------------------------------------------------------------
def _reachable(url: str, via: Endpoint) -> str | None:
    """A listener URL as a client can dial it: a wildcard host (a member
    listening on 0.0.0.0) is reached at the host its gRPC endpoint was
    reached at. None for what is not an http(s) URL."""
    parts = urlsplit(url.strip())
    try:
        port = parts.port
    except ValueError:  # not a number, or out of range
        return None
    if parts.scheme not in ("http", "https") or port is None:
        return None
    host = parts.hostname or ""
    if host in _WILDCARD_HOSTS:
        host = via.target.rpartition(":")[0].strip("[]")
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}:{port}{parts.path.rstrip('/')}"


def raft_status(session: Session, ep: Endpoint) -> metastore_pb2.GetRaftStatusResponse:
    return metastore_pb2_grpc.RaftStub(session.channel(ep)).GetRaftStatus(
        metastore_pb2.GetRaftStatusRequest(), timeout=session.settings.command_timeout)


def discover_http_urls(session: Session) -> list[str]:
    """The HTTP listener of the first endpoint (in --endpoints order) that
    answers GetRaftStatus and has one. Endpoints that cannot be reached are
    skipped; none reachable is the session's usual connection error."""
    tried: list[Endpoint] = []
    why: list[str] = []
    while len(tried) < len(session.endpoints):
        try:
            ep = session.connected(tried)
        except CtlError:
            if not tried:
                raise  # nothing connects: "cannot connect to ... : connection refused"
            break
        tried.append(ep)
        try:
            status = raft_status(session, ep)
        except grpc.RpcError as err:
            why.append(f"{ep.shown}: {rpc_error_message(err, ep.shown, session.settings.command_timeout)}")
            continue
        urls = [u for u in (_reachable(raw, ep) for raw in status.http_urls) if u]
        if urls:
            return urls
        why.append(f"{ep.shown}: no HTTP listener")
    raise CtlError("no member at --endpoints serves HTTP, which the drain API needs ("
                   + "; ".join(why) + "): start members with --listen-metrics-urls "
                   "(e.g. --listen-metrics-urls http://127.0.0.1:2381), or give --http-url")


def parse_http_urls(text: str) -> list[str]:
    """--http-url: comma-separated http(s)://host:port (a bare host:port means http)."""
    urls = []
    for raw in (part.strip() for part in text.split(",")):
        if not raw:
            continue
        url = raw if "://" in raw else f"http://{raw}"
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
            raise ValueError(f"{raw!r} is not an HTTP URL such as http://127.0.0.1:2381")
        urls.append(url.rstrip("/"))
    if not urls:
        raise ValueError("no URL given")
    return urls


def _store_http_urls(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is None:
        return
    try:
        ctx.meta[_HTTP_URL_KEY] = parse_http_urls(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


def http_url_option(f: Callable[..., T]) -> Callable[..., T]:
    """--http-url, on the group and on each subcommand (like the global
    flags, it goes before or after the subcommand)."""
    return click.option("--http-url", default=None, expose_value=False, callback=_store_http_urls,
                        metavar="URLS",
                        help="The placement API's URL(s), e.g. http://127.0.0.1:2381; skips finding a "
                             "member's HTTP listener through GetRaftStatus on --endpoints.")(f)


def placement_api(s: Settings) -> PlacementApi:
    urls = click.get_current_context().meta.get(_HTTP_URL_KEY)
    if not urls:
        with Session(s) as session:
            urls = discover_http_urls(session)
    return PlacementApi(urls, s.dial_timeout, s.command_timeout)


def member_liveness(session: Session) -> dict[int, str]:
    """member id -> liveness, from GET /api/v2/captures through the session's
    endpoints; empty when that is not reachable (for `member list`, whose
    LIVENESS column then stays blank rather than failing the listing)."""
    s = session.settings
    try:
        api = PlacementApi(discover_http_urls(session), s.dial_timeout, s.command_timeout)
        captures = api.get("/api/v2/captures")["captures"]
        return {int(c["member_id"], 16): str(c["liveness"]) for c in captures}
    except (CtlError, KeyError, TypeError, ValueError):
        return {}


# -- output -------------------------------------------------------------------------------
def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _duration(seconds: float) -> str:
    """1.2s, 2m03s, 1h02m03s: elapsed times as people read them."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    h, rest = divmod(whole, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


def _name(doc: dict, fallback: str = "") -> str:
    return str(doc.get("name") or doc.get("member_id") or fallback)


def _label(doc: dict) -> str:
    name, mid = doc.get("name") or "", doc.get("member_id") or ""
    return f"{name} ({mid})" if name and mid else name or mid


def is_draining(doc: dict) -> bool:
    """Still draining: the drain state names the member (or it is still
    DRAINING while the coordinator records the end)."""
    return bool(doc.get("is_draining")) or doc.get("liveness") == "DRAINING"


def status_line(doc: dict) -> str:
    """One line for people: where the drain of this member stands."""
    if is_draining(doc):
        workloads = _count(doc.get("initial_maintainer_count", 0), "workload")
        subunits = _count(doc.get("initial_dispatcher_count", 0), "sub-unit")
        line = (f"{_label(doc)}: DRAINING for {_duration(float(doc.get('elapsed_seconds', 0)))}, "
                f"{doc.get('remaining_maintainer_count', 0)} of {workloads} and "
                f"{doc.get('remaining_dispatcher_count', 0)} of {subunits} left")
        if doc.get("deadline"):
            line += f", deadline {doc['deadline']}"
    else:
        line = f"{_label(doc)}: {doc.get('liveness', '?')}, not draining"
        other = doc.get("draining_capture_id")
        if other and other != doc.get("member_id"):
            line += f" (member {other} is being drained)"
    if doc.get("online") is False:
        line += "; offline"
    return line + "\n"


STATUS_HEADER = ["member", "ID", "liveness", "online", "draining", "remaining workloads", "remaining sub-units",
                 "initial workloads", "initial sub-units", "started", "elapsed"]


def status_row(doc: dict) -> list[str]:
    mine = bool(doc.get("is_draining"))
    return [str(doc.get("name", "")), str(doc.get("member_id", "")), str(doc.get("liveness", "")),
            str(bool(doc.get("online"))).lower(), str(mine).lower(),
            str(doc.get("remaining_maintainer_count", "")), str(doc.get("remaining_dispatcher_count", "")),
            str(doc.get("initial_maintainer_count", "")) if mine else "",
            str(doc.get("initial_dispatcher_count", "")) if mine else "",
            str(doc.get("start_time", "")),
            _duration(float(doc["elapsed_seconds"])) if mine and "elapsed_seconds" in doc else ""]


MEMBERS_HEADER = ["member", "ID", "liveness", "online", "coordinator", "workloads", "sub-units"]


def members_rows(captures: Iterable[dict]) -> list[list[str]]:
    return [[str(c.get("name", "")), str(c.get("member_id", "")), str(c.get("liveness", "")),
             str(bool(c.get("online"))).lower(), str(bool(c.get("is_coordinator"))).lower(),
             str(c.get("workloads", "")), str(c.get("subunits", ""))] for c in captures]


# -- following a drain ---------------------------------------------------------------------
def drain_path(member: str) -> str:
    if not member.strip():
        raise BadArgs("MEMBER must be a member name or hex id (as `member list` prints them)")
    return f"/api/v2/captures/{quote(member, safe='')}/drain"


def _poll(api: PlacementApi, path: str, budget: float, interval: float) -> dict:
    """GET the drain status; no member answering (or no leader: 503) is
    retried for up to `budget` seconds, so a leader election does not end
    a watch. A refusal (404 ...) ends it at once."""
    give_up = time.monotonic() + budget
    while True:
        try:
            return api.get(path)
        except Unavailable:
            if time.monotonic() >= give_up:
                raise
            time.sleep(interval)


def follow(api: PlacementApi, member: str, interval: float, fmt: str, budget: float,
           started: bool = False) -> None:
    """Poll until the drain is over. For people, a line each time the
    progress changes, then "drain of M complete: STOPPING"; with -w json,
    each poll's status document on its own line. Returns (exit 0) when the
    member is STOPPING; a drain that ends otherwise (cancelled, or
    abandoned because the member went offline or restarted) is an error,
    exit 5, as a watch the server cancels. `started`: this command began
    the drain, so not finding it any more means it ended, not that there
    was none."""
    path = drain_path(member)
    last: tuple | None = None
    seen_draining = started
    while True:
        doc = _poll(api, path, budget, interval)
        if fmt == "json":
            print_json(doc)
        draining = is_draining(doc)
        progress = (doc.get("liveness"), draining, doc.get("remaining_maintainer_count"),
                    doc.get("remaining_dispatcher_count"))
        if fmt != "json" and draining and progress != last:
            out(status_line(doc))
        flush()
        last = progress
        if not draining:
            break
        seen_draining = True
        time.sleep(interval)
    _finish(doc, member, seen_draining, fmt)


def _finish(doc: dict, member: str, seen_draining: bool, fmt: str) -> None:
    who = _name(doc, member)
    if doc.get("liveness") == "STOPPING":
        if fmt != "json":
            out(f"drain of {who} complete: STOPPING\n")
        return
    state = doc.get("liveness", "?")
    if seen_draining:
        raise CtlError(f"drain of {who} ended without completing: it is {state} again (the drain was "
                       f"cancelled, or abandoned because the member went offline or restarted)", EXIT_INTERRUPTED)
    other = doc.get("draining_capture_id")
    busy = f"; member {other} is being drained" if other and other != doc.get("member_id") else ""
    raise CtlError(f"{who} is not being drained (it is {state}{busy})")


# -- commands --------------------------------------------------------------------------------
_interval_option = click.option(
    "--interval", default=str(DEFAULT_INTERVAL), show_default=True, metavar="DURATION",
    help="How often to poll while following a drain (Go duration or seconds).")


def _interval(value: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise BadArgs(f"--interval: {exc}") from None


@group("drain")
@http_url_option
def drain() -> None:
    """Drain a member: move its workloads to the others, then leave it
    STOPPING (out of scheduling until `drain cancel`). MEMBER is a member
    name or hex id. Needs a member's HTTP listener (--listen-metrics-urls),
    found through --endpoints, or --http-url.

    \b
      metastore ctl drain start m2 --wait
      metastore ctl drain status m2 -w table
      metastore ctl drain status m2 --watch
      metastore ctl drain cancel m2
      metastore ctl drain list -w table
    """


@command("start")
@click.argument("member")
@click.option("--deadline", default=None, metavar="DURATION",
              help="After this long (e.g. 10m, 90s), move what is left at once instead of one batch at a time.")
@click.option("--wait", is_flag=True, help="Follow the drain until it is over, as `status --watch`: exit 0 "
                                           "once the member is STOPPING, 5 if the drain ends otherwise.")
@_interval_option
@http_url_option
def drain_start(member: str, deadline: str | None, wait: bool, interval: str) -> None:
    """Start draining MEMBER (PUT /api/v2/captures/MEMBER/drain); prints
    what it has to move. The coordinator (the Raft leader) cannot be
    drained: move leadership first (`move-leader`). Starting a drain of
    the member already draining is harmless. `-w json`: the server's answer
    ({"current_maintainer_count", "current_dispatcher_count"}), then with
    --wait one status document per poll."""
    s = settings("simple", "json")
    path = drain_path(member)
    every = _interval(interval)
    body = None
    if deadline is not None:
        try:
            body = {"deadline_seconds": parse_duration(deadline)}
        except ValueError as exc:
            raise BadArgs(f"--deadline: {exc}") from None
    api = placement_api(s)
    counts = api.request("PUT", path, body)
    if s.write_out == "json":
        print_json(counts)
    else:
        out(f"draining {member}: {_count(int(counts.get('current_maintainer_count', 0)), 'workload')} and "
            f"{_count(int(counts.get('current_dispatcher_count', 0)), 'sub-unit')} to move\n")
    flush()
    if wait:
        follow(api, member, every, s.write_out, s.command_timeout, started=True)


@command("status")
@click.argument("member")
@click.option("--watch", is_flag=True, help="Follow the drain until it is over: a line per change (-w json: "
                                            "a status document per poll); exit 0 once the member is "
                                            "STOPPING, 5 if the drain ends otherwise.")
@_interval_option
@http_url_option
def drain_status(member: str, watch: bool, interval: str) -> None:
    """Where the drain of MEMBER stands (GET /api/v2/captures/MEMBER/drain):
    liveness (ALIVE, DRAINING, STOPPING), whether it is being drained, the
    workloads and sub-units left and at the start, when it started and how
    long ago. `-w json`: the server's status document."""
    s = settings("simple", "json") if watch else settings()
    path = drain_path(member)
    every = _interval(interval)
    api = placement_api(s)
    if watch:
        follow(api, member, every, s.write_out, s.command_timeout)
        return
    doc = api.get(path)
    if s.write_out == "json":
        print_json(doc)
    elif s.write_out == "table":
        out(table_text(STATUS_HEADER, [status_row(doc)]))
    else:
        out(status_line(doc))


@command("cancel")
@click.argument("member")
@http_url_option
def drain_cancel(member: str) -> None:
    """Cancel the drain of MEMBER, or undrain it once STOPPING (DELETE
    /api/v2/captures/MEMBER/drain): it is ALIVE and takes work again.
    Harmless for a member that is neither. `-w json`: the server's status
    document after the change."""
    s = settings("simple", "json")
    path = drain_path(member)
    api = placement_api(s)
    before = api.get(path)  # only to say what was undone
    after = api.request("DELETE", path)
    if s.write_out == "json":
        print_json(after)
        return
    who, state = _name(after, member), after.get("liveness", "?")
    if is_draining(before):
        out(f"drain of {who} cancelled: {state}\n")
    elif before.get("liveness") == "STOPPING":
        out(f"{who} undrained: {state}\n")
    else:
        out(f"{who} was not being drained: {state}\n")


@command("list")
@http_url_option
def drain_list() -> None:
    """Every member with its liveness, whether it is online (its session
    lives), whether it coordinates (the Raft leader), and the workloads and
    sub-units it runs (GET /api/v2/captures). Also `drain members`.
    `-w json`: the server's {"captures": [...]}."""
    s = settings()
    doc = placement_api(s).get("/api/v2/captures")
    captures = doc.get("captures", []) if isinstance(doc, dict) else []
    if s.write_out == "json":
        print_json(doc)
    elif s.write_out == "table":
        out(table_text(MEMBERS_HEADER, members_rows(captures)))
    else:
        out("".join(", ".join(row) + "\n" for row in members_rows(captures)))


for _cmd in (drain_start, drain_status, drain_cancel, drain_list):
    drain.add_command(_cmd)
drain.add_command(drain_list, "members")
