"""The streamed MP4 in real browsers: headless Chromium and Firefox play the `video` chunks of a Generate
stream through Media Source Extensions, appended one by one as a web client would append them on arrival.
The two engines parse fragmented MP4 apart (edit lists, composition offsets, colour tags), so each is
checked.

Needs Debian's chromium, and firefox-esr with libavcodec (Firefox decodes H.264 with the system's
FFmpeg). `make test` installs them where apt-get can; each browser's test skips elsewhere, saying so.
"""
from __future__ import annotations

import ctypes.util
import functools
import http.server
import io
import json
import os
import queue
import re
import shutil
import subprocess
import threading
from pathlib import Path

import av
import numpy as np
import pytest

from videogen.v1 import videogen_pb2 as pb

from ..helpers import collect, raw_frames, request

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Firefox plays H.264 only through the system's FFmpeg (without it, MediaSource says the type is unsupported)
FIREFOX = (shutil.which("firefox-esr") or shutil.which("firefox")) if ctypes.util.find_library("avcodec") else None

# A fresh Firefox profile off the network this machine does not have: no first-run pages, updates,
# telemetry or remote settings.
FIREFOX_PREFS = {
    "browser.shell.checkDefaultBrowser": False,
    "browser.startup.homepage_override.mstone": "ignore",
    "browser.aboutwelcome.enabled": False,
    "app.update.enabled": False,
    "app.update.auto": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.enabled": False,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "extensions.update.enabled": False,
    "services.settings.server": "http://127.0.0.1:9/",
    "media.autoplay.default": 0,
}

PAGE = """<!doctype html><html><body>
<video id="v" muted></video><canvas id="c"></canvas><pre id="out">pending</pre>
<script>
const chunks = %(chunks)d, type = 'video/mp4; codecs="avc1.640028"', res = {supported: MediaSource.isTypeSupported(type)};
const v = document.getElementById('v'), ms = new MediaSource();
v.src = URL.createObjectURL(ms);
ms.addEventListener('sourceopen', async () => {
  try {
    const sb = ms.addSourceBuffer(type);
    for (let i = 0; i < chunks; i++) {
      sb.appendBuffer(await (await fetch(`chunk-${i}.bin`)).arrayBuffer());
      await new Promise(r => sb.addEventListener('updateend', r, {once: true}));
    }
    ms.endOfStream();
    res.buffered = [...Array(v.buffered.length).keys()].map(i => [v.buffered.start(i), v.buffered.end(i)]);
    res.duration = ms.duration;
    // what a player shows first: the frame at time 0 (the element starts there)
    const shown = new Promise(r => v.readyState >= 2 ? r() : v.addEventListener('loadeddata', r, {once: true}));
    await Promise.race([shown, new Promise(r => setTimeout(r, 5000))]);
    if (v.readyState < 2) throw new Error(`no frame at time 0 (readyState ${v.readyState})`);
    const c = document.getElementById('c');
    c.width = v.videoWidth; c.height = v.videoHeight;
    const ctx = c.getContext('2d');
    ctx.drawImage(v, 0, 0);
    res.size = [v.videoWidth, v.videoHeight];
    res.first = Array.from(ctx.getImageData(0, 0, c.width, c.height).data);
  } catch (e) { res.error = String(e); }
  document.getElementById('out').textContent = JSON.stringify(res);
  fetch('result', {method: 'POST', body: JSON.stringify(res)});  // for a browser that cannot dump its DOM
});
</script></body></html>
"""


class _Page(http.server.SimpleHTTPRequestHandler):
    """Serves the page and its chunks; takes the result the page posts back."""

    result: "queue.Queue[dict]"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(204)
        self.end_headers()
        self.result.put(json.loads(body))

    def log_message(self, *args) -> None:
        pass


def _run_chromium(url: str, folder: Path, results: "queue.Queue[dict]") -> dict:
    # the flags keep a headless Chromium off the network this machine does not have
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={folder / 'profile'}", "--virtual-time-budget=20000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="out">([^<]*)</pre>', out.stdout)
    assert found and found.group(1) != "pending", f"the page did not finish:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return json.loads(found.group(1))


def _run_firefox(url: str, folder: Path, results: "queue.Queue[dict]") -> dict:
    # headless Firefox has no DOM dump: the page posts its result, and the browser is stopped then
    profile = folder / "profile"
    profile.mkdir()
    (profile / "user.js").write_text("".join(f'user_pref("{k}", {json.dumps(v)});\n' for k, v in FIREFOX_PREFS.items()))
    log = (folder / "firefox.log").open("w")
    proc = subprocess.Popen([FIREFOX, "--headless", "--no-remote", "--profile", str(profile), url],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MOZ_CRASHREPORTER_DISABLE": "1"})
    try:
        return results.get(timeout=120)
    except queue.Empty:
        raise AssertionError(f"the page did not finish:\n{(folder / 'firefox.log').read_text()[-2000:]}") from None
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


BROWSERS = {
    "chromium": (CHROMIUM, _run_chromium, "apt-get install chromium"),
    "firefox": (FIREFOX, _run_firefox, "apt-get install firefox-esr libavcodec59 (or the release's libavcodecN)"),
}


def _play(browser: str, folder: Path, chunks: list[bytes]) -> dict:
    for i, chunk in enumerate(chunks):
        (folder / f"chunk-{i}.bin").write_bytes(chunk)
    (folder / "page.html").write_text(PAGE % {"chunks": len(chunks)})
    results: queue.Queue[dict] = queue.Queue()
    handler = functools.partial(type("Page", (_Page,), {"result": results}), directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        return BROWSERS[browser][1](f"http://127.0.0.1:{httpd.server_address[1]}/page.html", folder, results)
    finally:
        httpd.shutdown()


@pytest.mark.parametrize("browser", [
    pytest.param(name, marks=pytest.mark.skipif(path is None, reason=f"no {name}: {install}; make test does, as root"))
    for name, (path, _, install) in BROWSERS.items()])
def test_the_streamed_mp4_plays_in_a_browser_from_time_zero(browser, tiny_server, tmp_path):
    frames, fps = 8, 7
    responses = collect(tiny_server.stub(), request(num_frames=frames, num_inference_steps=2, fps=fps,
                                                    decode_chunk_size=4,
                                                    output={"frame_encoding": pb.FRAME_ENCODING_RAW_RGB}))
    chunks = [r.video.data for r in responses if r.WhichOneof("event") == "video"]
    raw = raw_frames(responses).astype(np.int16)
    got = _play(browser, tmp_path, chunks)
    assert got["supported"] and "error" not in got, got
    # the timeline a player shows: from 0, one frame each 1/fps (it started 2 frames late)
    assert len(got["buffered"]) == 1, got["buffered"]
    np.testing.assert_allclose(got["buffered"][0], [0, frames / fps], atol=1e-3)
    assert abs(got["duration"] - frames / fps) < 1e-3
    # at 0 it shows the first frame, in the colours the file holds: what a decoder converting with the
    # stream's own BT.601 shows (PyAV; ~1 level apart: Chromium's conversion rounds differently).
    # Untagged, Chromium took the YUV for BT.709: 3.6 levels apart on these frames, ~7 on gradients.
    w, h = got["size"]
    first = np.array(got["first"], np.int16).reshape(h, w, 4)[..., :3]
    errors = [float(np.abs(first - f).mean()) for f in raw]
    with av.open(io.BytesIO(b"".join(chunks))) as container:
        decoded = next(container.decode(video=0)).to_ndarray(format="rgb24").astype(np.int16)
    assert errors[0] == min(errors), errors
    assert float(np.abs(first - decoded).mean()) < 2.0
