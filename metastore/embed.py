"""Run a metastore member inside your own process.

    from metastore import embed

    with embed.member(name="app", data_dir="/var/lib/app/metastore") as m:
        client = m.client()                      # a metastore.client.Client
        client.put("config/a", "1")

`start(...)` (or `member(...)`, the same function, for `with` statements)
takes `metastore serve`'s settings as `ServerConfig` field names (name,
data_dir, listen_client_urls, advertise_client_urls, listen_peer_urls,
initial_advertise_peer_urls, initial_cluster, initial_cluster_token, engine,
peer_secret, heartbeat_interval_ms, election_timeout_ms, snapshot_count, ...),
runs `api.server.Server` on an asyncio event loop of its own in a background
thread, and returns once the member is ready: a leader is elected, a
linearizable read is answered and the member's client URLs are published.
Your code may be synchronous, or run its own event loop.

Defaults differ from `metastore serve` only where a library must not grab
fixed ports: without listen_client_urls / listen_peer_urls the member listens
on free loopback ports (the peer URL is taken from initial_cluster when that
names this member). Ports chosen that way are remembered in the data dir
(`embed.json`) and reused when the member starts on it again: a member's id
derives from its peer URL, so another port would make it another member. It
serves no HTTP metrics listener unless listen_metrics_urls is given.
data_dir defaults to "<name>.metastore" in the current directory, as for
`metastore serve`.

Several members -- in one process or in several, embedded or `metastore
serve` -- form one cluster from the same initial_cluster and
initial_cluster_token. A member is ready only once a majority of them runs, so
start the members of one process with wait=False and then `wait_ready()` each.
initial_cluster_state means what it means for `metastore serve`.

start() blocks until the member is ready; from async code, call it with
`await asyncio.to_thread(embed.start, ...)` to keep your own loop running.

`stop()` is idempotent, runs on `with` exit, and at interpreter exit for any
member still running (before Python waits for non-daemon threads: pysyncobj's
Raft thread is one).
"""
from __future__ import annotations

import asyncio
# Imported before the exit hook below is registered so that its own hook
# (which refuses new executor work) runs after ours: stopping a member uses
# the event loop's default executor.
import concurrent.futures.thread  # noqa: F401
import dataclasses
import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
import weakref
from typing import Any, Sequence

from metastore import errors, event_loop
from metastore.api.pb import rpc_pb2
from metastore.client import Client
from metastore.cluster import parse_initial_cluster, parse_urls
from metastore.config import ConfigError, ServerConfig
from metastore.embed_placement import PlacementClient
from metastore.member_agent import AssignHook, ReleaseHook

__all__ = ["start", "member", "Member", "StartError", "NotReadyError", "ConfigError", "make_config",
           "free_ports", "loopback_url"]

log = logging.getLogger("metastore.embed")

DEFAULT_READY_TIMEOUT = 30.0
_URL_FIELDS = ("listen_client_urls", "advertise_client_urls", "listen_peer_urls", "initial_advertise_peer_urls",
               "listen_metrics_urls", "listen_client_http_urls")
_FIELDS = {f.name for f in dataclasses.fields(ServerConfig)}


class StartError(RuntimeError):
    """The member could not start (a port in use, a data dir it cannot open,
    ...); the message says why, the cause is chained."""


class NotReadyError(StartError, TimeoutError):
    """The member runs but did not become ready in time (e.g. no majority of
    the initial cluster is up)."""


# -- ports ---------------------------------------------------------------------
def free_ports(count: int = 1, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct TCP ports free on `host` a moment ago (another process
    could take one before the member binds it; the start then fails cleanly)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def loopback_url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


# -- configuration ------------------------------------------------------------------
# In the data dir: the loopback URLs chosen for a member started without
# listen URLs, reused when it starts again on that data dir (a member's id
# derives from its peer URL, so a new port would make it another member).
_PORTS_FILE = "embed.json"


def make_config(config: ServerConfig | None = None, **fields: Any) -> ServerConfig:
    """The resolved ServerConfig `start` runs with: `config` (or the embedding
    defaults described in the module docstring) with `fields` applied. URL
    fields take a list or a comma-separated string. Raises ConfigError."""
    return _make_config(config, fields)[0]


def _make_config(config: ServerConfig | None, fields: dict[str, Any]) -> tuple[ServerConfig, dict[str, list[str]]]:
    """(resolved config, the listen URLs chosen by default rather than given)."""
    unknown = sorted(set(fields) - _FIELDS)
    if unknown:
        raise TypeError(f"unknown metastore setting(s) {', '.join(unknown)}; "
                        f"valid: {', '.join(sorted(_FIELDS))}")
    fields = dict(fields)
    for name in _URL_FIELDS:
        if isinstance(fields.get(name), str):
            try:
                fields[name] = parse_urls(fields[name])
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}") from None
    if config is not None:
        return dataclasses.replace(config, **fields).resolved(), {}
    name = fields.get("name") or "default"
    remembered = _remembered_urls(fields.get("data_dir") or f"{name}.metastore")
    chosen: dict[str, list[str]] = {}
    if not fields.get("listen_client_urls"):
        fields["listen_client_urls"] = chosen["listen_client_urls"] = (
            remembered.get("listen_client_urls") or [loopback_url(free_ports(1)[0])])
    if not fields.get("listen_peer_urls"):
        mine: list[str] = []
        if fields.get("initial_cluster"):
            try:
                mine = parse_initial_cluster(fields["initial_cluster"]).get(name) or []
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        given = list(fields.get("initial_advertise_peer_urls") or []) or mine
        if given:
            fields["listen_peer_urls"] = given[:1]
        else:
            fields["listen_peer_urls"] = chosen["listen_peer_urls"] = (
                remembered.get("listen_peer_urls") or [loopback_url(free_ports(1)[0])])
    if not fields.get("initial_advertise_peer_urls"):
        fields["initial_advertise_peer_urls"] = list(fields["listen_peer_urls"])
    fields.setdefault("listen_metrics_urls", [])
    return ServerConfig(**fields).resolved(), chosen


def _remembered_urls(data_dir: str) -> dict[str, list[str]]:
    try:
        with open(os.path.join(data_dir, _PORTS_FILE)) as f:
            found = json.load(f)
        return {k: list(v) for k, v in found.items() if k in ("listen_client_urls", "listen_peer_urls")}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def _remember_urls(data_dir: str, chosen: dict[str, list[str]]) -> None:
    """Record default-chosen URLs before the member first starts (its data dir
    is bound to its peer URL from then on)."""
    if not chosen:
        return
    merged = {**_remembered_urls(data_dir), **chosen}
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, _PORTS_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(merged, f)
    os.replace(path + ".tmp", path)


# -- the member -------------------------------------------------------------------------
class Member:
    """A member running in this process. Create it with `start()`."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._stop_requested = threading.Event()
        self._started = threading.Event()   # Server.start finished or failed
        self._start_error: BaseException | None = None
        self._stop_lock = threading.Lock()
        self._grace = 1.0
        self._clients: weakref.WeakSet[Client] = weakref.WeakSet()
        self.server: Any = None  # api.server.Server, lives on the member's loop
        self.node: Any = None    # its metastore.node.Node
        self._hooks: tuple[AssignHook | None, ReleaseHook | None] = (None, None)
        # Workloads and drain: register, list, report sub-units, drain members.
        self.placement = PlacementClient(self)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<metastore member {self.name} {','.join(self.client_urls)} {state}>"

    # -- what callers need -------------------------------------------------------
    @property
    def name(self) -> str:
        return self.config.name

    @property
    def data_dir(self) -> str:
        return self.config.data_dir

    @property
    def client_urls(self) -> list[str]:
        """Where clients reach this member (its advertised client URLs)."""
        return list(self.config.advertise_client_urls)

    @property
    def endpoints(self) -> list[str]:
        """client_urls as host:port (etcdctl --endpoints, gRPC targets)."""
        return [u.split("://", 1)[-1] for u in self.client_urls]

    @property
    def peer_urls(self) -> list[str]:
        return list(self.config.initial_advertise_peer_urls)

    @property
    def member_id(self) -> int:
        """The etcd member id (0 before the member has started)."""
        return self.node.member_id if self.node is not None else 0

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The member's event loop (for `asyncio.run_coroutine_threadsafe`
        with `server`/`node`; nothing else may touch them)."""
        return self._loop

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop_requested.is_set()

    def client(self, endpoints: Sequence[str] | None = None, **kwargs: Any) -> Client:
        """A client on this member (or on `endpoints`); closed when the member stops."""
        c = Client(list(endpoints) if endpoints else self.client_urls, **kwargs)
        self._clients.add(c)
        return c

    def __enter__(self) -> "Member":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- lifecycle -------------------------------------------------------------------
    def _start(self, wait: bool, timeout: float) -> None:
        if self._thread is not None:
            raise RuntimeError(f"member {self.name} was already started")
        self._thread = threading.Thread(target=self._thread_main, name=f"metastore-{self.name}", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._thread.join()
            err = self._start_error
            raise StartError(f"metastore member {self.name!r} could not start: {err}") from err
        _running.add(self)
        if wait:
            try:
                self.wait_ready(timeout)
            except BaseException:
                self.stop()
                raise

    def wait_ready(self, timeout: float = DEFAULT_READY_TIMEOUT) -> None:
        """Return once the member has a leader, answers a linearizable read and
        has published its client URLs; NotReadyError after `timeout` s."""
        deadline = time.monotonic() + timeout
        problem = "not started"
        while True:
            loop = self._loop
            if self._thread is None or not self._thread.is_alive() or loop is None or self._stop_requested.is_set():
                raise StartError(f"metastore member {self.name!r} is not running")
            future = asyncio.run_coroutine_threadsafe(self._probe(), loop)
            try:
                problem = future.result(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            except concurrent.futures.TimeoutError:
                future.cancel()
                problem = "its event loop did not answer"
            except Exception as exc:  # noqa: BLE001 - reported if it persists
                problem = f"readiness check failed: {exc!r}"
            if problem is None:
                return
            if time.monotonic() >= deadline:
                raise NotReadyError(f"metastore member {self.name!r} not ready after {timeout:g} s: {problem}")
            time.sleep(0.05)

    async def _probe(self) -> str | None:
        """What keeps the member from being ready, or None (runs on its loop)."""
        node = self.node
        if not node.raft_status().leader_id:
            members = self.config.initial_members()
            if len(members) == 1:
                return "no leader elected yet"
            return (f"no leader elected yet: a majority of the {len(members)} members of initial_cluster "
                    f"({self.config.initial_cluster}) must be running")
        try:
            await asyncio.wait_for(node.range(rpc_pb2.RangeRequest(key=b"\0metastore-embed-ready")), 2.0)
        except errors.EtcdError as err:
            return f"a linearizable read failed: {err.message}"
        except asyncio.TimeoutError:
            return "a linearizable read did not complete"
        me = node.membership.get(node.member_id)
        if me is None or list(me.client_urls) != list(self.config.advertise_client_urls):
            return "its client URLs are not published yet"
        return None

    def stop(self, grace: float = 1.0, timeout: float = 30.0) -> None:
        """Stop the member (idempotent): close the clients made by client(),
        end client streams (after `grace` s for calls in flight), stop Raft
        and close the store. Waits up to `timeout` s for the thread to end."""
        thread = self._thread
        if thread is not None and threading.current_thread() is thread:
            raise RuntimeError("stop() called on the member's own event loop thread; call it from another thread")
        with self._stop_lock:
            clients, self._clients = list(self._clients), weakref.WeakSet()
            for c in clients:
                c.close()
            if not self._stop_requested.is_set():
                self._grace = grace
                self._stop_requested.set()
                self._wake()
            if thread is not None:
                thread.join(timeout)
                if thread.is_alive():
                    log.warning("metastore member %s did not stop within %g s; where it is:\n%s",
                                self.name, timeout, self._where(thread))
                    return
            _running.discard(self)

    def _where(self, thread: threading.Thread) -> str:
        """The member thread's stack and its event loop's unfinished tasks, for
        a stop that does not end (best effort: read from another thread)."""
        lines: list[str] = []
        frame = sys._current_frames().get(thread.ident or 0)
        if frame is not None:
            lines += traceback.format_stack(frame)
        loop = self._loop
        if loop is not None:
            try:
                tasks = list(asyncio.all_tasks(loop))
            except RuntimeError:  # the set changed while being read
                tasks = []
            for task in tasks:
                frames = _awaiting(task.get_coro())
                if not frames or any(f.f_code.co_filename.endswith(".pyx.pxi") for f in frames):
                    continue  # grpc's own waits for the next call
                lines.append(f"task {task.get_name()}: " + " -> ".join(
                    f"{f.f_code.co_name} ({os.path.basename(f.f_code.co_filename)}:{f.f_lineno})"
                    for f in frames) + "\n")
        return "".join(lines)

    def _wake(self) -> None:
        loop, event = self._loop, self._stop_event
        if loop is not None and event is not None:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop has already closed
                pass

    # -- the member's thread -------------------------------------------------------------
    def _thread_main(self) -> None:
        try:
            event_loop.run(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported to start() or logged
            if not self._started.is_set():
                self._start_error = exc
            else:
                log.exception("metastore member %s stopped with an error", self.name)
        finally:
            self._started.set()

    async def _serve(self) -> None:
        from metastore.api.server import Server
        from metastore.node import Node

        self._stop_event = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        if self._stop_requested.is_set():  # stop() ran before the loop existed
            self._stop_event.set()
        server = None
        try:
            server = Server(Node(self.config))
            server.node.placement.agent.on_assign, server.node.placement.agent.on_release = self._hooks
            await server.start()
        except BaseException as exc:
            self._start_error = exc
            if server is not None:
                try:
                    # Release the ports, the Raft node and the database lock.
                    await server.stop(grace=0)
                except Exception:  # noqa: BLE001 - the start error is the one to report
                    log.exception("cleaning up after the failed start of %s", self.name)
            return
        self.server, self.node = server, server.node
        log.info("member %s (%x) serving clients on %s", self.name, server.node.member_id,
                 ",".join(self.config.listen_client_urls))
        self._started.set()
        try:
            removed = asyncio.ensure_future(server.node.removed.wait())
            failed = asyncio.ensure_future(server.node.failed.wait())
            stop = asyncio.ensure_future(self._stop_event.wait())
            await asyncio.wait([stop, removed, failed], return_when=asyncio.FIRST_COMPLETED)
            for waiter in (stop, removed, failed):
                waiter.cancel()
            if server.node.removed.is_set():
                log.error("member %s was removed from the cluster: stopping it", self.name)
            if server.node.failed.is_set():
                log.error("member %s stops: %s", self.name, server.node.failure)
        finally:
            await server.stop(self._grace)
            log.info("member %s stopped", self.name)


def _awaiting(coro: Any, depth: int = 24) -> list[Any]:
    """The frames of a suspended coroutine and of what it awaits, outermost
    first (a task's own stack stops at its outermost coroutine, which hides
    where it waits)."""
    frames = []
    while coro is not None and depth > 0:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            frames.append(frame)
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        depth -= 1
    return frames


def start(config: ServerConfig | None = None, /, *, wait: bool = True, timeout: float = DEFAULT_READY_TIMEOUT,
          on_assign: AssignHook | None = None, on_release: ReleaseHook | None = None, **fields: Any) -> Member:
    """Start a member in this process and return its handle.

    `config` and `fields` as for `make_config` (bad settings raise
    ConfigError before anything starts). With wait (the default), returns once
    the member is ready, or stops it and raises NotReadyError after `timeout`
    s. A failed start raises StartError and leaves no thread running.
    `on_assign` / `on_release`: the application's workload hooks (see
    metastore.embed_placement), installed before the member takes any work."""
    cfg, chosen = _make_config(config, fields)
    _remember_urls(cfg.data_dir, chosen)
    m = Member(cfg)
    m._hooks = (on_assign, on_release)
    m._start(wait, timeout)
    return m


# `with embed.member(...) as m:` reads better; a Member is its own context manager.
member = start


# -- stopping at interpreter exit ---------------------------------------------------------
_running: set[Member] = set()
_exit_hook_lock = threading.Lock()
_exit_hook_registered = False


def _stop_all() -> None:
    for m in list(_running):
        try:
            m.stop(grace=0)
        except Exception:  # noqa: BLE001 - stop the others anyway
            log.exception("stopping metastore member %s at exit", m.name)


def _register_exit_hook() -> None:
    """Stop running members when the interpreter exits. threading's exit
    hooks run before Python joins non-daemon threads (plain atexit hooks run
    after, too late: the Raft thread would keep the process alive)."""
    global _exit_hook_registered
    with _exit_hook_lock:
        if _exit_hook_registered:
            return
        register = getattr(threading, "_register_atexit", None)
        if register is not None:
            register(_stop_all)
        else:  # pragma: no cover - CPython has had it since 3.9
            import atexit
            atexit.register(_stop_all)
        _exit_hook_registered = True


_register_exit_hook()
