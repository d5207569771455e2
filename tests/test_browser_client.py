"""The browser client (served at /client) in headless Chromium, with a wav file as the
microphone: it opens the websocket, streams PCM16 at the browser's rate, and gets replies."""
import asyncio
import shutil
import subprocess
import tempfile

import pytest

from test_server import start  # the same tiny streaming model and server set-up

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make test installs it)")
async def test_browser_client_talks_to_the_server(streaming_inference, tmp_path):
    from conftest import synthesize

    raw = synthesize("turn on the lights in the kitchen", str(tmp_path / "raw.wav"), rate=48000)
    mic = str(tmp_path / "mic.wav")
    subprocess.run(["sox", raw, mic, "pad", "0.5", "2.0"], check=True)  # silence so the VAD ends the turn
    srv = await start(streaming_inference)
    profile = tempfile.mkdtemp()
    page = srv.url.replace("ws://", "http://").replace("/v1/realtime", "/client?autostart")
    browser = subprocess.Popen(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
         f"--use-file-for-fake-audio-capture={mic}", "--autoplay-policy=no-user-gesture-required", page],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):  # up to 60 s: Chromium starts slowly on 2 cores
            metrics = srv.metrics.render()
            if "nestvox_responses_total" in metrics:
                break
            await asyncio.sleep(0.1)
        assert "nestvox_sessions_total 1" in metrics
        assert "nestvox_turns_total" in metrics and "nestvox_responses_total" in metrics
        assert 'nestvox_latency_ms_count{stage="speech_end_to_first_token"}' in metrics
        assert "nestvox_errors_total" not in metrics  # the page's session.update and audio were all valid
    finally:
        browser.kill()
        browser.wait()
        shutil.rmtree(profile, ignore_errors=True)
        await srv.stop()
