"""Plain value types shared by every layer."""
from __future__ import annotations

import enum
from dataclasses import asdict, dataclass


class RaftRole(str, enum.Enum):
    """What a member is doing in Raft. `standalone`/`unknown` are for a store
    with no Raft node attached (unit tests, tools that open a data dir)."""

    LEADER = "leader"
    FOLLOWER = "follower"
    CANDIDATE = "candidate"
    STANDALONE = "standalone"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class RaftStatus:
    """A member's view of Raft, as GetRaftStatus and `endpoint status` report it.

    Ids are etcd-style u64 member ids (see `metastore.cluster.member_id`);
    0 means "none" (no leader known). `applied <= commit` always holds.
    """

    node_id: int
    term: int
    leader_id: int
    state: str
    applied: int
    commit: int

    def to_dict(self) -> dict:
        return asdict(self)


class RaftStatusSource:
    """Anything that can report Raft status: the Raft node, or a fake in tests."""

    def raft_status(self) -> RaftStatus:  # pragma: no cover - interface
        raise NotImplementedError
