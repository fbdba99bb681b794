"""`metastore ctl get|put|del|watch`: etcdctl 3.4's KV commands, same
requests, same output (simple lines and JSON)."""
from __future__ import annotations

import os
import queue
import re
import sys
import time
from typing import Any, Iterator

import click
import grpc

from metastore.api.pb import kv_pb2, rpc_pb2, rpc_pb2_grpc
from metastore.cmd.ctl_common import (
    EXIT_BAD_FEATURE, EXIT_INTERRUPTED, BadArgs, CtlError, Session, command, flush, go_json, kv_text, out,
    print_json, rpc_error_message, settings)
from metastore.keys import prefix_range_end

_SORT_ORDERS = {"": rpc_pb2.RangeRequest.NONE, "ASCEND": rpc_pb2.RangeRequest.ASCEND,
                "DESCEND": rpc_pb2.RangeRequest.DESCEND}
_SORT_TARGETS = {"": rpc_pb2.RangeRequest.KEY, "KEY": rpc_pb2.RangeRequest.KEY,
                 "CREATE": rpc_pb2.RangeRequest.CREATE, "MODIFY": rpc_pb2.RangeRequest.MOD,
                 "VALUE": rpc_pb2.RangeRequest.VALUE, "VERSION": rpc_pb2.RangeRequest.VERSION}


def _arg(text: str) -> bytes:
    """A command-line argument as the bytes the user typed."""
    return os.fsencode(text)


def key_range(args: tuple[str, ...], prefix: bool, from_key: bool) -> tuple[bytes, bytes]:
    """(key, range_end) as etcdctl builds them from KEY [RANGE_END] and
    --prefix / --from-key."""
    if prefix and from_key:
        raise BadArgs("`--prefix` and `--from-key` cannot be set at the same time, choose one")
    key = _arg(args[0])
    if len(args) > 1:
        if prefix or from_key:
            raise BadArgs("too many arguments, only accept one argument when `--prefix` or `--from-key` is set")
        return key, _arg(args[1])
    if prefix:
        return (b"\0", b"\0") if not key else (key, prefix_range_end(key))
    if from_key:
        return key or b"\0", b"\0"
    return key, b""


@command("get", short_help="Get a key or a range of keys.")
@click.argument("key")
@click.argument("range_end", required=False)
@click.option("--prefix", is_flag=True, help="Get the keys with KEY as prefix.")
@click.option("--from-key", is_flag=True, help="Get the keys >= KEY (byte order).")
@click.option("--rev", type=click.IntRange(min=0), default=0, help="Read at this revision (0: current).")
@click.option("--limit", type=click.IntRange(min=0), default=0, help="At most this many keys (0: no limit).")
@click.option("--keys-only", is_flag=True, help="Get only the keys (the value lines are empty).")
@click.option("--print-value-only", is_flag=True, help="Only print the values (simple output).")
@click.option("--order", default="", help="ASCEND or DESCEND (ASCEND by default).")
@click.option("--sort-by", default="", help="Sort by CREATE, KEY, MODIFY, VALUE or VERSION.")
@click.option("--consistency", default="l", help="Linearizable (l) or serializable (s).")
def get(key: str, range_end: str | None, prefix: bool, from_key: bool, rev: int, limit: int,
        keys_only: bool, print_value_only: bool, order: str, sort_by: str, consistency: str) -> None:
    """Get KEY, or the keys in [KEY, RANGE_END), as `etcdctl get`.

    Simple output: for each key a line with the key and a line with the
    value, exactly as etcdctl 3.4 prints them. `-w json`: etcd's
    RangeResponse as etcdctl prints it (keys and values in base64).
    """
    s = settings("simple", "json")
    if consistency not in ("l", "s"):
        raise CtlError(f"unknown consistency flag {consistency!r}", EXIT_BAD_FEATURE)
    if order.upper() not in _SORT_ORDERS:
        raise CtlError(f"bad sort order {order}", EXIT_BAD_FEATURE)
    if sort_by.upper() not in _SORT_TARGETS:
        raise CtlError(f"bad sort target {sort_by}", EXIT_BAD_FEATURE)
    args = (key,) if range_end is None else (key, range_end)
    k, end = key_range(args, prefix, from_key)
    sort_order = _SORT_ORDERS[order.upper()]
    sort_target = _SORT_TARGETS[sort_by.upper()]
    if sort_target == rpc_pb2.RangeRequest.KEY and sort_order == rpc_pb2.RangeRequest.ASCEND:
        sort_order = rpc_pb2.RangeRequest.NONE  # the server's order already (as clientv3 does)
    req = rpc_pb2.RangeRequest(key=k, range_end=end, limit=limit, revision=rev, keys_only=keys_only,
                               sort_order=sort_order, sort_target=sort_target,
                               serializable=consistency == "s")
    with Session(s) as session:
        resp = session.call(lambda ch, t: rpc_pb2_grpc.KVStub(ch).Range(req, timeout=t), repeatable=True)
    if s.write_out == "json":
        print_json(go_json(resp))
        return
    for kv in resp.kvs:
        out(kv_text(kv, s.hex, print_value_only))


@command("put", short_help="Put a key.")
@click.argument("key")
@click.argument("value", required=False)
@click.option("--lease", default="0", help="Attach the key to this lease (ID in hex).")
@click.option("--prev-kv", is_flag=True, help="Also print the previous key-value.")
@click.option("--ignore-value", is_flag=True, help="Keep the current value (update the lease only).")
@click.option("--ignore-lease", is_flag=True, help="Keep the current lease (update the value only).")
def put(key: str, value: str | None, lease: str, prev_kv: bool, ignore_value: bool,
        ignore_lease: bool) -> None:
    """Put KEY=VALUE, as `etcdctl put` (prints OK). Without VALUE the value is
    read from stdin. `-w json`: etcd's PutResponse."""
    s = settings("simple", "json")
    if ignore_value and value is not None:
        raise BadArgs("put command needs only 1 argument when 'ignore-value' is set")
    data = b""
    if not ignore_value:
        if value is not None:
            data = _arg(value)
        else:
            data = b"" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
            if not data:
                raise BadArgs("put command needs 1 argument and input from stdin or 2 arguments")
    lease_id = int(lease, 16) if re.fullmatch(r"[+-]?[0-9a-fA-F]{1,16}", lease.strip()) else None
    if lease_id is None or not -2**63 <= lease_id < 2**63:
        raise BadArgs(f"bad lease ID ({lease!r}), expecting ID in Hex")
    req = rpc_pb2.PutRequest(key=_arg(key), value=data, lease=lease_id, prev_kv=prev_kv,
                             ignore_value=ignore_value, ignore_lease=ignore_lease)
    with Session(s) as session:
        resp = session.call(lambda ch, t: rpc_pb2_grpc.KVStub(ch).Put(req, timeout=t), repeatable=False)
    if s.write_out == "json":
        print_json(go_json(resp))
        return
    out("OK\n")
    if resp.HasField("prev_kv"):
        out(kv_text(resp.prev_kv, s.hex))


@command("del", short_help="Delete a key or a range of keys.")
@click.argument("key")
@click.argument("range_end", required=False)
@click.option("--prefix", is_flag=True, help="Delete the keys with KEY as prefix.")
@click.option("--from-key", is_flag=True, help="Delete the keys >= KEY (byte order).")
@click.option("--prev-kv", is_flag=True, help="Also print the deleted key-values.")
def delete(key: str, range_end: str | None, prefix: bool, from_key: bool, prev_kv: bool) -> None:
    """Delete KEY, or the keys in [KEY, RANGE_END), as `etcdctl del`
    (prints how many were deleted). `-w json`: etcd's DeleteRangeResponse."""
    s = settings("simple", "json")
    args = (key,) if range_end is None else (key, range_end)
    k, end = key_range(args, prefix, from_key)
    req = rpc_pb2.DeleteRangeRequest(key=k, range_end=end, prev_kv=prev_kv)
    with Session(s) as session:
        resp = session.call(lambda ch, t: rpc_pb2_grpc.KVStub(ch).DeleteRange(req, timeout=t),
                            repeatable=False)
    if s.write_out == "json":
        print_json(go_json(resp))
        return
    out(f"{resp.deleted}\n")
    for kv in resp.prev_kvs:
        out(kv_text(kv, s.hex))


@command("watch", short_help="Watch a key or a range of keys.")
@click.argument("key")
@click.argument("range_end", required=False)
@click.option("--prefix", is_flag=True, help="Watch the keys with KEY as prefix.")
@click.option("--rev", type=click.IntRange(min=0), default=0,
              help="Start at this revision (replays history first; 0: from now).")
@click.option("--prev-kv", is_flag=True, help="Also print the previous key-value of each event.")
def watch(key: str, range_end: str | None, prefix: bool, rev: int, prev_kv: bool) -> None:
    """Print the changes to KEY (or [KEY, RANGE_END), or a prefix) until
    interrupted, as `etcdctl watch`: per event a line PUT or DELETE, then
    the previous key-value (with --prev-kv), then the key and value lines.
    `-w json`: one line per WatchResponse, as etcdctl prints them.

    A broken stream resumes on another endpoint after the last event
    printed; a watch the server cancels (history compacted) exits 5.
    """
    s = settings("simple", "json")
    args = (key,) if range_end is None else (key, range_end)
    k, end = key_range(args, prefix, False)
    with Session(s) as session:
        try:
            _watch(session, k, end, rev, prev_kv)
        except KeyboardInterrupt:
            flush()
            raise click.exceptions.Exit(130) from None


def _print_watch_response(resp: rpc_pb2.WatchResponse, json_out: bool, hex_: bool) -> None:
    if json_out:
        print_json({"Header": go_json(resp.header), "Events": [go_json(e) for e in resp.events],
                    "CompactRevision": resp.compact_revision, "Canceled": resp.canceled,
                    "Created": False})
    else:
        for e in resp.events:
            out(b"DELETE\n" if e.type == kv_pb2.Event.DELETE else b"PUT\n")
            if e.HasField("prev_kv"):
                out(kv_text(e.prev_kv, hex_))
            out(kv_text(e.kv, hex_))
    flush()


def _watch(session: Session, key: bytes, range_end: bytes, start_revision: int, prev_kv: bool) -> None:
    s = session.settings
    json_out = s.write_out == "json"
    next_revision = start_revision
    tried: list[Any] = []
    broken_since: float | None = None
    started = time.monotonic()
    ever_created = False
    last_error = "the stream ended"
    while True:
        if not ever_created and time.monotonic() - started > s.command_timeout:
            # Never got going anywhere (not a server that watches?): say so
            # rather than retrying forever.
            raise CtlError(f"could not start the watch within {s.command_timeout:g}s "
                           f"(--command-timeout): {last_error}")
        if broken_since is None:
            ep = session.connected()
        else:
            # Resume elsewhere (or on the same member once it is back).
            try:
                ep = session.connected(tried, wait=False)
            except CtlError:
                tried.clear()
                time.sleep(0.5)
                continue
        requests: queue.Queue[Any] = queue.Queue()
        requests.put(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(
            key=key, range_end=range_end, start_revision=next_revision, prev_kv=prev_kv)))

        def request_iterator(q: queue.Queue[Any] = requests) -> Iterator[rpc_pb2.WatchRequest]:
            while True:  # keep the stream open: the server keeps the watch only while it is
                item = q.get()
                if item is None:
                    return
                yield item

        call = rpc_pb2_grpc.WatchStub(session.channel(ep)).Watch(request_iterator())
        try:
            for resp in call:
                if resp.canceled or resp.compact_revision:
                    if resp.compact_revision:
                        reason = "etcdserver: mvcc: required revision has been compacted"
                    else:
                        reason = resp.cancel_reason or "etcdserver: watch canceled"
                    sys.stderr.write(f"watch was canceled ({reason})\n")
                    if json_out:
                        _print_watch_response(resp, True, s.hex)
                    raise CtlError("watch is canceled by the server", EXIT_INTERRUPTED)
                if resp.created:
                    if not next_revision:
                        next_revision = resp.header.revision + 1
                    broken_since = None
                    ever_created = True
                    tried.clear()
                    continue
                if resp.events:
                    _print_watch_response(resp, json_out, s.hex)
                    next_revision = resp.events[-1].kv.mod_revision + 1
        except grpc.RpcError as err:
            if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                  grpc.StatusCode.INTERNAL):
                raise CtlError(rpc_error_message(err, ep.shown)) from None
            last_error = rpc_error_message(err, ep.shown)
        finally:
            requests.put(None)
            call.cancel()
        # The stream ended (member stopped or unreachable): try the others.
        tried.append(ep)
        if broken_since is None:
            broken_since = time.monotonic()
            sys.stderr.write(f"watch stream to {ep.shown} broke; resuming from revision {next_revision}\n")
        time.sleep(0.1)
