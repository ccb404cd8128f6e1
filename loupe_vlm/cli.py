"""The ``loupe`` command: one verb per job, each a ``main(argv)`` in its own folder.

It lives in the root package, above the folders, so that dispatching to ``demo`` and ``finetune``
does not make ``assistant`` depend on them.

Verbs are mapped to ``module:function`` strings and imported only when called, so ``loupe ask``
does not pay for gradio and the assistant package does not import ``demo`` or ``finetune``.
"""

from __future__ import annotations

import importlib
import sys

VERBS: dict[str, tuple[str, str]] = {
    "ask": ("loupe_vlm.assistant.ask:main", "answer one question about one or two images"),
    "caption": ("loupe_vlm.assistant.caption:main", "describe, rate or check many images to JSONL/CSV (+ mask PNGs)"),
    "demo": ("loupe_vlm.demo.app:main", "the chat web demo (127.0.0.1 by default)"),
    "serve": ("loupe_vlm.demo.serve:main", "an OpenAI-compatible API with the demo mounted at /ui"),
    "build-data": ("loupe_vlm.data_builders.cli:main", "build instruction datasets (quality, forgery, imports)"),
    "train": ("loupe_vlm.finetune.train:main", "LoRA / from-scratch training from a YAML recipe"),
    "export": ("loupe_vlm.finetune.export:main", "export a checkpoint, optionally with LoRA merged"),
    "eval": ("loupe_vlm.finetune.eval:main", "evaluate a checkpoint on a dataset and write a report"),
}


def _usage() -> str:
    lines = ["usage: loupe VERB [options]   (loupe VERB --help for a verb's options)", "", "verbs:"]
    lines += [f"  {verb:<11} {help_}" for verb, (_, help_) in VERBS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"loupe: unknown verb {verb!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    target = VERBS[verb][0]
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name in ("gradio", "fastapi", "uvicorn"):
            print(f"loupe {verb}: needs the demo extras; install them with  pip install 'loupe-vlm[demo]'  "
                  "(or pip install -e '.[demo]' in a checkout)", file=sys.stderr)
            return 2
        print(f"loupe {verb}: a package it needs is missing: {exc.name} ({exc}). Reinstall Loupe with its "
              "dependencies (pip install -e '.[demo]' in a checkout, or make install).", file=sys.stderr)
        return 2
    result = getattr(module, func_name)(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
