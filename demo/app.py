"""The Loupe chat web demo: ``build_demo(assistant) -> gr.Blocks`` and ``loupe demo``.

The UI is a thin layer around an injected ``Assistant``: nothing is loaded at import and there are
no module-level arguments. One image (optionally a second one, B, and a pristine reference) and a
mode go in; a chat answer streamed token by token and a report panel (rating with a score bar, distortions with
severity, A/B verdict, forgery verdict, confidence, the forgery mask as an overlay and a PNG to
download) come out.

Streaming: ``Assistant.stream`` yields the answer's text as the model writes it (greedy), then the
finished result, whose numbers come from the same pass's probabilities; the report fills in then.

Every model call shares one ``concurrency_id`` with ``concurrency_limit=1`` behind gradio's queue,
and one ``threading.Lock`` that ``loupe serve`` also holds for its API calls, so two users never run
the model at once. ``analyse`` (``api_name="analyse"``) returns the structured record for
``gradio_client``.
"""

from __future__ import annotations

import argparse
import html
import logging
import shutil
import sys
import tempfile
import threading
import uuid
import weakref
from pathlib import Path
from typing import Any, Iterator

import gradio as gr

from loupe_vlm.assistant import lm_precision
from loupe_vlm.assistant.inference import MODEL_HELP, Assistant, Request, Result
from loupe_vlm.assistant.processing import ImageError
from loupe_vlm.prompts import canonical_question, user_content
from loupe_vlm.prompts.parsing import strip_mask_tokens

from .common import (
    CANONICAL_QUESTIONS,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    UploadError,
    api_record,
    check_image_file,
    load_assistant,
    mask_png,
    overlay,
    pick_task,
    plan,
)

logger = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
MODEL_CONCURRENCY_ID = "loupe-model"

# mode -> (task, detail); None: route from the question and the number of images.
MODES: dict[str, tuple[str, bool] | None] = {
    "Auto": None,
    "Quality (brief)": ("quality.assess", False),
    "Quality (detailed)": ("quality.assess", True),
    "Compare": ("quality.compare", True),
    "Forgery": ("forgery.detect", True),
}

CSS = """
#loupe-report .bar {background: #e5e7eb; border-radius: 4px; height: 10px; width: 100%; margin: 2px 0 8px;}
#loupe-report .bar > div {height: 10px; border-radius: 4px;}
#loupe-report table {width: 100%; font-size: 0.9em;}
#loupe-report .muted {color: #6b7280;}
"""


def mode_question(mode: str) -> str:
    """The canonical prompt a mode puts in the question box."""
    task, detail = MODES.get(mode) or ("quality.assess", False)
    return canonical_question(task, detail)


def resolve_task(mode: str, question: str | None, has_b: bool) -> tuple[str, bool]:
    """(task, detail) for a mode; Auto routes by the question's words and the images given."""
    if mode not in MODES:
        raise gr.Error(f"unknown mode {mode!r}; pick one of: {', '.join(MODES)}")
    fixed = MODES[mode]
    if fixed is not None:
        return fixed
    task = pick_task(question, 2 if has_b else 1, detail=True)
    return task, task != "quality.assess"


def launch_options() -> dict[str, Any]:
    """Options for ``Blocks.launch`` and ``gr.mount_gradio_app``: theme, CSS, the upload cap.

    System fonts only, so the page makes no font requests and looks the same offline.
    """
    theme = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    return {"theme": theme, "css": CSS, "max_file_size": MAX_IMAGE_BYTES, "allowed_paths": [str(EXAMPLES_DIR)]}


# ---- report panel ------------------------------------------------------------------------------
def _bar(fraction: float, colour: str) -> str:
    pct = max(0.0, min(1.0, fraction)) * 100
    return f'<div class="bar"><div style="width:{pct:.1f}%;background:{colour}"></div></div>'


def report_html(result: Result) -> str:
    """The report panel for one result; fields the answer did not give are shown as not given."""
    e = html.escape
    parts = ['<div class="loupe-report-body">', f"<h3>Report</h3><p class='muted'>{e(result.task)} · "
             f"{e(str(result.model))} · {result.seconds or 0:.2f} s</p>"]
    q, c, f = result.quality, result.comparison, result.forgery
    if q is not None:
        if q.score is not None:
            parts.append(f"<p><b>Rating:</b> {e(str(q.rating))} — score {q.score:.2f} / 5</p>"
                         + _bar((q.score - 1) / 4, "#2563eb"))
        else:
            parts.append("<p><b>Rating:</b> <span class='muted'>the answer gives no rating word</span></p>")
        if q.distortions:
            rows = "".join(f"<tr><td>{e(d.get('name') or '')}</td><td>{e(d.get('category') or '')}</td>"
                           f"<td>{e(str(d.get('severity') or '—'))}</td></tr>" for d in q.distortions)
            parts.append("<p><b>Distortions</b></p><table><tr><th>distortion</th><th>category</th>"
                         f"<th>severity</th></tr>{rows}</table>")
        else:
            parts.append("<p><b>Distortions:</b> <span class='muted'>none named</span></p>")
    if c is not None:
        if c.better is not None and c.probability is not None:
            agree = {True: "both orders agree", False: "the two orders disagree", None: ""}[c.consistent]
            parts.append(f"<p><b>A/B:</b> image {e(c.better)} is better — p = {c.probability:.2f} "
                         f"<span class='muted'>{agree}</span></p>" + _bar(c.probability, "#7c3aed"))
        else:
            parts.append("<p><b>A/B:</b> <span class='muted'>the answer names neither A nor B</span></p>")
    if f is not None:
        if f.probability is not None:
            verdict = "tampered" if f.tampered else "authentic"
            extra = []
            if f.manipulation:
                extra.append(e(f.manipulation))
            if f.area is not None:
                extra.append(f"mask {f.area:.1%} of the image, {f.regions} region(s)")
            parts.append(f"<p><b>Forgery:</b> {verdict} — P(tampered) = {f.probability:.2f}"
                         f"<br><span class='muted'>{'; '.join(extra)}</span></p>" + _bar(f.probability, "#dc2626"))
        else:
            parts.append("<p><b>Forgery:</b> <span class='muted'>the answer gives no verdict word</span></p>")
    if result.confidence is not None:
        parts.append(f"<p><b>Confidence:</b> {result.confidence:.2f}</p>" + _bar(result.confidence, "#059669"))
    else:
        parts.append("<p><b>Confidence:</b> <span class='muted'>no key words to read it from</span></p>")
    parts.append("</div>")
    return "".join(parts)


EMPTY_REPORT = "<h3>Report</h3><p class='muted'>Upload an image and press Analyse.</p>"


# ---- the app -----------------------------------------------------------------------------------
def build_demo(assistant: Assistant, lock: threading.Lock | None = None) -> gr.Blocks:
    """The demo's Blocks around ``assistant``. ``lock`` serialises model calls with other users of
    the same Assistant in this process (``loupe serve`` passes the one its API uses)."""
    lock = lock or threading.Lock()
    mask_dir = Path(tempfile.mkdtemp(prefix="loupe-demo-"))

    def run(request: Request) -> Result:
        with lock:
            result = assistant.run([request])[0]
        if result.error is not None:
            raise gr.Error(result.error["message"])
        return result

    def checked(path: str | None) -> str | None:
        if path is None:
            return None
        try:
            return str(check_image_file(path))
        except UploadError as exc:
            raise gr.Error(str(exc)) from exc

    def fresh_request(image: str, image_b: str | None, reference: str | None, mode: str,
                      question: str | None) -> Request:
        task, detail = resolve_task(mode, question, image_b is not None)
        if task not in ("quality.rate", "quality.compare") and image_b is not None:
            gr.Warning("Image B is used only for comparisons; it was left out.")
            image_b = None
        if task == "forgery.detect" and reference is not None:
            gr.Warning("Forgery detection takes no reference image; it was left out.")
            reference = None
        try:
            p = plan(task, image, image_b, reference, question, detail)
        except ValueError as exc:
            raise gr.Error(str(exc)) from exc
        return p.request(names=[Path(x).name for x in p.images])

    def outputs_for(result: Result, image: str) -> tuple[str, Any, Any, dict]:
        mask_img = mask_file = None
        if result.forgery is not None and result.forgery.mask is not None:
            mask_img = overlay(image, result.forgery.mask)
            mask_file = mask_dir / f"mask-{uuid.uuid4().hex[:8]}.png"
            mask_file.write_bytes(mask_png(result.forgery.mask))
        record = result.to_record(mask_path=str(mask_file) if mask_file else None)
        return report_html(result), mask_img, (str(mask_file) if mask_file else None), record

    def respond(image, image_b, reference, mode, question, history, state) -> Iterator[tuple]:
        if image is None:
            raise gr.Error("Upload or paste an image first, or pick one of the examples.")
        image, image_b, reference = checked(image), checked(image_b), checked(reference)
        question = (question or "").strip()
        history = list(history or [])
        custom = bool(question) and question not in CANONICAL_QUESTIONS
        if state and custom:
            # A follow-up question: continue the conversation about the same images as free chat.
            req = Request("chat", state["images"], state["roles"], messages=state["messages"] + [
                {"role": "user", "content": [{"type": "text", "text": question}]}],
                names=[Path(x).name for x in state["images"]])
            shown_q = question
        else:
            req = fresh_request(image, image_b, reference, mode, question)
            shown_q = req.question
            state = None
        labels = [r if r != "reference" else "ref" for r in req.roles]
        history.append({"role": "user", "content": f"[{', '.join(labels)}] {shown_q}"})
        history.append({"role": "assistant", "content": ""})
        result = None
        with lock:  # one model call at a time, shared with the API; held while the answer streams
            try:
                pieces = assistant.stream(req)
            except (ImageError, ValueError, OSError) as exc:
                raise gr.Error(str(exc)) from None
            text = ""
            for item in pieces:  # the answer token by token, as the model writes it
                if isinstance(item, Result):
                    result = item
                    break
                text += item
                history[-1] = {"role": "assistant", "content": text}
                yield history, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), ""
        if state is None:
            state = {"images": req.images, "roles": req.roles,
                     "messages": [{"role": "user", "content": user_content(req.roles, req.question)}]}
        else:
            state = dict(state, messages=state["messages"] + [req.messages[-1]])
        state["messages"] = state["messages"] + [
            {"role": "assistant", "content": [{"type": "text", "text": result.raw_text}]}]
        report, mask_img, mask_file, record = outputs_for(result, image)
        history[-1] = {"role": "assistant", "content": strip_mask_tokens(result.text)}  # never show the token
        yield history, report, mask_img, mask_file, record, state, ""

    def analyse(image, image_b, reference, mode, question) -> dict:
        """Structured analysis for API clients: DESIGN.md's record, mask as base64 PNG."""
        if image is None:
            raise gr.Error("give an image")
        image, image_b, reference = checked(image), checked(image_b), checked(reference)
        return api_record(run(fresh_request(image, image_b, reference, mode, question)))

    def on_mode(mode: str, question: str) -> str:
        # Keep a question the user typed; replace only an empty box or another mode's prompt.
        q = (question or "").strip()
        return mode_question(mode) if not q or q in CANONICAL_QUESTIONS else question

    def pick_example(evt: gr.SelectData) -> tuple:
        a, b, m, _ = examples[evt.index]
        return str(EXAMPLES_DIR / a), (str(EXAMPLES_DIR / b) if b else None), m

    def reset() -> tuple:
        return [], EMPTY_REPORT, None, None, None, None

    examples = [  # (image A, image B, mode, label)
        ("noisy.png", None, "Auto", "noisy"),
        ("blurred.png", None, "Quality (detailed)", "blurred (detailed)"),
        ("jpeg.png", None, "Quality (brief)", "heavy JPEG"),
        ("tampered.png", None, "Forgery", "spliced (forgery)"),
        ("clean.png", None, "Forgery", "authentic (forgery)"),
        ("clean.png", "noisy.png", "Compare", "A/B: clean vs noisy"),
    ]

    with gr.Blocks(title="Loupe", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"# Loupe\nWhat is wrong with this image, how sure is the model, and was it tampered with? "
                    f"Model: `{assistant.name}`. Images stay on this machine. Uploads up to "
                    f"{MAX_IMAGE_BYTES / 1e6:.0f} MB and {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels.")
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Row():
                    image = gr.Image(label="Image (A)", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                     height=220, elem_id="loupe-image")
                    image_b = gr.Image(label="Image B (optional, to compare)", type="filepath", image_mode=None,
                                       sources=["upload", "clipboard"], height=220)
                    reference = gr.Image(label="Reference (optional, pristine)", type="filepath", image_mode=None,
                                         sources=["upload", "clipboard"], height=220)
                mode = gr.Radio(list(MODES), value="Auto", label="Mode")
                chatbot = gr.Chatbot(label="Loupe", height=300, elem_id="loupe-chat", feedback_options=None)
                with gr.Row():
                    question = gr.Textbox(value=mode_question("Auto"), label="Question", scale=5,
                                          elem_id="loupe-question", lines=1,
                                          placeholder="A follow-up question, or leave empty for the mode's prompt")
                    send = gr.Button("Analyse", variant="primary", scale=1, elem_id="loupe-send")
                clear = gr.Button("New conversation", size="sm")
            with gr.Column(scale=2):
                report = gr.HTML(EMPTY_REPORT, elem_id="loupe-report")
                mask_view = gr.Image(label="Forgery mask overlay", type="numpy", interactive=False, height=260)
                mask_download = gr.File(label="Mask PNG (255 = tampered)", interactive=False)
                with gr.Accordion("Result record (JSON)", open=False):
                    record = gr.JSON(label="record")
        # A gallery rather than gr.Examples: with several inputs gr.Examples shows a table or text labels,
        # and a person should see the photos. Selecting one fills the inputs and the mode.
        gallery = gr.Gallery([(str(EXAMPLES_DIR / a), label) for a, _, _, label in examples], columns=6,
                             label="Examples (bundled, work offline): click one, then Analyse", height=240,
                             allow_preview=False, object_fit="cover", elem_id="loupe-examples")

        chat_inputs = [image, image_b, reference, mode, question, chatbot, state]
        chat_outputs = [chatbot, report, mask_view, mask_download, record, state, question]
        send.click(respond, chat_inputs, chat_outputs, api_name="chat",
                   concurrency_id=MODEL_CONCURRENCY_ID, concurrency_limit=1)
        question.submit(respond, chat_inputs, chat_outputs, api_visibility="private",
                        concurrency_id=MODEL_CONCURRENCY_ID, concurrency_limit=1)
        analyse_button = gr.Button(visible=False)
        analyse_button.click(analyse, [image, image_b, reference, mode, question], record, api_name="analyse",
                             concurrency_id=MODEL_CONCURRENCY_ID, concurrency_limit=1)
        mode.change(on_mode, [mode, question], question, queue=False, api_visibility="private")
        resets = [chatbot, report, mask_view, mask_download, record, state]
        for comp in (image, image_b, reference):
            comp.change(reset, None, resets, queue=False, api_visibility="private")
        clear.click(reset, None, resets, queue=False, api_visibility="private")
        gallery.select(pick_example, None, [image, image_b, mode], queue=False, api_visibility="private")
    demo.queue(max_size=32, default_concurrency_limit=1)
    weakref.finalize(demo, shutil.rmtree, mask_dir, True)  # mask PNGs go with the app (or at exit)
    return demo


# ---- loupe demo --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loupe demo", description="The Loupe chat web demo (gradio). It binds "
                                "127.0.0.1 unless --host says otherwise; --share makes a public gradio link.")
    p.add_argument("--model", metavar="M", help=MODEL_HELP)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto: the GPU if there is one, else the CPU)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--share", action="store_true", help="also open a public *.gradio.live link (off by default)")
    p.add_argument("--max-new-tokens", type=int, default=160, help="answer length cap (default: 160)")
    p.add_argument("--lm-precision", choices=lm_precision.CHOICES, default="auto", help=lm_precision.HELP)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    assistant = load_assistant("loupe demo", args.model, args.device, args.max_new_tokens, args.host,
                               args.lm_precision)
    if assistant is None:
        return 2
    demo = build_demo(assistant)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, **launch_options())
    return 0


if __name__ == "__main__":
    sys.exit(main())
