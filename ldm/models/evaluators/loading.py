"""`load_evaluator`: a trained Segmenter or Classifier back from its run folder, ready to score samples."""
from __future__ import annotations

from pathlib import Path

from torch import nn

#: Checkpoints of a run folder, in order of preference.
CHECKPOINT_NAMES = ("best.ckpt", "last.ckpt")


def run_files(run_dir_or_ckpt: str | Path) -> tuple[list[Path], Path]:
    """(config files, checkpoint) of a run: a run folder gives `configs/*.yaml` and `checkpoints/best.ckpt` if
    present else `checkpoints/last.ckpt`; a checkpoint file gives itself and the configs of the run folder above it
    (`<run>/checkpoints/<file>`). Anything missing is a FileNotFoundError naming it."""
    path = Path(run_dir_or_ckpt)
    if not path.exists():
        raise FileNotFoundError(f"evaluator run folder or checkpoint {path} does not exist")
    if path.is_file():
        checkpoint, run_dir = path, path.parent.parent
    else:
        run_dir = path
        found = [path / "checkpoints" / name for name in CHECKPOINT_NAMES if (path / "checkpoints" / name).is_file()]
        if not found:
            wanted = " or ".join(f"checkpoints/{name}" for name in CHECKPOINT_NAMES)
            raise FileNotFoundError(f"evaluator run folder {path} has no {wanted}")
        checkpoint = found[0]
    configs = sorted((run_dir / "configs").glob("*.yaml"))
    if not configs:
        raise FileNotFoundError(f"evaluator run folder {run_dir} has no configs/*.yaml (the configs train_eval.py "
                                f"saves next to checkpoints/)")
    return configs, checkpoint


def load_evaluator(run_dir_or_ckpt: str | Path) -> nn.Module:
    """The Segmenter or Classifier of a run of train_eval.py, with its trained weights, in eval mode on the CPU.

    run_dir_or_ckpt: the run folder (`logs/<time>_<name>`) or one of its checkpoint files. The run's saved configs
    are merged in name order (as `-r` does) and the model is built as the test stage builds it.
    """
    from ldm.cli import load_config, model_config_for
    from ldm.engine.checkpoint import load_checkpoint, load_model_state
    from ldm.models.evaluators.classifier import Classifier
    from ldm.models.evaluators.segmenter import Segmenter
    from ldm.util import get_obj_from_str, instantiate_from_config

    configs, checkpoint_path = run_files(run_dir_or_ckpt)
    model_config = model_config_for(load_config([str(p) for p in configs], []).model, training=False)
    target = get_obj_from_str(model_config.target, where="model.target")
    if not (isinstance(target, type) and issubclass(target, (Segmenter, Classifier))):
        raise TypeError(f"{configs[0].parent.parent} is a run of {model_config.target}, not of an evaluator "
                        f"(Segmenter or Classifier)")
    model = instantiate_from_config(model_config)
    load_model_state(model, load_checkpoint(checkpoint_path)["state_dict"], checkpoint_path)
    return model.eval()
