"""Workloads applications place on members, as keys any etcd client can watch.

One key per workload, ``/metastore/workloads/<id>``, holding its JSON
record: what the application registered (id, metadata) and where it runs
(owner member, the owner's session, epoch, state, the sub-units the owner
reports on each member). The store is the source of truth for who owns
what; every change is a compare-and-set (a Txn on the key's mod_revision),
so a coordinator, an owner acknowledging and an application updating
metadata can never overwrite each other's view.

States: ``unassigned`` (registered, no owner yet) -> ``assigned`` (the
coordinator picked an owner; a move is in flight until the owner accepts)
-> ``running`` (the owner accepted). Every assignment raises the epoch; an
acknowledgement names the epoch and the member it was made for, so one from
a stale epoch or from another member is dropped.

Member and session ids are hex strings in JSON: they are 64-bit, beyond
what a JavaScript client reads exactly.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from typing import Any

from metastore.api.pb import rpc_pb2

log = logging.getLogger("metastore.workloads")

PREFIX = b"/metastore/workloads/"
PREFIX_END = PREFIX[:-1] + bytes([PREFIX[-1] + 1])

UNASSIGNED = "unassigned"
ASSIGNED = "assigned"
RUNNING = "running"
STATES = (UNASSIGNED, ASSIGNED, RUNNING)

MAX_ID_BYTES = 256


def check_id(workload_id: str) -> str:
    """A workload id: non-empty printable text without '/', so that its key is
    exactly one path segment (URL routes and prefix watches stay unambiguous)."""
    if not workload_id or len(workload_id.encode()) > MAX_ID_BYTES:
        raise ValueError(f"a workload id is 1 to {MAX_ID_BYTES} bytes")
    if "/" in workload_id or not workload_id.isprintable():
        raise ValueError("a workload id must be printable and must not contain '/'")
    return workload_id


def key_of(workload_id: str) -> bytes:
    return PREFIX + workload_id.encode()


def _hex(value: int) -> str:
    return f"{value:x}" if value else ""


def _unhex(value: str | None) -> int:
    return int(value, 16) if value else 0


@dataclass(frozen=True)
class Workload:
    id: str
    metadata: Any = None
    owner: int = 0  # member id; 0 = none
    session: int = 0  # the owner's session lease when assigned
    epoch: int = 0
    state: str = UNASSIGNED
    source: int = 0  # the member a move in flight comes from; 0 = none
    subunits: dict[int, int] = field(default_factory=dict)  # member id -> count, reported by the owner
    # The key's mod_revision when read: what a compare-and-set compares.
    mod_revision: int = 0

    def to_json(self) -> bytes:
        return json.dumps({
            "id": self.id, "metadata": self.metadata, "owner": _hex(self.owner),
            "session": _hex(self.session), "epoch": self.epoch, "state": self.state,
            "source": _hex(self.source),
            "subunits": {f"{m:x}": n for m, n in sorted(self.subunits.items()) if n},
        }, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, mod_revision: int = 0) -> "Workload":
        doc = json.loads(raw)
        return cls(
            id=str(doc["id"]), metadata=doc.get("metadata"), owner=_unhex(doc.get("owner")),
            session=_unhex(doc.get("session")), epoch=int(doc.get("epoch", 0)),
            state=doc.get("state", UNASSIGNED) if doc.get("state") in STATES else UNASSIGNED,
            source=_unhex(doc.get("source")),
            subunits={_unhex(m): int(n) for m, n in (doc.get("subunits") or {}).items() if int(n) > 0},
            mod_revision=mod_revision)

    def assigned_to(self, owner: int, session: int) -> "Workload":
        """The next assignment: a new epoch, sub-units reset (the new owner
        reports its own when it accepts)."""
        if self.state == ASSIGNED:
            source = self.source  # re-placed before anyone accepted: still moving off the same member
        else:
            source = self.owner if self.state == RUNNING else 0
        return replace(self, owner=owner, session=session, epoch=self.epoch + 1, state=ASSIGNED,
                       source=source, subunits={})

    def accepted(self, subunits: dict[int, int]) -> "Workload":
        return replace(self, state=RUNNING, source=0, subunits=dict(subunits))

    def subunits_on(self, member: int) -> int:
        return self.subunits.get(member, 0)

    def describe(self, names: dict[int, str] | None = None) -> dict[str, Any]:
        """The record as the HTTP API lists it (member names beside ids)."""
        names = names or {}
        doc = json.loads(self.to_json())
        doc["owner_name"] = names.get(self.owner, "")
        doc["mod_revision"] = self.mod_revision
        return doc


def read_all(store: Any) -> list[Workload]:
    """Every workload record in the store, in id order. A record that is not
    valid (someone wrote the key by hand) is skipped with an error log."""
    resp = store.range(rpc_pb2.RangeRequest(key=PREFIX, range_end=PREFIX_END))
    out = []
    for kv in resp.kvs:
        try:
            out.append(Workload.from_json(kv.value, kv.mod_revision))
        except (ValueError, KeyError, TypeError, AttributeError):
            log.error("workload record %r is not valid; ignored", kv.key)
    return out
