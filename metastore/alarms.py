"""etcd's alarms as replicated state: which member raised which alarm.

An alarm is raised or cleared by a Raft proposal (`Proposal.alarm`, an
etcd `AlarmRequest`) that every member applies, so every member holds the
same set and enforces it the same way (etcd keeps them in its `alarm`
bucket for the same reason). The set lives in the store's `meta` table,
one row per (member, alarm type), so it is durable on a persistent engine,
travels in Raft snapshots (which copy every table), in client snapshots and
through `metastore snapshot restore` -- as etcd's restore keeps its alarm
bucket.

Row: meta key ``alarm/`` + u64 member id + u32 alarm type (big-endian), empty value.
"""
from __future__ import annotations

import logging
import struct
import weakref

from metastore.api.pb import rpc_pb2
from metastore.store import Store

log = logging.getLogger("metastore.alarms")

PREFIX = b"alarm/"
_KEY = struct.Struct(">QI")

GET = rpc_pb2.AlarmRequest.GET
ACTIVATE = rpc_pb2.AlarmRequest.ACTIVATE
DEACTIVATE = rpc_pb2.AlarmRequest.DEACTIVATE
NONE = rpc_pb2.NONE
NOSPACE = rpc_pb2.NOSPACE
CORRUPT = rpc_pb2.CORRUPT


def alarm_key(member_id: int, alarm: int) -> bytes:
    return PREFIX + _KEY.pack(member_id, alarm)


def active(store: Store, alarm: int = NONE) -> list[tuple[int, int]]:
    """Active alarms as (member id, alarm type), ordered; of type `alarm`
    only, unless NONE (etcd's AlarmStore.Get)."""
    return [pair for pair in _every_active(store) if alarm == NONE or pair[1] == alarm]


# store -> (its meta_generation, the alarms then): every Put and Txn asks
# whether NOSPACE is active, and the answer only changes with the meta rows.
_known: "weakref.WeakKeyDictionary[Store, tuple[int, list[tuple[int, int]]]]" = weakref.WeakKeyDictionary()


def _every_active(store: Store) -> list[tuple[int, int]]:
    generation = getattr(store, "meta_generation", None)  # read before the rows: a change after it is seen next time
    if generation is not None:
        known = _known.get(store)
        if known is not None and known[0] == generation:
            return known[1]
    found = []
    for key, _value in store.meta_items(PREFIX):  # type: ignore[attr-defined]
        if len(key) != len(PREFIX) + _KEY.size:
            continue  # not ours: never raise on the request path
        found.append(_KEY.unpack_from(key, len(PREFIX)))
    if generation is not None:
        _known[store] = (generation, found)
    return found


def is_active(store: Store, alarm: int) -> bool:
    return bool(active(store, alarm))


def describe(member_id: int, alarm: int) -> str:
    """How etcd prints an AlarmMember (Go's compact proto text, trailing
    space included): `etcdctl endpoint status` shows this in ERRORS."""
    return f"memberID:{member_id} alarm:{alarm_name(alarm)} "


def alarm_name(alarm: int) -> str:
    try:
        return rpc_pb2.AlarmType.Name(alarm)
    except ValueError:
        return str(alarm)


def response(pairs: list[tuple[int, int]]) -> rpc_pb2.AlarmResponse:
    resp = rpc_pb2.AlarmResponse()
    for member, kind in pairs:
        resp.alarms.add(memberID=member, alarm=kind)  # type: ignore[arg-type]
    return resp


def apply(store: Store, req: rpc_pb2.AlarmRequest) -> rpc_pb2.AlarmResponse:
    """Apply an alarm proposal (apply thread; deterministic), as etcd's
    applierV3backend.Alarm: ACTIVATE answers the alarm (new or already
    active), DEACTIVATE the alarm it cleared (nothing if it was not active:
    a no-op), GET the active alarms of the requested type. Any alarm type is
    accepted; an unknown action answers nothing, as etcd does."""
    pair = (req.memberID, int(req.alarm))
    if req.action == GET:
        return response(active(store, req.alarm))
    if req.action == ACTIVATE:
        if pair not in active(store, req.alarm):
            store.write_meta({alarm_key(*pair): b""})  # type: ignore[attr-defined]
            log.warning("alarm activated: %s", describe(*pair), extra={"alarm": alarm_name(pair[1])})
        return response([pair])
    if req.action == DEACTIVATE:
        if pair not in active(store, req.alarm):
            return response([])
        store.write_meta({alarm_key(*pair): None})  # type: ignore[attr-defined]
        log.warning("alarm deactivated: %s", describe(*pair), extra={"alarm": alarm_name(pair[1])})
        return response([pair])
    return rpc_pb2.AlarmResponse()
