"""`metastore ctl`: the metastore-specific companion to etcdctl.

The same global flags as etcdctl (--endpoints, -w/--write-out, --dial-timeout,
--command-timeout, --hex; given before or after the subcommand), etcdctl
3.4's output for the commands both have, plus what only metastore reports
(the Raft state of each member). The commands live in `ctl_kv` (get, put,
del, watch), `ctl_cluster` (endpoint status, member, move-leader),
`ctl_drain` (drain start, status, cancel, list: the placement HTTP API) and
`ctl_snapshot` (snapshot save, restore); `ctl_common` has the connections,
errors and output formats.

Exit codes are etcdctl's: 0 success, 1 error (the server's, or no endpoint
reachable within the dial timeout), 4 an unsupported flag value, 5 a watch
canceled by the server (or a followed drain that ended without completing),
128 a mistake in the command line.
"""
from __future__ import annotations

import click

from metastore.cmd.ctl_cluster import endpoint, member, move_leader
from metastore.cmd.ctl_common import CtlGroup, global_options
from metastore.cmd.ctl_drain import drain
from metastore.cmd.ctl_kv import delete, get, put, watch
from metastore.cmd.ctl_snapshot import snapshot


@click.group("ctl", cls=CtlGroup)
@global_options(hidden=False)
def ctl() -> None:
    """etcdctl's commands for metastore, plus its Raft status.

    \b
      metastore ctl --endpoints 127.0.0.1:2379 endpoint status -w table
      metastore ctl member list
      metastore ctl put greeting hello && metastore ctl get greeting
      metastore ctl snapshot save backup.db
      metastore ctl drain start m2 --wait
    """


for _cmd in (get, put, delete, watch, endpoint, member, move_leader, snapshot, drain):
    ctl.add_command(_cmd)
