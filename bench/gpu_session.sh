#!/usr/bin/env bash
# One device session's measurements, written under $OUT (run from the repository root on the GPU machine).
#
# The machine's image lacks diffusers, PyAV and our grpc pins: carry them as wheels in .whl/ together with
# this repository's own wheel (stubs are generated at build time), as /work/.library/device/README.md says.
# `bash bench/gpu_wheels.sh /path/to/venv/python` fills .whl/ (49 MiB); run it right before the call: the
# machine runs the wheel, not the tree (gpu-PART.txt says whether they match).
#
# part1: the plain pipeline and the compiled server from a cold cache, then (a new process, as a restart
#        would be) the compiled server from the warm cache. tricks: one eager UNet forward per option.
# part2: the plain pipeline and the compiled server with FP8 linears (PSNR of its frames against the
#        plain ones), then the pipeline's low-memory recipe beside ours with and without forward
#        chunking (~7 min with the cold FP8 compile; self-contained).
# part3: the compiled server with Inductor's conv_1x1_as_mm and coordinate-descent tuning.
# part4: part2 with --profile (device time per step by kernel kind), then the fp16 compiled server if time is left.
# part5: the fp16 compiled UNet's step profile, then the same with channels_last (predicted: the 0.031 s of
#        cuDNN layout transposes per step gone, ~0.43 s a step against 0.456).
# part6: the fourth session's options, beside a baseline in the same call: the plain pipeline, the compiled
#        server (UNet only, as part5's first run) and the same with fold_cross_attention, temporal_convs_2d
#        and cudnn_benchmark, both profiled (each option shows in its own bucket of the step). Both server
#        runs also have this session's always-on changes (one step of run-ahead, uint8 frames made on the
#        device, frames before the MP4, the MP4 streamed per chunk). Then unet_tricks in the time left.
#        ~8 min.
# part7: the target itself, in one call: the plain pipeline and the full configuration (UNet + VAE compiled,
#        with the fourth session's options but cudnn_benchmark (unmeasured; its timing of every new shape would
#        lengthen the cold start), and the fifth's for the VAE decoder: its temporal convolutions as
#        2-d and Inductor's layout optimisation forced through compile_vae_options) end to end and first
#        frame, profiled, so each option still shows in its bucket against run 4's profile (cross-attention
#        flash calls gone, layout transposes down) and the decode beside run 3's 1.09 s (~6.5-8 min). If that
#        server failed or left no figures and the call has >= ~4 min left (SECONDS < 330), the same without
#        the forced VAE layout. Run this first when a session can afford one call (name kind nvidia-h200:
#        the earlier runs compared against are H200 ones); part6 splits the options apart.
# part9: GEMM autotuning for the compiled UNet (Inductor's max_autotune_gemm: Triton GEMM templates against
#        cuBLAS per shape, with epilogue fusion benchmarked where a pointwise op follows a GEMM), UNet only, profiled,
#        its own cache (a long cold compile, ~6-8 min; a one-off with compile_cache_dir). Compare its step with
#        part6's baseline (p9) or run 3's 0.456 s.
# part8: the low-memory mode with the UNet compiled (compile=default, allowed with cpu_offload since the
#        fourth session), ~4 min.
# part10: compile artifacts (eleventh session): `videogen-server compile-artifacts` writes part7's configuration's
#        compiled code (from part7's cache when this machine just ran part7, ~1-2 min; else a cold compile,
#        ~5 min), then a server whose compile cache is empty loads the file: its ready_s against run 3's 36.6 s
#        (warm cache) and 272.9 s (cold); predicted ~40 s. Reports the file's size (Triton's kernels bundled).
# part11: static FP8 (twelfth session) on part7's configuration: the UNet's linear layers in FP8 with one
#        activation scale per layer calibrated on the warm-up, so the quantisation fuses into the kernels
#        producing the activations (run 4's dynamic row-wise scales cost ~0.095 s a step and made FP8 slower
#        than fp16). The UNet compiles cold (~2.5 min; the VAE's graphs come from part7's cache when this
#        machine ran it, with the plain pipeline's saved frames for the PSNR). Predicted: ~0.035-0.05 s a
#        step below the fp16 server of part7, PSNR against the plain pipeline near run 4's 46 dB.
# part12: part9's GEMM templates plus coordinate-descent tuning of Inductor's own kernels (nineteenth session:
#        run 6's step is GEMMs 0.115 s, glue 0.131 s of 0.429 s), UNet only, profiled (templates counted
#        apart: gemm_triton, conv_triton). Predicted ~0.40-0.42 s a step against run 6's 0.429 s. Its cold
#        compile is unknown (part9's 6-8 min is a guess too): a call of its own, first in a session.
#
# fa4a, then part13 (twentieth session): FlashAttention-4 (attention_kernel=fa4) for the UNet's self-attentions.
#        FA4 and the CUTLASS DSL do not fit one call beside the wheels: `gpu_wheels.sh PY --fa4` packs them
#        as .fa4a/ and .fa4b/. Call 1: carry [".fa4a"], `bash bench/gpu_session.sh fa4a` (~2 min with the
#        start): leaves the first piece in /tmp and times torch's attention kernels at the step's shapes
#        (attention_bench.py). Call 2 at once (the machine goes back after 30 s idle): carry
#        [".whl", ".fa4b"], `bash bench/gpu_session.sh part13` (~6-7 min): FA4 against cuDNN per shape, then
#        the server with fa4, profiled. A call 2 that finds no first piece runs part12.
#
# part14 (twentieth session): part7 with split_group_norm (group norms from per-channel statistics), the plain
#        pipeline beside it for the frames' PSNR, profiled (~7.5 min: one call of its own). Since the
#        twenty-first session also fold_upsample, in the way upsample_bench.py (run first, ~30 s) finds
#        fastest, if any beats stock, and conv_bench.py (~1 min) after the server if the call has time left
#        (else part15 runs it); fa4a runs upsample_bench too.
# part15 (twenty-first session): part14's server restarted with the compile cache part14 filled: the
#        warm-ready target (<= 60 s), last measured in run 3; then conv_bench if part14 could not, then
#        geglu_bench.py (twenty-second session: the UNet's 48 GEGLUs stock and fused, fused_geglu) with the
#        time left. The call right after part14, at once (VG_CALL_SECONDS=300, timeout_s 300; ~3.5-5 min).
# part16 (twenty-second session): geglu_bench, then, if the fused GEGLU kernel won, the UNet served with
#        fused_geglu (run 6's UNet options, the VAE eager, profiled; ~5-6 min, a cold UNet compile); else part12.
#
# Compile caches: part7 packs its cache (/tmp/vg-cc-full) as $OUT/cc-full.tar.xz when that fits in what a call
# returns (15 MiB here) and reports its size either way. A later session on the same kind of card, code and
# torch can carry it back (copy it into .cc/, which .gitignore has, and name .cc in carry beside
# .whl: 64 MiB in all, the wheels take 48): every .cc/*.tar.xz is unpacked into /tmp first, so the same
# server params start warm (~37 s to ready instead of ~270 s), leaving the call's time for more variants.
set -u
SECONDS=${VG_SESSION_SECONDS:-0}  # a part handing over to another (exec) keeps the call's clock
part=${1:?usage: bench/gpu_session.sh part1|...|part16|fa4a|tricks}
OUT=${OUT:-/tmp/vg-out}
mkdir -p "$OUT"
# what one call leaves on the machine for the next (its /tmp lives while the machine is held); another folder
# only for tests/unit/test_gpu_session.py, which runs the parts' logic here with stand-ins for the benches
STATE=${VG_STATE_DIR:-/tmp}
if [ "$part" = fa4a ]; then  # carry [".fa4a"] only (no room for .whl): leave FA4's first piece, time torch's kernels
    mkdir -p "$STATE/fa4stage" && cp .fa4a/fa4.tar.xz.0 "$STATE/fa4stage/" && ls -la "$STATE/fa4stage" | tee "$OUT/fa4a.txt"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >>"$OUT/fa4a.txt" 2>&1
    PYTHONUNBUFFERED=1 timeout 300 python3 bench/attention_bench.py --out "$OUT/attention-sdpa.json" \
        --kernels cudnn,flash,efficient 2>&1 | tee "$OUT/attention-sdpa.log"
    # the upsamplers' ways (fold_upsample), from this tree's accel.py: no wheel travels in this call
    PYTHONUNBUFFERED=1 timeout 60 python3 bench/upsample_bench.py --out "$OUT/upsample.json" 2>&1 \
        | tee "$OUT/upsample.log"
    exit 0
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
W=/tmp/vg-bench
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$OUT/gpu-$part.txt" 2>&1
# every run ends before the call's limit (590 s; VG_CALL_SECONDS=N for a call given timeout_s N, where the
# session has less device time left than a full call): killed at the limit, a run keeps what it checkpointed
CALL_SECONDS=${VG_CALL_SECONDS:-590}
bench() {
    local left=$((CALL_SECONDS - 10 - SECONDS))
    [ "$left" -gt 10 ] || { echo "no time left for bench $*"; return 1; }
    timeout -s INT -k 10 "$left" python3 bench/bench.py --workdir "$W" --repeats 1 "$@"
    local rc=$?
    find "$OUT" -name '*.json.tmp' -delete  # a run killed mid-save: the call returns few files
    return $rc
}
# the code that runs is the wheel's: say so when it is not the working tree's (rebuild it before the call)
python3 - >>"$OUT/gpu-$part.txt" 2>&1 <<'PY'
import filecmp, pathlib, videogen_server
site, tree = pathlib.Path(videogen_server.__file__).parent, pathlib.Path("server/videogen_server")
stale = [str(p.relative_to(tree)) for p in tree.rglob("*.py")
         if not (site / p.relative_to(tree)).exists() or not filecmp.cmp(p, site / p.relative_to(tree), shallow=False)]
print("WARNING: the wheel differs from the working tree in", stale) if stale else print("wheel = working tree")
PY
for f in .cc/*.tar.xz; do
    [ -e "$f" ] && tar -C "$STATE" -xJf "$f" && echo "unpacked compile cache $f" | tee -a "$OUT/gpu-$part.txt"
done
keep_cache() {  # DIR NAME: its size by part to $OUT/cache-NAME.txt; DIR as $OUT/NAME.tar.xz if that fits
    [ -d "$1" ] || return 0
    { du -sh "$1"/*; du -sh "$1"; } >"$OUT/cache-$2.txt" 2>&1  # two calls: du counts a file once per call
    command -v xz >/dev/null || { echo "no xz: cache not packed" >>"$OUT/cache-$2.txt"; return 0; }
    # whole, else without triton/ (Inductor's FX graph entries bundle their Triton kernels: maybe enough)
    for exclude in "" "--exclude=$(basename "$1")/triton"; do
        local left=$((CALL_SECONDS - 5 - SECONDS))  # packing ends before the call's limit, whatever the cache's size
        [ "$left" -gt 15 ] || { echo "no time left to pack ($exclude)" >>"$OUT/cache-$2.txt"; return 0; }
        (set -o pipefail; tar -C "$(dirname "$1")" $exclude -cf - "$(basename "$1")" \
            | timeout "$left" xz -T0 -6 >"$STATE/$2.tar.xz") \
            || { echo "packing failed or timed out ($exclude)" >>"$OUT/cache-$2.txt"; return 0; }
        size=$(stat -c %s "$STATE/$2.tar.xz")
        echo "packed ${exclude:-whole}: $size bytes" >>"$OUT/cache-$2.txt"
        if [ "$size" -gt 0 ] && [ "$size" -le $((14 * 1024 * 1024)) ]; then cp "$STATE/$2.tar.xz" "$OUT/"; return 0; fi
    done
}
conv_bench() {  # the decoder's convolutions one shape at a time (~1 min): cuDNN's heuristic kernel against its
    # timed choice (cudnn_benchmark), the temporal ones as 2-d or 3-d, the one-frame chunk's with the middle
    # tap: which layer run 7's slow sm80 kernel (31 calls, 3.7 ms each) belongs to, what the decode could be
    local left=$((CALL_SECONDS - 10 - SECONDS))
    [ "$left" -gt 30 ] || { echo "no time left for conv_bench"; return 1; }
    timeout "$((left < 120 ? left : 120))" python3 bench/conv_bench.py --out "$OUT/conv.json" 2>&1 | tee "$OUT/conv.log"
    touch "$STATE/vg-conv-done"
}
geglu_bench() {  # the UNet's GEGLU layers stock and fused in one Triton kernel (fused_geglu, twenty-second
    # session), ~1-1.5 min: Triton's autotuning and two compiles per shape; `best` says whether to serve fused
    local left=$((CALL_SECONDS - 10 - SECONDS))
    [ "$left" -gt 40 ] || { echo "no time left for geglu_bench"; return 1; }
    timeout "$((left < 150 ? left : 150))" python3 bench/geglu_bench.py --out "$OUT/geglu.json" 2>&1 | tee "$OUT/geglu.log"
}
# part14's and part15's server: part7's configuration with split_group_norm (fold_upsample is picked at run time)
PART14_PARAMS="fold_cross_attention=true,temporal_convs_2d=true,split_group_norm=true,compile_cache_dir=/tmp/vg-cc-gn,compile_vae_options=force_layout_optimization=true"
case $part in
part1)
    # H200, 2026-11-26: plain ~30 s; server_compile ~270 s to ready from a cold cache (UNet and VAE) + ~2 min of requests; warm ~90 s
    bench --out "$OUT/p1" --variants plain,server_compile --time-budget 300 2>&1 | tee "$OUT/p1.log"
    bench --out "$OUT/p2" --variants server_compile_warm --time-budget 120 2>&1 | tee "$OUT/p2.log"
    ;;
part3)
    # Inductor knobs diffusers recommends for UNets, on top of reduce-overhead (cold compile, ~5 min; own cache)
    bench --out "$OUT/p6" --variants server_compile --time-budget 400 \
        --server-params "compile_options=conv_1x1_as_mm=true;coordinate_descent_tuning=true,compile_cache_dir=/tmp/vg-cc-opts" \
        2>&1 | tee "$OUT/p6.log"
    ;;
tricks)
    # one eager UNet forward per option (~50 s)
    bench --out "$OUT/p0" --variants unet_tricks 2>&1 | tee "$OUT/p0.log"
    ;;
part4)
    # part2 with device time per step by kernel kind (--profile), then, if the session has time left,
    # the fp16 compiled server again (its profile; 0 recompiles with max_decode_chunk_size) in its own cache
    bench --out "$OUT/p4" --variants plain,server_compile_fp8 --profile --time-budget 300 2>&1 | tee "$OUT/p4.log"
    bench --out "$OUT/p5" --steps 5 --variants plain_lowmem,server_offload,server_lowmem --profile --time-budget 170 \
        2>&1 | tee "$OUT/p5.log"
    if [ "$SECONDS" -lt 240 ]; then
        bench --out "$OUT/p1" --variants server_compile --profile --time-budget 60 2>&1 | tee "$OUT/p1.log"
    fi
    ;;
part5)
    # the fp16 compiled step's own kernel profile, then the same with channels-last convolutions (UNet only:
    # the VAE's compile would double the cold start and not change the step; ~8 min with the plain run)
    bench --out "$OUT/p7" --variants plain,server_compile --profile --server-params compile_vae=none \
        --time-budget 120 2>&1 | tee "$OUT/p7.log"
    bench --out "$OUT/p8" --variants server_compile --profile --time-budget 60 \
        --server-params "compile_vae=none,channels_last=true,compile_cache_dir=/tmp/vg-cc-nhwc" 2>&1 | tee "$OUT/p8.log"
    ;;
part6)
    # predicted (the table in docs/performance.md): attention -0.02 s and GEMM -0.01 s a step (fold),
    # layout transposes -0.03 s (2-d temporal convolutions), convolutions lower by an unknown amount
    # (cudnn_benchmark): ~0.39 s a step against ~0.456
    bench --out "$OUT/p9" --variants plain,server_compile --profile --time-budget 300 \
        --server-params "compile_vae=none,compile_cache_dir=/tmp/vg-cc-base" 2>&1 | tee "$OUT/p9.log"
    bench --out "$OUT/p10" --variants server_compile --profile --time-budget 60 --server-params \
        "compile_vae=none,fold_cross_attention=true,temporal_convs_2d=true,cudnn_benchmark=true,compile_cache_dir=/tmp/vg-cc-fold" \
        2>&1 | tee "$OUT/p10.log"
    left=$((570 - SECONDS))
    if [ "$left" -gt 90 ]; then
        bench --out "$OUT/p11" --variants unet_tricks --time-budget "$left" 2>&1 | tee "$OUT/p11.log"
    fi
    ;;
part7)
    # the full configuration's end to end and first frame (UNet + VAE compiled, cold, ~5.5 min), with the
    # options (edit the list to what part6 showed, if it ran first); predicted ~10.6 s, first frame ~10.1 s.
    # The VAE decoder also gets its temporal convolutions as 2-d and Inductor's layout optimisation forced
    # (off by default in its dynamic-frames graph): decode predicted below run 3's 1.09 s. Not
    # cudnn_benchmark: its gain is unknown (convolutions <= 0.12 s a step) and its cuDNN timing of every
    # new shape (the VAE's warm-up alone decodes 8 chunk lengths) would lengthen the cold start by an
    # unmeasured amount, in the one call that must fit; part6 measures it.
    opts="fold_cross_attention=true,temporal_convs_2d=true,compile_cache_dir=$STATE/vg-cc-full"
    bench --out "$OUT/p12" --variants plain,server_compile --profile --time-budget 120 --server-params \
        "$opts,compile_vae_options=force_layout_optimization=true" 2>&1 | tee "$OUT/p12.log"
    # if that server failed or left no figures (the forced VAE layout is the new risk), the same without it:
    # the UNet's options are the same, so its graphs come from the cache and only the VAE compiles
    # (~4 min with start-up and requests: only when that fits)
    if python3 -c 'import json, sys
try:
    r = json.load(open(sys.argv[1]))["variants"].get("server_compile")
except Exception:  # no results at all: the process died
    r = None
sys.exit(0 if r is None or "error" in r or "incomplete" in r else 1)' "$OUT/p12/bench_results.json" \
        && [ "$SECONDS" -lt 330 ]; then
        bench --out "$OUT/p12b" --variants server_compile --profile --time-budget 60 --server-params "$opts" \
            2>&1 | tee "$OUT/p12b.log"
    fi
    if [ "$SECONDS" -lt 540 ]; then keep_cache "$STATE/vg-cc-full" cc-full; fi
    ;;
part9)
    bench --out "$OUT/p14" --variants server_compile --profile --time-budget 60 --server-params \
        "compile_vae=none,fold_cross_attention=true,temporal_convs_2d=true,compile_cache_dir=/tmp/vg-cc-gemm,compile_options=max_autotune_gemm=true" \
        2>&1 | tee "$OUT/p14.log"
    ;;
part12)
    # max-autotune's GEMM templates (epilogues fused) and coordinate-descent tuning of the glue's kernels on
    # run 6's UNet (0.429 s a step: GEMMs 0.115 s, Inductor's glue 0.131 s); the VAE eager (the step is the
    # UNet's). Predicted ~0.40-0.42 s a step; its cold compile is unknown (each GEMM shape's Triton configs
    # are compiled and timed): a call of its own, first in a session
    bench --out "$OUT/p17" --variants server_compile --profile --time-budget 60 --server-params \
        "compile_vae=none,fold_cross_attention=true,temporal_convs_2d=true,compile_cache_dir=/tmp/vg-cc-tuned,compile_options=max_autotune_gemm=true;coordinate_descent_tuning=true" \
        2>&1 | tee "$OUT/p17.log"
    ;;
part16)
    # the UNet's GEGLUs fused into their projections (fused_geglu, twenty-second session): geglu_bench first
    # (~1-1.5 min; part15 may have run it already), then, if the compiled fused kernel beat stock over a step,
    # run 6's UNet options plus fused_geglu, UNet only (the VAE eager: the step is the UNet's), profiled, its
    # own cache. Predicted -0.01 to -0.03 s a step against run 6's 0.429 s. If fused did not win: part12.
    [ -f "$OUT/geglu.json" ] || geglu_bench
    fused=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1])).get('best', 'false'))" \
        "$OUT/geglu.json" 2>/dev/null || echo false)
    echo "part16: geglu_bench best=$fused" | tee "$OUT/geglu.txt"
    if [ "$fused" != "true" ]; then VG_SESSION_SECONDS=$SECONDS exec bash "$0" part12; fi
    bench --out "$OUT/p21" --variants server_compile --profile --time-budget 60 --server-params \
        "compile_vae=none,fold_cross_attention=true,temporal_convs_2d=true,fused_geglu=true,compile_cache_dir=/tmp/vg-cc-geglu" \
        2>&1 | tee "$OUT/p21.log"
    ;;
part13)
    # FlashAttention-4 for the UNet's self-attentions (attention_kernel=fa4; run 6's step: attention 0.092 s of
    # 0.429 s, cuDNN's sm90 kernel at ~340 TFLOP/s). Needs FA4's first piece left by `fa4a` on this machine
    # (the call before, within its 30 s of idle) and .fa4b carried with .whl. First each kernel alone at the
    # step's shapes (FA4 against cuDNN in one process), then, if FA4 ran every shape, the server with run 6's
    # UNet options plus fa4, UNet only, profiled, its own cache. Predicted: attention ~0.06-0.07 s a step
    # (-0.02 to -0.03 s), ~0.40-0.41 s a step. Without the first piece (a new machine): part12 instead.
    piece0=$STATE/fa4stage/fa4.tar.xz.0
    [ -f "$piece0" ] || piece0=.fa4a/fa4.tar.xz.0  # carried here too (a call with room for it)
    if [ ! -f "$piece0" ] || [ ! -f .fa4b/fa4.tar.xz.1 ]; then
        echo "part13: FA4's pieces are not both here (was fa4a the call before, on this machine?): part12 instead" \
            | tee "$OUT/fa4.txt"
        VG_SESSION_SECONDS=$SECONDS exec bash "$0" part12
    fi
    sum=$(cat "$piece0" .fa4b/fa4.tar.xz.1 | sha256sum | cut -d' ' -f1)
    [ "$sum" = "$(cat .fa4b/sha256)" ] || { echo "part13: FA4's pieces do not match (sha256)" | tee "$OUT/fa4.txt"; exit 1; }
    cat "$piece0" .fa4b/fa4.tar.xz.1 | xz -d | tar -C "$STATE" -xf - || exit 1
    # a PYTHONPATH entry reads no .pth file: the CUTLASS DSL's own (dsl_packages) is named here
    export PYTHONPATH=/tmp/site:$STATE/fa4site:$STATE/fa4site/nvidia_cutlass_dsl/dsl_packages
    # FA4's kernels compiled once (attention_bench), then loaded by the server from its on-disk cache
    export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=/tmp/fa4-kernels
    timeout 240 python3 bench/attention_bench.py --out "$OUT/attention-fa4.json" --kernels cudnn,fa4 2>&1 \
        | tee "$OUT/attention-fa4.log"
    if ! python3 -c "import json, sys; d = json.load(open(sys.argv[1])); sys.exit(d['per_step_s'].get('fa4') is None)" \
            "$OUT/attention-fa4.json"; then
        echo "part13: FA4 did not run every shape (attention-fa4.json): no server run" | tee -a "$OUT/fa4.txt"
        exit 0
    fi
    # CUDA graphs (the default mode) only if FA4's calls could be captured and replayed to the same output
    mode=$(python3 -c "import json, sys
rows = [r['kernels'].get('fa4', {}) for r in json.load(open(sys.argv[1]))['shapes']]
print('reduce-overhead' if all(r.get('graph_matches_eager') for r in rows) else 'default')" "$OUT/attention-fa4.json")
    echo "part13: compile=$mode" | tee -a "$OUT/fa4.txt"
    bench --out "$OUT/p18" --variants server_compile --profile --time-budget 60 --server-params \
        "compile=$mode,compile_vae=none,fold_cross_attention=true,temporal_convs_2d=true,attention_kernel=fa4,compile_cache_dir=/tmp/vg-cc-fa4" \
        2>&1 | tee "$OUT/p18.log"
    ;;
part14)
    # split_group_norm (twentieth session) on part7's configuration (UNet + VAE compiled, cold, its own cache):
    # group norms from per-channel statistics, whose reductions read channels-last tensors along their
    # channels. Run 7's VAE group norms took ~5 ms a call against ~0.8 ms of traffic. Predicted: decode
    # 0.92 -> ~0.75-0.8 s, Inductor's glue in the step 0.131 -> ~0.10-0.12 s if the UNet's group norms are
    # as slow (unmeasured: the profile says), so ~0.40-0.42 s a step; frames within 1/255 of run 6's
    # With it, fold_upsample (twenty-first session) in the way upsample_bench finds fastest on this card, if one
    # beats stock (~40 s, first): the UNet's and decoder's upsamplers as one convolution of the source, 5/9
    # of their arithmetic gone (4.2 TFLOP a step, ~22 a video). Predicted -0.005 to -0.008 s a step and
    # -0.04 to -0.1 s of decode; the bench's own figures split it from split_group_norm's (convolutions
    # against Inductor's kernels in the profile)
    timeout 60 python3 bench/upsample_bench.py --out "$OUT/upsample.json" 2>&1 | tee "$OUT/upsample.log"
    fold=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1])).get('best', 'false'))" \
        "$OUT/upsample.json" 2>/dev/null || echo false)
    echo "part14: fold_upsample=$fold" | tee "$OUT/upsample.txt"
    echo "$fold" >"$STATE/vg-part14-fold"  # for part15, the call after, on this machine
    bench --out "$OUT/p19" --variants plain,server_compile --profile --time-budget 120 --server-params \
        "$PART14_PARAMS,fold_upsample=$fold" 2>&1 | tee "$OUT/p19.log"
    # the server's figures first; the decoder's convolutions here if the call has time, else in part15
    if [ "$SECONDS" -lt $((CALL_SECONDS - 100)) ]; then conv_bench; fi
    ;;
part15)
    # part14's server started again in a new process, as a restart: ready with its compile cache warm (the
    # target: <= 60 s; 36.6 s on record, run 3, before the weights were loaded as float32 and cast), then
    # its requests. The call right after part14 on the same machine (30 s idle), ~2.5 min with a request
    fold=$(cat "$STATE/vg-part14-fold" 2>/dev/null) || { echo "part15: part14 did not run on this machine" | tee "$OUT/p20.txt"; exit 0; }
    bench --out "$OUT/p20" --variants server_compile_warm --time-budget 30 --server-params \
        "$PART14_PARAMS,fold_upsample=$fold" 2>&1 | tee "$OUT/p20.log"
    [ -e "$STATE/vg-conv-done" ] || conv_bench  # part14 had no time left for it
    geglu_bench
    ;;
part10)
    # the same server parameters as part7, so that its cache (if this machine ran part7) has every graph
    opts="fold_cross_attention=true,temporal_convs_2d=true,compile_cache_dir=$STATE/vg-cc-full"
    bench --out "$OUT/p15" --variants server_compile_artifacts --time-budget 60 --server-params \
        "$opts,compile_vae_options=force_layout_optimization=true" 2>&1 | tee "$OUT/p15.log"
    ;;
part11)
    opts="fold_cross_attention=true,temporal_convs_2d=true,compile_cache_dir=$STATE/vg-cc-full"
    bench --out "$OUT/p16" --variants server_compile_fp8_static --profile --time-budget 60 --server-params \
        "$opts,compile_vae_options=force_layout_optimization=true" 2>&1 | tee "$OUT/p16.log"
    ;;
part8)
    # the low-memory mode compiled (compile=default: no CUDA graphs, the UNet's weights move every request),
    # against run 5's eager 0.636 s a step at 7.69 GiB; 5 steps, cold compile ~2.5 min
    bench --out "$OUT/p13" --steps 5 --variants server_lowmem --profile --time-budget 60 \
        --server-params "compile=default,compile_cache_dir=/tmp/vg-cc-lowmem" 2>&1 | tee "$OUT/p13.log"
    ;;
part2)
    bench --out "$OUT/p4" --variants plain,server_compile_fp8 --time-budget 260 2>&1 | tee "$OUT/p4.log"
    # the low-memory gap (3.9 s per step against the pipeline's 0.72): same process, per-step figures
    bench --out "$OUT/p5" --steps 5 --variants plain_lowmem,server_offload,server_lowmem --time-budget 150 2>&1 \
        | tee "$OUT/p5.log"
    ;;
*)
    echo "unknown part $part" >&2
    exit 2
    ;;
esac
