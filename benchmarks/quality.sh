#!/usr/bin/env bash
# Sample quality of the shipped configs on one GPU, every row trained from scratch and scored by the project's own
# metrics (ldm.metrics through each model's test stage, into <run>/metrics/test.json):
#   digits   2D class-conditional LDM (configs/demo/ldm_2d.yaml): agreement of a classifier trained on real digits
#            with the requested class, FID / KID on that classifier's features, diversity; beside the same figures
#            for the real test digits. Two LDMs: the config as shipped (zero terminal SNR, v-prediction) and the
#            CompVis schedule it replaced (eps, x_T not pure noise).
#   mni152   3D tissue-mask-conditioned LDM (configs/demo/ldm_3d.yaml, wider AE and UNet, longer): Dice of a
#            SegResNet trained on real crops between each sample's segmentation and its conditioning mask, beside
#            its Dice on the real test crops; AE PSNR / SSIM / MS-SSIM on the 16 held-out test crops.
#   phantom  3D tumour-mask-conditioned LDM on HeadPhantom 64^3 (configs/quality/): tumour Dice, AE PSNR / SSIM.
#   Both 3D rows also train the judge's network on samples for the training masks and test it on real data
#   (m_tstr / p_tstr against m_seg / p_seg: "train on synthetic, test on real").
# Usage: bash benchmarks/quality.sh [OUT_DIR]   (step counts from the environment, defaults below)
# Writes OUT_DIR/summary.txt (every test.json) and each run folder under OUT_DIR/runs.
set -u
OUT_DIR=${1:-logs/quality}; RUNS=$OUT_DIR/runs; LOGS=$OUT_DIR/logs; mkdir -p "$RUNS" "$LOGS"
PY=${PY:-python3}
QUIET="trainer.logger=[csv]"
T_STAGE1=${T_STAGE1:-130}   # seconds: stage-1 and evaluator training stop here at the latest (SIGTERM saves)
T_STAGE2=${T_STAGE2:-240}   # seconds: LDM training stops here at the latest; the test stage runs after it
T_TEST=${T_TEST:-120}       # seconds: at most for each test stage
run_dir() { ls -td "$RUNS"/*_"$1" | head -n 1; }
train() { local limit=$1 log=$2; shift 2; timeout "$limit" "$PY" "$@" -l "$RUNS" $QUIET > "$LOGS/$log.log" 2>&1; }

digits() {
  train "$T_STAGE1" d_ae train_ae.py -b configs/demo/ae_2d.yaml -t -n d_ae trainer.max_steps=${D_AE_STEPS:-3000} \
    trainer.limit_test_batches=-1 "model.params.test_metrics={metrics: [psnr, ssim, ms_ssim]}" &
  train "$T_STAGE1" d_cls train_eval.py -b configs/eval/cls_digits.yaml -t -n d_cls &
  wait
  local ae cls; ae=$(run_dir d_ae); cls=$(run_dir d_cls)
  local metrics="{metrics: [accuracy, fid, kid, diversity_ms_ssim], classifier: '$cls', feature_extractor: classifier, kid_subset_size: 50}"
  for variant in eps vz; do
    local extra=""
    [ $variant = eps ] && extra="model.params.parameterization=eps model.params.rescale_betas_zero_snr=false model.params.timestep_spacing=uniform"
    ( train "$T_STAGE2" d_ldm_$variant train_ldm.py -b configs/demo/ldm_2d.yaml -t --no_test -n d_ldm_$variant \
        trainer.max_steps=${D_LDM_STEPS:-4000} model.params.first_stage_config.params.ckpt_path=$ae/checkpoints/last.ckpt $extra
      train "$T_TEST" d_test_$variant train_ldm.py -r "$(run_dir d_ldm_$variant)" trainer.limit_test_batches=-1 \
        "model.params.test_metrics=$metrics" ) &
  done
  wait
}

# Train on synthetic, test on real: samples for the training split's masks train the judge's config afresh; both
# that network and the real-trained judge are then tested on the real test split (metrics/test.json: dice).
tstr() {  # PREFIX LDM_RUN REAL_SEG_RUN SEG_CONFIG [overrides of the seg config ...]
  local prefix=$1 ldm=$2 seg=$3 config=$4 samples=$OUT_DIR/${1}_tstr_samples; shift 4
  timeout "$T_TEST" "$PY" sample.py -r "$ldm" --cond split:train --n_samples "${TSTR_N:-256}" --batch_size 32 \
    --outdir "$samples" > "$LOGS/${prefix}_tstr_sample.log" 2>&1
  "$PY" -m ldm.data.generated "$config" "$samples" "$OUT_DIR/${prefix}_tstr.yaml"  # training split: the samples
  train "$T_STAGE1" ${prefix}_tstr train_eval.py -b "$OUT_DIR/${prefix}_tstr.yaml" -t --no_test -n ${prefix}_tstr "$@"
  train "$T_TEST" ${prefix}_tstr_test train_eval.py -r "$(run_dir ${prefix}_tstr)"
  train "$T_TEST" ${prefix}_seg_test train_eval.py -r "$seg"
}

mni152() {
  local wide="model.params.ddconfig.ch=32"
  train "$T_STAGE1" m_ae train_ae.py -b configs/demo/ae_3d.yaml -t -n m_ae trainer.max_steps=${M_AE_STEPS:-3000} $wide \
    trainer.val_check_interval=500 data.params.test.params.length=16 "model.params.test_metrics={metrics: [psnr, ssim, ms_ssim]}" &
  train "$T_STAGE1" m_seg train_eval.py -b configs/eval/seg_mni152.yaml -t --no_test -n m_seg trainer.max_steps=3000 \
    trainer.val_check_interval=500 data.params.batch_size=8 model.params.network_config.params.init_filters=16 &
  wait
  local ae seg; ae=$(run_dir m_ae); seg=$(run_dir m_seg)
  train "$T_STAGE2" m_ldm train_ldm.py -b configs/demo/ldm_3d.yaml -t --no_test -n m_ldm trainer.max_steps=${M_LDM_STEPS:-6000} \
    trainer.val_check_interval=1000 model.params.first_stage_config.params.ddconfig.ch=32 \
    model.params.unet_config.params.model_channels=64 model.params.unet_config.params.num_res_blocks=2 \
    model.params.first_stage_config.params.ckpt_path=$ae/checkpoints/last.ckpt
  train "$T_TEST" m_test train_ldm.py -r "$(run_dir m_ldm)" trainer.limit_test_batches=-1 data.params.test.params.length=16 \
    "model.params.test_metrics={metrics: [dice, diversity_ms_ssim], segmenter: '$seg'}"
  tstr m "$(run_dir m_ldm)" "$seg" configs/eval/seg_mni152.yaml trainer.max_steps=3000 trainer.val_check_interval=500 \
    data.params.batch_size=8 model.params.network_config.params.init_filters=16
}

phantom() {
  train "$T_STAGE1" p_ae train_ae.py -b configs/quality/phantom_ae.yaml -t -n p_ae trainer.max_steps=${P_AE_STEPS:-3000} &
  train "$T_STAGE1" p_seg train_eval.py -b configs/eval/seg_phantom.yaml -t --no_test -n p_seg trainer.max_steps=2000 &
  wait
  local ae seg; ae=$(run_dir p_ae); seg=$(run_dir p_seg)
  train "$T_STAGE2" p_ldm train_ldm.py -b configs/quality/phantom_ldm.yaml -t --no_test -n p_ldm \
    trainer.max_steps=${P_LDM_STEPS:-6000} model.params.first_stage_config.params.ckpt_path=$ae/checkpoints/last.ckpt \
    model.params.test_metrics.segmenter=$seg
  train "$T_TEST" p_test train_ldm.py -r "$(run_dir p_ldm)"
  tstr p "$(run_dir p_ldm)" "$seg" configs/eval/seg_phantom.yaml trainer.max_steps=2000
}

start=$(date +%s)
digits & mni152 & phantom &
wait
for report in "$RUNS"/*/metrics/test.json; do
  echo "$(basename "$(dirname "$(dirname "$report")")"): $(tr -d '\n ' < "$report")"
done > "$OUT_DIR/summary.txt"
echo "wall time: $(( $(date +%s) - start )) s" >> "$OUT_DIR/summary.txt"
cat "$OUT_DIR/summary.txt"
