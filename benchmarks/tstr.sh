#!/usr/bin/env bash
# Train on synthetic, test on real (as Med-DDPM reports it): a segmentation network trained only on volumes a
# mask-conditioned LDM generated for the training split's masks, tested on the real test split, beside the same
# network trained on the real training data (the judge run given). Both use the same eval config and step count.
# Usage: bash benchmarks/tstr.sh LDM_RUN REAL_SEG_RUN [OUT_DIR] [overrides of the eval config ...]
#   N (default 256): samples drawn; SEG_CONFIG (default configs/eval/seg_mni152.yaml); STEPS (default 50) and
#   BATCH (default 16) of the sampler; PY (default python3).
# Example, after `make demo`:
#   bash benchmarks/tstr.sh logs/demo/*_demo_ldm logs/demo/*_demo_seg logs/tstr
# Prints both Dice figures and their ratio; writes OUT_DIR/samples (sample.py folder: samples and their masks) and
# the synthetic-trained run OUT_DIR/<time>_tstr_seg (metrics/test.json: its Dice on the real test split).
set -euo pipefail
cd "$(dirname "$0")/.."
LDM_RUN=${1:?usage: tstr.sh LDM_RUN REAL_SEG_RUN [OUT_DIR] [overrides ...]}
REAL_SEG=${2:?usage: tstr.sh LDM_RUN REAL_SEG_RUN [OUT_DIR] [overrides ...]}
OUT_DIR=${3:-logs/tstr}
shift $(( $# < 3 ? $# : 3 ))
PY=${PY:-python3}
SEG_CONFIG=${SEG_CONFIG:-configs/eval/seg_mni152.yaml}
mkdir -p "$OUT_DIR"

"$PY" sample.py -r "$LDM_RUN" --cond split:train --n_samples "${N:-256}" --batch_size "${BATCH:-16}" \
    --steps "${STEPS:-50}" --outdir "$OUT_DIR/samples"
"$PY" -m ldm.data.generated "$SEG_CONFIG" "$OUT_DIR/samples" "$OUT_DIR/tstr_seg.yaml"  # training split: the samples
"$PY" train_eval.py --base "$OUT_DIR/tstr_seg.yaml" -t --name tstr_seg -l "$OUT_DIR" "$@"
TSTR_RUN=$(ls -td "$OUT_DIR"/*_tstr_seg | head -n 1)
[ -f "$REAL_SEG/metrics/test.json" ] || "$PY" train_eval.py -r "$REAL_SEG"   # its test stage on the real test split
"$PY" - "$TSTR_RUN" "$REAL_SEG" <<'PYEOF'
import json, sys
synthetic, real = (json.load(open(f"{run}/metrics/test.json"))["metrics"]["dice"] for run in sys.argv[1:])
print(f"train on synthetic, test on real: Dice {synthetic:.3f}; trained on real: {real:.3f}; ratio {synthetic / real:.2f}")
PYEOF
