#!/usr/bin/env bash
# The demo: build the tiny model repository, start the server, generate a video from the sample
# image with the CLI, show a few metrics, stop the server with SIGTERM (graceful drain).
set -euo pipefail
BIN="${VENV:-.venv}/bin"
OUT=demo-out
rm -rf "$OUT" && mkdir -p "$OUT"

"$BIN/videogen-server" make-tiny-model "$OUT/repo" >/dev/null
"$BIN/videogen-server" serve --model-repository "$OUT/repo" --port 0 --metrics-port 0 \
    --port-file "$OUT/ports" --cpu-threads 1 >"$OUT/server.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null || true' EXIT

for _ in $(seq 1 120); do  # the port file appears once every model is loaded and warm
    [ -s "$OUT/ports" ] && break
    kill -0 $server 2>/dev/null || { cat "$OUT/server.log"; echo "server failed to start" >&2; exit 1; }
    sleep 0.5
done
read -r port metrics_port _ <"$OUT/ports"
echo "server ready: gRPC 127.0.0.1:$port, metrics http://127.0.0.1:$metrics_port/metrics"

"$BIN/videogen" generate --target "127.0.0.1:$port" --model svd-tiny \
    --image server/videogen_server/assets/sample.png --num-frames 8 --steps 8 --seed 42 --fps 7 \
    --out generated.mp4 --frames-dir "$OUT/frames"

"$BIN/python" - "$metrics_port" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
keep = ("videogen_requests_total", "videogen_frames_generated_total", "videogen_request_duration_seconds_sum",
        "videogen_time_to_first_frame_seconds_sum")
print("metrics (excerpt):")
print("\n".join("  " + l for l in text.splitlines() if l.startswith(keep)))
PY

kill -TERM $server
wait $server || true
trap - EXIT
frames=$("$BIN/python" -c "import av,sys; c=av.open(sys.argv[1]); print(sum(1 for _ in c.decode(video=0)))" generated.mp4)
echo "wrote $(pwd)/generated.mp4 ($frames frames) and $OUT/frames/; server log: $OUT/server.log"
