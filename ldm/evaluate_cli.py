"""`evaluate.py`: score generated images with `ldm.metrics`, from folders of files or from a diffusion run.

    python evaluate.py --samples gen/ --real real/ --metrics fid,kid,diversity_ms_ssim --features 2.5d
    python evaluate.py --samples gen/ --masks masks/ --segmenter logs/<seg run> --metrics dice
    python evaluate.py --samples gen/ --labels labels.csv --classifier logs/<cls run> --metrics accuracy,fid \\
        --features classifier --real real/
    python evaluate.py -r logs/<ldm run> [--sample 16] [--metrics dice,diversity_ms_ssim --segmenter ...]

Folders (`--samples`, `--real`, `--masks`): a folder, or a quoted glob pattern such as 'logs/r/images/test/samples_*'.
A folder with a `manifest.json` (a `sample.py` output) gives the samples it lists (their NIfTI files, else PNG); any
other folder gives its `.nii`, `.nii.gz` and `.png` files, sorted by name, all of one kind and one shape.
- NIfTI: reoriented to RAS when 3D (as the training data are), a 4th axis holds channels: (C, X, Y, Z); a 2D file
  is one channel as stored. Values to [-1, 1] by `--intensity`, per image and channel: `percentile` (default) maps
  the `--percentiles` (0.5, 99.5) to -1 and 1 and clips, as the training pipeline scales volumes; `minmax` maps the
  minimum and maximum; `none` keeps the values (files already in [-1, 1], e.g. ours). A constant channel becomes -1.
- PNG: 0..255 (0..65535 for 16-bit) -> [-1, 1], whatever `--intensity` says; one channel when every image of the
  folder is grey (RGB files whose three channels are equal count as grey), else RGB.
Masks (for "dice") pair with the samples by file name (without suffix) when each sample has one, else by sorted
order; a NIfTI mask with the images' spatial axes is a label map (`--mask_labels` lists its values in class order;
default: the values are the classes), one with an extra last axis is one-hot; a PNG mask is a label map. Labels (for
"accuracy"): a CSV (name,class rows, a header allowed) or JSON ({name: class}) file; names with or without suffix;
real files named there are scored too ("accuracy_real"). Without `--labels`, a sample.py manifest's "label k"
conditions are used. Paired metrics (psnr, ssim, ms_ssim) pair samples and real images by sorted order.

A run (`-r RUN`): the test split of the run's data config (real images, and its conditions: masks for "dice",
labels for "accuracy") against the samples the test stage saved in RUN/images/test for each batch (NIfTI volumes for
3D; for 2D the batch's PNG grid, read back at 8 bits). `--sample N` first runs the test stage on ceil(N / batch
size) batches (`train_ldm.py -r RUN` with trainer.limit_test_batches; like any `-r` call it records the overrides in
RUN/configs/) and scores its first N samples. Metrics, evaluator runs and feature settings default to the run's
`model.params.test_metrics`; flags override them. Values are read as the pipeline gives them (no rescaling).

Prints one line per metric and writes a JSON report (metrics, non-finite as null, and what was scored) to `--out`
(default `<samples folder>/metrics.json` or `RUN/metrics/evaluate.json`). Bad input is one line on stderr and exit
code 2; a failing test stage returns the training CLI's exit code.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import OmegaConf

from ldm.cli import EXIT_BAD_INPUT, load_config, model_config_for
from ldm.engine.checkpoint import CheckpointError, atomic_write
from ldm.evaluate_files import (INTENSITY_RULES, EvaluationInputError, ImageSet, labels_of, listed_files,
                                manifest_labels, paired_files, parse_integers, read_label_table, read_mask,
                                saved_test_samples, read_test_batch)
from ldm.metrics import METRICS, MetricSuite, MissingWeights, feature_extractor
from ldm.models.test_metrics import check_test_metrics, load_scorer, on_device_of_input
from ldm.util import TRUST_VARIABLE, ConfigError, instantiate_from_config

FEATURES = ("segmenter", "classifier", "inception", "medicalnet", "2.5d")
PAIRED_METRICS = ("psnr", "ssim", "ms_ssim")
#: Evaluator networks (train_eval.py runs) and the metric each is for.
EVALUATORS = {"segmenter": "dice", "classifier": "accuracy"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evaluate.py", description="Score generated images (a folder, or a diffusion run's test samples) with "
                                        "ldm.metrics; see ldm/evaluate_cli.py for how files are read.",
        epilog="With -r, further KEY=VALUE arguments are OmegaConf overrides of the run's config (and of its test "
               "stage with --sample).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--samples", metavar="DIR", help="generated images: a folder or a quoted glob pattern")
    source.add_argument("-r", "--resume", metavar="RUN", help="a diffusion run folder: its test split and test samples")
    parser.add_argument("--real", metavar="DIR", help="real images to compare with (folder or glob pattern)")
    parser.add_argument("--masks", metavar="DIR", help="the samples' conditioning masks, for dice")
    parser.add_argument("--mask_labels", metavar="L0,L1,...", help="label values of label-map masks, in class order")
    parser.add_argument("--labels", metavar="FILE", help="CSV or JSON: file name -> class, for accuracy")
    parser.add_argument("--sample", type=int, metavar="N", help="with -r: run the test stage first, score N samples")
    parser.add_argument("--metrics", help=f"comma-separated, of: {', '.join(METRICS)}")
    parser.add_argument("--segmenter", metavar="RUN", help="a train_eval.py Segmenter run (for dice)")
    parser.add_argument("--classifier", metavar="RUN", help="a train_eval.py Classifier run (for accuracy)")
    parser.add_argument("--features", choices=FEATURES, help="feature network of fid / kid (default: the segmenter "
                                                             "or classifier given)")
    parser.add_argument("--feature_options", metavar="JSON", help="its keyword arguments, e.g. '{\"num_slices\": 16}'")
    parser.add_argument("--suite_options", metavar="JSON",
                        help="further MetricSuite arguments, e.g. '{\"kid_subset_size\": 50, \"num_classes\": 3}'")
    parser.add_argument("--intensity", choices=INTENSITY_RULES, default="percentile",
                        help="how NIfTI values map to [-1, 1] (folders only)")
    parser.add_argument("--percentiles", default="0.5,99.5", metavar="LOW,HIGH", help="for --intensity percentile")
    parser.add_argument("--batch_size", type=int, default=8, help="images scored together")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    parser.add_argument("-s", "--seed", type=int, default=23, help="with -r: the test stage's seed (data order)")
    parser.add_argument("--out", metavar="FILE.json", help="report path (default: see above)")
    parser.add_argument("--trust-config", action="store_true",
                        help=f"let the run's configs name any importable target (also {TRUST_VARIABLE}=1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opt, dotlist = build_parser().parse_known_args(argv)
    opt.argv = argv
    if opt.trust_config:
        os.environ[TRUST_VARIABLE] = "1"
    try:
        metrics, path = run(opt, dotlist)
    except TestStageFailed as failed:
        return failed.code
    except (EvaluationInputError, ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for name, value in metrics.items():
        print(f"{name}: {value:.6g}")
    print(f"evaluate: report written to {path}")
    return 0


def run(opt: argparse.Namespace, dotlist: list[str]) -> tuple[dict[str, float], Path]:
    """Score as `opt` says and write the report; (metrics, where the report was written)."""
    from ldm.sample_cli import pick_device  # heavy imports after argument errors are out of the way

    if opt.batch_size < 1:
        raise EvaluationInputError(f"--batch_size must be >= 1, got {opt.batch_size}")
    device = pick_device(opt.device)
    if opt.resume:
        report, default_out = score_run(opt, dotlist, device)
    else:
        if dotlist:
            raise EvaluationInputError(f"unrecognised argument(s) {' '.join(dotlist)} (KEY=VALUE overrides go "
                                       f"with -r only)")
        report, default_out = score_folders(opt, device)
    metrics = report["metrics"]
    report = {"created": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": ["evaluate.py", *opt.argv], **report,
              "metrics": {name: value if math.isfinite(value) else None for name, value in metrics.items()}}
    path = Path(opt.out) if opt.out else default_out
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda handle: handle.write(text.encode()))
    return metrics, path


# ------------------------------------------------------------------------------------------------ scoring set-up
@dataclass
class Scoring:
    """What to compute and with which networks: the flags, over a run's `test_metrics:` config in -r mode."""

    metrics: list[str]
    segmenter: str | None = None
    classifier: str | None = None
    features: str | None = None
    feature_options: dict | None = None
    suite_options: dict | None = None

    def describe(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "segmenter": self.segmenter, "classifier": self.classifier,
                "features": self.features, "feature_options": self.feature_options,
                "suite_options": self.suite_options}


def json_option(text: str | None, flag: str) -> dict:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise EvaluationInputError(f"{flag} {text}: not JSON ({err})") from None
    if not isinstance(value, dict):
        raise EvaluationInputError(f"{flag} {text}: expected a JSON object of keyword arguments")
    return value


def scoring_from(opt: argparse.Namespace, defaults: dict | None = None) -> Scoring:
    """The flags over `defaults` (a checked `test_metrics:` config), checked: names, evaluator runs that exist."""
    defaults = dict(defaults or {})
    own = {key: defaults.pop(key, None) for key in ("metrics", "segmenter", "classifier", "feature_extractor",
                                                   "feature_options")}
    metrics = [name.strip() for name in opt.metrics.split(",") if name.strip()] if opt.metrics else own["metrics"]
    if not metrics:
        raise EvaluationInputError(f"name the metrics with --metrics (of: {', '.join(METRICS)})")
    unknown = [name for name in metrics if name not in METRICS]
    if unknown:
        raise EvaluationInputError(f"--metrics: unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)}")
    scoring = Scoring(list(metrics), opt.segmenter or own["segmenter"], opt.classifier or own["classifier"],
                      opt.features or own["feature_extractor"],
                      json_option(opt.feature_options, "--feature_options") if opt.feature_options
                      else own["feature_options"],
                      {**defaults, **json_option(opt.suite_options, "--suite_options")})
    for role in EVALUATORS:
        run_dir = getattr(scoring, role)
        if run_dir is not None and not Path(str(run_dir)).exists():
            raise EvaluationInputError(f"--{role} {run_dir}: no such run folder (a train_eval.py run)")
    if scoring.features is None and {"fid", "kid"} & set(metrics):
        scoring.features = "segmenter" if scoring.segmenter else "classifier" if scoring.classifier else None
        if scoring.features is None:
            raise EvaluationInputError(f"fid / kid need a feature network: --features {'|'.join(FEATURES)} "
                                       f"(segmenter / classifier with that run)")
    return scoring


def build_suite(scoring: Scoring, device: torch.device, metrics: Sequence[str] | None = None) -> MetricSuite:
    """A MetricSuite of `metrics` (default: all of scoring's) with the evaluator networks they need, on `device`."""
    metrics = list(scoring.metrics if metrics is None else metrics)
    wants_features = bool({"fid", "kid"} & set(metrics))
    networks = {}
    for role, metric in EVALUATORS.items():
        if metric not in metrics and not (wants_features and scoring.features == role):
            continue
        if getattr(scoring, role) is None:
            raise EvaluationInputError(f"{metric if metric in metrics else '--features ' + role} needs --{role} "
                                       f"(a train_eval.py run)")
        try:
            networks[role] = load_scorer(getattr(scoring, role), role).to(device)
        except ConfigError as err:  # "test_metrics.<role>: <why>"
            raise EvaluationInputError(f"--{role}: {str(err).split(': ', 1)[-1]}") from None
    features = feature_network(scoring, networks, device) if wants_features else None
    try:
        return MetricSuite(metrics, feature_extractor=features,
                           segmenter=on_device_of_input(networks["segmenter"], "segment")
                           if "segmenter" in networks else None,
                           classifier=on_device_of_input(networks["classifier"], "predict")
                           if "classifier" in networks else None, **(scoring.suite_options or {}))
    except (TypeError, ValueError) as err:
        raise EvaluationInputError(f"--suite_options: {err}") from None


def feature_network(scoring: Scoring, networks: dict, device: torch.device):
    """The fid / kid feature extractor; a missing weights file is an EvaluationInputError naming it."""
    options = dict(scoring.feature_options or {})
    name = scoring.features
    if name in EVALUATORS:
        return feature_extractor(networks[name], **options)
    if name in ("inception", "medicalnet"):
        options.setdefault("device", device)
    elif name == "2.5d":
        options.setdefault("network", "inception")
        if options["network"] in ("inception", "medicalnet"):
            options["network_options"] = {"device": device, **(options.get("network_options") or {})}
    try:
        return feature_extractor(name, **options)
    except MissingWeights as err:
        raise EvaluationInputError(f"--features {name}: {err}") from None
    except (TypeError, ValueError) as err:
        raise EvaluationInputError(f"--features {name} / --feature_options: {err}") from None


def computed(suite: MetricSuite) -> dict[str, float]:
    try:
        return suite.compute()
    except ValueError as err:  # too few samples for a metric, a metric whose inputs were not given
        raise EvaluationInputError(str(err)) from None


def updated(suite: MetricSuite, files: Sequence[Path], **inputs: torch.Tensor | None) -> None:
    """suite.update(**inputs); a ValueError (shapes that do not fit) names the files of the batch."""
    try:
        suite.update(**inputs)
    except ValueError as err:
        where = f"{files[0]}" + (f" .. {files[-1]}" if len(files) > 1 else "")
        raise EvaluationInputError(f"{where}: {err}") from None


# ------------------------------------------------------------------------------------------------ folder mode
def score_folders(opt: argparse.Namespace, device: torch.device) -> tuple[dict[str, Any], Path]:
    scoring = scoring_from(opt)
    try:
        low, high = (float(v) for v in opt.percentiles.split(","))
    except ValueError:
        raise EvaluationInputError(f"--percentiles {opt.percentiles}: expected LOW,HIGH, e.g. 0.5,99.5") from None
    if not 0 <= low < high <= 100:
        raise EvaluationInputError(f"--percentiles {opt.percentiles}: need 0 <= LOW < HIGH <= 100")
    samples = ImageSet(opt.samples, "--samples", opt.intensity, (low, high))
    real = ImageSet(opt.real, "--real", opt.intensity, (low, high)) if opt.real else None
    if real is not None:
        samples.check_matches(real)
    scored: dict[str, Any] = {"samples": samples.describe(), "real": None if real is None else real.describe()}
    if real is None and ({"fid", "kid"} | set(PAIRED_METRICS)) & set(scoring.metrics):
        raise EvaluationInputError(f"{', '.join(n for n in scoring.metrics if n in ('fid', 'kid', *PAIRED_METRICS))} "
                                   f"need real images: --real DIR")
    mask_files, mask_labels = None, parse_integers(opt.mask_labels, "--mask_labels")
    if opt.masks:
        mask_files, paired_by = paired_files(samples.files, listed_files(opt.masks, "--masks")[0], "--masks")
        scored["masks"] = {"source": opt.masks, "count": len(mask_files), "paired_by": paired_by}
    elif "dice" in scoring.metrics:
        raise EvaluationInputError("dice needs the samples' conditioning masks: --masks DIR")
    table = read_label_table(Path(opt.labels)) if opt.labels else manifest_labels(samples)
    if "accuracy" in scoring.metrics:
        if labels_of(samples.files, table) is None:
            missing = next(p for p in samples.files if labels_of([p], table) is None)
            raise EvaluationInputError(f"accuracy needs a class per sample: {missing.name} has none in "
                                       f"{opt.labels or 'the sample.py manifest (pass --labels FILE)'}")
        scored["labels"] = {"source": opt.labels or "manifest.json", "count": len(table)}

    paired = [name for name in scoring.metrics if name in PAIRED_METRICS]
    unpaired = [name for name in scoring.metrics if name not in PAIRED_METRICS]
    metrics: dict[str, float] = {}
    if unpaired:
        suite = build_suite(scoring, device, unpaired)
        for indices, images in samples.batches(opt.batch_size):
            files = [samples.files[i] for i in indices]
            condition = (torch.stack([read_mask(mask_files[i], samples.shape[1:], mask_labels) for i in indices])
                         if mask_files is not None and "dice" in unpaired else None)
            updated(suite, files, fake=images.to(device), condition=condition, labels=labels_of(files, table))
        for indices, images in real.batches(opt.batch_size) if real is not None else ():
            files = [real.files[i] for i in indices]
            updated(suite, files, real=images.to(device), labels=labels_of(files, table))
        metrics.update(computed(suite))
    if paired:
        if len(real) != len(samples):
            raise EvaluationInputError(f"{', '.join(paired)} pair samples with real images by sorted order, but there "
                                       f"are {len(samples)} samples and {len(real)} real images")
        suite = build_suite(scoring, device, paired)
        for (indices, fake_images), (_, real_images) in zip(samples.batches(opt.batch_size),
                                                            real.batches(opt.batch_size)):
            updated(suite, [samples.files[i] for i in indices], real=real_images.to(device),
                    fake=fake_images.to(device))
        metrics.update(computed(suite))
    report = {"mode": "folders", "metrics": metrics, "scored": scored,
              "settings": {**scoring.describe(), "intensity": opt.intensity, "percentiles": [low, high],
                           "device": str(device)}}
    return report, samples.folder / "metrics.json"


# ------------------------------------------------------------------------------------------------ run mode
class TestStageFailed(Exception):
    """The test stage run for --sample returned a non-zero exit code (it has printed why)."""

    def __init__(self, code: int):
        super().__init__(f"test stage exit code {code}")
        self.code = code


def run_configs(run_dir: Path) -> list[str]:
    if not run_dir.is_dir():
        raise EvaluationInputError(f"-r {run_dir}: no such run folder")
    configs = sorted(str(path) for path in (run_dir / "configs").glob("*.yaml"))
    if not configs:
        raise EvaluationInputError(f"-r {run_dir}: no configs/*.yaml (a run folder of train_ldm.py)")
    return configs


def datamodule_of_test_split(config) -> Any:
    """The run's data module with its test split only."""
    data = OmegaConf.create(OmegaConf.to_container(config.data, resolve=True))
    if data.get("params", {}).get("test") is None:
        raise EvaluationInputError("-r: the run's data config has no test split (data.params.test)")
    data.params.train = data.params.validation = None
    return instantiate_from_config(data)


def generate_test_samples(run_dir: Path, count: int, batch_size: int, seed: int, dotlist: list[str]) -> None:
    """The test stage of the run (the training CLI, `-r RUN`) on enough batches for `count` samples."""
    from ldm.cli import main as training_cli

    batches = math.ceil(count / batch_size)
    print(f"evaluate: running the test stage of {run_dir} on {batches} batch(es) of {batch_size}")
    code = training_cli("test stage", ["-r", str(run_dir), "-s", str(seed),
                                       f"trainer.limit_test_batches={batches}", *dotlist])
    if code != 0:
        raise TestStageFailed(code)


def score_run(opt: argparse.Namespace, dotlist: list[str], device: torch.device) -> tuple[dict[str, Any], Path]:
    run_dir = Path(opt.resume)
    config = load_config(run_configs(run_dir), dotlist)
    params = model_config_for(config.model, training=False).get("params", {}) or {}
    for flag in ("real", "masks", "labels", "mask_labels"):
        if getattr(opt, flag) is not None:
            raise EvaluationInputError(f"--{flag} goes with --samples; -r reads the run's test split")
    try:
        defaults = check_test_metrics(params.get("test_metrics"))
    except ConfigError as err:
        raise EvaluationInputError(f"-r {run_dir}: model.params.{err}") from None
    scoring = scoring_from(opt, defaults)
    datamodule = datamodule_of_test_split(config)
    since = None
    if opt.sample is not None:
        if opt.sample < 1:
            raise EvaluationInputError(f"--sample must be >= 1, got {opt.sample}")
        since = time.time() - 1.0  # file times can be a second coarse
        generate_test_samples(run_dir, opt.sample, datamodule.batch_size, opt.seed, dotlist)
    folder = run_dir / "images" / "test"
    files = saved_test_samples(folder, since)
    if not files:
        raise EvaluationInputError(f"-r {run_dir}: no test-stage samples (samples_b-*) in {folder}; run the test "
                                   f"stage first (python train_ldm.py -r {run_dir}) or pass --sample N")
    real_key = params.get("first_stage_key", "image")
    condition_key = params.get("cond_stage_key", "image") if params.get("conditioning_key") is not None else None
    suite = build_suite(scoring, device)
    world_size = max(files) + 1
    limit = opt.sample
    scored_count, shape = 0, None
    for rank in range(world_size):
        loader = datamodule.dataloader("test", rank, world_size, opt.seed)
        for batch_idx, batch in enumerate(loader):
            entry = files.get(rank, {}).get(batch_idx)
            if entry is None or (limit is not None and scored_count >= limit):
                break
            if real_key not in batch:
                raise EvaluationInputError(f"-r {run_dir}: test items have no {real_key!r} (first_stage_key) entry")
            real = torch.as_tensor(batch[real_key]).float()
            fake, batch_files = read_test_batch(entry, real)
            keep = real.shape[0] if limit is None else min(real.shape[0], limit - scored_count)
            condition = labels = None
            if condition_key is not None and condition_key in batch:
                value = torch.as_tensor(batch[condition_key])[:keep]
                condition, labels = (value.float(), None) if value.ndim == real.ndim else (None, value)
            updated(suite, batch_files, real=real[:keep].to(device), fake=fake[:keep].to(device), condition=condition,
                    labels=labels)
            scored_count += keep
            shape = list(real.shape[1:])
    if scored_count == 0:
        raise EvaluationInputError(f"-r {run_dir}: the samples in {folder} match no test batch")
    report = {"mode": "run", "metrics": computed(suite),
              "scored": {"run": str(run_dir), "samples": str(folder), "count": scored_count, "shape": shape,
                         "ranks": world_size, "real": "data.params.test", "real_key": real_key,
                         "condition_key": condition_key, "generated": opt.sample is not None},
              "settings": {**scoring.describe(), "seed": opt.seed, "device": str(device)}}
    return report, run_dir / "metrics" / "evaluate.json"
