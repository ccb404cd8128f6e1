"""A local chat-completions server (127.0.0.1 only) for testing the openai labeller through the real client.

It answers from the private notes in the request, the way an obedient model would, and can be told
to misbehave: HTTP errors, slow replies (timeouts), malformed bodies, refusals and hallucinated
distortions. ``requests`` counts the calls it received.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

EXTRA = [("blur", "slight motion blur"), ("noise", "slight Gaussian noise"), ("compression", "slight JPEG blocking")]


def answer_from_notes(body: dict) -> str:
    """A reply that follows the instructions, built from the notes in the last user message."""
    text = "".join(p.get("text", "") for p in body["messages"][-1]["content"] if p.get("type") == "text")

    def phrases(label: str) -> list[str]:
        m = re.search(rf"^{label}: (.*)$", text, re.M)
        return re.findall(r'"([^"]+)"', m.group(1)) if m else []

    rating = re.search(r"^Overall quality: (\w+)\.", text, re.M)
    better = re.search(r"^The better image is (A|B)\.", text, re.M)
    if better:
        if "3 to 6 sentences" not in text:
            return f"Image {better.group(1)} is better."
        parts = [f"Image {better.group(1)} is better."]
        for role in ("A", "B"):
            ph = phrases(f"Image {role}")
            parts.append(f"Image {role} has {' and '.join(ph)}." if ph else f"Image {role} shows no visible distortion.")
        return " ".join(parts)
    ph = phrases("The image")
    out = f"The image shows {' and '.join(ph)}." if ph else "The image shows no visible distortion."
    if rating:
        out += f" Overall, the quality is {rating.group(1)}."
    return out


def hallucinate(body: dict) -> str:
    """A reply that adds a distortion the notes do not have."""
    text = answer_from_notes(body)
    low = text.lower()
    for cat, phrase in EXTRA:
        if cat not in low:
            if text.startswith("Image"):
                return text + f" Image A also has {phrase}."
            return phrase[0].upper() + phrase[1:] + " is visible. " + text
    return text


class Server:
    """Run with ``with Server(behaviour) as s: s.base_url``; ``behaviour(body, n) -> (status, text|body, delay)``."""

    def __init__(self, behaviour: Callable[[dict, int], tuple[int, str, float]] | None = None):
        self.behaviour = behaviour or (lambda body, n: (200, answer_from_notes(body), 0.0))
        self.requests = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with outer.lock:
                    outer.requests += 1
                    n = outer.requests
                if not self.path.endswith("/chat/completions"):
                    return self._send(404, json.dumps({"error": {"message": "not found"}}))
                status, payload, delay = outer.behaviour(body, n)
                if delay:
                    time.sleep(delay)
                if status == 200 and not payload.startswith("RAW:"):
                    payload = json.dumps({
                        "id": f"chatcmpl-{n}", "object": "chat.completion", "created": 0, "model": body.get("model"),
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": payload}}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
                elif status != 200:
                    payload = json.dumps({"error": {"message": payload, "type": "test"}})
                else:
                    payload = payload[4:]
                self._send(status, payload)

            def _send(self, status, payload):
                data = payload.encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    if status == 429:
                        self.send_header("retry-after", "0")
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> "Server":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
