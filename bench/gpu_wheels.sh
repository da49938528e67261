#!/usr/bin/env bash
# Fills .whl/ (.gitignore has it) with what bench/gpu_session.sh installs on the device machine: the packages
# its image lacks, as CPython 3.12 x86-64 wheels, and this tree's own videogen wheel (stubs generated at
# build time). Run it here, from the repository root, right before a device session's first `run`
# (with carry [".whl"]): a new machine has no .whl/, and the machine runs the wheel, not the tree.
#   bash bench/gpu_wheels.sh [PYTHON] [--fa4]    # PYTHON: one with grpcio-tools and setuptools (default python3)
#
# --fa4 also packs FlashAttention-4 (flash-attn-4 and the CUTLASS DSL it compiles its kernels with, unpacked
# as installed, xz-compressed: ~68 MiB, more than one call carries beside the wheels) in two pieces:
# .fa4a/ (~58 MiB) for a first call, which leaves it on the machine (`gpu_session.sh fa4a`), and .fa4b/
# (the rest) for the next call, within the machine's 30 s of idle (`gpu_session.sh part13`, carry
# [".whl", ".fa4b"]). Built once (~3 min of xz here); kept while FA4_VERSIONS below is unchanged.
set -euo pipefail
py=python3
fa4=false
for arg in "$@"; do
    case $arg in --fa4) fa4=true ;; -*) echo "gpu_wheels: unknown option $arg" >&2; exit 2 ;; *) py=$arg ;; esac
done
cd "$(dirname "$0")/.."
mkdir -p .whl
# the server imports opentelemetry's API at start, tracing or not (~1 MB of wheels)
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    diffusers==0.42.1 av==18.1.0 grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 \
    protobuf==7.36.2 importlib_metadata==10.2.0 \
    opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2 \
    opentelemetry-exporter-otlp-proto-grpc==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2 \
    opentelemetry-exporter-otlp-common==0.66b2 opentelemetry-proto==1.45.2 googleapis-common-protos==1.76.0
rm -rf build .whl/videogen-*
"$py" -m pip wheel -q --no-deps --no-build-isolation . -w .whl
rm -rf build
# one version of each package (two stop the whole install there), and within what a call carries
dupes=$(ls .whl | sed -E 's/-[0-9].*//' | tr '_' '-' | tr 'A-Z' 'a-z' | sort | uniq -d)
[ -z "$dupes" ] || { echo "gpu_wheels: several versions of: $dupes (remove the old ones from .whl/)" >&2; exit 1; }
size=$(du -sm .whl | cut -f1)
ls .whl
echo "gpu_wheels: .whl/ holds ${size} MiB; a call carries 64 MiB in all, a .cc/ compile cache beside it included"
[ "$size" -le 60 ] || { echo "gpu_wheels: over 60 MiB: too large to carry with room to spare" >&2; exit 1; }
$fa4 || exit 0

FA4_VERSIONS="flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 apache-tvm-ffi==0.1.15.post2
torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5"  # the device image has torch 2.11 (cu130), triton, einops, cuda-bindings
if [ -f .fa4b/versions ] && [ "$(cat .fa4b/versions)" = "$FA4_VERSIONS" ] && [ -f .fa4a/fa4.tar.xz.0 ]; then
    echo "gpu_wheels: .fa4a/ and .fa4b/ are up to date"
else
    stage=$(mktemp -d)
    trap 'rm -rf "$stage"' EXIT
    # shellcheck disable=SC2086
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        -d "$stage/wheels" $FA4_VERSIONS
    mkdir "$stage/fa4site"
    for w in "$stage"/wheels/*.whl; do unzip -q -o "$w" -d "$stage/fa4site"; done  # a wheel unpacked = installed
    tar -C "$stage" -cf - fa4site | xz -T0 -9e >"$stage/fa4.tar.xz"
    rm -rf .fa4a .fa4b
    mkdir -p .fa4a .fa4b
    head -c $((58 * 1024 * 1024)) "$stage/fa4.tar.xz" >.fa4a/fa4.tar.xz.0
    tail -c +$((58 * 1024 * 1024 + 1)) "$stage/fa4.tar.xz" >.fa4b/fa4.tar.xz.1
    (cd "$stage" && sha256sum fa4.tar.xz) | cut -d' ' -f1 >.fa4b/sha256
    echo "$FA4_VERSIONS" >.fa4b/versions
fi
a=$(du -sm .fa4a | cut -f1); b=$(du -sm .fa4b | cut -f1)
echo "gpu_wheels: .fa4a/ ${a} MiB (call 1: gpu_session.sh fa4a), .fa4b/ ${b} MiB (call 2, beside .whl: $((size + b)) MiB)"
[ $((size + b)) -le 61 ] || { echo "gpu_wheels: .whl/ and .fa4b/ together are too large for one call" >&2; exit 1; }
