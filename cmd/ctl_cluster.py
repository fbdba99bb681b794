"""`metastore ctl endpoint status`, `member ...` and `move-leader`:
etcdctl's cluster commands, with metastore's Raft status and each member's
liveness (ALIVE, DRAINING, STOPPING) added."""
from __future__ import annotations

import shlex
import sys
from typing import Any

import click
import grpc

from metastore.api.pb import metastore_pb2, metastore_pb2_grpc, rpc_pb2, rpc_pb2_grpc
from metastore.cmd.ctl_common import (
    EXIT_ERROR, BadArgs, CtlError, Endpoint, Session, Settings, command, go_json, group, humanize_bytes,
    out, parse_endpoint, parse_hex_id, per_endpoint, print_json, settings, table_text)
from metastore.cmd.ctl_drain import member_liveness, raft_status


# -- endpoint status ---------------------------------------------------------------------
STATUS_HEADER = ["endpoint", "ID", "version", "db size", "is leader", "is learner", "raft term",
                 "raft index", "raft applied index", "raft state", "commit index", "applied index", "liveness",
                 "errors"]


def cluster_endpoints(s: Settings) -> list[Endpoint]:
    """Every client URL in MemberList (etcdctl's --cluster)."""
    with Session(s) as session:
        resp = session.call(lambda ch, t: rpc_pb2_grpc.ClusterStub(ch).MemberList(
            rpc_pb2.MemberListRequest(), timeout=t), repeatable=True)
    eps: list[Endpoint] = []
    for m in resp.members:
        for url in m.clientURLs:
            try:
                ep = parse_endpoint(url)
            except ValueError:
                continue
            if ep not in eps:
                eps.append(ep)
    if not eps:
        raise CtlError("the cluster's member list has no client URLs")
    return eps


def _status(session: Session, ep: Endpoint) -> tuple[rpc_pb2.StatusResponse,
                                                     metastore_pb2.GetRaftStatusResponse | None]:
    status = session.call(lambda ch, t: rpc_pb2_grpc.MaintenanceStub(ch).Status(
        rpc_pb2.StatusRequest(), timeout=t), repeatable=True)
    try:
        raft = metastore_pb2_grpc.RaftStub(session.channel(ep)).GetRaftStatus(
            metastore_pb2.GetRaftStatusRequest(), timeout=session.settings.command_timeout)
    except grpc.RpcError:
        raft = None  # not a metastore member (an etcd endpoint), or an older one
    return status, raft


def raft_json(raft: metastore_pb2.GetRaftStatusResponse | None) -> dict | None:
    if raft is None:
        return None
    return {"node_id": raft.node_id, "term": raft.term, "leader_id": raft.leader_id, "state": raft.state,
            "applied": raft.applied, "commit": raft.commit, "liveness": raft.liveness}


def status_row(ep: Endpoint, st: rpc_pb2.StatusResponse, raft: Any) -> list[str]:
    return [ep.shown, f"{st.header.member_id:x}", st.version, humanize_bytes(st.dbSize),
            str(st.leader == st.header.member_id).lower(), str(st.isLearner).lower(), str(st.raftTerm),
            str(st.raftIndex), str(st.raftAppliedIndex),
            raft.state if raft is not None else "-", str(raft.commit) if raft is not None else "-",
            str(raft.applied) if raft is not None else "-",
            # "" from a metastore too old to report it: unknown, as for an etcd endpoint.
            (raft.liveness or "-") if raft is not None else "-", ", ".join(st.errors)]


@group("endpoint")
def endpoint() -> None:
    """Endpoint commands (status)."""


@command("status")
@click.option("--cluster", is_flag=True, help="Every member's client URLs from the member list, "
                                              "not just --endpoints.")
def endpoint_status(cluster: bool) -> None:
    """The status of each endpoint: etcdctl's columns, then the member's Raft
    state (leader, follower, candidate), its commit and applied index and
    its liveness (ALIVE, DRAINING, STOPPING) from metastorepb.Raft/GetRaftStatus.

    `-w json` prints a list of {"Endpoint", "Status" (etcd's StatusResponse,
    as etcdctl prints it), "Raft" ({node_id, term, leader_id, state,
    applied, commit, liveness}; null for an endpoint that is not metastore)}. An
    endpoint that does not answer is reported on stderr and the exit code
    is 1, after the others are printed.
    """
    s = settings()
    eps = cluster_endpoints(s) if cluster else s.endpoints
    results = per_endpoint(s, eps, _status)
    ok = [(ep, res) for ep, res, err in results if res is not None]
    for ep, _res, err in results:
        if err is not None:
            sys.stderr.write(f"Failed to get the status of endpoint {ep.shown} ({err})\n")
    if s.write_out == "json":
        print_json([{"Endpoint": ep.shown, "Status": go_json(st), "Raft": raft_json(raft)}
                    for ep, (st, raft) in ok])
    else:
        rows = [status_row(ep, st, raft) for ep, (st, raft) in ok]
        if s.write_out == "table":
            out(table_text(STATUS_HEADER, rows))
        else:
            out("".join(", ".join(row) + "\n" for row in rows))
    if len(ok) != len(results):
        raise click.exceptions.Exit(EXIT_ERROR)


endpoint.add_command(endpoint_status)


# -- member ---------------------------------------------------------------------------------
MEMBER_HEADER = ["ID", "Status", "Name", "Peer Addrs", "Client Addrs", "Is Learner"]


def member_rows(members: Any) -> list[list[str]]:
    return [[f"{m.ID:x}", "started" if m.name else "unstarted", m.name, ",".join(m.peerURLs),
             ",".join(m.clientURLs), str(m.isLearner).lower()] for m in members]


def member_rows_with_liveness(members: Any, liveness: dict[int, str]) -> list[list[str]]:
    """etcdctl's row plus LIVENESS, blank when unknown: nothing reachable
    could tell, or the member has not started (the store's default ALIVE
    would claim more than is known)."""
    return [row + [liveness.get(m.ID, "") if m.name else ""] for row, m in zip(member_rows(members), members)]


def members_liveness(session: Session, members: Any) -> dict[int, str]:
    """member id -> liveness: every member's at once from the placement API
    when a member serves HTTP; otherwise each member's own GetRaftStatus
    on its client URLs (in parallel: a member down costs one dial timeout).
    Missing where neither answers."""
    known = member_liveness(session)
    if known:
        return known
    eps: list[Endpoint] = []
    for m in members:
        for url in m.clientURLs:
            try:
                eps.append(parse_endpoint(url))
                break
            except ValueError:
                continue
    results = per_endpoint(session.settings, eps, raft_status)
    return {st.node_id: st.liveness for _ep, st, _err in results if st is not None and st.liveness}


def _cluster_call(method: str, req: Any, repeatable: bool = False) -> Any:
    with Session(settings()) as session:
        return session.call(lambda ch, t: getattr(rpc_pb2_grpc.ClusterStub(ch), method)(req, timeout=t),
                            repeatable=repeatable)


@group("member")
def member() -> None:
    """Membership commands (list, add, remove, promote)."""


@command("list")
def member_list() -> None:
    """The cluster's members, as `etcdctl member list`: ID, status (started,
    or unstarted until an added member runs), name, peer and client URLs,
    is learner. `-w table` adds each member's LIVENESS (ALIVE, DRAINING,
    STOPPING; blank for a member that cannot tell, such as one not started);
    simple stays etcdctl's lines, for the scripts that parse them.
    `-w json`: etcd's MemberListResponse."""
    s = settings()
    with Session(s) as session:
        resp = session.call(lambda ch, t: rpc_pb2_grpc.ClusterStub(ch).MemberList(
            rpc_pb2.MemberListRequest(), timeout=t), repeatable=True)
        liveness = members_liveness(session, resp.members) if s.write_out == "table" else {}
    if s.write_out == "json":
        print_json(go_json(resp))
    elif s.write_out == "table":
        out(table_text(MEMBER_HEADER + ["Liveness"], member_rows_with_liveness(resp.members, liveness)))
    else:
        out("".join(", ".join(row) + "\n" for row in member_rows(resp.members)))


@command("add")
@click.argument("name")
@click.option("--peer-urls", default="", help="The new member's peer URLs, comma-separated.")
@click.option("--learner", is_flag=True, help="Add as a learner (replicates, does not vote; promote it later).")
def member_add(name: str, peer_urls: str, learner: bool) -> None:
    """Add member NAME to the cluster, as `etcdctl member add`; then start it
    with the `metastore serve` flags printed (plus the cluster's
    --initial-cluster-token and its own listen URLs and data dir).
    `-w json`: etcd's MemberAddResponse."""
    s = settings("simple", "json")
    urls = [u.strip() for u in peer_urls.split(",") if u.strip()]
    if not urls:
        raise BadArgs("member peer urls not provided")
    resp = _cluster_call("MemberAdd", rpc_pb2.MemberAddRequest(peerURLs=urls, isLearner=learner))
    if s.write_out == "json":
        print_json(go_json(resp))
        return
    new = resp.member
    as_learner = " as learner " if new.isLearner else " "
    out(f"Member {new.ID:16x} added{as_learner}to cluster {resp.header.cluster_id:16x}\n")
    # Other members not started yet have no name to list (`=url` would be
    # refused); the new member learns them from the cluster anyway.
    conf = [f"{name if m.ID == new.ID else m.name}={u}" for m in resp.members
            if m.ID == new.ID or m.name for u in m.peerURLs]
    if not any(m.ID == new.ID for m in resp.members):
        conf += [f"{name}={u}" for u in urls]
    flags = ["metastore", "serve", "--name", name, "--initial-advertise-peer-urls", ",".join(urls),
             "--listen-peer-urls", urls[0], "--initial-cluster", ",".join(conf),
             "--initial-cluster-state", "existing"]
    out("\nStart the new member with (and the cluster's --initial-cluster-token, its own "
        "--listen-client-urls and --data-dir):\n" + " ".join(shlex.quote(f) for f in flags) + "\n")


@command("remove")
@click.argument("member_id", metavar="ID")
def member_remove(member_id: str) -> None:
    """Remove the member with ID (hex, as `member list` prints it); it stops
    itself. `-w json`: etcd's MemberRemoveResponse."""
    s = settings("simple", "json")
    mid = parse_hex_id(member_id)
    resp = _cluster_call("MemberRemove", rpc_pb2.MemberRemoveRequest(ID=mid))
    if s.write_out == "json":
        print_json(go_json(resp))
    else:
        out(f"Member {mid:16x} removed from cluster {resp.header.cluster_id:16x}\n")


@command("promote")
@click.argument("member_id", metavar="ID")
def member_promote(member_id: str) -> None:
    """Promote the learner with ID (hex) to a voting member; the server
    refuses while it has not caught up with the leader's log."""
    s = settings("simple", "json")
    mid = parse_hex_id(member_id)
    resp = _cluster_call("MemberPromote", rpc_pb2.MemberPromoteRequest(ID=mid))
    if s.write_out == "json":
        print_json(go_json(resp))
    else:
        out(f"Member {mid:16x} promoted in cluster {resp.header.cluster_id:16x}\n")


for _cmd in (member_list, member_add, member_remove, member_promote):
    member.add_command(_cmd)


# -- move-leader -------------------------------------------------------------------------------
def _status_only(session: Session, ep: Endpoint) -> rpc_pb2.StatusResponse:
    return session.call(lambda ch, t: rpc_pb2_grpc.MaintenanceStub(ch).Status(
        rpc_pb2.StatusRequest(), timeout=t), repeatable=True)


@command("move-leader")
@click.argument("target", metavar="ID")
def move_leader(target: str) -> None:
    """Transfer leadership to the member with ID (hex), as `etcdctl
    move-leader`: finds the leader among --endpoints (or, when none of them
    leads, through the member list) and asks it to hand over; returns once
    the target leads. `-w json`: etcd's MoveLeaderResponse."""
    s = settings("simple", "json")
    target_id = parse_hex_id(target)
    results = per_endpoint(s, s.endpoints, _status_only)
    statuses = [(ep, st) for ep, st, _err in results if st is not None]
    if not statuses:
        errors = "; ".join(f"{ep.shown}: {err}" for ep, _st, err in results)
        raise CtlError(f"no endpoint answered: {errors}")
    leading = [(ep, st) for ep, st in statuses if st.leader and st.leader == st.header.member_id]
    leader_ep = leading[0][0] if leading else None
    leader_id = leading[0][1].leader if leading else next((st.leader for ep, st in statuses if st.leader), 0)
    if leader_ep is None:
        if not leader_id:
            raise CtlError("the cluster has no leader right now (an election is under way?); retry")
        # None of the given endpoints leads: reach the leader through its client URLs.
        with Session(s, [statuses[0][0]]) as session:
            members = session.call(lambda ch, t: rpc_pb2_grpc.ClusterStub(ch).MemberList(
                rpc_pb2.MemberListRequest(), timeout=t), repeatable=True).members
        urls = next((list(m.clientURLs) for m in members if m.ID == leader_id), [])
        leader_eps = [parse_endpoint(u) for u in urls]
        if not leader_eps:
            raise CtlError(f"no leader endpoint given at {','.join(ep.shown for ep in s.endpoints)}, "
                           f"and the leader ({leader_id:x}) publishes no client URL")
    else:
        leader_eps = [leader_ep]
    with Session(s, leader_eps) as session:
        resp = session.call(lambda ch, t: rpc_pb2_grpc.MaintenanceStub(ch).MoveLeader(
            rpc_pb2.MoveLeaderRequest(targetID=target_id), timeout=t), repeatable=False)
    if s.write_out == "json":
        print_json(go_json(resp))
    else:
        out(f"Leadership transferred from {leader_id:x} to {target_id:x}\n")
