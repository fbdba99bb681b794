"""Everything installs under `metastore`; nothing generic lands in site-packages."""
import importlib
import subprocess
import sys


def test_subpackages_live_under_metastore():
    for name in ("metastore.raft", "metastore.engines.memory", "metastore.api", "metastore.api.pb",
                 "metastore.cmd"):
        assert importlib.import_module(name).__name__ == name


def test_stdlib_cmd_is_not_shadowed():
    out = subprocess.run([sys.executable, "-c", "import cmd; print(cmd.Cmd.__name__)"],
                         capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.strip() == "Cmd"
    for generic in ("raft", "api", "engines"):
        probe = subprocess.run([sys.executable, "-c", f"import {generic}"], capture_output=True, cwd="/")
        assert probe.returncode != 0, f"a top-level module {generic!r} is importable"


def test_cli_help_reads_well():
    for args in ([], ["serve"]):
        out = subprocess.run([sys.executable, "-m", "metastore", *args, "--help"], capture_output=True,
                             text=True, cwd="/", check=True)
        assert "Usage:" in out.stdout
    serve_help = subprocess.run([sys.executable, "-m", "metastore", "serve", "--help"], capture_output=True,
                                text=True, cwd="/", check=True).stdout
    for flag in ("--name", "--data-dir", "--listen-client-urls", "--advertise-client-urls",
                 "--listen-peer-urls", "--initial-advertise-peer-urls", "--initial-cluster",
                 "--initial-cluster-token", "--initial-cluster-state", "--engine"):
        assert flag in serve_help
