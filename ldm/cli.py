"""Command line shared by `train_ae.py` and `train_ldm.py`: the flags of the original latent-diffusion `main.py`.

    python train_ae.py --base configs/demo/ae_3d.yaml -t --name demo_ae trainer.max_steps=10

Order of work: parse flags, merge configs, start Fabric (every rank exists from here), agree on the log dir,
build data and model, then train (`-t`) and/or test.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from ldm.data.transforms import DataFileError
from ldm.engine.checkpoint import LAST, CheckpointError, load_checkpoint, load_model_state, non_finite_parameters
from ldm.engine.config import trainer_config_from
from ldm.engine.original_config import (default_run_length, is_original_config, port_lightning,
                                        port_original_model)
from ldm.engine.guard import NonFiniteLossError
from ldm.engine.model_checks import check_latent_diffusion
from ldm.engine.run_lock import RunFolderBusy, RunLock
from ldm.engine.signals import Preempted, PreemptionFlags
from ldm.util import TRUST_VARIABLE, TRUSTED_PREFIXES, ConfigError, instantiate_from_config

SECTIONS = ("model", "data", "trainer")
# Exit codes besides 0: bad input (config, checkpoint; nothing written), a run stopped by the NaN/Inf guard, and an
# OS error writing or reading files (disk full, read-only folder; the last good checkpoint is left as it was).
EXIT_BAD_INPUT = 2
EXIT_NON_FINITE = 3
EXIT_OS_ERROR = 4
MODEL_KEYS = ("target", "params", "base_learning_rate", "train_target", "test_target", "test_only_params")


def str2bool(value: str) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {value!r}")


BOOLEAN_LITERALS = ("yes", "true", "t", "y", "1", "no", "false", "f", "n", "0")
SWITCHES = ("-t", "--train", "--no_test", "--no-test", "-d", "--debug")


def normalise_boolean_flags(argv: list[str]) -> list[str]:
    """Accept the original main.py's optional booleans (`-t True`, `--no-test false`, bare `--scale_lr`) without
    letting a flag swallow the KEY=VALUE override that follows it."""
    out: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        value = argv[index + 1] if index + 1 < len(argv) else None
        has_literal = value is not None and value.lower() in BOOLEAN_LITERALS
        if token in SWITCHES and has_literal:
            out += [token] if str2bool(value) else []
            index += 2
            continue
        if token == "--scale_lr" and not has_literal:
            out += [token, "true"]
        else:
            out.append(token)
        index += 1
    return out


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description,
        epilog="Any further KEY=VALUE arguments are OmegaConf dotlist overrides merged last, e.g. "
               "model.params.base_learning_rate=1e-4 trainer.max_steps=10 data.params.batch_size=2.",
    )
    parser.add_argument("-n", "--name", default="", help="run name: logs/<timestamp>_<name><postfix>/")
    parser.add_argument("-r", "--resume", default="",
                        help="a log dir (restores its configs/ and checkpoints/last.ckpt) or a checkpoint file")
    parser.add_argument("-b", "--base", nargs="*", metavar="config.yaml", default=[],
                        help="config files, merged left to right (after a resumed run's saved configs)")
    parser.add_argument("-t", "--train", action="store_true", help="train; without it only the test stage runs")
    parser.add_argument("--no_test", "--no-test", action="store_true", help="skip the test stage after training")
    parser.add_argument("-p", "--postfix", default="", help="appended to the log dir name")
    parser.add_argument("-d", "--debug", action="store_true", help="write the run under <logdir>/debug_runs/")
    parser.add_argument("-s", "--seed", type=int, default=23, help="seed for weights, data order and noise")
    parser.add_argument("-l", "--logdir", default="logs", help="parent folder of run folders")
    parser.add_argument("--trust-config", action="store_true",
                        help=f"let configs name any importable target (also {TRUST_VARIABLE}=1); by default only "
                             f"{', '.join(TRUSTED_PREFIXES)} and the aliases, since a config runs the code it names")
    parser.add_argument("--scale_lr", type=str2bool, default=True,
                        help="lr = accumulate_grad_batches * devices * num_nodes * batch_size * base_learning_rate "
                             "(default true; --scale_lr false uses base_learning_rate as is)")
    return parser


def load_config(paths: list[str], dotlist: list[str]) -> DictConfig:
    """Merge YAML files in order, then the dotlist; errors name the file or argument at fault."""
    configs = []
    for path in paths:
        if not Path(path).is_file():
            raise ConfigError(f"--base {path}: no such file")
        try:
            configs.append(OmegaConf.load(path))
        except Exception as err:
            raise ConfigError(f"--base {path}: cannot parse YAML ({err})") from err
    bad = [arg for arg in dotlist if "=" not in arg or arg.startswith("-")]
    if bad:
        raise ConfigError(f"unrecognised argument(s) {' '.join(bad)}: overrides are KEY=VALUE, see --help")
    try:
        config = OmegaConf.merge(*configs, OmegaConf.from_dotlist(dotlist))
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot merge configs: {err}") from err
    return port_lightning_section(config)


def port_lightning_section(config: DictConfig) -> DictConfig:
    """Translate an original config (CompVis latent-diffusion / stable-diffusion): its `lightning` section becomes
    our `trainer` section and its model options ours (`ldm.engine.original_config`), printing a notice for each key
    dropped as harmless. Only `model` is required here (sampling needs no data); training and testing check `data`."""
    notices: list[str] = []
    original = is_original_config(config)
    if "lightning" in config:
        lightning = OmegaConf.to_container(config.pop("lightning"), resolve=True) or {}
        if not isinstance(lightning, dict):
            raise ConfigError(f"lightning: expected a mapping with trainer, callbacks, modelcheckpoint, got "
                              f"{type(lightning).__name__}")
        ported, notices = port_lightning(lightning)
        config.trainer = OmegaConf.merge(ported, config.get("trainer", {}) or {})
    if original and "data" in config:  # the original main.py trained with Lightning's default length
        trainer = config.get("trainer", None)
        config.trainer = default_run_length({} if trainer is None else OmegaConf.to_container(trainer, resolve=True),
                                            notices)
    unknown = sorted(set(config.keys()) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown top-level config section(s) {', '.join(unknown)} (expected: {', '.join(SECTIONS)})")
    if "model" not in config:
        raise ConfigError(f"config has no 'model' section (given: {', '.join(config.keys()) or 'none'})")
    notices += port_original_model(config.model, original=original)
    for notice in notices:
        print(f"notice: {notice}")
    return config


def model_config_for(model: DictConfig, training: bool) -> DictConfig:
    """`target`+`params` for this stage: `train_target` when training, `test_target` + `test_only_params` otherwise."""
    unknown = sorted(set(model.keys()) - set(MODEL_KEYS))
    if unknown:
        raise ConfigError(f"model: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(MODEL_KEYS)})")
    chosen = OmegaConf.create({"model": {"target": model.target, "params": model.get("params", {}) or {}}})
    if training and "train_target" in model:
        chosen.model.target = model.train_target
    if not training:
        if "test_target" in model:
            chosen.model.target = model.test_target
        chosen.model.params = OmegaConf.merge(chosen.model.params, model.get("test_only_params", {}) or {})
    return chosen.model


def is_run_folder(path: Path) -> bool:
    return (path / "configs").is_dir() and (path / "checkpoints").is_dir()


def resolve_resume(resume: str) -> tuple[Path | None, Path]:
    """(run folder, checkpoint path) for `-r`, which names a run folder, a checkpoint in its checkpoints/, or a
    checkpoint anywhere else: then the run folder is None (the run continues in a new one)."""
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"-r {resume}: no such file or folder")
    if path.is_file():
        run = path.parent.parent
        return (run if path.parent.name == "checkpoints" and is_run_folder(run) else None), path
    checkpoint = path / "checkpoints" / LAST
    if not checkpoint.is_file():
        raise CheckpointError(f"-r {resume}: the log dir has no checkpoints/{LAST} to resume from")
    return path, checkpoint


def check_log_folder(logdir: str, parent: Path) -> None:
    """Refuse a `-l` under which no run folder can be made (its nearest existing folder is a file, read-only or not
    ours), before anything runs."""
    existing = next(path for path in (parent, *parent.parents) if path.exists() or path == path.parent)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"-l {logdir}: run folders cannot be made there ({existing} is not a writable folder)")


def untrained_first_stage_warning(model, model_config: DictConfig) -> str | None:
    """A loud line when a latent diffusion model is about to train on a first stage that no checkpoint filled: the
    demo configs leave `first_stage_config.params.ckpt_path` null for the command line to set."""
    first_stage = getattr(model, "first_stage_model", None)
    params = model_config.get("params", {}) or {}
    stage_config = params.get("first_stage_config", None)
    if first_stage is None or not isinstance(stage_config, DictConfig) or params.get("ckpt_path", None) or \
            next(first_stage.parameters(), None) is None:
        return None
    if (stage_config.get("params", {}) or {}).get("ckpt_path", None):
        return None
    key = "model.params.first_stage_config.params.ckpt_path"
    return (f"WARNING: {key} is null: the first stage is an untrained autoencoder with random weights, so this model "
            f"learns the latents of noise and its samples will be noise. Set {key}=logs/<autoencoder run>/"
            f"checkpoints/last.ckpt")


def resume_hint(logdir: Path, last_good: Path | None) -> str:
    """How to go on after the NaN/Inf guard stopped a run in `logdir`; `last_good`: the newest step file saved
    outside a streak of bad steps, if known."""
    last = logdir / "checkpoints" / LAST
    if not last.is_file():
        return f"no checkpoint was saved in {logdir} yet"
    if last_good is not None and last_good.is_file() and not os.path.samefile(last_good, last):
        return f"-r {last_good} resumes from before the bad steps ({LAST} was saved during them)"
    return f"-r {logdir} resumes from {last}"


def scaled_learning_rate(base_lr: float, accumulate: int, devices: int, num_nodes: int, batch_size: int,
                         scale: bool) -> tuple[float, str]:
    """The learning rate the model gets, and a line saying how it was computed."""
    if not scale:
        return base_lr, f"learning rate {base_lr:.2e} (base_learning_rate, not scaled)"
    lr = accumulate * devices * num_nodes * batch_size * base_lr
    return lr, (f"learning rate {lr:.2e} = {accumulate} (accumulate_grad_batches) * {devices} (devices) * "
                f"{num_nodes} (num_nodes) * {batch_size} (batch_size) * {base_lr:.2e} (base_learning_rate)")


def run_name(opt: argparse.Namespace, now: str) -> str:
    if opt.name:
        name = "_" + opt.name
    elif opt.base:
        name = "_" + Path(opt.base[0]).stem
    else:
        name = ""
    return now + name + opt.postfix


def main(description: str, argv: list[str] | None = None) -> int:
    parser = build_parser(description)
    opt, dotlist = parser.parse_known_args(normalise_boolean_flags(sys.argv[1:] if argv is None else argv))
    if opt.trust_config:
        os.environ[TRUST_VARIABLE] = "1"  # also for the processes of the other ranks, started from this one
    flags = PreemptionFlags(stage="start-up").install()
    try:
        with contextlib.ExitStack() as cleanup:
            return run(opt, dotlist, flags, cleanup)
    except Preempted as err:
        print(err, file=sys.stderr)
        return 0
    except (ConfigError, CheckpointError, RunFolderBusy) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except MissingMandatoryValue as err:  # a `???` in a config that nothing set
        print(f"error: {err.full_key}: no value (the config leaves it ???); set it on the command line, "
              f"e.g. {err.full_key}=...", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_NON_FINITE
    except DataFileError as err:  # a file found corrupt when read, in training or test
        print(f"error: {data_error_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as err:  # one line naming the path and the OS error, e.g. a full disk
        print(f"error: {err}", file=sys.stderr)
        return EXIT_OS_ERROR
    finally:
        flags.uninstall()


def data_error_line(err: DataFileError) -> str:
    """The message of a DataFileError; one raised in a loader worker arrives wrapped with the worker's traceback,
    whose last line holds it."""
    text = str(err).strip()
    last = text.splitlines()[-1] if text else ""
    marker = f"{DataFileError.__name__}: "
    return last.split(marker, 1)[1] if "Original Traceback" in text and marker in last else text


def lock_run_folder(fabric, logdir: Path, cleanup: contextlib.ExitStack) -> None:
    """Rank 0 locks the run folder until the run ends (`cleanup`); every rank raises RunFolderBusy if it could not."""
    problem = None
    if fabric.is_global_zero:
        lock = RunLock(logdir)
        try:
            notice = lock.acquire()
        except RunFolderBusy as err:
            problem = str(err)
        else:
            cleanup.callback(lock.release)
            if notice:
                print(notice)
    problem = fabric.broadcast(problem, src=0)
    if problem:
        raise RunFolderBusy(problem)


def run(opt: argparse.Namespace, dotlist: list[str], flags: PreemptionFlags, cleanup: contextlib.ExitStack) -> int:
    from ldm.engine.loop import Trainer  # heavy imports after argument errors are out of the way

    now = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    checkpoint_path, logdir = None, None
    if opt.resume and not (opt.name and not Path(opt.resume).is_file()):
        logdir, checkpoint_path = resolve_resume(opt.resume)
    resumed_run = logdir is not None  # else a new run folder, perhaps from a checkpoint found outside any
    if opt.name and (resumed_run or opt.resume and checkpoint_path is None):
        raise ConfigError("-n/--name and -r/--resume of a run folder cannot be combined: a resumed run keeps its name")
    if resumed_run:
        opt.base = sorted(glob.glob(str(logdir / "configs" / "*.yaml"))) + list(opt.base)
    else:
        parent = Path(opt.logdir) / "debug_runs" if opt.debug else Path(opt.logdir)
        check_log_folder(opt.logdir, parent)
        logdir = parent / run_name(opt, now)
    if not opt.base:
        raise ConfigError("no config given: pass --base config.yaml (or -r a run folder)" if checkpoint_path is None
                          else f"no config given: -r {opt.resume} is not inside a run folder (with configs/ and "
                               f"checkpoints/), so its configs are unknown; pass --base config.yaml")
    if checkpoint_path is not None and not resumed_run:
        print(f"-r {opt.resume}: not inside a run folder (with configs/ and checkpoints/); its training state "
              f"continues in a new run folder under {parent}")

    config = load_config(opt.base, dotlist)
    if "data" not in config:
        raise ConfigError(f"config has no 'data' section (given: {', '.join(config.keys())}): training and testing "
                          f"read one; sample.py needs none")
    trainer_cfg = trainer_config_from(config.get("trainer", {}))
    trainer = Trainer(trainer_cfg, seed=opt.seed, flags=flags)
    fabric = trainer.fabric
    logdir = Path(fabric.broadcast(str(logdir), src=0))  # every rank writes into rank 0's folder
    if resumed_run:
        lock_run_folder(fabric, logdir, cleanup)
    fabric.seed_everything(opt.seed)

    callbacks = [instantiate_from_config(cfg) for cfg in (config.trainer.callbacks.values()
                                                         if "trainer" in config and "callbacks" in config.trainer else [])]
    datamodule = instantiate_from_config(config.data)
    if fabric.is_global_zero:
        print(f"data: {type(datamodule).__name__}\n{datamodule.describe()}")
    model_config = model_config_for(config.model, training=opt.train)
    model = instantiate_from_config(model_config)
    if hasattr(model, "first_stage_model") and hasattr(datamodule, "peek"):
        split, item = datamodule.peek()
        check_latent_diffusion(model, model_config.params, item, data_where=f"data.params.{split}")
    base_lr = float(config.model.get("base_learning_rate", 0.0))
    num_nodes = getattr(fabric.strategy, "num_nodes", 1)  # `fabric run --num-nodes` may override the config
    model.learning_rate, how = scaled_learning_rate(
        base_lr, trainer_cfg.accumulate_grad_batches, fabric.world_size // num_nodes, num_nodes,
        datamodule.batch_size, opt.scale_lr)
    if checkpoint_path is not None and opt.train:
        how = f"{how}; unused when resuming (the optimizer state saved in the checkpoint sets it)"
    if fabric.is_global_zero:
        parameters = sum(p.numel() for p in model.parameters())
        print(f"model: {type(model).__name__}, {parameters / 1e6:.2f}M parameters\n{how}")
        if opt.train and checkpoint_path is None:
            warning = untrained_first_stage_warning(model, model_config)
            if warning:
                print(warning, file=sys.stderr)

    checkpoint = load_checkpoint(checkpoint_path) if checkpoint_path else None
    if checkpoint is not None:
        load_model_state(model, checkpoint["state_dict"], checkpoint_path)
        broken = non_finite_parameters(model)
        if broken:
            raise CheckpointError(f"{checkpoint_path} holds NaN/Inf weights ({', '.join(broken[:5])}"
                                  f"{', ...' if len(broken) > 5 else ''}): resume from an earlier step=N.ckpt")
        trainer.weights_loaded_from(checkpoint_path, checkpoint)
    run_config = OmegaConf.to_container(config, resolve=True)

    def open_run_folder() -> None:
        """Write into the run folder only once the first step has gone through: an override given with -r that
        fails (at build time or in the first step) must not leave a config behind that breaks every later resume."""
        if fabric.is_global_zero:
            (logdir / "checkpoints").mkdir(parents=True, exist_ok=True)
            (logdir / "configs").mkdir(parents=True, exist_ok=True)
            if not resumed_run:  # a new run folder: lock it now that it exists
                lock = RunLock(logdir)
                lock.acquire()
                cleanup.callback(lock.release)
            OmegaConf.save(OmegaConf.masked_copy(config, ["model", "data"]), logdir / "configs" / f"{now}-project.yaml")
            OmegaConf.save(OmegaConf.create({"trainer": config.get("trainer", {})}),
                           logdir / "configs" / f"{now}-trainer.yaml")
            print(f"run folder: {logdir}")

    trainer.attach(logdir, callbacks, run_config, open_run_folder)

    try:
        if opt.train:
            try:
                trainer.fit(model, datamodule, resume=checkpoint)
            except NonFiniteLossError as err:
                raise NonFiniteLossError(f"{err}; {resume_hint(logdir, trainer.last_good_checkpoint)}") from None
        if not opt.no_test:
            if flags.exit_requested:  # a SIGTERM that came after training's last step boundary
                raise Preempted("SIGTERM at the end of training: exiting before the test stage")
            flags.stage = "the test stage"
            if datamodule.has("test"):
                trainer.test(model, datamodule)
            elif fabric.is_global_zero:
                print("test: skipped, the data section has no 'test' split")
    finally:
        trainer.logger.close()
    return 0
