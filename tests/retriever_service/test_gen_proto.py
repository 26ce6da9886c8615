"""The checked-in stubs are what scripts/gen_proto.py makes from proto/ now."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

from tests.retriever_service.service_testing import ROOT


def load_gen_proto():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checked_in_stubs_are_up_to_date():
    diffs = load_gen_proto().stale_files()
    assert not diffs, "stale stubs: run `python scripts/gen_proto.py`\n" + "".join(diffs)[:5000]


def test_check_mode_fails_on_a_stale_stub(tmp_path):
    gen_proto = load_gen_proto()
    gen_proto.generate(tmp_path)
    assert gen_proto.stale_files(tmp_path) == []
    stub = tmp_path / "retriever_pb2_grpc.py"
    stub.write_text(stub.read_text() + "\n# edited by hand\n")
    (diff,) = gen_proto.stale_files(tmp_path)
    assert "edited by hand" in diff


def test_check_mode_exit_code():
    done = subprocess.run([sys.executable, "scripts/gen_proto.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_generated_modules_import_as_part_of_the_package():
    text = (ROOT / "retriever_service/v1/retriever_pb2_grpc.py").read_text()
    assert "from retriever_service.v1 import retriever_pb2" in text
    assert "from rest.retriever" not in text  # would shadow / collide with the `rest` package
