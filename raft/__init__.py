"""Raft for metastore, on pysyncobj (see node.py)."""
from metastore.raft.node import RaftConfig, RaftNode, TransferOutcome

__all__ = ["RaftConfig", "RaftNode", "TransferOutcome"]
