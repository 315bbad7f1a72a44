#!/usr/bin/env bash
# The embedded demo, end to end on CPU or GPU: a 3D KL autoencoder on crops of the MNI152 brain template
# (shipped inside the nilearn wheel), a segmentation network trained on the real crops (the judge), then a latent
# diffusion model conditioned on tissue masks, then samples for the held-out masks, scored: the judge's Dice between
# each sample's segmentation and the mask it was made for, beside its Dice on the real crops of those masks.
# Results land under logs/demo/: each run folder has checkpoints/, images/{train,val,test}/ (PNG mid-slices and
# NIfTI volumes), metrics/test.json, metrics.csv and tensorboard/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
LOGS=${LOGS:-logs/demo}

"$PY" train_ae.py --base configs/demo/ae_3d.yaml -t --name demo_ae -l "$LOGS" "$@"
AE_RUN=$(ls -td "$LOGS"/*_demo_ae | head -n 1)

"$PY" train_eval.py --base configs/eval/seg_mni152.yaml -t --no_test --name demo_seg -l "$LOGS" "$@"
SEG_RUN=$(ls -td "$LOGS"/*_demo_seg | head -n 1)

"$PY" train_ldm.py --base configs/demo/ldm_3d.yaml -t --no_test --name demo_ldm -l "$LOGS" \
    model.params.first_stage_config.params.ckpt_path="$AE_RUN/checkpoints/last.ckpt" "$@"
LDM_RUN=$(ls -td "$LOGS"/*_demo_ldm | head -n 1)

# No -t: the test stage alone, which generates samples for the test split's tissue masks and scores them.
"$PY" train_ldm.py -r "$LDM_RUN" "model.params.test_metrics={metrics: [dice, diversity_ms_ssim], segmenter: '$SEG_RUN'}"
"$PY" - "$AE_RUN" "$LDM_RUN" <<'EOF'
import json, sys
ae, ldm = (json.load(open(f"{run}/metrics/test.json"))["metrics"] for run in sys.argv[1:])
print(f"autoencoder, held-out crops: PSNR {ae['psnr']:.1f} dB, SSIM {ae['ssim']:.3f}")
ratio = f", ratio {ldm['dice'] / ldm['dice_real']:.2f}" if ldm["dice_real"] else ""
print(f"samples follow their masks: Dice {ldm['dice']:.3f} (real crops of the same masks: {ldm['dice_real']:.3f}{ratio})")
EOF
"$PY" scripts/demo_figure.py "$LDM_RUN"
echo "demo done: autoencoder in $AE_RUN, diffusion model and samples in $LDM_RUN/images/test/"
