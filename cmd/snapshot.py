"""`metastore snapshot restore`: a new cluster's data dir from a client snapshot.

The counterpart of `etcdctl snapshot save` (which works against metastore
unchanged): as with etcd, each member of the new cluster runs restore with
its own --name and --initial-advertise-peer-urls and the same
--initial-cluster and --initial-cluster-token, then starts with `metastore
serve` and those same flags.
"""
from __future__ import annotations

import sys

import click

from metastore.cluster import parse_urls
from metastore.config import DEFAULT_PEER_URL, ENGINES, ServerConfig


def _urls(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    try:
        return parse_urls(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.group("snapshot")
def snapshot() -> None:
    """Restore snapshots taken with `etcdctl snapshot save`.

    A snapshot saved from metastore is an etcd database (etcd's tools read it
    too); one saved from etcd restores into metastore.
    """


@snapshot.command("restore")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--data-dir", default="", help="Directory to create  [default: <name>.metastore]")
@click.option("--name", default="default", show_default=True, help="Name of the member being restored.")
@click.option("--initial-cluster", default="",
              help="Every member of the new cluster as name=peer-url, comma-separated  "
                   "[default: <name>=<advertised peer url>]")
@click.option("--initial-cluster-token", default="metastore-cluster", show_default=True,
              help="Token of the new cluster (a new token makes a new cluster id).")
@click.option("--initial-advertise-peer-urls", default=DEFAULT_PEER_URL, show_default=True, callback=_urls,
              help="Peer URL of the member being restored.")
@click.option("--engine", type=click.Choice(list(ENGINES)), default="memory", show_default=True,
              help="Storage engine the member will run (`metastore serve --engine`).")
@click.option("--skip-hash-check", is_flag=True,
              help="Accept a database without the sha256 `snapshot save` appends (e.g. etcd's member/snap/db).")
def restore(file: str, data_dir: str, name: str, initial_cluster: str, initial_cluster_token: str,
            initial_advertise_peer_urls: list[str], engine: str, skip_hash_check: bool) -> None:
    """Create a member's data dir for a new cluster from snapshot FILE,
    saved from metastore or from etcd 3.4/3.5.

    The file's sha256 is checked first; a damaged or foreign file is refused
    and nothing is written. The target data dir must not exist or be empty.
    """
    from metastore import dbsnapshot

    cfg = ServerConfig(name=name, data_dir=data_dir, initial_cluster=initial_cluster,
                       initial_cluster_token=initial_cluster_token,
                       initial_advertise_peer_urls=initial_advertise_peer_urls, engine=engine)
    try:
        header = dbsnapshot.restore(file, cfg, skip_hash_check)
    except dbsnapshot.SnapshotError as exc:
        click.echo(f"metastore: snapshot restore failed: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:  # e.g. no permission to create the data dir
        click.echo(f"metastore: snapshot restore failed: {exc.strerror or exc}"
                   f"{f': {exc.filename}' if exc.filename else ''}", err=True)
        sys.exit(1)
    target = cfg.resolved().data_dir
    click.echo(f"restored snapshot {file} ({dbsnapshot.describe(header)}) into {target} "
               f"for member {name} ({engine} engine)")
