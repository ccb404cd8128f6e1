"""Do a model's quality answers follow its forensic branch's heads?

For each single-distortion ``quality.identify`` / ``quality.assess`` record of a ``loupe eval`` report, it
compares three categories: the truth, the auxiliary heads' top-1 (``encode_lowlevel``, as the LM sees it
through the evidence tokens and fusion), and the first category the answer names (the report's parsed
distortions). It prints how often the heads are right, the answer is right, and the answer agrees with
the heads. A model whose heads are right but whose answers do not agree with them has an LM that does
not use what the branch sees.

    python benchmarks/answers_follow_heads.py --model CKPT --report runs/eval-q --data data/quality
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the checkpoint the report was made with")
    p.add_argument("--report", required=True, type=Path, help="a `loupe eval` output folder (predictions.jsonl)")
    p.add_argument("--data", required=True, type=Path, help="the dataset folder its images are relative to")
    args = p.parse_args(argv)
    preds = args.report / "predictions.jsonl"
    if not preds.is_file():
        p.error(f"{preds}: not found; pass the folder `loupe eval --out` wrote")

    import torch

    from loupe_vlm.assistant.modeling import ExplainableVLM
    from loupe_vlm.assistant.processing import AUX_CATEGORIES, load_image, to_lowlevel_tensor

    model, _ = ExplainableVLM.from_pretrained(args.model)
    model.eval()
    if not model.config.aux_weight:
        p.error(f"{args.model}: this model has no auxiliary heads")
    n = heads_right = answer_right = agree = 0
    with preds.open() as fh:
        for line in fh:
            rec = json.loads(line)
            if rec.get("sample_task") not in ("quality.identify", "quality.assess") or rec.get("error"):
                continue
            truth = [d["category"] for d in (rec.get("gt") or {}).get("distortions", [])]
            if len(truth) != 1:
                continue
            named = [d["category"] for d in ((rec.get("quality") or {}).get("distortions") or []) if d.get("category")]
            image = to_lowlevel_tensor(load_image(args.data / rec["images"][-1]), model.config.lowlevel_max_side)
            with torch.no_grad():
                probs = model.encode_lowlevel([image]).aux[0][0].sigmoid()[:len(AUX_CATEGORIES)]
            top = AUX_CATEGORIES[int(probs.argmax())]
            n += 1
            heads_right += top == truth[0]
            answer_right += bool(named) and named[0] == truth[0]
            agree += bool(named) and named[0] == top
    if not n:
        print(f"{preds}: no single-distortion identify/assess records", file=sys.stderr)
        return 2
    print(f"{n} single-distortion identify/assess records: heads' top-1 right {heads_right / n:.3f}; "
          f"answer's first category right {answer_right / n:.3f}; answer agrees with the heads' top-1 {agree / n:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
