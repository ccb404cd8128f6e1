#!/usr/bin/env bash
# Rebuild the embedded default model loupe-tiny from nothing, on a CPU machine:
#   data (built-in photo pool, template labeller) -> loupe train -> loupe export -> loupe eval.
# Run it through `make loupe-tiny`. About an hour on 2 cores: data ~2 min; training in two stages,
# the LowLevelEncoder alone on the builders' labels (10000 cheap steps, ~25 min) then the whole
# model with that encoder frozen (3000 steps of 8, ~23 min); evaluation and the probe ~3 min.
set -euo pipefail
cd "$(dirname "$0")/../.."
LOUPE=${LOUPE:-.venv/bin/loupe}
DATA=${DATA:-data/loupe-tiny}
RUN=${RUN:-runs/loupe-tiny}
OUT=${OUT:-assistant/weights/loupe-tiny}
# One torch thread: on a shared 2-core machine torch's default thread pool was many times slower.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}

$LOUPE build-data quality --out "$DATA/quality" --n 10000 --image-size 224 --seed 1 --no-progress
$LOUPE build-data forgery --out "$DATA/forgery" --n 10000 --size 224 --seed 1
$LOUPE train --config finetune/recipes/loupe-tiny.yaml --data "$DATA/quality" "$DATA/forgery" --data_weights 1 1 --output "$RUN"
# a clean export folder, keeping the committed model card (its numbers are updated by hand from the reports)
if [ -d "$OUT" ]; then find "$OUT" -mindepth 1 -maxdepth 1 ! -name MODEL_CARD.md -exec rm -rf {} +; fi
$LOUPE export --checkpoint "$RUN" --out "$OUT"
$LOUPE eval --model "$OUT" --data "$DATA/quality/test.jsonl" --batch-size 8 --out runs/eval-loupe-tiny-quality --restart
$LOUPE eval --model "$OUT" --data "$DATA/forgery/test.jsonl" --batch-size 8 --out runs/eval-loupe-tiny-forgery --restart
# what the forensic branch alone sees on the same test splits (its auxiliary heads)
.venv/bin/python benchmarks/lowlevel_probe.py --checkpoint "$OUT" --quality "$DATA/quality" --forgery "$DATA/forgery" \
  --split test --val-limit 100000 | tee runs/eval-loupe-tiny-lowlevel.txt
echo "loupe-tiny rebuilt in $OUT; reports in runs/eval-loupe-tiny-*/report.md"
