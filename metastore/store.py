"""The Store interface: what the rest of metastore asks of a key-value engine.

One protocol, implemented once for both engines by `metastore.mvcc.MVCCStore`
on top of an engine's `Backend` (how bytes are kept: memory or RocksDB). The
request/response types are etcd's own protobuf messages, so nothing is
converted between the wire, the Raft log and the store.

Threading contract: mutating calls (put, delete_range, txn, compact) come only
from the Raft apply loop, one at a time, in log order, and must be
deterministic -- every member applies the same entries and must end in the
same state. Reads (range, revision, ...) may come from any thread at any time
and see a consistent state as of some applied revision.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Protocol, Sequence

from metastore.api.pb import kv_pb2, rpc_pb2
from metastore.errors import EtcdError
from metastore.types import RaftStatus, RaftStatusSource

# Called after every committed mutation with the new store revision and the
# events it produced (all events of one revision at once, in order), and with
# no events when a snapshot replaced the content (the revision may jump).
EventListener = Callable[[int, Sequence[kv_pb2.Event]], None]


class Store(Protocol):
    # -- reads ---------------------------------------------------------------
    def range(self, req: rpc_pb2.RangeRequest) -> rpc_pb2.RangeResponse:
        """Keys of [key, range_end) as of req.revision (0 = current).

        Honours limit, sort, keys_only, count_only and the min/max mod/create
        revision filters. header.revision is the store's current revision.
        Raises COMPACTED / FUTURE_REV for revisions outside what is kept.
        """
        ...

    @property
    def revision(self) -> int:
        """Current store revision; 1 for an empty store."""
        ...

    @property
    def compact_revision(self) -> int:
        """Revision of the last compaction, 0 if never compacted."""
        ...

    # -- mutations (Raft apply loop only) ------------------------------------
    def put(self, req: rpc_pb2.PutRequest) -> rpc_pb2.PutResponse: ...

    def put_many(self, requests: Sequence[tuple[tuple[int, int], rpc_pb2.PutRequest]]
                 ) -> list[rpc_pb2.PutResponse | EtcdError]:
        """Consecutive Puts of one Raft entry, each with its (raft index,
        position), applied together in one write; each result as put() would
        give it, or its own error (the others still apply). A failed write
        fails them all."""
        ...

    def delete_range(self, req: rpc_pb2.DeleteRangeRequest) -> rpc_pb2.DeleteRangeResponse: ...

    def txn(self, req: rpc_pb2.TxnRequest) -> rpc_pb2.TxnResponse: ...

    def compact(self, req: rpc_pb2.CompactionRequest) -> rpc_pb2.CompactionResponse:
        """Record a compaction: reads below req.revision fail from now on;
        the history itself is dropped in the background."""
        ...

    def wait_compacted(self, revision: int | None = None, timeout: float | None = None) -> bool:
        """Wait until the history below `revision` (default: the last
        compaction) is physically gone; False on timeout or close."""
        ...

    def lease_grant(self, req: rpc_pb2.LeaseGrantRequest) -> rpc_pb2.LeaseGrantResponse:
        """Record lease req.ID with req.TTL; LEASE_EXISTS if it exists. A put
        naming a lease that does not exist fails with LEASE_NOT_FOUND."""
        ...

    def lease_revoke(self, req: rpc_pb2.LeaseRevokeRequest) -> rpc_pb2.LeaseRevokeResponse:
        """Drop the lease and delete its keys in one revision."""
        ...

    # -- lease reads -----------------------------------------------------------
    def lease_ttl(self, lease: int) -> int | None:
        """Granted TTL, None for an unknown lease."""
        ...

    def leases(self) -> dict[int, int]: ...

    def lease_keys(self, lease: int) -> list[bytes]: ...

    # -- Raft bookkeeping and snapshots ---------------------------------------
    @property
    def applied_position(self) -> tuple[int, int]:
        """(Raft index, position in its batch) of the last applied request
        whose writes the store holds; persisted atomically with them."""
        ...

    def set_apply_position(self, index: int, position: int) -> None: ...

    def export_items(self) -> Iterator[tuple[str, bytes, bytes]]:
        """Every backend row as of the call (a copy)."""
        ...

    def import_items(self, items: Iterator[tuple[str, bytes, bytes]]) -> None:
        """Replace the whole content with a snapshot's rows."""
        ...

    def checkpoint(self, target_dir: str) -> bool:
        """Write an engine-native copy of the data into `target_dir` (faster
        than export_items for a persistent engine); False if the engine has
        none."""
        ...

    def frozen_copy(self, target_dir: str) -> Iterable[tuple[str, bytes, bytes]] | None:
        """A consistent copy taken quickly, to be read while writes go on:
        None after writing a checkpoint to `target_dir`, else the rows --
        call their close(), if they have one, once read."""
        ...

    def prepare_frozen_copy(self) -> None:
        """A frozen copy is coming soon: do ahead, in the background, what
        would make it slow (a persistent engine flushes its write buffers).
        Never blocks for long."""
        ...

    def install_checkpoint(self, checkpoint_dir: str) -> bool:
        """Replace the whole content with a checkpoint from an engine of the
        same kind; False, nothing changed, if this engine cannot."""
        ...

    # -- events, status, lifecycle -------------------------------------------
    def add_listener(self, listener: EventListener) -> None: ...

    def attach_raft(self, source: RaftStatusSource | None) -> None:
        """Connect the Raft node whose status get_raft_status reports."""
        ...

    def get_raft_status(self) -> RaftStatus:
        """The attached Raft node's status; state `standalone` with no node."""
        ...

    def db_size(self) -> tuple[int, int]:
        """(bytes the backend occupies, bytes of it holding live data)."""
        ...

    def close(self) -> None: ...
