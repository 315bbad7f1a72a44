#!/usr/bin/env bash
# Class agreement of the text-to-image digits demo (configs/demo/text_2d.yaml): samples drawn for the prompts
# "a handwritten zero" ... "a handwritten nine" (sample.py --prompt_file), labelled by the digits classifier
# (configs/eval/cls_digits.yaml) with evaluate.py's accuracy, beside the same classifier on the real test digits
# (written as 8-bit PNGs like the samples, so both go through the same reading).
# Usage: bash benchmarks/text_digits.sh TEXT_LDM_RUN CLASSIFIER_RUN [OUT_DIR] [further sample.py arguments ...]
#   N (default 180): samples, cycling through the ten prompts; STEPS (default 50); BATCH (default 30); PY.
# Example:
#   bash benchmarks/text_digits.sh logs/<time>_demo_text_2d logs/<time>_cls_digits logs/text_digits --scale 3
# Prints "accuracy" (samples) and "accuracy_real"; writes OUT_DIR/samples (sample.py folder), OUT_DIR/real,
# OUT_DIR/labels.csv and OUT_DIR/metrics.json.
set -euo pipefail
cd "$(dirname "$0")/.."
LDM_RUN=${1:?usage: text_digits.sh TEXT_LDM_RUN CLASSIFIER_RUN [OUT_DIR] [sample.py arguments ...]}
CLASSIFIER=${2:?usage: text_digits.sh TEXT_LDM_RUN CLASSIFIER_RUN [OUT_DIR] [sample.py arguments ...]}
OUT_DIR=${3:-logs/text_digits}
shift $(( $# < 3 ? $# : 3 ))
PY=${PY:-python3}
N=${N:-180}
mkdir -p "$OUT_DIR"

# the prompts, the real test digits as PNGs, and the class of every file of both
"$PY" - "$OUT_DIR" "$N" <<'PYEOF'
import sys
from pathlib import Path

from ldm.data.digits import NUMBER_WORDS, Digits
from ldm.engine.images import save_png, to_grid

out, count = Path(sys.argv[1]), int(sys.argv[2])
(out / "prompts.txt").write_text("".join(f"a handwritten {word}\n" for word in NUMBER_WORDS))
rows = [f"sample_{index:04d},{index % 10}" for index in range(count)]  # sample i has prompt i mod 10
real = Digits("test", size=32, seed=0)
(out / "real").mkdir(exist_ok=True)
for index in range(len(real)):
    item = real[index]
    save_png(to_grid(item["image"][None]), out / "real" / f"real_{index:04d}.png")
    rows.append(f"real_{index:04d},{int(item['class_label'])}")
(out / "labels.csv").write_text("name,class\n" + "\n".join(rows) + "\n")
PYEOF

"$PY" sample.py -r "$LDM_RUN" --prompt_file "$OUT_DIR/prompts.txt" --n_samples "$N" --batch_size "${BATCH:-30}" \
    --steps "${STEPS:-50}" --outdir "$OUT_DIR/samples" "$@"
"$PY" evaluate.py --samples "$OUT_DIR/samples" --real "$OUT_DIR/real" --labels "$OUT_DIR/labels.csv" \
    --classifier "$CLASSIFIER" --metrics accuracy --out "$OUT_DIR/metrics.json"
