"""bench/gpu_session.sh, the device sessions' script, run here for its own logic: which bench each part runs,
with which server parameters, what one call leaves for the next and what a part does when a bench failed or
time ran short. The benches themselves need the GPU, which this machine has not: a stand-in `python3` first
on PATH writes the JSON each would (as given by the test) and logs its arguments, the `timeout` limit the
script started it under and its PYTHONPATH; every other python3 call of
the script (its inline JSON reading, the wheel check) runs the real interpreter. The benches' own code is
tested elsewhere (tests/unit/test_*_bench.py, bench.py's --tiny runs); on 2026-11-28 the parts 12-16 also ran
whole on this CPU with the real benches in --tiny mode."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_session.sh"

STAND_IN = f"""#!{sys.executable}
import json, os, sys, time
args = sys.argv[1:]
try:  # started by coreutils' timeout: its options and limit (the seconds the script gave the bench)
    parent = open("/proc/%d/cmdline" % os.getppid(), "rb").read().decode().split("\\0")
    timeout = parent[1:parent.index("python3")] if os.path.basename(parent[0]) == "timeout" else None
except (OSError, ValueError):
    timeout = None
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"args": args, "timeout": timeout, "pythonpath": os.environ.get("PYTHONPATH", "")}}) + "\\n")
if args[:2] == ["-m", "pip"]:
    sys.exit(0)
if args and args[0].startswith("bench/"):
    name = os.path.basename(args[0])[:-3]
    out = args[args.index("--out") + 1]
    if name == "bench":
        os.makedirs(out, exist_ok=True)
        out = os.path.join(out, "bench_results.json")
        params = dict(p.split("=", 1) for p in args[args.index("--server-params") + 1].split(",") if "=" in p)
        # the server fills its compile cache (only part7's is under VG_STATE_DIR; the others name /tmp)
        if params.get("compile_cache_dir", "").startswith(os.environ["VG_STATE_DIR"] + "/"):
            os.makedirs(params["compile_cache_dir"], exist_ok=True)
            with open(os.path.join(params["compile_cache_dir"], "graph"), "w") as f:
                f.write("compiled")
    result = os.environ.get("FAKE_" + name.upper())
    if result is not None:  # unset: the bench died before writing anything
        with open(out, "w") as f:
            f.write(result)
    time.sleep(float(os.environ.get("FAKE_SECONDS_" + name.upper(), 0)))
    sys.exit(0)
os.execv({sys.executable!r}, [{sys.executable!r}] + args)
"""

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or shutil.which("bash") is None or shutil.which("timeout") is None,
    reason="needs Linux (/proc), bash and coreutils' timeout")


class Machine:
    """The device machine as the script sees it across calls: a working directory (the carried tree), a
    /tmp that lives between calls (VG_STATE_DIR) and, per call, an $OUT."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tree, self.state, self.bin = root / "tree", root / "state", root / "bin"
        for d in (self.tree, self.state, self.bin):
            d.mkdir()
        (self.bin / "python3").write_text(STAND_IN)
        (self.bin / "python3").chmod(0o755)
        self.calls = 0

    def run(self, part: str, *, elapsed: int = 0, call_seconds: int | None = None,
            seconds: dict[str, float] | None = None, **benches: object):
        """One call: `bash bench/gpu_session.sh PART` with `elapsed` seconds already gone; `benches` maps a
        bench's name (bench, upsample_bench, ...) to the JSON it writes (None: it writes nothing),
        `seconds` a bench's name to how long it takes."""
        self.calls += 1
        out = self.root / f"out{self.calls}"
        log = self.root / f"log{self.calls}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FAKE_", "VG_"))}
        env.update(PATH=f"{self.bin}{os.pathsep}{env['PATH']}", OUT=str(out), FAKE_LOG=str(log),
                   VG_STATE_DIR=str(self.state), VG_SESSION_SECONDS=str(elapsed))
        if call_seconds is not None:
            env["VG_CALL_SECONDS"] = str(call_seconds)
        for name, took in (seconds or {}).items():
            env[f"FAKE_SECONDS_{name.upper()}"] = str(took)
        for name, result in benches.items():
            if result is not None:
                env[f"FAKE_{name.upper()}"] = json.dumps(result)
        # its own process group, killed whole if it hangs: what it started (timeout, a bench) goes with it
        proc = subprocess.Popen(["bash", str(SCRIPT), part], cwd=self.tree, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
        ran = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return Call(proc.returncode, stdout, stderr, out, ran)


class Call:
    def __init__(self, rc: int, stdout: str, stderr: str, out: Path, ran: list[dict]) -> None:
        self.rc, self.stdout, self.stderr, self.out = rc, stdout, stderr, out
        self.records = ran  # per python3 call: its args, the `timeout` around it, its PYTHONPATH

    def runs(self, bench: str) -> list[dict]:
        """The runs of `bench`, in order."""
        return [r for r in self.records if r["args"] and r["args"][0] == f"bench/{bench}.py"]

    def record(self, bench: str) -> dict:
        """The first run of `bench`."""
        runs = self.runs(bench)
        assert runs, f"{bench} did not run: {self.benches()}"
        return runs[0]

    def limit(self, bench: str) -> int:
        """The seconds the script's `timeout` gave the first run of `bench`."""
        timeout = self.record(bench)["timeout"]
        assert timeout, f"{bench} ran without timeout"
        return int(timeout[-1])

    def benches(self) -> list[str]:
        """The benches run, in order, by script name."""
        return [Path(r["args"][0]).stem for r in self.records if r["args"] and r["args"][0].startswith("bench/")]

    def bench_args(self, index: int = 0) -> dict[str, str]:
        """The options of the index-th bench.py run."""
        args = self.runs("bench")[index]["args"][1:]
        return {args[i]: args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else ""
                for i in range(len(args)) if args[i].startswith("--")}


def params(call: Call, index: int = 0) -> dict[str, str]:
    return dict(p.split("=", 1) for p in call.bench_args(index)["--server-params"].split(","))


@pytest.fixture
def machine(tmp_path):
    return Machine(tmp_path)


SERVED = {"variants": {"server_compile": {"e2e_s": 1.0}}}


def test_part14_picks_the_upsample_fold_then_part15_restarts_the_same_server_warm(machine):
    first = machine.run("part14", upsample_bench={"best": "phases"}, bench=SERVED, conv_bench={})
    assert first.rc == 0, first.stderr
    assert first.benches() == ["upsample_bench", "bench", "conv_bench"]
    args = first.bench_args()
    assert args["--variants"] == "plain,server_compile" and "--profile" in args
    served = params(first)
    assert served["split_group_norm"] == "true" and served["fold_upsample"] == "phases"
    assert (machine.state / "vg-part14-fold").read_text().strip() == "phases"
    assert "fold_upsample=phases" in (first.out / "upsample.txt").read_text()

    second = machine.run("part15", bench={"variants": {"server_compile_warm": {"ready_s": 30.0}}}, geglu_bench={})
    assert second.rc == 0, second.stderr
    assert second.benches() == ["bench", "geglu_bench"]  # conv_bench ran in part14
    assert second.bench_args()["--variants"] == "server_compile_warm"
    assert params(second) == served  # the same configuration: its compile cache is warm


def test_part14_without_time_for_conv_bench_leaves_it_to_part15(machine):
    first = machine.run("part14", elapsed=500, upsample_bench={"best": "false"}, bench=SERVED, conv_bench={})
    assert first.rc == 0, first.stderr
    assert first.benches() == ["upsample_bench", "bench"]
    assert params(first)["fold_upsample"] == "false"
    second = machine.run("part15", conv_bench={}, geglu_bench={})
    assert second.benches() == ["bench", "conv_bench", "geglu_bench"]


def test_a_failed_upsample_bench_serves_the_stock_upsamplers(machine):
    call = machine.run("part14", upsample_bench=None, bench=SERVED, conv_bench={})
    assert call.rc == 0, call.stderr
    assert params(call)["fold_upsample"] == "false"


def test_part15_on_a_new_machine_runs_nothing(machine):
    call = machine.run("part15", geglu_bench={})
    assert call.rc == 0
    assert call.benches() == []
    assert "part14 did not run on this machine" in (call.out / "p20.txt").read_text()


@pytest.mark.parametrize("best", ["true", "false", None])
def test_part16_serves_the_fused_geglu_only_when_it_won(machine, best):
    call = machine.run("part16", geglu_bench=None if best is None else {"best": best}, bench=SERVED)
    assert call.rc == 0, call.stderr
    assert call.benches() == ["geglu_bench", "bench"]
    served = params(call)
    if best == "true":
        assert served["fused_geglu"] == "true" and "compile_options" not in served
    else:  # part12 instead: the GEMM templates
        assert "fused_geglu" not in served
        assert served["compile_options"] == "max_autotune_gemm=true;coordinate_descent_tuning=true"


def test_every_bench_ends_before_the_calls_limit(machine):
    # part16 with 575 of 590 s gone: geglu_bench has no time, part12 (exec'd) gets the clock and none either
    call = machine.run("part16", elapsed=575, geglu_bench={"best": "true"}, bench=SERVED)
    assert call.benches() == []
    assert "no time left for geglu_bench" in call.stdout and "no time left for bench" in call.stdout
    # with time: each bench's limit is what is left of the call, less 10 s to write its results
    call = machine.run("part14", elapsed=100, upsample_bench={"best": "false"}, bench=SERVED, conv_bench={})
    assert 470 <= call.limit("bench") <= 590 - 10 - 100 and call.limit("conv_bench") == 120  # its own cap
    # interrupted (SIGINT: bench.py saves what it has), then killed 10 s later
    assert call.record("bench")["timeout"][:4] == ["-s", "INT", "-k", "10"]
    call = machine.run("part14", elapsed=450, upsample_bench={"best": "false"}, bench=SERVED, conv_bench={})
    assert call.limit("conv_bench") == 120  # 100 s left after the server: conv_bench's minute fits
    call = machine.run("part14", elapsed=500, upsample_bench={"best": "false"}, bench=SERVED, conv_bench={})
    assert 75 <= call.limit("bench") <= 80 and "conv_bench" not in call.benches()
    (machine.state / "vg-conv-done").unlink()  # as if only the late part14 had run: part15 runs it
    call = machine.run("part15", elapsed=200, call_seconds=300, conv_bench={}, geglu_bench={})  # a 300 s call
    assert [75 <= call.limit(b) <= 90 for b in ("bench", "conv_bench", "geglu_bench")] == [True] * 3
    (machine.state / "vg-conv-done").unlink()
    call = machine.run("part15", call_seconds=300, conv_bench={}, geglu_bench={})
    assert call.limit("conv_bench") == 120 and call.limit("geglu_bench") == 150  # their own caps
    (machine.state / "vg-conv-done").unlink()
    call = machine.run("part15", elapsed=255, call_seconds=300, conv_bench={}, geglu_bench={})
    assert call.benches() == ["bench", "conv_bench"]  # 35 s left: too few for geglu_bench's compiles
    assert "no time left for geglu_bench" in call.stdout


def test_a_part_handing_over_keeps_the_calls_clock(machine):
    # geglu_bench takes 3 s of part16; part12, exec'd after it, counts them: its bench gets less than 480 s
    call = machine.run("part16", elapsed=100, seconds={"geglu_bench": 3}, geglu_bench={"best": "false"},
                       bench=SERVED)
    assert call.benches() == ["geglu_bench", "bench"]
    assert call.limit("bench") <= 590 - 10 - 100 - 3


def _fa4_pieces(machine: Machine, *, corrupt: bool = False) -> None:
    """FA4's archive split as gpu_wheels.sh splits it: .fa4a/ (call 1) and .fa4b/ with its sha256 (call 2)."""
    site = machine.root / "fa4site"
    site.mkdir()
    (site / "flash_attn.py").write_text("")
    archive = machine.root / "fa4.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(site, arcname="fa4site")
    data = archive.read_bytes()
    (machine.tree / ".fa4a").mkdir()
    (machine.tree / ".fa4b").mkdir()
    (machine.tree / ".fa4a" / "fa4.tar.xz.0").write_bytes(data[:100])
    (machine.tree / ".fa4b" / "fa4.tar.xz.1").write_bytes(data[100:] + (b"x" if corrupt else b""))
    (machine.tree / ".fa4b" / "sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")


def _attention(graph_ok: bool | tuple[bool, ...], fa4_ran: bool = True) -> dict:
    """attention_bench's JSON: whether FA4 ran every shape, and per shape whether its calls replayed
    under a CUDA graph to the same output."""
    per_shape = graph_ok if isinstance(graph_ok, tuple) else (graph_ok, graph_ok)
    return {"per_step_s": {"cudnn": 0.09, "fa4": 0.06 if fa4_ran else None},
            "shapes": [{"kernels": {"fa4": {"graph_matches_eager": ok}}} for ok in per_shape]}


@pytest.mark.skipif(shutil.which("xz") is None or importlib.util.find_spec("lzma") is None, reason="needs xz")
@pytest.mark.parametrize("graph_ok", [True, False, (True, False)])
def test_fa4a_then_part13_serve_fa4_in_the_mode_its_kernels_allow(machine, graph_ok):
    _fa4_pieces(machine)
    first = machine.run("fa4a", attention_bench={}, upsample_bench={})
    assert first.rc == 0, first.stderr
    assert first.benches() == ["attention_bench", "upsample_bench"]
    shutil.rmtree(machine.tree / ".fa4a")  # call 2 carries .whl and .fa4b only: the first piece is on the machine
    second = machine.run("part13", attention_bench=_attention(graph_ok), bench=SERVED)
    assert second.rc == 0, second.stderr
    assert (machine.state / "fa4site" / "flash_attn.py").exists()
    assert second.benches() == ["attention_bench", "bench"]
    assert f"{machine.state}/fa4site" in second.record("bench")["pythonpath"].split(":")  # FA4 importable
    served = params(second)
    assert served["attention_kernel"] == "fa4"
    assert served["compile"] == ("reduce-overhead" if graph_ok is True else "default")  # every shape replayed


@pytest.mark.skipif(shutil.which("xz") is None or importlib.util.find_spec("lzma") is None, reason="needs xz")
def test_part13_serves_nothing_when_fa4_missed_a_shape(machine):
    _fa4_pieces(machine)
    call = machine.run("part13", attention_bench=_attention(True, fa4_ran=False), bench=SERVED)
    assert call.rc == 0, call.stderr
    assert call.benches() == ["attention_bench"]
    assert "FA4 did not run every shape" in (call.out / "fa4.txt").read_text()


@pytest.mark.skipif(importlib.util.find_spec("lzma") is None, reason="needs Python's lzma")
def test_part13_refuses_pieces_that_do_not_match(machine):
    _fa4_pieces(machine, corrupt=True)
    call = machine.run("part13", attention_bench=_attention(True), bench=SERVED)
    assert call.rc == 1
    assert call.benches() == []
    assert "do not match" in (call.out / "fa4.txt").read_text()


def test_part13_without_fa4s_first_piece_runs_part12(machine):
    call = machine.run("part13", bench=SERVED)
    assert call.rc == 0, call.stderr
    assert call.benches() == ["bench"]
    assert params(call)["compile_options"] == "max_autotune_gemm=true;coordinate_descent_tuning=true"
    assert "part12 instead" in (call.out / "fa4.txt").read_text()


def test_part7_runs_the_full_configuration_again_without_the_forced_vae_layout_when_it_failed(machine):
    failed = {"variants": {"server_compile": {"error": "RuntimeError: ..."}}}
    call = machine.run("part7", bench=failed)
    assert call.rc == 0, call.stderr
    assert call.benches() == ["bench", "bench"]
    assert params(call, 0)["compile_vae_options"] == "force_layout_optimization=true"
    assert "compile_vae_options" not in params(call, 1)
    fine = machine.run("part7", bench=SERVED)
    assert fine.benches() == ["bench"]
    if shutil.which("xz"):  # the cache the server filled, packed for a later session to carry back
        with tarfile.open(fine.out / "cc-full.tar.xz") as tar:
            assert "vg-cc-full/graph" in tar.getnames()
    late = machine.run("part7", elapsed=330, bench=failed)  # no time for a second cold VAE compile
    assert late.benches() == ["bench"]
    cut = machine.run("part7", bench={"variants": {"server_compile": {"incomplete": "killed at the limit"}}})
    assert cut.benches() == ["bench", "bench"]
    died = machine.run("part7", bench=None)  # no results at all: the process died
    assert died.benches() == ["bench", "bench"]


def test_an_unknown_part_is_refused(machine):
    call = machine.run("part99")
    assert call.rc == 2 and "unknown part" in call.stderr
