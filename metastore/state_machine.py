"""The replicated state machine: what applying one Raft entry means.

An entry is a `ProposalBatch` (many client requests that shared one Raft
round trip), or empty in logs written before reads stopped needing an entry
(raft.read_index). Every member applies the same entries
in the same order, so everything here must be deterministic. A request that
fails (a compacted revision, ignore_value on a missing key, ...) fails alone:
its error is its result and the other requests of the batch still apply.
"""
from __future__ import annotations

import logging
from typing import Callable, Union

from google.protobuf.message import Message
from grpc import StatusCode

from metastore import errors
from metastore.api.pb import raft_entry_pb2, rpc_pb2
from metastore.cluster import Membership
from metastore.errors import EtcdError
from metastore.lessor import Lessor
from metastore.store import Store

log = logging.getLogger("metastore.apply")

# Requests whose effect is not kept in the store (the member table lives in
# memory, rebuilt from snapshot + log): a replay applies them again, whatever
# the store's applied position says. Both are idempotent.
_OUTSIDE_STORE = frozenset({"member_change", "publish"})

Result = Union[Message, EtcdError, None]


class StateMachine:
    def __init__(self, store: Store, membership: Membership, lessor: Lessor | None = None) -> None:
        self.store = store
        self.membership = membership
        self.lessor = lessor
        # Called (apply thread) with the id of every member removed.
        self.on_member_removed: Callable[[int], None] | None = None

    def apply(self, payload: bytes, index: int) -> list[Result]:
        """Apply the committed entry at Raft `index`; one result per proposal.

        Runs on the Raft applier thread (raft.applier), entries in log
        order. Never raises: an entry that cannot be applied must still
        answer its waiters and let the next one through. After a restart
        the log is replayed from the last snapshot; requests a persistent
        store already holds (its applied position) are skipped, so nothing is
        applied twice.
        """
        if not payload:
            return []  # a read barrier of an older version's log: nothing to apply
        try:
            batch = raft_entry_pb2.ProposalBatch.FromString(payload)
        except Exception:  # pragma: no cover - only a corrupted log gets here
            log.critical("undecodable Raft entry %d (%d bytes) skipped", index, len(payload))
            return []
        applied = self.store.applied_position
        results: list[Result] = []
        # Consecutive Puts go to the store together (one backend write).
        puts: list[tuple[tuple[int, int], rpc_pb2.PutRequest]] = []
        for position, proposal in enumerate(batch.proposals):
            kind = proposal.WhichOneof("op")
            if kind == "put" and (index, position) > applied:
                puts.append(((index, position), proposal.put))
                continue
            if puts:
                results += self._apply_puts(puts)
                puts = []
            if (index, position) <= applied and kind not in _OUTSIDE_STORE:
                results.append(None)  # already in the store; nobody waits for it
                continue
            self.store.set_apply_position(index, position)
            results.append(self._apply_one(proposal))
        if puts:
            results += self._apply_puts(puts)
        return results

    def _apply_puts(self, puts: list[tuple[tuple[int, int], rpc_pb2.PutRequest]]) -> list[Result]:
        try:
            return self.store.put_many(puts)
        except Exception as exc:  # a bug or a failed write, not a client error: say so loudly
            log.exception("applying %d puts failed", len(puts))
            error = EtcdError(StatusCode.INTERNAL, f"etcdserver: internal error applying put: {exc}")
            return [error] * len(puts)

    def _apply_one(self, proposal: raft_entry_pb2.Proposal) -> Result:
        kind = proposal.WhichOneof("op")
        store = self.store
        try:
            if kind == "put":
                return store.put(proposal.put)
            if kind == "delete_range":
                return store.delete_range(proposal.delete_range)
            if kind == "txn":
                return store.txn(proposal.txn)
            if kind == "compaction":
                return store.compact(proposal.compaction)
            if kind == "lease_grant":
                resp = store.lease_grant(proposal.lease_grant)
                if self.lessor is not None:
                    self.lessor.granted(resp.ID, resp.TTL)
                return resp
            if kind == "lease_revoke":
                resp = store.lease_revoke(proposal.lease_revoke)
                if self.lessor is not None:
                    self.lessor.revoked(proposal.lease_revoke.ID)
                return resp
            if kind == "lease_refresh":
                if self.lessor is not None:
                    self.lessor.refreshed(list(proposal.lease_refresh.ids))
                return None
            if kind == "member_change":
                change = proposal.member_change
                if change.remove:
                    self.membership.remove(change.member_id)
                    if self.on_member_removed is not None:
                        self.on_member_removed(change.member_id)
                else:
                    self.membership.add(change.member_id, list(change.peer_urls), change.is_learner)
                return None
            if kind == "alarm":
                from metastore import alarms  # etcd's Alarm: replicated in the store's meta table

                return alarms.apply(store, proposal.alarm)
            if kind == "liveness":
                from metastore import liveness  # node liveness and drain state, in the meta table

                return liveness.apply(store, proposal.liveness)
            if kind == "publish":
                attrs = proposal.publish
                if not self.membership.publish(attrs.member_id, attrs.name, list(attrs.client_urls)):
                    # Not (yet) in the table: its addition is still on the way.
                    return errors.MEMBER_NOT_FOUND
                return None
            log.error("proposal with unknown op %r ignored", kind)
            return EtcdError(StatusCode.INTERNAL, f"etcdserver: unknown request type {kind!r}")
        except EtcdError as err:
            return err
        except Exception as exc:  # a bug, not a client error: say so loudly
            log.exception("applying %s failed", kind)
            return EtcdError(StatusCode.INTERNAL, f"etcdserver: internal error applying {kind}: {exc}")
