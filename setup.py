"""Build hook: generate the Python gRPC stubs (and their .pyi) from proto/ at install time.

The include root is proto/, which mirrors the package path, so the generated modules import each
other as `videogen.v1.xxx_pb2` (and `inference.xxx_pb2` for the Open Inference Protocol) with no
rewriting. Generated code lands in the build directory only; it is never committed or edited.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "proto"


def generate_stubs(out_dir: Path) -> list[str]:
    from grpc_tools import protoc  # build requirement (pyproject [build-system])
    import grpc_tools

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = str(Path(grpc_tools.__file__).parent / "_proto")
    args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}",
            f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}"]
    plugin = shutil.which("protoc-gen-mypy_grpc") or str(Path(sys.executable).parent / "protoc-gen-mypy_grpc")
    if os.path.exists(plugin):  # typed service stubs (mypy-protobuf), when the build has it
        args += [f"--plugin=protoc-gen-mypy_grpc={plugin}", f"--mypy_grpc_out={out_dir}"]
    if protoc.main(args + protos) != 0:
        raise SystemExit(f"protoc failed on {protos}")
    written = []
    # Package markers for the generated tree (empty files; the generated modules are untouched).
    for pkg in {Path(p).parent for p in protos}:
        parts = pkg.parts
        for i in range(1, len(parts) + 1):
            init = out_dir.joinpath(*parts[:i], "__init__.py")
            if not init.exists():
                init.write_text("")
        (out_dir / pkg / "py.typed").write_text("")
    # Every top-level package the protos generate (videogen/, inference/), nothing else in build_lib.
    top_level = {Path(p).parts[0] for p in protos}
    for path in out_dir.rglob("*"):
        if path.is_file() and path.parts[len(out_dir.parts)] in top_level:
            written.append(str(path))
    return written


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        super().run()
        self._stub_outputs = generate_stubs(Path(self.build_lib))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return super().get_outputs(include_bytecode) + list(getattr(self, "_stub_outputs", []))


setup(cmdclass={"build_py": BuildPyWithStubs})
