"""The gRPC API may grow but never break: `buf lint` and `buf breaking` over proto/.

`proto/api-baseline.json` is the released API (a buf image of proto/: videogen.v1 and our copy of
KServe v2 / Triton's protocol). Against it, buf's FILE rules refuse what would break a deployed
client (a field renumbered, removed without `reserved`, or retyped; an RPC removed), a generated
stub's users (a message or field renamed) or a config.pbtxt (text format, read by field name).
Adding fields, messages or RPCs passes. README ("API changes") says when to refresh the baseline.

buf comes from the `buf-bin` wheel (the `test` extra); each case here runs buf for real, and the
mutation cases prove the gate refuses each kind of break rather than passing everything.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BASELINE = ROOT / "proto" / "api-baseline.json"
VIDEOGEN = "proto/videogen/v1/videogen.proto"
MODEL_CONFIG = "proto/videogen/v1/model_config.proto"
KSERVE = "proto/inference/grpc_service.proto"


def _buf_binary() -> str:
    beside = Path(sys.executable).parent / "buf"  # the venv's own, installed by buf-bin
    found = str(beside) if beside.exists() else shutil.which("buf")
    if not found:
        pytest.fail("buf not found: install the test extra (`pip install '.[test]'`, which brings buf-bin)")
    return found


def _buf(tmp_path: Path, workspace: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, BUF_CACHE_DIR=str(tmp_path / "buf-cache"))
    return subprocess.run([_buf_binary(), *args], cwd=workspace, env=env, capture_output=True,
                          text=True, timeout=120)


def _workspace(tmp_path: Path) -> Path:
    """A copy of the API as it stands (buf.yaml and proto/) to mutate."""
    copy = tmp_path / "workspace"
    copy.mkdir()
    shutil.copy(ROOT / "buf.yaml", copy / "buf.yaml")
    shutil.copytree(ROOT / "proto", copy / "proto")
    return copy


def _edit(workspace: Path, path: str, old: str, new: str) -> None:
    file = workspace / path
    text = file.read_text()
    assert text.count(old) == 1, f"{path} no longer has {old!r} once: update this test's mutation"
    file.write_text(text.replace(old, new))


def test_the_api_passes_lint(tmp_path: Path) -> None:
    done = _buf(tmp_path, ROOT, "lint")
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_api_does_not_break_the_released_one(tmp_path: Path) -> None:
    done = _buf(tmp_path, ROOT, "breaking", "--against", str(BASELINE))
    assert done.returncode == 0, (
        "the API breaks the released one (proto/api-baseline.json):\n" + done.stdout + done.stderr)


# Each: (file, text, replacement, what buf's message must name).
BREAKS = {
    "field renumbered": (VIDEOGEN, "optional int32 jpeg_quality = 2;", "optional int32 jpeg_quality = 20;",
                         'field "2" with name "jpeg_quality"'),
    "field removed without reserving it": (
        VIDEOGEN, "  optional int32 motion_bucket_id = 9;\n", "",
        'field "9" with name "motion_bucket_id"'),
    "field retyped": (VIDEOGEN, "optional int64 seed = 13;", "optional string seed = 13;", '"seed"'),
    "config field renamed (config.pbtxt is read by name)": (
        MODEL_CONFIG, "int32 max_batch_size = 4;", "int32 max_batch = 4;", "max_batch_size"),
    "RPC removed": (VIDEOGEN, "  rpc UnloadModel(UnloadModelRequest) returns (UnloadModelResponse);\n", "",
                    '"UnloadModel"'),
    "KServe protocol RPC renamed": (KSERVE, "rpc ModelInfer(ModelInferRequest)",
                                      "rpc ModelInference(ModelInferRequest)", '"ModelInfer"'),
}


@pytest.mark.parametrize("kind", list(BREAKS))
def test_the_gate_refuses_a_break(kind: str, tmp_path: Path) -> None:
    path, old, new, named = BREAKS[kind]
    workspace = _workspace(tmp_path)
    _edit(workspace, path, old, new)
    done = _buf(tmp_path, workspace, "breaking", "--against", str(BASELINE))
    assert done.returncode != 0, f"buf breaking passed a {kind}"
    assert named in done.stdout, done.stdout + done.stderr


def test_the_gate_lets_the_api_grow(tmp_path: Path) -> None:
    """A new optional field, message and RPC are compatible: the check is not just refusing change."""
    workspace = _workspace(tmp_path)
    _edit(workspace, VIDEOGEN, "  ResizeMode resize_mode = 19;\n",
          "  ResizeMode resize_mode = 19;\n  // A new knob.\n  optional int32 new_knob = 20;\n")
    _edit(workspace, VIDEOGEN, "service VideoGen {\n",
          "service VideoGen {\n  // Ping answers.\n  rpc Ping(PingRequest) returns (PingResponse);\n")
    with open(workspace / VIDEOGEN, "a") as file:
        file.write("\n// Ping's request.\nmessage PingRequest {}\n// Ping's answer.\nmessage PingResponse {}\n")
    done = _buf(tmp_path, workspace, "breaking", "--against", str(BASELINE))
    assert done.returncode == 0, done.stdout + done.stderr
    lint = _buf(tmp_path, workspace, "lint")
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_lint_exemptions_are_per_element(tmp_path: Path) -> None:
    """Triton's enum names are exempted where they stand (`// buf:lint:ignore` comments), not file-wide:
    a new enum in the same file is linted like any other."""
    workspace = _workspace(tmp_path)
    with open(workspace / MODEL_CONFIG, "a") as file:
        file.write("\n// Where.\nenum Placement {\n  // Anywhere.\n  ANYWHERE = 0;\n}\n")
    done = _buf(tmp_path, workspace, "lint")
    assert done.returncode != 0 and 'Enum zero value name "ANYWHERE" should be suffixed' in done.stdout, \
        done.stdout + done.stderr


def test_lint_requires_documentation(tmp_path: Path) -> None:
    """buf's COMMENTS rules: a new field (or message, enum, RPC...) without a leading comment fails lint."""
    workspace = _workspace(tmp_path)
    _edit(workspace, VIDEOGEN, "  ResizeMode resize_mode = 19;\n",
          "  ResizeMode resize_mode = 19;\n  optional int32 new_knob = 20;  // a trailing comment is not enough\n")
    done = _buf(tmp_path, workspace, "lint")
    assert done.returncode != 0 and 'Field "new_knob" should have a non-empty comment' in done.stdout, \
        done.stdout + done.stderr
