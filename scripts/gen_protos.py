#!/usr/bin/env python3
"""Regenerate the protobuf/gRPC modules in api/pb from the .proto files there.

The .proto files live in api/pb but are compiled under the virtual path
metastore/api/pb, so the generated modules import each other as
``metastore.api.pb.*`` -- the installed package name -- and never as
generic top-level modules.

The generated *_pb2.py modules are then pointed at metastore's private
descriptor pool (api/pb/_pool.py) instead of protobuf's default one, so they
never clash with an etcd client library's copy of the same messages.

Usage: python scripts/gen_protos.py [--out DIR]
(--out writes elsewhere; tests/test_protos_fresh.py uses it to detect stale stubs.)
"""
from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = REPO / "api" / "pb"
VIRTUAL = "metastore/api/pb"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
_DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
_PRIVATE_POOL = "_pool.POOL.AddSerializedFile("
_POOL_IMPORT = "from metastore.api.pb import _pool\n"


def use_private_pool(source: str) -> str:
    """Register a generated module's descriptors in metastore's own pool."""
    if _DEFAULT_POOL not in source:
        raise SystemExit("unexpected protoc output: no default-pool registration to redirect")
    source = source.replace(_DEFAULT_POOL, _PRIVATE_POOL)
    marker = "# @@protoc_insertion_point(imports)\n"
    return source.replace(marker, _POOL_IMPORT + marker, 1)


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Compile every .proto of api/pb into out_dir; return the files written."""
    from grpc_tools import protoc  # imported late: only generation needs grpcio-tools

    import grpc_tools

    protos = sorted(PROTO_DIR.glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
        args = [
            "protoc",
            f"-I{VIRTUAL}={PROTO_DIR}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
        ] + [f"{VIRTUAL}/{p.name}" for p in protos]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for f in sorted((pathlib.Path(tmp) / VIRTUAL).iterdir()):
            if f.name.endswith(GENERATED_SUFFIXES):
                target = out_dir / f.name
                if f.name.endswith("_pb2.py"):
                    target.write_text(use_private_pool(f.read_text()))
                else:
                    shutil.copyfile(f, target)
                written.append(target)
        return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=PROTO_DIR)
    ns = parser.parse_args()
    for path in generate(ns.out):
        print(path.relative_to(ns.out.parent) if ns.out == PROTO_DIR else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
