"""The BraTS configs end to end on one GPU: stage-1 and stage-2 training steps and DDIM sampling.

    python benchmarks/bench_brats_pipeline.py [--ae-steps 30] [--ldm-steps 25] [--samples 3] [--subjects 8]
                                              [--layouts contiguous,channels_last] [--ldm-only] [--out DIR]

Runs the real command lines on the real configs, changing only the data root, run length and logging:
1. writes `--subjects` BraTS-2021-layout subjects (4 modalities + seg, 176 x 176 x 160 float32 NIfTI: a noisy
   ellipsoid head with a labelled tumour, tests/data/brats_tree.py) into a temporary folder;
2. `train_ae.py -b configs/autoencoder/brats_kl_f4_3d.yaml`: 4 x 128^3 crops, batch 2, bf16-mixed, with the
   patch-GAN switched on halfway (disc_start) so both phases are timed; LPIPS runs on the config's 2.5D slices with
   a VGG16 of random weights saved as the backbone file (the ImageNet file is not on the device; the cost is the
   same), or is switched off (said in the table) when torchvision/lpips are missing;
   (`--ldm-only` skips this: the LDM then runs on the config's autoencoder at initialisation, which costs the same
   per step and saves stage 1's cuDNN autotuning and training: minutes on a fresh GPU machine);
3. `train_ldm.py -b configs/latent-diffusion/brats_mask_concat_3d.yaml` on stage 1's checkpoint: batch 4, the
   frozen encoder on 4 x 128^3 crops, then the 169M-parameter UNet on 4 x (4 x 32^3) latents + 4 mask channels;
4. `sample.py -r <ldm run> --cond split:test --sampler ddim --steps 50 --batch_size 1`, bf16: seconds per sample
   (50 UNet evaluations + one decode to 4 x 128^3), from manifest.json.
Each `--layouts` entry repeats 2-4 with trainer.channels_last set accordingly (with +expandable, the CUDA caching
allocator in expandable-segments mode; with +recompute, recompute_cheap in the trained networks; with +graph,
trainer.cuda_graph in stage 2: the UNet's forward and backward replayed as CUDA graphs, and sample.py --cuda_graph;
with +copies besides +graph, trainer.bf16_weight_copies in stage 2, not under --smoke, whose fp32 it refuses;
with +cache, stage 2 a second time with model.params.cache_latents={dir, copies: 1}: the train split encoded once
before training, then the UNet alone on the stored posterior moments, its step time and its ratio to the uncached
step in a row of its own, with the one-off encoding's seconds: from the log's "latent cache ... encoding" line to
the cache's index.json, hashing included).
The loop logs per step the loader wait, peak allocated / reserved memory and the allocator's retries, which the table
shows beside the step times, and the first step's duration (autotuning, compilation, capture: "first step s").

Step times are medians of the per-step times the training loop logs (perf/steps_per_s with log_every_n_steps 1)
after the first `--warmup` steps of each phase (cuDNN autotuning, Triton compilation, loader start-up); peak memory is
the largest perf/peak_memory_gib (torch.cuda.max_memory_allocated since the previous step) over the same steps.
The training splits are cached in memory (cache_rate 1: loading and scaling once, random crops per step) so the
8 loader workers keep up and the times are the GPU's; benchmarks/bench_models.py times the networks alone.
Sampling: the median of the per-sample seconds after the first sample.
`--smoke` runs the same chain with tiny models on the CPU (a check of the command lines, not a measurement).
Writes DIR/bench_brats_pipeline.json (DIR: --out, else $OUT, else .) and prints a markdown table last; each command
line writes its output to DIR/logs/ as it runs, so a run stopped by a time limit still leaves it.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.data.brats_tree import write_subject  # noqa: E402

AE_CONFIG = ROOT / "configs" / "autoencoder" / "brats_kl_f4_3d.yaml"
LDM_CONFIG = ROOT / "configs" / "latent-diffusion" / "brats_mask_concat_3d.yaml"
SUBJECT_SHAPE = (176, 176, 160)  # head ellipsoid 0.8 x that: a brain bounding box above the 128^3 crop
NEVER = 10 ** 9
SMOKE = ["trainer.accelerator=cpu", "trainer.precision=32", "data.params.num_workers=0"] + [
    f"data.params.{split}.params.crop_to=[16,16,16]" for split in ("train", "validation", "test")]
TINY_DDCONFIG = ("resolution=16", "ch=8", "norm_num_groups=4")
SMOKE_AE = [f"model.params.ddconfig.{k}" for k in TINY_DDCONFIG] + [
    f"model.params.lossconfig.params.{k}" for k in ("disc_num_layers=2", "disc_ndf=8")]
SMOKE_LDM = [f"model.params.first_stage_config.params.ddconfig.{k}" for k in TINY_DDCONFIG] + [
    "model.params.image_size=4", "model.params.unet_config.params.image_size=4",
    "model.params.unet_config.params.model_channels=32"]
COMMON = ["trainer.logger=[csv]", "trainer.log_every_n_steps=1", f"trainer.val_check_interval={NEVER}",
          f"trainer.checkpoint.every_n_steps={NEVER}", f"trainer.callbacks.image_logger.params.batch_frequency={NEVER}",
          "trainer.precision=bf16-mixed", "data.params.train.params.cache_rate=1.0",
          "data.params.train.params.cache_num_workers=8"]


def write_tree(root: Path, count: int) -> None:
    with ProcessPoolExecutor(max_workers=min(count, os.cpu_count() or 1)) as pool:
        list(pool.map(write_subject, [root] * count, [f"BraTS2021_{i:05d}" for i in range(count)],
                      [SUBJECT_SHAPE] * count, range(count)))


def random_vgg16(path: Path) -> str | None:
    """A torchvision VGG16 state dict with random weights at `path` (the LPIPS backbone file), None without lpips."""
    try:
        import lpips  # noqa: F401
        import torch
        import torchvision
    except Exception as err:  # noqa: BLE001 -- any import failure means: no LPIPS in this run
        print(f"LPIPS off: {type(err).__name__}: {err}")
        return None
    torch.save(torchvision.models.vgg16().state_dict(), path)
    return str(path)


def run_cli(args: list[str], log: Path, env: dict | None = None,
            marks: dict[str, float | None] | None = None) -> float:
    """Runs `python args...` in the repo root, output to `log`; returns wall seconds; raises on failure.

    marks: {regex: None}, each filled with the wall-clock time (time.time()) at which the first output line matching
    it arrived (the child writes unbuffered, so that is when it printed the line)."""
    began = time.perf_counter()
    print(f"running {' '.join(args[:3])} (output: {log})", flush=True)
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    command = [sys.executable, *args]
    with open(log, "w") as out, subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                 env=env, text=True, errors="replace") as child:
        for line in child.stdout:
            out.write(line)
            out.flush()
            for pattern, seen in (marks or {}).items():
                if seen is None and re.search(pattern, line):
                    marks[pattern] = time.time()
        code = child.wait()
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"{' '.join(args[:3])} exited {code}; last lines of {log}:\n{tail}")
    return time.perf_counter() - began


def only_run(parent: Path) -> Path:
    runs = [p for p in parent.iterdir() if p.is_dir()]
    if len(runs) != 1:
        raise RuntimeError(f"expected one run folder in {parent}, found {runs}")
    return runs[0]


def read_metrics(run: Path) -> dict[str, dict[int, float]]:
    """name -> {step: value} from the run's metrics.csv."""
    metrics: dict[str, dict[int, float]] = defaultdict(dict)
    with open(run / "metrics.csv") as f:
        for row in csv.DictReader(f):
            metrics[row["name"]][int(row["step"])] = float(row["value"])
    return metrics


def phase(metrics: dict, first: int, last: int) -> dict:
    """Over logged steps first..last (inclusive): median step time and loader wait (ms), peak allocated and reserved
    memory (GiB), allocator retries (cudaFree-all-and-retry events) during those steps."""
    def values(name: str) -> list[float]:
        return [v for s, v in sorted(metrics.get(name, {}).items()) if first <= s <= last]

    rates, peaks, reserved = values("perf/steps_per_s"), values("perf/peak_memory_gib"), values("perf/peak_reserved_gib")
    retries = [v for s, v in sorted(metrics.get("perf/alloc_retries", {}).items()) if first - 1 <= s <= last]
    if not rates:
        raise RuntimeError(f"no perf/steps_per_s logged for steps {first}..{last}")
    return {"steps": f"{first}-{last}", "n": len(rates), "step_ms": 1000 * statistics.median(1 / r for r in rates),
            "min_ms": 1000 / max(rates), "data_wait_ms": 1000 * statistics.median(values("perf/data_wait_s") or [0]),
            "peak_gib": max(peaks, default=float("nan")), "reserved_gib": max(reserved, default=float("nan")),
            "alloc_retries": retries[-1] - retries[0] if retries else float("nan")}


def first_step_seconds(log: Path) -> float | None:
    """The training loop's own "first step: X s" line (autotuning, compilation, graph capture), None if absent."""
    found = re.search(r"^first step: ([0-9.]+) s", log.read_text(), re.M)
    return float(found.group(1)) if found else None


def bench_layout(variant: str, tree: Path, work: Path, opt: argparse.Namespace, vgg: str | None, logs: Path) -> dict:
    """variant: contiguous or channels_last, optionally +expandable (PYTORCH_CUDA_ALLOC_CONF=expandable_segments),
    +recompute (recompute_cheap in the trained networks: the autoencoder, then the UNet), +graph
    (trainer.cuda_graph in stage 2, the UNet, and sample.py --cuda_graph; the autoencoder has no graphed training)
    and +copies with +graph (trainer.bf16_weight_copies in stage 2; left out under --smoke, which trains in fp32);
    +cache: stage 2 again on a latent cache (the result's "ldm_cached" entry, see `train_ldm_cached`)."""
    layout, *options = variant.split("+")
    if layout not in ("contiguous", "channels_last") \
            or set(options) - {"expandable", "recompute", "graph", "copies", "cache"} \
            or ("copies" in options and "graph" not in options):
        raise ValueError(f"unknown variant {variant!r}: contiguous or channels_last, optionally +expandable, "
                         f"+recompute, +graph, +copies (with +graph), +cache")
    env = dict(os.environ)
    if "expandable" in options:
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    channels_last = layout == "channels_last"
    common = [*COMMON, f"trainer.channels_last={str(channels_last).lower()}", *(SMOKE if opt.smoke else [])]
    recompute = "recompute" in options
    result: dict = {"layout": variant}
    if opt.ldm_only:
        ckpt = untrained_autoencoder(work / "untrained_ae.ckpt", opt.smoke)
    else:
        ckpt, stage_one = train_autoencoder(variant, tree, work, opt, vgg, logs, common, recompute, env)
        result.update(stage_one)

    ldm_args = [f"data.params.train.params.root={tree}", f"model.params.first_stage_config.params.ckpt_path={ckpt}",
                f"trainer.max_steps={opt.ldm_steps}", *common, *(SMOKE_LDM if opt.smoke else []),
                f"model.params.unet_config.params.recompute_cheap={str(recompute).lower()}",
                f"trainer.cuda_graph={str('graph' in options).lower()}",
                *(["trainer.bf16_weight_copies=true"] if "copies" in options and not opt.smoke else [])]
    ldm_logs = work / f"ldm_{variant}"
    run_cli(["train_ldm.py", "-b", str(LDM_CONFIG), "-t", "--no_test", "-l", str(ldm_logs), "-n", "bench",
             *ldm_args], logs / f"ldm_{variant}.log", env)
    ldm_run = only_run(ldm_logs)
    result["ldm"] = phase(read_metrics(ldm_run), 1 + opt.warmup, opt.ldm_steps)
    result["ldm"]["first_step_s"] = first_step_seconds(logs / f"ldm_{variant}.log")
    if "cache" in options:
        result["ldm_cached"] = train_ldm_cached(variant, work, opt, logs, ldm_args, env)
        result["ldm_cached"]["vs_uncached"] = result["ldm_cached"]["step_ms"] / result["ldm"]["step_ms"]

    outdir = work / f"samples_{variant}"
    run_cli(["sample.py", "-r", str(ldm_run), "--cond", "split:test", "--n_samples", str(opt.samples),
             "--batch_size", "1", "--sampler", "ddim", "--steps", "2" if opt.smoke else "50", "--eta", "0",
             "--precision", "32" if opt.smoke else "bf16", "--device", "cpu" if opt.smoke else "cuda",
             "--outdir", str(outdir), *(["--cuda_graph"] if "graph" in options else [])],
            logs / f"sample_{variant}.log", env)
    manifest = json.loads((outdir / "manifest.json").read_text())
    seconds = [entry["seconds"] for entry in manifest["samples"]]
    result["sample"] = {"seconds": seconds, "median_s": statistics.median(seconds[1:] or seconds),
                        "files": sorted(p.name for p in outdir.iterdir())[:6]}
    return result


def train_autoencoder(variant: str, tree: Path, work: Path, opt: argparse.Namespace, vgg: str | None, logs: Path,
                      common: list[str], recompute: bool, env: dict) -> tuple[Path, dict]:
    """Stage 1 with the patch-GAN switched on halfway; returns its checkpoint and its two phases' step times (the
    result's "ae", "ae_gan" and "lpips" entries)."""
    disc_start = opt.ae_steps // 2
    lpips = ([f"model.params.lossconfig.params.perceptual_backbone_path={vgg}"] if vgg and not opt.smoke
             else ["model.params.lossconfig.params.perceptual_weight=0"])
    ae_logs = work / f"ae_{variant}"
    run_cli(["train_ae.py", "-b", str(AE_CONFIG), "-t", "--no_test", "-l", str(ae_logs), "-n", "bench",
             f"data.params.train.params.root={tree}", f"trainer.max_steps={opt.ae_steps}",
             f"model.params.lossconfig.params.disc_start={disc_start}", *lpips, *common,
             f"model.params.ddconfig.recompute_cheap={str(recompute).lower()}",
             *(SMOKE_AE if opt.smoke else [])], logs / f"ae_{variant}.log", env)
    run = only_run(ae_logs)
    metrics = read_metrics(run)
    return run / "checkpoints" / "last.ckpt", {
        "ae": phase(metrics, 1 + opt.warmup, disc_start - 1) | {
            "first_step_s": first_step_seconds(logs / f"ae_{variant}.log")},
        "ae_gan": phase(metrics, disc_start + 1 + opt.warmup, opt.ae_steps),
        "lpips": "random VGG16" if vgg and not opt.smoke else "off"}


def train_ldm_cached(variant: str, work: Path, opt: argparse.Namespace, logs: Path, ldm_args: list[str],
                     env: dict) -> dict:
    """Stage 2 with the same overrides plus cache_latents {dir: a fresh folder, copies: 1}: the phase of its steps,
    "first_step_s", "copies" and "encode_s" (the one-off encoding, hashing and writing of the train split: from the
    log's notice that it starts to the index.json it writes last)."""
    cache, ldm_logs = work / f"latent_cache_{variant}", work / f"ldm_{variant}_cached"
    log = logs / f"ldm_{variant}_cached.log"
    started = r"^latent cache .*encoding"
    marks: dict[str, float | None] = {started: None}
    run_cli(["train_ldm.py", "-b", str(LDM_CONFIG), "-t", "--no_test", "-l", str(ldm_logs), "-n", "bench",
             *ldm_args, f"model.params.cache_latents={{dir: {cache}, copies: 1}}"], log, env, marks)
    if marks[started] is None or not (cache / "index.json").is_file():
        raise RuntimeError(f"stage 2 with cache_latents built no cache in {cache} (see {log})")
    return phase(read_metrics(only_run(ldm_logs)), 1 + opt.warmup, opt.ldm_steps) | {
        "first_step_s": first_step_seconds(log), "copies": 1,
        "encode_s": (cache / "index.json").stat().st_mtime - marks[started]}


def untrained_autoencoder(path: Path, smoke: bool) -> Path:
    """`--ldm-only`: stage 1's checkpoint without training, the autoencoder config's model at initialisation (the
    LDM's step time does not depend on the weights; its loss, which the LDM ignores, left out). Made once, at `path`."""
    if path.exists():
        return path
    from omegaconf import OmegaConf

    from ldm.engine.checkpoint import atomic_torch_save
    from ldm.util import instantiate_from_config
    model = OmegaConf.load(AE_CONFIG).model
    model_config = OmegaConf.create({"target": model.target, "params": model.params})
    model_config.params.lossconfig = {"target": "torch.nn.Identity"}
    if smoke:
        model_config = OmegaConf.merge(model_config, OmegaConf.from_dotlist(
            [item.removeprefix("model.") for item in SMOKE_AE if item.startswith("model.params.ddconfig.")]))
    atomic_torch_save({"state_dict": instantiate_from_config(model_config).state_dict()}, path)
    return path


def table(results: list[dict]) -> str:
    lines = ["| variant | stage | steps timed | step ms (median) | min ms | loader wait ms | peak GiB | reserved GiB "
             "| allocator retries | first step s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['layout']} | failed: {r['error'].splitlines()[0][:120]} | | | | | | | | |")
            continue
        cached = r.get("ldm_cached", {})
        for key, name in (("ae", f"AE 2x4x128^3 (LPIPS {r.get('lpips')}, GAN idle)"),
                          ("ae_gan", "AE 2x4x128^3 + patch-GAN (2 optimizers)"),
                          ("ldm", "LDM: encoder 4x4x128^3 + UNet 4x8x32^3"),
                          ("ldm_cached", f"LDM on cached latents (copies {cached.get('copies')}): UNet 4x8x32^3, "
                                         f"{cached.get('vs_uncached', 0):.2f}x the uncached step; encoding once "
                                         f"{cached.get('encode_s', 0):.1f} s")):
            if key not in r:  # --ldm-only, or no +cache
                continue
            p = r[key]
            lines.append(f"| {r['layout']} | {name} | {p['steps']} ({p['n']}) | {p['step_ms']:.0f} | "
                         f"{p['min_ms']:.0f} | {p['data_wait_ms']:.0f} | {p['peak_gib']:.1f} | "
                         f"{p['reserved_gib']:.1f} | {p['alloc_retries']:.0f} | "
                         f"{'' if p.get('first_step_s') is None else format(p['first_step_s'], '.1f')} |")
        s = r["sample"]
        lines.append(f"| {r['layout']} | DDIM 50 steps + decode, 1 sample | {len(s['seconds'])} samples | "
                     f"{1000 * s['median_s']:.0f} per sample | {1000 * min(s['seconds']):.0f} | | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ae-steps", type=int, default=30)
    parser.add_argument("--ldm-steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--subjects", type=int, default=16, help="split 0.8 / 0.1 / 0.1 by the configs")
    parser.add_argument("--ldm-only", action="store_true",
                        help="skip stage 1's training: the LDM runs on the autoencoder config's untrained model (same "
                             "step time; stages 3-4 only)")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the chain, times nothing")
    parser.add_argument("--layouts", default="contiguous,channels_last",
                        help="comma-separated: contiguous or channels_last, each optionally +expandable "
                             "(PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True for its runs), +recompute "
                             "(recompute_cheap in the autoencoder and the UNet), +graph (trainer.cuda_graph "
                             "for the UNet, sample.py --cuda_graph), +copies with it "
                             "(trainer.bf16_weight_copies) and +cache (stage 2 again on cached latents)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    opt = parser.parse_args(argv)
    import torch
    if opt.smoke:
        global SUBJECT_SHAPE
        SUBJECT_SHAPE = (24, 24, 24)
        opt.ae_steps, opt.ldm_steps, opt.warmup, opt.samples, opt.subjects = 4, 2, 0, 2, 10
    elif not torch.cuda.is_available():
        print("bench_brats_pipeline: needs a CUDA GPU (bf16 training at 128^3); --smoke checks the chain on CPU")
        return 1
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not opt.smoke else "cpu (smoke)"
    results = []
    out = Path(opt.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        began = time.perf_counter()
        write_tree(work / "brats", opt.subjects)
        print(f"wrote {opt.subjects} subjects in {time.perf_counter() - began:.1f} s", flush=True)
        vgg = random_vgg16(work / "vgg16_random.pth")
        for layout in opt.layouts.split(","):
            began = time.perf_counter()
            try:
                results.append(bench_layout(layout, work / "brats", work, opt, vgg, out / "logs"))
            except Exception as err:  # noqa: BLE001 -- report and go on with the next layout
                print(f"{layout}: {err}", flush=True)
                results.append({"layout": layout, "error": str(err)})
            print(f"{layout}: {time.perf_counter() - began:.0f} s", flush=True)
            (out / "bench_brats_pipeline.json").write_text(json.dumps(
                {"device": device, "torch": torch.__version__, "args": vars(opt), "results": results}, indent=2))
    print(f"\n{device}, torch {torch.__version__}, bf16-mixed; command: python benchmarks/bench_brats_pipeline.py "
          f"{' '.join(sys.argv[1:] if argv is None else argv)}")
    print(table(results))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
