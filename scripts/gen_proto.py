"""Generate the Python gRPC stubs of the retrieval service from proto/ (the one way to make them).

    python scripts/gen_proto.py           # rewrite retriever_service/v1/*_pb2*.py(i)
    python scripts/gen_proto.py --check   # exit 1 if the checked-in stubs are stale

protoc names the generated modules after the proto package (``rest.retriever.v1``), which would
collide with this project's own ``rest`` package; the stubs therefore live in
``retriever_service/v1/`` and their cross-module import is rewritten to point there.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO_FILE = "rest/retriever/v1/retriever.proto"
PROTO_PACKAGE = "rest.retriever.v1"
TARGET_PACKAGE = "retriever_service.v1"
TARGET_DIR = ROOT / "retriever_service" / "v1"
GENERATED = ("retriever_pb2.py", "retriever_pb2.pyi", "retriever_pb2_grpc.py")


def run_protoc(out_dir: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    # protoc needs the well-known types' directory on its include path even when they are unused.
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        PROTO_FILE,
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {PROTO_FILE}")


def rewrite_imports(source: str) -> str:
    """``from rest.retriever.v1 import x`` -> ``from retriever_service.v1 import x``."""
    pattern = rf"^from {re.escape(PROTO_PACKAGE)} import "
    return re.sub(pattern, f"from {TARGET_PACKAGE} import ", source, flags=re.MULTILINE)


def generate(out_dir: Path) -> list[Path]:
    """Write the stubs into ``out_dir`` and return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        run_protoc(Path(tmp))
        produced = Path(tmp, *PROTO_PACKAGE.split("."))
        paths = []
        for name in GENERATED:
            text = rewrite_imports((produced / name).read_text())
            target = out_dir / name
            target.write_text(text)
            paths.append(target)
    return paths


def stale_files(checked_in: Path = TARGET_DIR) -> list[str]:
    """Unified diffs of every stub that differs from what the proto generates now."""
    diffs = []
    with tempfile.TemporaryDirectory() as tmp:
        for fresh in generate(Path(tmp)):
            current = checked_in / fresh.name
            old = current.read_text().splitlines(keepends=True) if current.exists() else []
            new = fresh.read_text().splitlines(keepends=True)
            if old != new:
                diffs.append("".join(difflib.unified_diff(old, new, str(current), "regenerated")))
    return diffs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the stubs are stale")
    args = parser.parse_args()
    if args.check:
        diffs = stale_files()
        if diffs:
            sys.stdout.write("".join(diffs)[:20000])
            print("\nstale stubs: run `python scripts/gen_proto.py` and commit the result")
            return 1
        print("stubs are up to date")
        return 0
    for path in generate(TARGET_DIR):
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
