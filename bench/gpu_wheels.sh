#!/usr/bin/env bash
# Fills .whl/ (.gitignore has it) with what bench/gpu_session.sh installs on the device machine: the packages
# its image lacks, as CPython 3.12 x86-64 wheels, and this tree's own videogen wheel (stubs generated at
# build time). Run it here, from the repository root, right before a device session's first `run`
# (with carry [".whl"]): a new machine has no .whl/, and the machine runs the wheel, not the tree.
#   bash bench/gpu_wheels.sh [PYTHON]    # PYTHON: one with grpcio-tools and setuptools (default python3)
set -euo pipefail
py=${1:-python3}
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
