#!/usr/bin/env bash
# The embedded demo, end to end on CPU or GPU: a 3D KL autoencoder on crops of the MNI152 brain template
# (shipped inside the nilearn wheel), then a latent diffusion model conditioned on tissue masks, then samples.
# Results land under logs/demo/: each run folder has checkpoints/, images/{train,val,test}/ (PNG mid-slices and
# NIfTI volumes), metrics.csv and tensorboard/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
LOGS=${LOGS:-logs/demo}

"$PY" train_ae.py --base configs/demo/ae_3d.yaml -t --no_test --name demo_ae -l "$LOGS" "$@"
AE_RUN=$(ls -td "$LOGS"/*_demo_ae | head -n 1)

"$PY" train_ldm.py --base configs/demo/ldm_3d.yaml -t --no_test --name demo_ldm -l "$LOGS" \
    model.params.first_stage_config.params.ckpt_path="$AE_RUN/checkpoints/last.ckpt" "$@"
LDM_RUN=$(ls -td "$LOGS"/*_demo_ldm | head -n 1)

# No -t: the test stage alone, which generates samples for the test split's tissue masks.
"$PY" train_ldm.py -r "$LDM_RUN"
echo "demo done: autoencoder in $AE_RUN, diffusion model and samples in $LDM_RUN/images/test/"
