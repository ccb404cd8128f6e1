"""``loupe build-data``: one sub-command per builder, each a ``main(argv)`` in its own module."""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "quality": ("loupe_vlm.data_builders.quality:main", "distorted images -> quality instruction data"),
    "forgery": ("loupe_vlm.data_builders.forgery:main", "tamper synthesis -> forgery instruction data with masks"),
    "import-forgery": ("loupe_vlm.data_builders.importers:main",
                       "convert a downloaded forgery dataset (CASIA, Columbia, ...) to Loupe's format"),
    "import-quality": ("loupe_vlm.data_builders.quality_readers:main",
                       "convert a downloaded quality dataset (KADID-10k, TID2013, KonIQ-10k) to Loupe's format"),
    "contact-sheet": ("loupe_vlm.data_builders.contact_sheet:main",
                      "one PNG grid: every distortion x 5 severities, or forgery examples with masks"),
}


def _usage() -> str:
    lines = ["usage: loupe build-data SUBCOMMAND [options]", "", "subcommands:"]
    lines += [f"  {name:<15} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] not in SUBCOMMANDS:
        print(f"loupe build-data: unknown subcommand {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func = SUBCOMMANDS[argv[0]][0].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            print(f"loupe build-data {argv[0]}: not built yet in this version of Loupe.", file=sys.stderr)
            return 2
        raise
    return int(getattr(module, func)(argv[1:]) or 0)
