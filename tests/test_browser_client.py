"""The browser client (served at /client) in headless Chromium, with a wav file as the
microphone: it opens the websocket, declares its rate in a GA session.update, streams
PCM16 at the browser's rate and shows the replies (response.output_text.delta); a typed
line is a typed turn. The page's DOM is read over the DevTools protocol."""
import asyncio
import json
import os
import re
import shutil
import subprocess
import tempfile
import urllib.request

import pytest

from test_server import start  # the same tiny streaming model and server set-up

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LATENCY_LINE = re.compile(r"(completed|incomplete|cancelled): (end of speech|request) → first token [\d.]+ ms, "
                          r"→ last token [\d.]+ ms")
LOG = "JSON.stringify([...document.querySelectorAll('#log div')].map((d) => [d.className, d.textContent]))"


class DevTools:
    """Runtime.evaluate in the page, over Chromium's DevTools websocket."""

    def __init__(self, profile: str):
        self.profile = profile
        self.ws = None
        self.ids = 0

    async def open(self, timeout: float = 60.0) -> None:
        from websockets.asyncio.client import connect

        port_file = os.path.join(self.profile, "DevToolsActivePort")
        for _ in range(int(timeout * 10)):
            if os.path.exists(port_file) and open(port_file).read().strip():
                break
            await asyncio.sleep(0.1)
        port = int(open(port_file).read().split()[0])
        for _ in range(int(timeout * 10)):
            targets = await asyncio.to_thread(
                lambda: json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5).read()))
            pages = [t for t in targets if t.get("type") == "page" and "/client" in t.get("url", "")]
            if pages:
                break
            await asyncio.sleep(0.1)
        self.ws = await connect(pages[0]["webSocketDebuggerUrl"], max_size=1 << 24, proxy=None)

    async def eval(self, expression: str):
        self.ids += 1
        await self.ws.send(json.dumps({"id": self.ids, "method": "Runtime.evaluate",
                                       "params": {"expression": expression, "returnByValue": True}}))
        while True:
            reply = json.loads(await asyncio.wait_for(self.ws.recv(), 30))
            if reply.get("id") == self.ids:
                return reply["result"]["result"].get("value")

    async def log(self):
        return json.loads(await self.eval(LOG))


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
         f"--use-file-for-fake-audio-capture={mic}", "--autoplay-policy=no-user-gesture-required",
         "--remote-debugging-port=0", "--remote-allow-origins=*", page],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    devtools = DevTools(profile)
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

        # the page shows the spoken turn's reply (output_text deltas) and its latency line
        await devtools.open()
        for _ in range(100):
            log = await devtools.log()
            if any(cls == "latency" for cls, _ in log):
                break
            await asyncio.sleep(0.1)
        assert ["user", "(speaking…)"] in log, log
        first = next(i for i, (cls, _) in enumerate(log) if cls == "latency")
        assert log[first - 1][0] == "" and log[first - 1][1], log  # the reply, streamed into its line
        assert LATENCY_LINE.fullmatch(log[first][1]) and "end of speech" in log[first][1], log
        assert "listening (" in await devtools.eval("document.getElementById('status').textContent")

        # a typed turn: conversation.item.create + response.create
        await devtools.eval("document.getElementById('text').value = 'turn on the lights';"
                            "document.getElementById('typed').requestSubmit()")
        for _ in range(300):
            log = await devtools.log()
            typed = [i for i, (cls, text) in enumerate(log) if text == "you: turn on the lights"]
            if typed and any(cls == "latency" for cls, _ in log[typed[0]:]):
                break
            await asyncio.sleep(0.1)
        assert typed and log[typed[0]][0] == "user", log
        after = log[typed[0] + 1:]
        assert any(cls == "" and text for cls, text in after), log  # a reply line with text
        assert any(cls == "latency" and LATENCY_LINE.fullmatch(text) and "request" in text for cls, text in after), log
        assert not any(cls == "error" for cls, _ in log), log
        assert "nestvox_errors_total" not in srv.metrics.render()
    finally:
        if devtools.ws is not None:
            await devtools.ws.close()
        browser.kill()
        browser.wait()
        shutil.rmtree(profile, ignore_errors=True)
        await srv.stop()
