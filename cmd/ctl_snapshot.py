"""`metastore ctl snapshot save|restore`: save streams Maintenance.Snapshot
into a file (sha256 checked, written atomically); restore is `metastore
snapshot restore` itself."""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import threading
import time
from typing import Any

import click
import grpc

from metastore import dbsnapshot
from metastore.api.pb import rpc_pb2, rpc_pb2_grpc
from metastore.cmd.ctl_common import (
    CtlError, Session, command, group, out, print_json, rpc_error_message, settings)
from metastore.cmd.snapshot import restore
from metastore.fsutil import fsync_path

SHA_SIZE = 32
# Below this a progress bar would only flicker.
PROGRESS_MIN_BYTES = 1 << 20


@group("snapshot")
def snapshot() -> None:
    """Save a member's snapshot; restore one into a new data dir."""


class _Trailer:
    """Hashes a stream except its last 32 bytes, which it keeps: the sha256
    the server sends after the data."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.tail = b""

    def feed(self, blob: bytes) -> None:
        if len(blob) >= SHA_SIZE:
            self.sha.update(self.tail)
            self.sha.update(memoryview(blob)[:-SHA_SIZE])
            self.tail = blob[-SHA_SIZE:]
        else:
            data = self.tail + blob
            cut = max(len(data) - SHA_SIZE, 0)
            self.sha.update(data[:cut])
            self.tail = data[cut:]


@command("save")
@click.argument("path", metavar="FILE")
def snapshot_save(path: str) -> None:
    """Save a snapshot of one member (the first endpoint that connects) to FILE.

    The stream's trailing sha256 is checked before FILE appears: the data
    goes to a temporary file next to it, renamed into place once complete,
    checked and fsynced, so FILE is never a partial snapshot. A progress bar
    is shown on a terminal for large snapshots. --command-timeout bounds the
    wait for each piece of the stream, not the whole transfer.
    `-w json`: {"path", "endpoint", "member_id", "revision", "size", "sha256"}.
    """
    s = settings()
    target = os.path.abspath(path)
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        raise CtlError(f"cannot save the snapshot to {path}: directory {directory} does not exist")
    if os.path.isdir(target):
        raise CtlError(f"cannot save the snapshot to {path}: it is a directory")
    with Session(s) as session:
        ep = session.connected()
        call = rpc_pb2_grpc.MaintenanceStub(session.channel(ep)).Snapshot(rpc_pb2.SnapshotRequest())
        last = [time.monotonic()]
        stalled = threading.Event()
        done = threading.Event()

        def watchdog() -> None:
            while not done.wait(0.1):
                if time.monotonic() - last[0] > s.command_timeout:
                    stalled.set()
                    call.cancel()
                    return

        threading.Thread(target=watchdog, daemon=True).start()
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(target) + ".", suffix=".part", dir=directory)
        bar: Any = None
        try:
            trailer = _Trailer()
            size = 0
            first: rpc_pb2.SnapshotResponse | None = None
            with os.fdopen(fd, "wb") as f:
                try:
                    for resp in call:
                        last[0] = time.monotonic()
                        blob = resp.blob
                        if first is None:
                            first = resp
                            total = len(blob) + resp.remaining_bytes + SHA_SIZE
                            if total >= PROGRESS_MIN_BYTES and sys.stderr.isatty():
                                bar = click.progressbar(length=total, file=sys.stderr, show_pos=False,
                                                        label=f"Downloading snapshot from {ep.shown}")
                                bar.__enter__()
                        f.write(blob)
                        trailer.feed(blob)
                        size += len(blob)
                        if bar is not None:
                            bar.update(len(blob))
                except grpc.RpcError as err:
                    if stalled.is_set():
                        raise CtlError(f"snapshot from {ep.shown} stalled: no data for "
                                       f"{s.command_timeout:g}s (--command-timeout)") from None
                    raise CtlError(f"snapshot from {ep.shown} failed: {rpc_error_message(err, ep.shown)}") from None
                finally:
                    done.set()
                    if bar is not None:
                        bar.__exit__(None, None, None)
                f.flush()
                os.fsync(f.fileno())
            if first is None or size <= SHA_SIZE:
                raise CtlError(f"snapshot from {ep.shown} is incomplete: the stream ended after {size} bytes")
            if trailer.sha.digest() != trailer.tail:
                raise CtlError(f"snapshot from {ep.shown} is damaged: sha256 checksum mismatch (the stream "
                               f"says {trailer.tail.hex()}, its data hashes to {trailer.sha.hexdigest()}); "
                               f"nothing was saved")
            os.replace(tmp, target)
            fsync_path(directory)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
    if s.write_out == "json":
        # From the file's own header: the stream's chunks carry none (etcd 3.4's do not either).
        header = dbsnapshot.header(target)
        # An etcd member's snapshot does not say which member took it.
        member = {"member_id": int(header["member_id"], 16)} if "member_id" in header else {}
        print_json({"path": path, "endpoint": ep.shown, **member,
                    "revision": header["revision"], "size": size, "sha256": trailer.tail.hex()})
    else:
        out(f"Snapshot saved at {path}\n")


snapshot.add_command(snapshot_save)
# The very command `metastore snapshot restore` is: one implementation.
snapshot.add_command(restore)
