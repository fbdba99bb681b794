"""The committed protobuf stubs are exactly what scripts/gen_protos.py makes."""
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_generated_stubs_match_protos(tmp_path):
    subprocess.run([sys.executable, str(REPO / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    generated = sorted(p.name for p in tmp_path.iterdir())
    committed = sorted(p.name for p in (REPO / "api" / "pb").iterdir()
                       if p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")))
    assert generated == committed, "stub files differ: run python scripts/gen_protos.py"
    stale = [name for name in generated
             if (tmp_path / name).read_bytes() != (REPO / "api" / "pb" / name).read_bytes()]
    assert not stale, f"stale generated stubs {stale}: run python scripts/gen_protos.py and commit"


def test_wire_names_are_etcds():
    """Package/service names are on the wire; spot-check the ones clients call."""
    from metastore.api.pb import kv_pb2, rpc_pb2

    services = rpc_pb2.DESCRIPTOR.services_by_name
    assert services["KV"].full_name == "etcdserverpb.KV"
    assert [m.name for m in services["KV"].methods] == ["Range", "Put", "DeleteRange", "Txn", "Compact"]
    assert services["Maintenance"].methods_by_name["Snapshot"].server_streaming
    assert services["Watch"].methods_by_name["Watch"].client_streaming
    assert kv_pb2.KeyValue.DESCRIPTOR.full_name == "mvccpb.KeyValue"
    fields = {f.name: (f.number, f.type) for f in rpc_pb2.StatusResponse.DESCRIPTOR.fields}
    assert fields["raftAppliedIndex"][0] == 7 and fields["dbSizeInUse"][0] == 9
    assert rpc_pb2.Compare.DESCRIPTOR.fields_by_name["range_end"].number == 64
    assert rpc_pb2.WatchResponse.DESCRIPTOR.fields_by_name["events"].number == 11
