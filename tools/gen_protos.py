"""Generate the Python protobuf/gRPC modules under ferry/_proto from protos/.

Why a script and not a bare protoc call: the generated modules are rewritten to
import each other as ``ferry._proto.*`` and to register in Ferry's own descriptor
pool. The private pool is what lets Ferry and tritonclient live in one process:
both define ``inference.ModelInferRequest`` and the default pool refuses a second
definition of a symbol.

``--check`` regenerates into a temporary folder and fails when the committed code
differs, which is how CI catches a proto edit without a regeneration.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
TARGET = ROOT / "ferry" / "_proto"
# Proto import paths whose generated modules move under ferry._proto.
GENERATED_ROOTS = r"(inference|ferry\.v1)"

POOL_MODULE = '''"""Ferry's descriptor pool, kept apart from the default one (see tools/gen_protos.py)."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
'''


def _rewrite(text: str) -> str:
    text = re.sub(rf"^from {GENERATED_ROOTS} import ", r"from ferry._proto.\1 import ", text, flags=re.M)
    text = text.replace(
        "from google.protobuf import descriptor_pool as _descriptor_pool\n",
        "from google.protobuf import descriptor_pool as _descriptor_pool  # noqa: F401\n"
        "from ferry._proto._pool import POOL as _FERRY_POOL\n",
    )
    return text.replace("_descriptor_pool.Default()", "_FERRY_POOL")


def generate(out: Path) -> None:
    from grpc_tools import protoc  # a dev dependency: only needed to regenerate

    protos = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    args = ["protoc", f"-I{PROTOS}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}"]
    if protoc.main([*args, *protos]) != 0:
        raise SystemExit("protoc failed")
    for path in out.rglob("*.py*"):
        path.write_text(_rewrite(path.read_text()))
    for folder in [out, *(p for p in out.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()
    (out / "_pool.py").write_text(POOL_MODULE)
    (out / "__init__.py").write_text('"""Generated from protos/ by tools/gen_protos.py; do not edit."""\n')


def _differences(a: Path, b: Path) -> list[str]:
    files_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    files_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    diff = sorted(str(p) for p in files_a ^ files_b)
    diff += sorted(str(p) for p in files_a & files_b if not filecmp.cmp(a / p, b / p, shallow=False))
    return diff


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if ferry/_proto is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "_proto"
        out.mkdir()
        generate(out)
        if args.check:
            stale = _differences(out, TARGET)
            if stale:
                print("ferry/_proto is stale; run `make protos`. Differs:", *stale, sep="\n  ")
                return 1
            print("ferry/_proto is up to date")
            return 0
        shutil.rmtree(TARGET, ignore_errors=True)
        shutil.copytree(out, TARGET)
    print(f"generated {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
