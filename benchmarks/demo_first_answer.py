"""Time from page load to the first answer in the demo, in a real headless browser.

Launches the demo (``build_demo``) on 127.0.0.1 with a checkpoint, then for each trial opens a fresh
page, clicks a bundled example, presses Analyse and waits until the answer's report is on screen.
Prints each trial and the median, plus the model's own seconds for the same answer.

    .venv/bin/python benchmarks/demo_first_answer.py                      # the default model (loupe-smol)
    .venv/bin/python benchmarks/demo_first_answer.py --model CKPT --trials 5

Needs Debian's chromium (/usr/bin/chromium) and Python Playwright.
"""

from __future__ import annotations

import argparse
import re
import socket
import statistics
import time

from loupe_vlm.assistant.inference import Assistant
from loupe_vlm.demo.app import build_demo, launch_options

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a Loupe checkpoint folder (default: the embedded default model)")
    p.add_argument("--trials", type=int, default=3, help="fresh page loads to time (default: 3)")
    p.add_argument("--example", default="noisy", help="caption of the example to click (default: noisy)")
    args = p.parse_args(argv)
    from playwright.sync_api import sync_playwright

    assistant = Assistant.from_pretrained(args.model)
    demo = build_demo(assistant)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_options())
    url = f"http://127.0.0.1:{port}/"
    times, model_s = [], []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=ARGS)
            for trial in range(args.trials):
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                t0 = time.perf_counter()
                page.goto(url, wait_until="domcontentloaded")
                page.locator("#loupe-examples").get_by_text(args.example, exact=True).click()
                page.locator("#loupe-image img").first.wait_for(state="visible", timeout=60_000)
                page.locator("#loupe-send").click()
                page.locator("#loupe-report .loupe-report-body").wait_for(state="visible", timeout=120_000)
                times.append(time.perf_counter() - t0)
                m = re.search(r"· ([0-9.]+) s", page.locator("#loupe-report").inner_text())
                model_s.append(float(m.group(1)) if m else float("nan"))
                print(f"trial {trial + 1}: page load -> first answer {times[-1]:.2f} s (model {model_s[-1]:.2f} s)")
                page.close()
            browser.close()
    finally:
        demo.close()
    print(f"{assistant.name}: median page load -> first answer {statistics.median(times):.2f} s over "
          f"{len(times)} trials (model median {statistics.median(model_s):.2f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
