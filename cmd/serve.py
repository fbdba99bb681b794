"""`metastore serve`: run one member, with etcd's flag names."""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys

import click

from metastore import event_loop, logs
from metastore.config import DEFAULT_CLIENT_URL, DEFAULT_METRICS_URL, DEFAULT_PEER_URL, ConfigError, ServerConfig
from metastore.cluster import parse_urls

log = logging.getLogger("metastore.serve")


def _urls(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str]:
    if value is None or value == "":
        return []
    try:
        return parse_urls(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _optional_urls(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    """Like _urls, but None when the flag is not given (the default applies)."""
    return None if value is None else _urls(ctx, param, value)


@click.command("serve")
@click.option("--name", default="default", show_default=True, help="Human-readable name of this member.")
@click.option("--data-dir", default="", help="Directory for this member's data  [default: <name>.metastore]")
@click.option("--listen-client-urls", default=DEFAULT_CLIENT_URL, show_default=True, callback=_urls,
              help="Comma-separated URLs to serve clients (etcd's gRPC API) on.")
@click.option("--advertise-client-urls", default="", callback=_urls,
              help="Client URLs to tell the rest of the cluster  [default: --listen-client-urls]")
@click.option("--listen-peer-urls", default=DEFAULT_PEER_URL, show_default=True, callback=_urls,
              help="URL to listen on for Raft traffic from other members.")
@click.option("--initial-advertise-peer-urls", default=DEFAULT_PEER_URL, show_default=True, callback=_urls,
              help="Peer URL the other members reach this one on.")
@click.option("--listen-metrics-urls", default=None, callback=_optional_urls,
              help=f"Comma-separated URLs to serve /metrics, /health and /version on (HTTP); '' for none  "
                   f"[default: {DEFAULT_METRICS_URL} if --listen-client-urls is the default, else none]")
@click.option("--listen-client-http-urls", default="", callback=_urls,
              help="Comma-separated URLs to serve etcd's JSON gateway on (HTTP: POST /v3/kv/range, ...) "
                   "besides the client port, which serves it too; none by default.")
@click.option("--initial-cluster", default="",
              help="Every initial member as name=peer-url, comma-separated  [default: <name>=<advertised peer url>]")
@click.option("--initial-cluster-token", default="metastore-cluster", show_default=True,
              help="Names the cluster; member and cluster ids derive from it.")
@click.option("--initial-cluster-state", type=click.Choice(["new", "existing"]), default="new",
              show_default=True, help="'new' to form a cluster; 'existing' to join one.")
@click.option("--engine", type=click.Choice(["memory", "rocksdb"]), default="memory", show_default=True,
              help="Storage engine.")
@click.option("--peer-secret-file", type=click.Path(dir_okay=False), default=None,
              help="File holding the cluster secret that encrypts and authenticates Raft traffic "
                   "(or set METASTORE_PEER_SECRET). Required when peers listen beyond loopback.")
@click.option("--heartbeat-interval", default=100, show_default=True, type=click.IntRange(min=1),
              help="Raft heartbeat interval in ms.")
@click.option("--election-timeout", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Raft election timeout in ms.")
@click.option("--max-request-bytes", default=1536 * 1024, show_default=True, type=click.IntRange(min=1),
              help="Largest client request accepted.")
@click.option("--quota-backend-bytes", default=0, show_default=True, type=int,
              help="Backend size that raises the NOSPACE alarm (writes refused until disarmed); "
                   "0 means etcd's default of 2 GiB, a negative value disables the quota.")
@click.option("--snapshot-count", default=100_000, show_default=True, type=click.IntRange(min=100),
              help="Applied requests between snapshots, as etcd counts them; the log before a snapshot is dropped.")
@click.option("--unsafe-no-fsync", is_flag=True, default=False,
              help="Do not fsync the Raft log: faster, but a power loss can lose acknowledged "
                   "writes. For tests and benchmarks only.")
@click.option("--session-ttl", default=5, show_default=True, type=click.IntRange(min=1),
              help="Seconds a member may miss heartbeats before it counts as offline and its workloads "
                   "are placed elsewhere.")
@click.option("--drain-batch-size", default=1, show_default=True, type=click.IntRange(min=1),
              help="Workload moves a drain keeps in flight at once.")
@click.option("--workload-move-timeout", default=30.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds a member has to accept a workload moved to it before it goes elsewhere.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="text for people; json: one object per line (ts, level, member, logger, msg).")
def serve(name: str, data_dir: str, listen_client_urls: list[str], advertise_client_urls: list[str],
          listen_peer_urls: list[str], initial_advertise_peer_urls: list[str],
          listen_metrics_urls: list[str] | None, listen_client_http_urls: list[str], initial_cluster: str,
          initial_cluster_token: str, initial_cluster_state: str, engine: str, peer_secret_file: str | None,
          heartbeat_interval: int, election_timeout: int, max_request_bytes: int, quota_backend_bytes: int,
          snapshot_count: int,
          unsafe_no_fsync: bool, session_ttl: int, drain_batch_size: int, workload_move_timeout: float,
          log_level: str, log_format: str) -> None:
    """Run a metastore member.

    With no flags: a single-member cluster on the memory engine, serving
    clients on 127.0.0.1:2379, like a fresh `etcd`. Stops cleanly on
    SIGTERM or SIGINT.
    """
    logs.setup(log_level, log_format, name)
    secret = os.environ.get("METASTORE_PEER_SECRET") or None
    if peer_secret_file:
        try:
            with open(peer_secret_file) as f:
                secret = f.read().strip()
        except OSError as exc:
            raise click.UsageError(f"cannot read --peer-secret-file: {exc}") from None
        if not secret:
            raise click.UsageError(f"--peer-secret-file {peer_secret_file} is empty")
    cfg = ServerConfig(
        name=name, data_dir=data_dir, listen_client_urls=listen_client_urls,
        advertise_client_urls=advertise_client_urls, listen_peer_urls=listen_peer_urls,
        initial_advertise_peer_urls=initial_advertise_peer_urls, listen_metrics_urls=listen_metrics_urls,
        listen_client_http_urls=listen_client_http_urls, initial_cluster=initial_cluster,
        initial_cluster_token=initial_cluster_token, initial_cluster_state=initial_cluster_state,
        engine=engine, peer_secret=secret, heartbeat_interval_ms=heartbeat_interval,
        election_timeout_ms=election_timeout, max_request_bytes=max_request_bytes,
        quota_backend_bytes=quota_backend_bytes,
        snapshot_count=snapshot_count, unsafe_no_fsync=unsafe_no_fsync, session_ttl=session_ttl,
        drain_batch_size=drain_batch_size, workload_move_timeout=workload_move_timeout)
    try:
        cfg = cfg.resolved()
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        event_loop.run(_run(cfg))
    except (ConfigError, RuntimeError) as exc:
        click.echo(f"metastore: {exc}", err=True)
        sys.exit(1)


async def _run(cfg: ServerConfig) -> None:
    from metastore.api.server import Server
    from metastore.node import Node

    server = Server(Node(cfg))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        # Everything made at startup (modules, protobuf descriptors, the
        # loaded store's structures) lives as long as the process: keep it
        # out of every later full collection.
        gc.freeze()
        log.info("member %s (%x) serving clients on %s (gRPC; HTTP/1.1: the JSON gateway, /metrics, "
                 "/health, /version)", cfg.name, server.node.member_id, ",".join(cfg.listen_client_urls))
        if cfg.listen_client_http_urls:
            log.info("serving etcd's JSON gateway (/v3/...) on %s", ",".join(cfg.listen_client_http_urls))
        if cfg.listen_metrics_urls:
            log.info("serving /metrics, /health and /version on %s", ",".join(cfg.listen_metrics_urls))
        else:
            log.info("no metrics listener (set --listen-metrics-urls to serve /metrics and /health)")
        node = server.node
        removed = asyncio.ensure_future(node.removed.wait())
        failed = asyncio.ensure_future(node.failed.wait())
        await asyncio.wait([asyncio.ensure_future(stop.wait()), removed, failed],
                           return_when=asyncio.FIRST_COMPLETED)
        log.info("shutting down" + (": removed from the cluster" if removed.done() else
                                    f": {node.failure}" if failed.done() else ""))
    finally:
        # Also after a failed start: release the ports, the Raft node and
        # the database LOCK before the process reports the error.
        await server.stop()
    log.info("stopped")
    if server.node.failed.is_set():
        raise RuntimeError(server.node.failure)  # exit status 1, as etcd's after a failed WAL write
