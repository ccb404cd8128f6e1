#!/usr/bin/env bash
# Issue 15's ablations of loupe-smol, each arm on one short schedule: the same data, stage-1 and stage-2
# steps, seed and batch, and the same held-out records in its eval, with evidence guidance off (the arms
# without the branch have no heads to guide by). Arms:
#   full            the recipe (finetune/recipes/loupe-smol.yaml) as it is, on the short schedule
#   lm-scratch      the LM trained from scratch (a 12-layer Llama of SmolLM2's width, every weight trained)
#   no-branch       no high-pass LowLevelEncoder, and with it no heads, evidence tokens, fusion or mask prior
#   no-wider        the training records of the wider Debian photo pool left out (same val and test)
#   random-encoder  EfficientNet-Lite0 randomly initialised instead of ImageNet-pretrained
# and, cheaper, arms of stage 1 alone (the heads; stage 2 does not change them), measured by
# benchmarks/lowlevel_probe.py on the wider-pool test photos and the external set, next to full's heads:
#   s1-no-wider, s1-random-encoder, s1-no-highpass (the branch and its heads without the high-pass residuals)
# Usage: bash finetune/recipes/ablate-loupe-smol.sh [ARM ...]
#   (default: full lm-scratch no-branch s1-no-wider s1-random-encoder s1-no-highpass; a finished arm is skipped)
# Needs the data of `make loupe-smol` (DATA), its test-wider.jsonl files and its external-corruption set
# (EXTERNAL). On 2 cores an end-to-end arm takes 20-40 min at the defaults (stage 2 at ~13 s a step), a
# stage-1 arm about 10. Then: python benchmarks/ablation_table.py "$OUT"
set -uo pipefail
cd "$(dirname "$0")/../.."
LOUPE=${LOUPE:-.venv/bin/loupe}
DATA=${DATA:-data/loupe-smol}
EXTERNAL=${EXTERNAL:-$DATA/external/test.jsonl}
OUT=${OUT:-runs/ablate-loupe-smol}
S1=${S1:-300}; S2=${S2:-120}
WIDER_LIMIT=${WIDER_LIMIT:-108}; EXT_EVERY=${EXT_EVERY:-4}; FORGERY_LIMIT=${FORGERY_LIMIT:-100}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} MKL_NUM_THREADS=${MKL_NUM_THREADS:-2}
mkdir -p "$OUT"
# every EXT_EVERY-th external record: with 13 records a photo, each corruption and the clean view stay in
.venv/bin/python -c "import sys; ls=open('$EXTERNAL').readlines(); open('$(dirname "$EXTERNAL")/ablation.jsonl','w').writelines(ls[::$EXT_EVERY])"
# the training records without the wider pool (gcompris-qt-data, lomiri-wallpapers-16.04, jigzo-data,
# palapeli-data, kphotoalbum); the other splits and the images are the same files
.venv/bin/python - "$DATA" "$OUT/data-no-wider" <<'PY'
import json, os, sys
from loupe_vlm.data_builders.photo_pool import PACKAGE_NAMES
src_root, dst_root = sys.argv[1:]
for part in ("quality", "forgery"):
    src, dst = os.path.join(src_root, part), os.path.join(dst_root, part)
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if name != "train.jsonl" and not os.path.lexists(os.path.join(dst, name)):
            os.symlink(os.path.abspath(os.path.join(src, name)), os.path.join(dst, name))
    with open(os.path.join(src, "train.jsonl")) as f, open(os.path.join(dst, "train.jsonl"), "w") as g:
        g.writelines(l for l in f if json.loads(l)["meta"].get("source_photo", "").split(":")[0] not in PACKAGE_NAMES)
PY
common=(--config finetune/recipes/loupe-smol.yaml --data_weights 1 1 --scratch.lowlevel_pretrain_steps "$S1"
        --max_steps "$S2" --warmup_steps 10 --save_every 0 --eval_every 0 --val_samples 16)
run() {
  local name=$1 data=$2; shift 2
  local out=$OUT/$name
  [ -f "$out.done" ] && { echo "$name: done already"; return; }
  if [ ! -f "$out/loupe_config.json" ]; then
    rm -rf "$out"
    echo "$name: training ($(date))"
    $LOUPE train "${common[@]}" --data "$data/quality" "$data/forgery" --output "$out" "$@" > "$out.train.log" 2>&1 \
      || { echo "$name: training failed, see $out.train.log"; return 1; }
  fi
  echo "$name: eval ($(date))"
  $LOUPE eval --model "$out" --data "$DATA/quality/test-wider.jsonl" --limit "$WIDER_LIMIT" --evidence-guidance 0 \
    --out "$out-ev-wider" --no-progress > "$out.ev-wider.log" 2>&1 &&
  $LOUPE eval --model "$out" --data "$(dirname "$EXTERNAL")/ablation.jsonl" --evidence-guidance 0 \
    --out "$out-ev-ext" --no-progress > "$out.ev-ext.log" 2>&1 &&
  $LOUPE eval --model "$out" --data "$DATA/forgery/test.jsonl" --limit "$FORGERY_LIMIT" --evidence-guidance 0 \
    --out "$out-ev-forgery" --no-progress > "$out.ev-forgery.log" 2>&1 \
    || { echo "$name: eval failed, see $out.ev-*.log"; return 1; }
  touch "$out.done"
}
# the heads of a checkpoint, by the probe, on the wider-pool test photos (quality and forgery) and the external set
probe() {
  local name=$1 wider=$OUT/probe-wider
  for t in quality forgery; do
    mkdir -p "$wider/$t"
    for f in images masks; do [ -e "$DATA/$t/$f" ] && ln -sfn "$(realpath "$DATA/$t/$f")" "$wider/$t/$f"; done
    ln -sfn "$(realpath "$DATA/$t/test-wider.jsonl")" "$wider/$t/test.jsonl"
  done
  .venv/bin/python benchmarks/lowlevel_probe.py --checkpoint "$OUT/$name" --quality "$wider/quality" \
    --forgery "$wider/forgery" --split test --val-limit 400 > "$OUT/$name.probe-wider.txt" 2>&1 &&
  .venv/bin/python benchmarks/lowlevel_probe.py --checkpoint "$OUT/$name" --quality "$(dirname "$EXTERNAL")" \
    --split test --val-limit 600 > "$OUT/$name.probe-ext.txt" 2>&1 || echo "$name: probe failed, see $OUT/$name.probe-*.txt"
}
# the full arm again with the default model's evidence guidance (2): the branch's heads also steer its words
# (benchmarks/ablation_table.py ... --arms full full-g2 ...)
guided() {
  local name=$1
  [ -f "$OUT/$name-g2-ev-ext/metrics.json" ] && return
  $LOUPE eval --model "$OUT/$name" --data "$DATA/quality/test-wider.jsonl" --limit "$WIDER_LIMIT" \
    --evidence-guidance 2 --out "$OUT/$name-g2-ev-wider" --no-progress > "$OUT/$name-g2.ev-wider.log" 2>&1 &&
  $LOUPE eval --model "$OUT/$name" --data "$(dirname "$EXTERNAL")/ablation.jsonl" --evidence-guidance 2 \
    --out "$OUT/$name-g2-ev-ext" --no-progress > "$OUT/$name-g2.ev-ext.log" 2>&1 || echo "$name: guided eval failed"
}
stage1() {
  local name=$1 data=$2; shift 2
  if [ ! -f "$OUT/$name/loupe_config.json" ]; then
    echo "$name: stage 1 ($(date))"
    $LOUPE train "${common[@]}" --max_steps 1 --warmup_steps 0 --data "$data/quality" "$data/forgery" \
      --output "$OUT/$name" "$@" > "$OUT/$name.train.log" 2>&1 || { echo "$name: training failed"; return 1; }
  fi
  probe "$name"
}
arms=("$@"); [ ${#arms[@]} -eq 0 ] && arms=(full lm-scratch no-branch s1-no-wider s1-random-encoder s1-no-highpass)
for arm in "${arms[@]}"; do
  case $arm in
    full) run full "$DATA" && probe full && guided full ;;
    lm-scratch) run lm-scratch "$DATA" --base scratch:smol12:llama --method full --lr 1e-3 ;;
    no-branch) run no-branch "$DATA" --lowlevel_branch false --scratch.evidence_tokens false \
      --scratch.evidence_fusion false --scratch.fusion_gate false --scratch.mask_prior false ;;
    no-wider) run no-wider "$OUT/data-no-wider" ;;
    random-encoder) run random-encoder "$DATA" --image_pretrained false ;;
    s1-no-wider) stage1 s1-no-wider "$OUT/data-no-wider" ;;
    s1-random-encoder) stage1 s1-random-encoder "$DATA" --image_pretrained false ;;
    s1-no-highpass) stage1 s1-no-highpass "$DATA" --lowlevel_highpass false ;;
    *) echo "unknown arm $arm (full, lm-scratch, no-branch, no-wider, random-encoder, s1-no-wider," \
      "s1-random-encoder, s1-no-highpass)"; exit 2 ;;
  esac
done
.venv/bin/python benchmarks/ablation_table.py "$OUT" --arms full full-g2 lm-scratch no-branch s1-no-wider s1-random-encoder \
  s1-no-highpass
