"""``loupe export``: copy a trained checkpoint to a clean folder, optionally with LoRA merged in.

With ``--merge``, the LoRA adapter (and the trained mask-token rows) are folded into the base
weights with peft's ``merge_and_unload`` and the result is written as a bundled checkpoint
(``base/`` + heads): it loads without peft and without the original base. Accepts a final output
folder or a ``checkpoints/step-N`` folder; the resume state (``trainer/``) is not copied.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

import torch

from loupe_vlm.assistant.guidance import AB_VERDICTS
from loupe_vlm.assistant.modeling import CheckpointError, ExplainableVLM
from loupe_vlm.assistant.forensic import FORENSIC_FILE
from loupe_vlm.assistant.noreference import NOREFERENCE_FILE
from loupe_vlm.assistant.reference import REFERENCE_FILE

logger = logging.getLogger("loupe_vlm.finetune.export")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export(checkpoint: str | Path, out: str | Path, merge: bool = False, dtype: str | None = None,
           trust_remote_code: bool = False, evidence_guidance: float | None = None,
           ab_verdict: str | None = None, rating_width: float | None = None) -> Path:
    """Write ``checkpoint`` to ``out`` (merged when ``merge``); returns ``out``. ``evidence_guidance``,
    ``ab_verdict`` and ``rating_width`` set the exported model's own decoding settings (``assistant/guidance.py``,
    ``LoupeConfig``); None keeps them."""
    checkpoint, out = Path(checkpoint), Path(out)
    if out.resolve() == checkpoint.resolve():
        raise CheckpointError(f"{out}: export needs a new folder, not the checkpoint itself")
    model, processor = ExplainableVLM.from_pretrained(checkpoint, dtype=DTYPES[dtype] if dtype else None,
                                                      trust_remote_code=trust_remote_code)
    is_peft = hasattr(model.vlm, "peft_config")
    if merge and not is_peft:
        logger.info("%s has no LoRA adapter; nothing to merge, exporting as is", checkpoint)
    if merge and is_peft:
        model.vlm = model.vlm.merge_and_unload()
        model.config.training = {**model.config.training, "merged_from": {"base": model.config.base,
                                                                          "lora": model.config.lora}}
        model.config.base, model.config.lora = "bundled", None
    if evidence_guidance is not None:
        model.config.evidence_guidance = float(evidence_guidance)
    if ab_verdict is not None:
        model.config.ab_verdict = ab_verdict
    if rating_width is not None:
        model.config.rating_width = float(rating_width)
    model.config.check()
    model.save_pretrained(out, processor=processor)
    for f in (REFERENCE_FILE, NOREFERENCE_FILE, FORENSIC_FILE):  # the reading models and forensic net travel with it
        if (checkpoint / f).is_file():
            shutil.copyfile(checkpoint / f, out / f)
    compact_tokenizer(out / "tokenizer.json")
    logger.info("exported %s -> %s%s", checkpoint, out, " (LoRA merged)" if merge and is_peft else "")
    return out


def compact_tokenizer(path: Path) -> None:
    """Rewrite a ``tokenizer.json``, if it exists, in less space and with the same meaning: no indentation, and
    a BPE model's merges as "a b" strings instead of ["a", "b"] pairs (the format the tokenizers library has
    always read; kept as pairs where a part holds a space). loupe-smol's: 3.5 -> 1.4 MB, which keeps the
    shipped folder within its size budget."""
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    merges = (data.get("model") or {}).get("merges")
    if isinstance(merges, list) and all(isinstance(m, list) and len(m) == 2 and " " not in m[0] + m[1]
                                        for m in merges):
        data["model"]["merges"] = [f"{a} {b}" for a, b in merges]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``loupe export``."""
    parser = argparse.ArgumentParser(prog="loupe export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder written by `loupe train`")
    parser.add_argument("--out", required=True, help="the folder to write (created)")
    parser.add_argument("--merge", action="store_true",
                        help="fold the LoRA adapter into the base weights: a bundled model that loads without peft")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weights' dtype in the export (default: as stored)")
    parser.add_argument("--evidence-guidance", type=float, metavar="S",
                        help="the export's own evidence-guidance strength: how strongly its image heads steer the "
                             "distortion and severity words of identify and assess answers (0 off; default: as "
                             "the checkpoint has it)")
    parser.add_argument("--ab-verdict", choices=AB_VERDICTS,
                        help="with guidance on, where a comparison's verdict comes from: 'heads' (the image heads' "
                             "severities steer it) or 'both_orders' (the LM reads the pair in both orders first, "
                             "and the answer writes the verdict of its average); default: as the checkpoint has it")
    parser.add_argument("--rating-width", type=float, metavar="W",
                        help="with guidance on, the heads' severity also steers an assessment's rating words, the "
                             "more the smaller W (LoupeConfig.rating_width; loupe-smol: 0.5); default: as the "
                             "checkpoint has it")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the base's own code to run")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = export(args.checkpoint, args.out, args.merge, args.dtype, args.trust_remote_code,
                     args.evidence_guidance, args.ab_verdict, args.rating_width)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"loupe export: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
