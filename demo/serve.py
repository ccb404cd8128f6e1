"""``loupe serve``: an OpenAI-compatible API over one Assistant, with the gradio demo at ``/ui``.

``create_app(assistant, allow_files=None) -> FastAPI`` serves:

* ``GET /v1/models``: the one model (its id is ``assistant.name``; the part before ``@`` also works);
* ``POST /v1/chat/completions``: images as ``image_url`` content parts. Data URLs always; file paths
  (``file:///...`` or a plain path) only when ``allow_files`` names a root folder, and never outside
  it. Remote ``http(s)`` URLs are not fetched. ``"stream": true`` sends OpenAI SSE chunks.
  Each choice carries Loupe's structured result as the extra field ``loupe`` (DESIGN.md's record,
  the forgery mask as a base64 PNG); the ``openai`` client reads it through ``model_extra``.

Which task a request runs: the extra field ``loupe_task`` (``quality``, ``identify``, ``rate``,
``compare``, ``forgery`` or a full task name, or ``chat``) when given. Otherwise a conversation that
already has an assistant turn continues as free chat; else a question mentioning tampering, editing,
forgery, fakes or authenticity runs ``forgery.detect``, two images run a comparison (``quality.rate``,
or ``quality.compare`` with ``"loupe_detail": true``) and anything else ``quality.assess``.
Image order: one image is A; two are A, B for a comparison and reference, A for a quality task;
three are reference, A, B.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: a bad image or
request 400, a file outside ``--allow-files`` 403, an unknown model 404, too large 413.

With ``"stream": true`` the answer goes out token by token as the model writes it (greedy); the last
chunk carries Loupe's record, whose numbers come from the same pass's probabilities.
``max_tokens`` and ``temperature`` are ignored: the server's ``--max-new-tokens`` applies and decoding
is greedy. Model calls are serialised by one lock that the mounted demo shares.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import re
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from loupe_vlm.assistant import lm_precision
from loupe_vlm.assistant.inference import MODEL_HELP, Assistant, Request, Result
from loupe_vlm.assistant.processing import ImageError

from .common import (
    MAX_IMAGE_BYTES,
    UploadError,
    api_record,
    check_image_bytes,
    check_image_file,
    load_assistant,
    normalise_task,
    pick_task,
    plan,
)

# A whole request may carry three base64 images (4/3 of their bytes) plus text.
MAX_REQUEST_BYTES = 3 * (MAX_IMAGE_BYTES * 4 // 3 + 4) + 1_000_000
MAX_IMAGES = 3


class APIError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def _upload_error(exc: UploadError, param: str) -> APIError:
    return APIError(exc.status, str(exc), param=param, code="image_too_large" if exc.status == 413 else "invalid_image")


# ---- request -> Loupe request ------------------------------------------------------------------
class _Images:
    """Resolves image_url parts to opened images, enforcing the caps and the file root."""

    def __init__(self, allow_files: Path | None):
        self.root = allow_files.resolve() if allow_files is not None else None

    def load(self, url: str, param: str) -> Image.Image | Path:
        if url.startswith("data:"):
            header, sep, payload = url.partition(",")
            if not sep or ";base64" not in header:
                raise APIError(400, "image data URLs must be base64: data:image/png;base64,...", param=param,
                               code="invalid_image")
            if len(payload) * 3 // 4 > MAX_IMAGE_BYTES + 3:  # refuse before decoding
                raise _upload_error(UploadError(f"the image in {param} is about {len(payload) * 3 / 4e6:.1f} MB; "
                                                f"the limit is {MAX_IMAGE_BYTES / 1e6:.0f} MB", 413), param)
            try:
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise APIError(400, f"the image in {param} is not valid base64 ({exc})", param=param,
                               code="invalid_image") from exc
            try:
                img = check_image_bytes(data, f"the image in {param}")
                img.load()  # decode now, so a truncated file is a 400 here rather than inside the model call
            except UploadError as exc:
                raise _upload_error(exc, param) from exc
            except Exception as exc:  # PIL raises OSError/SyntaxError/... for broken data
                raise APIError(400, f"the image in {param} could not be decoded ({type(exc).__name__}: {exc}); "
                                    "send a complete PNG, JPEG or WebP", param=param, code="invalid_image") from exc
            return img
        if re.match(r"^[a-z][a-z0-9+.-]*://", url) and not url.startswith("file://"):
            raise APIError(400, f"{param}: remote image URLs are not fetched; send the image as a base64 data URL",
                           param=param, code="invalid_image")
        if self.root is None:
            raise APIError(400, f"{param}: file paths are refused by this server; send a base64 data URL, or start "
                                "it with `loupe serve --allow-files ROOT`", param=param, code="files_not_allowed")
        raw = url[len("file://"):] if url.startswith("file://") else url
        path = (self.root / raw).resolve()  # an absolute raw path replaces the root here
        if not path.is_relative_to(self.root):
            raise APIError(403, f"{param}: {raw} is outside the allowed folder {self.root}", "permission_error",
                           param=param, code="path_not_allowed")
        if not path.is_file():
            raise APIError(400, f"{param}: no image file at {path}", param=param, code="invalid_image")
        try:
            return check_image_file(path)
        except UploadError as exc:
            raise _upload_error(exc, param) from exc


def _parts(content: Any, param: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if content is None:
        return []
    if not isinstance(content, list):
        raise APIError(400, f"{param} must be a string or a list of content parts", param=param)
    return content


def build_request(body: dict, images: _Images) -> Request:
    """Turn an OpenAI chat body into one Loupe ``Request`` (see the module docstring for the rules)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    conv: list[dict] = []  # transformers-shaped messages, images as {"type": "image"}
    loaded: list[Any] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"messages[{i}] needs a role of system, developer, user or assistant",
                           param=f"messages[{i}].role")
        if msg["role"] in ("system", "developer"):
            continue  # Loupe is trained without a system prompt; one would only shift its answers
        out: list[dict] = []
        for j, part in enumerate(_parts(msg.get("content"), f"messages[{i}].content")):
            param = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                out.append({"type": "text", "text": str(part.get("text", ""))})
            elif kind == "image_url":
                if msg["role"] != "user":
                    raise APIError(400, f"{param}: images belong in user messages", param=param)
                iu = part.get("image_url")
                url = iu.get("url") if isinstance(iu, dict) else iu
                if not isinstance(url, str):
                    raise APIError(400, f"{param}: image_url needs a url", param=param)
                if len(loaded) == MAX_IMAGES:
                    raise APIError(400, f"at most {MAX_IMAGES} images (reference, A, B) per request", param=param)
                loaded.append(images.load(url, param))
                out.append({"type": "image"})
            else:
                raise APIError(400, f"{param}: unsupported content part type {kind!r} (text and image_url only)",
                               param=param)
        conv.append({"role": msg["role"], "content": out})
    if not loaded:
        raise APIError(400, "send at least one image as an image_url content part", param="messages")
    if not conv or conv[-1]["role"] != "user":
        raise APIError(400, "the last message must be the user's", param="messages")
    names = [f"image-{k + 1}" for k in range(len(loaded))]
    task_name = body.get("loupe_task")
    detail = bool(body.get("loupe_detail", False))
    has_history = any(m["role"] == "assistant" for m in conv)
    if task_name is not None:
        try:
            task = normalise_task(str(task_name))
        except ValueError as exc:
            raise APIError(400, str(exc), param="loupe_task") from exc
    elif has_history:
        task = "chat"
    else:
        question_so_far = " ".join(p["text"] for p in conv[-1]["content"] if p["type"] == "text")
        task = pick_task(question_so_far, 2 if len(loaded) >= 2 else 1, detail)
    if task == "chat":
        return Request("chat", loaded, ["A"] * len(loaded), messages=conv, names=names)
    question = " ".join(p["text"] for p in conv[-1]["content"] if p["type"] == "text").strip()
    pair = task in ("quality.rate", "quality.compare")
    n_needed = (2 if pair else 1)
    if len(loaded) not in (n_needed, n_needed + 1) or (task == "forgery.detect" and len(loaded) != 1):
        raise APIError(400, f"{task} takes {n_needed} image(s)" + ("" if task == "forgery.detect" else
                       f", or {n_needed + 1} with a reference first") + f"; got {len(loaded)}", param="messages")
    reference = loaded[0] if len(loaded) == n_needed + 1 else None
    rest = loaded[1:] if reference is not None else loaded
    try:
        p = plan(task, rest[0], rest[1] if pair else None, reference, question, detail)
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages") from exc
    return p.request(names=names)


# ---- responses ---------------------------------------------------------------------------------
def _completion(result: Result, model: str, cid: str, created: int) -> dict:
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": "stop", "logprobs": None, "loupe": api_record(result)}]}


def _chunk(cid: str, created: int, model: str, delta: dict, finish: str | None = None,
           extra: dict | None = None) -> str:
    choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None, **(extra or {})}
    return "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                  "model": model, "choices": [choice]}) + "\n\n"


def _stream_chunks(pieces: Iterator[str | Result], lock: threading.Lock, model: str, cid: str,
                   created: int) -> Iterator[str]:
    """SSE chunks of an answer as the model writes it (``Assistant.stream``), then the final chunk with
    Loupe's record. The model lock is taken when the first chunk is asked for and held until the answer is
    finished or the client goes away (the generator is then closed, which releases it)."""
    lock.acquire()
    try:
        yield _chunk(cid, created, model, {"role": "assistant", "content": ""})
        for item in pieces:
            if isinstance(item, Result):
                yield _chunk(cid, created, model, {}, "stop", {"loupe": api_record(item)})
                break
            yield _chunk(cid, created, model, {"content": item})
        yield "data: [DONE]\n\n"
    finally:
        lock.release()


# ---- the app -----------------------------------------------------------------------------------
def create_app(assistant: Assistant, allow_files: str | Path | None = None, *, lock: threading.Lock | None = None,
               mount_ui: bool = True) -> FastAPI:
    """The API app around ``assistant``; with ``mount_ui`` the gradio demo is served at ``/ui``."""
    lock = lock or threading.Lock()
    images = _Images(Path(allow_files) if allow_files is not None else None)
    model_ids = {assistant.name, assistant.name.split("@")[0]}
    created_at = int(time.time())
    app = FastAPI(title="Loupe API", description="OpenAI-compatible chat completions with Loupe's structured "
                  "results.", version="1")

    @app.exception_handler(APIError)
    async def _api_error(_: HTTPRequest, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: HTTPRequest, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type_).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: HTTPRequest, exc: RequestValidationError) -> JSONResponse:
        return APIError(400, str(exc.errors())).response()

    @app.get("/")
    async def root() -> RedirectResponse:
        return RedirectResponse("/ui/" if mount_ui else "/docs")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": assistant.name, "object": "model", "created": created_at,
                                            "owned_by": "loupe"}]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict:
        if model_id not in model_ids:
            raise APIError(404, f"model {model_id!r} not found; this server has {assistant.name!r}", param="model",
                           code="model_not_found")
        return {"id": assistant.name, "object": "model", "created": created_at, "owned_by": "loupe"}

    def run(request: Request) -> Result:
        with lock:
            return assistant.run([request])[0]

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        declared = http.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_REQUEST_BYTES:
            raise APIError(413, f"the request is {int(declared) / 1e6:.1f} MB; the limit is "
                                f"{MAX_REQUEST_BYTES / 1e6:.0f} MB", code="request_too_large")
        raw = bytearray()
        async for piece in http.stream():  # capped read, also for chunked bodies without a length
            raw += piece
            if len(raw) > MAX_REQUEST_BYTES:
                raise APIError(413, f"the request is over the limit of {MAX_REQUEST_BYTES / 1e6:.0f} MB",
                               code="request_too_large")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON ({exc})") from exc
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        name = body.get("model")
        if name not in model_ids:
            raise APIError(404, f"model {name!r} not found; this server has {assistant.name!r} (see /v1/models)",
                           param="model", code="model_not_found")
        request = await run_in_threadpool(build_request, body, images)  # decodes images off the event loop
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.get("stream"):
            try:  # images are loaded and encoded here, before anything is sent: a bad one is a 400
                pieces = await run_in_threadpool(assistant.stream, request)
            except (ImageError, ValueError, OSError) as exc:
                raise APIError(400, str(exc), param="messages", code=getattr(exc, "kind", None)) from None
            # a sync iterator: Starlette runs each step in its thread pool, so tokens go out as they come
            return StreamingResponse(_stream_chunks(pieces, lock, assistant.name, cid, created),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        result = await run_in_threadpool(run, request)
        if result.error is not None:
            raise APIError(400, result.error["message"], param="messages", code=result.error["type"])
        return _completion(result, assistant.name, cid, created)

    if mount_ui:
        import gradio as gr

        from .app import build_demo, launch_options

        app = gr.mount_gradio_app(app, build_demo(assistant, lock=lock), path="/ui", server_name="127.0.0.1",
                                  **launch_options())
    return app


# ---- loupe serve -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loupe serve", description="An OpenAI-compatible API (/v1/models, "
                                "/v1/chat/completions) with the chat demo at /ui. Binds 127.0.0.1 by default.",
                                epilog="example client:\n  from openai import OpenAI\n"
                                       "  c = OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='none')",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="M", help=MODEL_HELP)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto: the GPU if there is one, else the CPU)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--allow-files", metavar="ROOT", type=Path,
                   help="also accept image file paths under this folder (never outside it); off by default")
    p.add_argument("--no-ui", action="store_true", help="do not mount the gradio demo at /ui")
    p.add_argument("--max-new-tokens", type=int, default=160, help="answer length cap (default: 160)")
    p.add_argument("--lm-precision", choices=lm_precision.CHOICES, default="auto", help=lm_precision.HELP)
    return p


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = build_parser().parse_args(argv)
    if args.allow_files is not None and not args.allow_files.is_dir():
        print(f"loupe serve: --allow-files {args.allow_files} is not a folder", file=sys.stderr)
        return 2
    assistant = load_assistant("loupe serve", args.model, args.device, args.max_new_tokens, args.host,
                               args.lm_precision)
    if assistant is None:
        return 2
    app = create_app(assistant, args.allow_files, mount_ui=not args.no_ui)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
