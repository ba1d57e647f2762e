"""Shared fixtures: a per-session cache for tiny-random models, test images, a CLI runner,
and a scripted OpenAI-compatible server on 127.0.0.1 (nothing here touches the network)."""
import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session", autouse=True)
def tiny_cache(tmp_path_factory):
    """tiny-random models are built once per test session into a private cache."""
    path = tmp_path_factory.mktemp("rr-cache")
    os.environ["RATIONALREWARDS_CACHE"] = str(path)
    os.environ["HF_HUB_OFFLINE"] = "1"
    return path


def solid(color, size=(64, 48)):
    return Image.new("RGB", size, color)


@pytest.fixture
def image_dir(tmp_path):
    """red.png, blue.png, green.png, a corrupt bad.png, and no missing.png."""
    for c in ("red", "blue", "green"):
        solid(c).save(tmp_path / f"{c}.png")
    (tmp_path / "bad.png").write_text("this is not a png")
    return tmp_path


def run_cli(*argv, env=None, timeout=3600, fresh=False):
    """Run one of our commands the way a user would: `python SCRIPT ARGS` in the checkout, its exit
    code, stdout and stderr. In this process by default (the libraries are imported once per test
    session, not once per command); fresh=True starts a new Python (signals, environment
    variables read at import, installed commands)."""
    script = Path(str(argv[0])).stem
    if fresh or env or script not in ("rationalrewards", "parrot", "rl_nft", "gcr_loop"):
        full_env = {**os.environ, **(env or {})}
        return subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True,
                              text=True, env=full_env, timeout=timeout)
    import contextlib
    import importlib
    module = importlib.import_module(script)
    out, err, cwd, old_argv = io.StringIO(), io.StringIO(), os.getcwd(), sys.argv
    code = 0
    try:
        os.chdir(ROOT)
        sys.argv = [str(a) for a in argv]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                module.cli()
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else 1
    finally:
        os.chdir(cwd)
        sys.argv = old_argv
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def dominant_colour(data_url: str) -> str:
    """'red', 'green' or 'blue' for a base64 PNG data URL: lets a scripted server 'see' images."""
    raw = base64.b64decode(data_url.split(",", 1)[1])
    r, g, b = Image.open(io.BytesIO(raw)).convert("RGB").resize((1, 1)).getpixel((0, 0))
    return ("red", "green", "blue")[max(range(3), key=lambda i: (r, g, b)[i])]


class ScriptedServer:
    """An OpenAI-compatible chat-completions server with scripted behaviour.

    `handler(payload) -> reply` decides each answer; a reply is a string (the message
    content), a dict (the whole JSON body), an int (an HTTP error status),
    ("hang", seconds) to hold the connection open without answering, ("stall", text, seconds) to
    stream `text` and then send nothing, ("drip", text, seconds) to stream `text` a character at a
    time, `seconds` apart, or ("raw", bytes) to send these bytes as the whole reply.
    A request with "stream": true gets its reply as server-sent events, as vLLM sends them.
    """

    def __init__(self, handler):
        self.handler, self.requests = handler, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "payload": payload})
                reply = server.handler(payload)
                if isinstance(reply, tuple) and reply[0] == "hang":
                    time.sleep(reply[1])
                    return
                if isinstance(reply, tuple) and reply[0] == "raw":
                    self.wfile.write(reply[1])
                    self.close_connection = True
                    return
                if isinstance(reply, int):
                    self.send_response(reply)
                    self.end_headers()
                    self.wfile.write(b'{"error": "scripted failure"}')
                    return
                if payload.get("stream") and not isinstance(reply, int):
                    return self.stream(reply)
                if isinstance(reply, str):
                    reply = {"choices": [{"index": 0,
                                          "message": {"role": "assistant", "content": reply}}]}
                body = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def stream(self, reply):
                """The reply as server-sent events: the text in two chunks, then the finish."""
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                stall = reply[2] if isinstance(reply, tuple) and reply[0] == "stall" else None
                text, finish = (reply[1], None) if stall else (reply, "stop")
                if isinstance(reply, tuple) and reply[0] == "drip":
                    for ch in reply[1]:
                        event = {"choices": [{"index": 0, "delta": {"content": ch}}]}
                        self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                        self.wfile.flush()
                        time.sleep(reply[2])
                    text = ""
                if isinstance(reply, dict) and isinstance(reply.get("choices"), list) and \
                        reply["choices"] and isinstance(reply["choices"][0], dict) and \
                        "message" in reply["choices"][0]:
                    choice = reply["choices"][0]
                    text, finish = choice["message"].get("content"), choice.get("finish_reason",
                                                                                "stop")
                if isinstance(text, str) or text is None:
                    half = len(text or "") // 2
                    events = [{"choices": [{"index": 0, "delta": {"content": part},
                                            "finish_reason": None}]}
                              for part in ((text or "")[:half], (text or "")[half:])]
                    events += [{"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}]
                else:  # a body of another shape, sent as it is
                    events = [text]
                for event in events if not stall else events[:1]:
                    self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                    self.wfile.flush()
                if stall:
                    time.sleep(stall)
                    return
                self.wfile.write(b"data: [DONE]\n\n")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted_server():
    servers = []

    def start(handler):
        servers.append(ScriptedServer(handler))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def images_in(payload) -> list:
    """Data URLs of the images in a chat-completions request, in order."""
    return [p["image_url"]["url"] for m in payload["messages"] if isinstance(m["content"], list)
            for p in m["content"] if p["type"] == "image_url"]


def text_in(payload) -> str:
    return "".join(p.get("text", "") for m in payload["messages"] if isinstance(m["content"], list)
                   for p in m["content"] if p["type"] == "text")


def optimise(parts: dict, x0, cond, r, keep, gen, step: int):
    """rl_nft.optimise_epoch on a run made of `parts` only (transformer, optimizer, params,
    sigmas, geo, args; no EMA), for tests that build the pieces themselves."""
    import types
    import rl_nft
    run = types.SimpleNamespace(pipe=types.SimpleNamespace(transformer=parts.pop("transformer")),
                                ema=None, **parts)
    return rl_nft.optimise_epoch(run, rl_nft.Collected(x0, cond, r, keep), gen, step)
