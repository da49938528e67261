#!/usr/bin/env bash
# Builds deploy/docker/Dockerfile and checks the image as Kubernetes runs it, on any machine (no GPU: the
# tiny model on the CPU; the image's CUDA torch runs there too). `make image-smoke` runs it.
#
# The server container runs as deploy/k8s/deployment.yaml has it: the image's user (uid 10001), a
# read-only root filesystem with a tmpfs on /tmp, every capability dropped, no new privileges, the model
# repository mounted read-only. A second container of the same image is the caller (its `videogen` CLI
# and Python). Checked: the health-only port answers SERVING; `videogen wait-ready` and `generate` over
# gRPC; the MP4 decodes to the requested frames; /metrics counts the request; SIGTERM drains: a
# generation in flight completes and the server exits 0.
#
# Environment:
#   CONTAINER_ENGINE   docker (default when its daemon answers) or podman, with any global options
#                      (e.g. "podman --runtime runc --cgroup-manager cgroupfs" where crun cannot run)
#   BUILD_ARGS         extra build options (e.g. "--isolation chroot" for podman without a runtime;
#                      "--build-arg BASE_IMAGE=..." where Docker Hub's python image cannot be pulled)
#   IMAGE              tag to build and check (default videogen-server:smoke); SKIP_BUILD=1 checks it as is
#   SMOKE_PORT         first of three free host ports (default 18101): gRPC, metrics, health
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${CONTAINER_ENGINE:-}" ]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then CONTAINER_ENGINE=docker
    elif command -v podman >/dev/null; then CONTAINER_ENGINE=podman
    else echo "image-smoke: neither a docker daemon nor podman here" >&2; exit 2
    fi
fi
read -r -a ENGINE <<<"$CONTAINER_ENGINE"
read -r -a EXTRA <<<"${BUILD_ARGS:-}"
IMAGE=${IMAGE:-videogen-server:smoke}
PORT=${SMOKE_PORT:-18101}; METRICS=$((PORT + 1)); HEALTH=$((PORT + 2))
NAME=videogen-smoke-$$
WORK=$(mktemp -d)
step() { printf '\n== %s\n' "$*"; }
fail() { echo "image-smoke: FAILED: $*" >&2; "${ENGINE[@]}" logs "$NAME" 2>&1 | tail -30 >&2 || true; exit 1; }
cleanup() {
    "${ENGINE[@]}" rm -f "$NAME" >/dev/null 2>&1 || true
    # what the image's user (uid 10001) wrote, removed by that user (the host's may not own it)
    "${ENGINE[@]}" run --rm -v "$WORK:/work" --entrypoint sh "$IMAGE" -c 'rm -rf /work/* /work/.[!.]*' \
        >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    step "build $IMAGE with ${ENGINE[*]}"
    start=$SECONDS
    "${ENGINE[@]}" build "${EXTRA[@]}" -f deploy/docker/Dockerfile -t "$IMAGE" .
    echo "built in $((SECONDS - start)) s"
fi
"${ENGINE[@]}" image inspect "$IMAGE" --format 'image size: {{.Size}} bytes' || fail "no image $IMAGE"

# the caller: the image's own CLI and Python, on the host's network, /work for files
client() { "${ENGINE[@]}" run --rm --network host -v "$WORK:/work" --entrypoint "$1" "$IMAGE" "${@:2}"; }

step "tiny model repository and sample image, written by the image"
chmod 0777 "$WORK"
client videogen-server make-tiny-model /work/models >/dev/null
client python -c 'import pathlib, shutil, videogen_server.assets as a
shutil.copy(pathlib.Path(a.__file__).parent / "sample.png", "/work/in.png")'

step "server as the Deployment runs it (read-only root, no capabilities, models read-only)"
# arguments after the image replace CMD and follow the ENTRYPOINT's flags: the last --port wins.
# /tmp with exec, as the Deployment's emptyDir is (docker's --tmpfs is noexec by default; Inductor and
# Triton load the .so files they build there)
"${ENGINE[@]}" run -d --name "$NAME" --network host --read-only --tmpfs /tmp:rw,exec,size=2g \
    --cap-drop ALL --security-opt no-new-privileges -v "$WORK/models:/models:ro" "$IMAGE" \
    --log-format json --port "$PORT" --metrics-port "$METRICS" --health-port "$HEALTH" \
    --drain-grace-seconds 120 >/dev/null  # a busy CPU machine can be slow: the check is the drain, not its grace
client videogen wait-ready --target "127.0.0.1:$PORT" --timeout 300 svd-tiny || fail "never ready"
client python -c 'import sys, grpc
from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as hg
s = hg.HealthStub(grpc.insecure_channel(f"127.0.0.1:{sys.argv[1]}")).Check(h.HealthCheckRequest(service=""), timeout=10)
assert s.status == h.HealthCheckResponse.SERVING, s
print("health port: SERVING")' "$HEALTH" || fail "health port"

step "generate over gRPC"
client videogen generate --target "127.0.0.1:$PORT" --model svd-tiny --image /work/in.png --num-frames 4 \
    --out /work/out.mp4 || fail "generate"
client python -c 'import av
with av.open("/work/out.mp4") as c:
    n = sum(1 for _ in c.decode(video=0))
assert n == 4, f"{n} frames in the MP4, not 4"
print("MP4: 4 frames")' || fail "the MP4"
client python -c 'import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10).read().decode()
ok = [l for l in text.splitlines() if l.startswith("videogen_requests_total{") and "code=\"OK\"" in l]
assert ok and float(ok[0].rsplit(" ", 1)[1]) == 1.0, ok
print("metrics:", ok[0])' "$METRICS" || fail "metrics"

step "SIGTERM drains: the generation in flight completes, the server exits 0"
client videogen generate --target "127.0.0.1:$PORT" --model svd-tiny --image /work/in.png --steps 12 \
    --out /work/drained.mp4 >"$WORK/drain.log" 2>&1 &
caller=$!
for _ in $(seq 100); do grep -q '^accepted' "$WORK/drain.log" 2>/dev/null && break; sleep 0.2; done
grep -q '^accepted' "$WORK/drain.log" || fail "the drain's request was never accepted: $(cat "$WORK/drain.log")"
client python -c 'import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10).read().decode()
assert any(l.startswith("videogen_inflight_requests{") and l.endswith(" 1.0") for l in text.splitlines()), \
    "no request in flight when SIGTERM goes"' "$METRICS" || fail "nothing in flight for the drain"
"${ENGINE[@]}" stop -t 150 "$NAME" >/dev/null
wait "$caller" || fail "the request in flight did not complete through the drain: $(tail -3 "$WORK/drain.log")"
code=$("${ENGINE[@]}" inspect "$NAME" --format '{{.State.ExitCode}}')
[ "$code" = 0 ] || fail "the server exited $code after SIGTERM"
"${ENGINE[@]}" logs "$NAME" 2>&1 | grep -q 'SIGTERM: draining' || fail "no drain in the server's log"
echo "drained: the request completed, exit code 0"

printf '\nimage-smoke: %s passed\n' "$IMAGE"
