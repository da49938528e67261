"""Compile artifacts (torch's portable "Mega-Cache"): `videogen-server compile-artifacts` compiles a model
once and writes what it compiled beside its weights; a server on another machine, its own compile cache
empty, loads that file and compiles nothing from scratch.

Real processes, as in production: the artifacts are written by the CLI in one process with one Inductor
cache, and served by `videogen-server serve` in another with an empty one. On a GPU the file also carries
Triton's compiled kernels (bundled into Inductor's entries), which is where a cold start spends its
minutes; on this CPU the C++ kernels are rebuilt from the loaded code, so what the test can check here is
that every graph is found (no compile from scratch) and the frames, not the time saved.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from videogen.v1 import videogen_pb2 as pb

from ..helpers import TINY_PARAMETERS, ServerThread, collect, raw_frames, request, tiny_config

RAW = {"frame_encoding": pb.FRAME_ENCODING_RAW_RGB}
WARM = 'model_warmup [ { name: "w" inputs { key: "num_inference_steps" value: "1" } } ]'
COMPILED = TINY_PARAMETERS + 'parameters { key: "compile" value { string_value: "default" } }\n'
CASE = dict(seed=11, num_inference_steps=2, decode_chunk_size=2)  # the warm-up's shape: the compiled graph runs


def _cli(*args: str, cache: Path, timeout: float, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "videogen_server.cli", *args], env=env, timeout=timeout, **kw)


def _frames(target: str, model: str) -> np.ndarray:
    import grpc

    from videogen.v1 import videogen_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        responses = collect(pb_grpc.VideoGenStub(channel), request(model=model, output=RAW, **CASE))
    assert responses[-1].WhichOneof("event") == "summary", responses[-1]
    return np.stack(raw_frames(responses)).astype(np.int16)


@pytest.mark.timeout(900)  # the tiny UNet compiled in two fresh processes: ~1.5-2.5 min on 2 busy cores
def test_compile_artifacts_let_a_server_with_an_empty_cache_compile_nothing(make_repo, tmp_path):
    """Built where the repository is prepared (`--output`, the repository's layout), then copied into it."""
    late_cache = tmp_path / "late-cache"
    repo = make_repo({"m": tiny_config("m", WARM, parameters=COMPILED), "eager": tiny_config("eager"),
                      # a model loading beside it with a compile cache of its own: m's entries, unpacked into the
                      # process's cache, must stay where m's warm-up looks for them
                      "late": tiny_config("late", parameters=COMPILED + 'parameters { key: "compile_cache_dir" '
                                          f'value {{ string_value: "{late_cache}" }} }}\n')})
    out = tmp_path / "out"
    folder = out / "m" / "1" / "compile_artifacts"
    # a build killed mid-write (a Job's deadline) left its temporary file: the next build clears it
    from videogen_server.backends.svd import accel

    name = accel.artifacts_name(torch.device("cpu"))  # (this process runs one torch thread, as --cpu-threads 1)
    folder.mkdir(parents=True)
    (folder / f".{name}.x1y2z3").write_bytes(b"half a build")

    built = _cli("compile-artifacts", "--model-repository", str(repo), "--model", "m", "--cpu-threads", "1",
                 "--output", str(out), cache=tmp_path / "builder-cache", timeout=600, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    assert not (repo / "m" / "1" / "compile_artifacts").exists()  # --output: the repository is left as it was
    files = sorted(folder.glob("*.bin"))
    assert len(files) == 1, (files, built.stdout, built.stderr[-2000:])
    path = files[0]
    assert path.name.startswith(f"torch-{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-cpu-")
    # Inductor's C++ for this CPU's vector instructions, at this thread count: a file from an AVX-512 host
    # computed garbage on an AVX2 one (a cache hit), one built at another --cpu-threads never hit (review)
    from torch._inductor import cpu_vec_isa

    picked = cpu_vec_isa.pick_vec_isa()
    isa = str(picked).replace(" ", "+") if picked else "novec"
    assert path.name == name and path.name.endswith(f"-{isa}-t1.bin"), path.name
    assert f"wrote {path}" in built.stdout, built.stdout
    assert path.stat().st_mode & 0o777 == 0o644  # servers often run as another user than the job that wrote it
    assert "compiled 1 from scratch" in built.stderr, built.stderr[-3000:]  # the builder's own cache was empty
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], "a temporary file was left behind"
    shutil.copytree(out, repo, dirs_exist_ok=True)  # `rsync -a out/ repo/`
    path = repo / "m" / "1" / "compile_artifacts" / path.name

    # a server on "another machine": its Inductor cache is a new, empty folder
    log, port_file = tmp_path / "serve.log", tmp_path / "ports"
    with log.open("w") as out:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "server-cache"), "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "videogen_server.cli", "serve", "--model-repository", str(repo),
                                 "--host", "127.0.0.1", "--port", "0", "--metrics-host", "127.0.0.1", "--metrics-port", "0",
                                 "--cpu-threads", "1",
                                 "--model-control-mode", "explicit", "--load-model", "m", "--load-model", "late",
                                 "--port-file", str(port_file)],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600
            while not port_file.exists():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            text = log.read_text()
            assert f"compile artifacts {path.name} (" in text, text[-3000:]
            assert "m/1#0 warm-up built 1 graphs: Inductor found 1 in its cache and compiled 0 from scratch" in text, \
                text[-3000:]
            grpc_port, metrics_port = port_file.read_text().split()[:2]
            compiled = _frames(f"127.0.0.1:{grpc_port}", "m")
            assert "runs uncompiled" not in log.read_text()
            # and the metrics say what the log said: an operator's alert need not read logs
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as scrape:
                lookups = {sample.labels["result"]: sample.value
                           for family in text_string_to_metric_families(scrape.read().decode())
                           for sample in family.samples
                           if sample.name == "videogen_compile_cache_lookups_total" and sample.labels["model"] == "m"}
            assert lookups == {"hit": 1, "miss": 0, "bypass": 0}, lookups
        finally:
            proc.terminate()
            proc.wait(60)
    assert proc.returncode == 0, log.read_text()[-3000:]
    with ServerThread(repo, model_control_mode="explicit", load_models=("eager",)) as server:
        eager = _frames(server.target, "eager")
    assert np.abs(compiled - eager).max() <= 1


def test_compile_artifacts_go_beside_the_weights_unless_an_output_folder_is_given(make_repo, tmp_path):
    from videogen_server.config import ServerConfig
    from videogen_server.engine.engine import Engine
    from videogen_server.metrics import Metrics

    repo = make_repo({"m": None})
    for config, expected in (
            (ServerConfig(model_repositories=(repo,), write_compile_artifacts=True),
             repo / "m" / "2" / "compile_artifacts"),
            (ServerConfig(model_repositories=(repo,), write_compile_artifacts=True, compile_artifacts_output=tmp_path),
             tmp_path / "m" / "2" / "compile_artifacts"),
            (ServerConfig(model_repositories=(repo,)), None)):  # serve: nothing is written
        engine = Engine(config, Metrics())
        engine.scan()
        assert engine.compile_artifacts_out("m", 2) == expected


def test_compile_artifacts_needs_a_model_that_compiles_and_names_what_failed(make_repo, tmp_path, capsys):
    from videogen_server.cli import _compile_artifacts
    from videogen_server.config import ServerConfig

    from videogen_server.errors import InvalidRequest

    repo = make_repo({"eager": tiny_config("eager"), "cold": tiny_config("cold", parameters=COMPILED)})

    def run(model: str, **kw) -> str:
        config = ServerConfig(model_repositories=(repo,), model_control_mode="explicit", load_models=(model,),
                              metrics_port=-1, cpu_threads=1, write_compile_artifacts=True, **kw)
        assert asyncio.run(_compile_artifacts(config)) == 1
        return capsys.readouterr().err

    err = run("eager")
    assert "eager version 1: failed" in err and "compile: this model compiles nothing" in err, err
    # compiled, but no warm-up compiles it: what torch holds would be other models' graphs
    err = run("cold")
    assert "cold version 1: failed" in err and "warm-up compiled nothing" in err, err
    assert not list(repo.glob("*/1/compile_artifacts/*"))
    # a folder it cannot write: found before the weights load and minutes of compiling, not after
    (tmp_path / "a-file").write_text("")
    err = run("cold", compile_artifacts_output=tmp_path / "a-file")
    assert f"cannot write compile artifacts to {tmp_path / 'a-file' / 'cold' / '1' / 'compile_artifacts'}" in err, err
    with pytest.raises(SystemExit) as exit_, capsys.disabled():
        from videogen_server.cli import main

        main(["compile-artifacts", "--model-repository", str(repo), "--model", "cold", "--model", "eager"])
    assert exit_.value.code == 2  # not the last one silently, the others compiling from scratch at every start
    with pytest.raises(InvalidRequest, match=r"--model: one model a run"):
        asyncio.run(_compile_artifacts(ServerConfig(model_repositories=(repo,), model_control_mode="explicit",
                                                    load_models=("*",), write_compile_artifacts=True)))

    unknown = _cli("compile-artifacts", "--model-repository", str(repo), "--model", "nope", cache=tmp_path / "c",
                   timeout=120, capture_output=True, text=True)
    # named by the flag this command takes (not serve's --load-model) and the repository searched
    assert unknown.returncode == 2 and f"{repo}: --model: not in the repository: ['nope']" in unknown.stderr, \
        unknown.stderr[-2000:]
    assert "--load-model" not in unknown.stderr


def test_artifacts_for_another_machine_or_unreadable_ones_are_logged_and_left_out(tmp_path, caplog):
    """The model then compiles from scratch, as without the folder; nothing fails."""
    from videogen_server.backends.svd import accel

    cpu = torch.device("cpu")
    assert accel.load_compile_artifacts(tmp_path / "absent", cpu) is None
    (tmp_path / "empty").mkdir()  # left by a build that failed: no file at all is no folder, not a warning
    with caplog.at_level(logging.WARNING):
        assert accel.load_compile_artifacts(tmp_path / "empty", cpu) is None
    assert not caplog.text

    other = tmp_path / "other"
    other.mkdir()
    (other / "torch-2.11.0+cu130-py312-NVIDIA-H200-sm90.bin").write_bytes(b"x")
    with caplog.at_level(logging.WARNING):
        line, loaded = accel.load_compile_artifacts(other, cpu)
    assert not loaded and line == f"compile artifacts: none for {accel.artifacts_name(cpu)}"
    assert "has no compile artifacts for this torch, Python and device" in caplog.text
    assert "torch-2.11.0+cu130-py312-NVIDIA-H200-sm90.bin" in caplog.text  # what it has, to see the mismatch

    # an empty file (a node lost before the build's write reached the disk): said, not passed over
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / accel.artifacts_name(cpu)).write_bytes(b"")
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        line, loaded = accel.load_compile_artifacts(tmp_path / "zero", cpu)
    assert not loaded and "is empty: compiling from scratch" in caplog.text

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / accel.artifacts_name(cpu)).write_bytes(b"not torch's format")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        line, loaded = accel.load_compile_artifacts(broken, cpu)
    assert not loaded and "could not be loaded" in caplog.text and "compiling from scratch" in caplog.text
    # once per file and process: a second instance of the model neither reloads nor logs it again
    caplog.clear()
    assert accel.load_compile_artifacts(broken, cpu) == (line, False) and not caplog.text
    # but a file that changed (a new build, then a reload) is read again
    (broken / accel.artifacts_name(cpu)).write_bytes(b"a newer build, still not torch's format")
    with caplog.at_level(logging.WARNING):
        accel.load_compile_artifacts(broken, cpu)
    assert "could not be loaded" in caplog.text


@pytest.mark.timeout(300)
def test_cache_lookups_are_counted_for_the_thread_that_compiled(tmp_path):
    """Instances and models warm up at once, each on its thread, and torch's counters are process-wide:
    each instance's warm-up line (and the warning that artifacts did not cover it) must count only its
    own graphs."""
    import threading

    from videogen_server.backends.svd import accel

    accel.GraphCounter.install()
    barrier = threading.Barrier(2)
    idents, before = {}, {}

    def compile_one(k: int) -> None:
        # a thread id is reused once its thread ended, and counts are kept per id: what this thread
        # counts is what was added from its start, as the backend reads it (graphs_before, lookups_before)
        idents[k] = threading.get_ident()
        before[k] = accel.GraphCounter.lookups(idents[k])
        fn = torch.compile(lambda x: torch.sin(x) * (k + 2) + k, fullgraph=True)
        barrier.wait()
        fn(torch.randn(8 + k))

    threads = [threading.Thread(target=compile_one, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    for k in range(2):
        hits, misses, bypassed = (a - b for a, b in zip(accel.GraphCounter.lookups(idents[k]), before[k]))
        assert (hits + misses, bypassed) == (1, 0), (k, hits, misses, bypassed)


def test_a_compile_cache_with_a_folder_this_user_cannot_write_is_left_out(tmp_path):
    """Inductor writes its locks and new entries into folders an earlier run made: one made by another
    user (a debugging run as root, an image whose user changed) failed the warm-up's first compile and the
    version, where only the top folder was checked (review). As root here, the check runs in a child
    process that has become another user."""
    import stat

    from videogen_server.backends.svd import accel

    def check(cache: Path) -> int:
        """use_compile_cache in a child process (as a new server would call it), as another user when this
        one is root: 3 left out, 0 taken, 6 the child could not become another user."""
        pid = os.fork()
        if pid == 0:  # the child: only the check, then out (no pytest, no gRPC)
            status = 4
            try:
                if os.getuid() == 0:
                    try:
                        os.setgid(65534)
                        os.setuid(65534)
                    except OSError:
                        os._exit(6)
                accel._cache_dir, accel._unpacked = None, []  # (this child's copies: as in a new server process)
                status = 0 if accel.use_compile_cache(str(cache)) else 3
            finally:
                os._exit(status)
        deadline = time.monotonic() + 60
        while True:
            done, wait_status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(wait_status)
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                raise AssertionError("the check did not end in 60 s")
            time.sleep(0.05)

    top = Path(tempfile.mkdtemp(prefix="vg-cache-"))
    try:
        cache = top / "cache"
        (cache / "fxgraph" / "ab").mkdir(parents=True)
        for folder in (top, cache, cache / "fxgraph"):
            folder.chmod(0o777)
        # another user's folder, as this one sees it: not writable
        (cache / "fxgraph" / "ab").chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH
                                         if os.getuid() == 0 else 0o555)
        status = check(cache)
        if status == 6:
            pytest.skip("this root cannot become another user (a rootless container)")
        assert status == 3, status  # left out (the model compiles into the process's own cache), not failed
        (cache / "fxgraph" / "ab").chmod(0o777)
        assert check(cache) == 0
        # a folder it cannot even list (root's, 0700): os.walk passed over it, unchecked (review)
        (cache / "fxgraph" / "cd").mkdir()
        (cache / "fxgraph" / "cd").chmod(0o700 if os.getuid() == 0 else 0o000)
        assert check(cache) == 3
        (cache / "fxgraph" / "cd").chmod(0o777)
    finally:
        shutil.rmtree(top, ignore_errors=True)
