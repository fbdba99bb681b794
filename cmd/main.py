"""The `metastore` command."""
from __future__ import annotations

import click

from metastore import __version__
from metastore.cmd.ctl import ctl
from metastore.cmd.serve import serve
from metastore.cmd.snapshot import snapshot


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="metastore")
def cli() -> None:
    """metastore: a Raft-replicated key-value store that speaks etcd's v3 API.

    Start a member with `metastore serve`, then use etcdctl (or any etcd
    client) against it.
    """


cli.add_command(serve)
cli.add_command(snapshot)
cli.add_command(ctl)
