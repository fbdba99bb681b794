"""The placement and drain HTTP API, on the member's --listen-metrics-urls listener.

    PUT    /api/v2/workloads/{id}            register (body: JSON metadata; idempotent)
    GET    /api/v2/workloads/{id}            one record
    DELETE /api/v2/workloads/{id}            remove
    GET    /api/v2/workloads                 list: id, owner, epoch, state, sub-units per member
    PUT    /api/v2/workloads/{id}/subunits   the owner reports sub-units (fenced by member + epoch)
    GET    /api/v2/captures                  members with liveness, online, load
    PUT    /api/v2/captures/{member}/drain   start a drain (body optional: {"deadline_seconds": N})
    GET    /api/v2/captures/{member}/drain   drain status
    DELETE /api/v2/captures/{member}/drain   cancel the drain (the member is ALIVE again)

{member} is a member name or hex id; "captures" is the source design's word
for members. Any member answers; errors are JSON {"error": "..."}. An
etcd-level failure (no leader, timeout) is a 503 -- the request can be
retried, possibly on another member.
"""
from __future__ import annotations

import functools
from typing import Any, Awaitable, Callable

from metastore.api.http import HTTPError, Request, Router
from metastore.errors import EtcdError
from metastore.placement import Placement, PlacementError

Handler = Callable[[Request], Awaitable[tuple[int, Any]]]


def _answers_errors(handler: Handler) -> Handler:
    @functools.wraps(handler)
    async def wrapped(req: Request) -> tuple[int, Any]:
        try:
            return await handler(req)
        except PlacementError as err:
            raise HTTPError(err.status, err.message) from None
        except EtcdError as err:
            raise HTTPError(503, err.message) from None
    return wrapped


def _member_hex(value: Any, what: str) -> int:
    try:
        return int(str(value), 16)
    except ValueError:
        raise HTTPError(400, f"{what} must be a hex member id, not {value!r}") from None


def add_placement_routes(router: Router, placement: Placement) -> None:
    @_answers_errors
    async def put_workload(req: Request) -> tuple[int, Any]:
        metadata = req.json() if req.body else None
        created, record = await placement.register(req.params["id"], metadata)
        return (201 if created else 200), record.describe(placement.names())

    @_answers_errors
    async def get_workload(req: Request) -> tuple[int, Any]:
        record = await placement.get(req.params["id"])
        if record is None:
            raise HTTPError(404, f"no workload {req.params['id']!r}")
        return 200, record.describe(placement.names())

    @_answers_errors
    async def delete_workload(req: Request) -> tuple[int, Any]:
        if not await placement.remove(req.params["id"]):
            raise HTTPError(404, f"no workload {req.params['id']!r}")
        return 200, {"deleted": req.params["id"]}

    @_answers_errors
    async def list_workloads(req: Request) -> tuple[int, Any]:
        names = placement.names()
        return 200, {"workloads": [w.describe(names) for w in await placement.list()]}

    @_answers_errors
    async def put_subunits(req: Request) -> tuple[int, Any]:
        body = req.json()
        if not isinstance(body, dict) or "member" not in body or "epoch" not in body:
            raise HTTPError(400, 'expected {"member": "<hex id>", "epoch": N, "subunits": {"<hex id>": count}}')
        member = _member_hex(body["member"], "member")
        counts = body.get("subunits") or {}
        if not isinstance(counts, dict) or not all(isinstance(n, int) for n in counts.values()):
            raise HTTPError(400, "subunits must map hex member ids to integer counts")
        subunits = {_member_hex(m, "a subunits key"): n for m, n in counts.items()}
        if not isinstance(body["epoch"], int):
            raise HTTPError(400, "epoch must be an integer")
        if not await placement.acknowledge(req.params["id"], member, body["epoch"], subunits, accept=False):
            raise HTTPError(409, f"dropped: member {member:x} does not run workload {req.params['id']!r} at "
                                 f"epoch {body['epoch']}")
        record = await placement.get(req.params["id"])
        return 200, record.describe(placement.names()) if record else {}

    @_answers_errors
    async def list_members(req: Request) -> tuple[int, Any]:
        return 200, {"captures": await placement.members_status()}

    @_answers_errors
    async def put_drain(req: Request) -> tuple[int, Any]:
        deadline = 0.0
        if req.body:
            body = req.json()
            if not isinstance(body, dict):
                raise HTTPError(400, 'expected a JSON object such as {"deadline_seconds": 600}')
            value = body.get("deadline_seconds", 0)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise HTTPError(400, "deadline_seconds must be a number")
            deadline = float(value)
        return 200, await placement.drain_start(req.params["member"], deadline)

    @_answers_errors
    async def get_drain(req: Request) -> tuple[int, Any]:
        return 200, await placement.drain_status(req.params["member"])

    @_answers_errors
    async def delete_drain(req: Request) -> tuple[int, Any]:
        return 200, await placement.drain_cancel(req.params["member"])

    router.add("PUT", "/api/v2/workloads/{id}", put_workload)
    router.add("GET", "/api/v2/workloads/{id}", get_workload)
    router.add("DELETE", "/api/v2/workloads/{id}", delete_workload)
    router.add("GET", "/api/v2/workloads", list_workloads)
    router.add("PUT", "/api/v2/workloads/{id}/subunits", put_subunits)
    router.add("GET", "/api/v2/captures", list_members)
    router.add("PUT", "/api/v2/captures/{member}/drain", put_drain)
    router.add("GET", "/api/v2/captures/{member}/drain", get_drain)
    router.add("DELETE", "/api/v2/captures/{member}/drain", delete_drain)
