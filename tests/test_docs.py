"""The documents hold: every relative link of README.md, CONTRIBUTING.md and docs/*.md resolves (file and heading), and
every command in the README's ```sh blocks is accepted by the program it names (argparse / click parsers, config files
and override keys, Makefile targets, script flags); the CPU-cheap `make -n` ones run."""
from __future__ import annotations

import inspect
import re
import shlex
import subprocess
import sys
from dataclasses import fields
from functools import lru_cache
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*$", re.M)
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces -> '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {slug(h) for h in HEADING.findall(text)}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(document):
    text = FENCE.sub("", document.read_text())
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (document.parent / path).resolve() if path else document
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with anchor #{anchor} in {file.name}")
    assert not broken, f"{document.name}: " + "; ".join(broken)


def test_readme_is_short_and_keeps_its_sections():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 260
    for heading in ("## Set-up: two commands", "## Sample quality", "## Fault tolerance", "## Performance"):
        assert heading in text.splitlines(), heading


def readme_commands() -> list[str]:
    """The README's shell commands: lines of ```sh blocks, comments stripped, continuations joined."""
    commands = []
    for language, body in FENCE.findall((ROOT / "README.md").read_text()):
        if language == "sh":
            for line in body.replace("\\\n", " ").splitlines():
                command = re.sub(r"\s+#.*$", "", line).strip()
                if command:
                    commands.append(command)
    return commands


def check_config_overrides(bases: list[str], dotlist: list[str]) -> None:
    """--base files exist and merge; each KEY=VALUE names a key the configs (or the trainer's schema) have."""
    from ldm.cli import load_config
    from ldm.engine.config import TrainerConfig
    from ldm.util import get_obj_from_str

    for base in bases:
        assert (ROOT / base).is_file(), f"--base {base}: no such file"
    config = load_config([str(ROOT / b) for b in bases], [])
    trainer_keys = {f.name for f in fields(TrainerConfig)}
    for item in dotlist:
        key = item.partition("=")[0]
        parts = key.split(".")
        if parts[0] == "trainer":
            assert parts[1] in trainer_keys, f"{key}: no such trainer key"
            continue
        if parts[:2] == ["model", "test_only_params"]:  # overrides model.params in the test stage
            parts = ["model", "params", *parts[2:]]
        parent = OmegaConf.select(config, ".".join(parts[:-1]), default=None)
        assert parent is not None, f"{key}: no {'.'.join(parts[:-1])} in {', '.join(bases)}"
        if parts[-1] not in parent.keys():  # not in the config: then a constructor argument of the target it configures
            assert parts[-2] == "params", f"{key}: not a key of {', '.join(bases)}"
            target = get_obj_from_str(OmegaConf.select(config, ".".join(parts[:-2])).target)
            assert parts[-1] in inspect.signature(target).parameters, f"{key}: not an argument of {target.__name__}"


def check_stage_script(args: list[str]) -> None:
    from ldm.cli import build_parser, normalise_boolean_flags

    opt, dotlist = build_parser("").parse_known_args(normalise_boolean_flags(args))
    bad = [a for a in dotlist if "=" not in a or a.startswith("-")]
    assert not bad, f"not flags nor KEY=VALUE overrides: {bad}"
    assert not (opt.name and opt.resume), "-n and -r cannot be combined"
    if opt.base:
        check_config_overrides(opt.base, dotlist)


@lru_cache
def help_text(*command: str) -> str:
    run = subprocess.run([*command, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-1000:]
    return run.stdout


def check_python(args: list[str]) -> None:
    script, rest = args[0], args[1:]
    if script in ("train_ae.py", "train_ldm.py", "train_eval.py"):
        check_stage_script(rest)
    elif script == "sample.py":
        from ldm.sample_cli import build_parser
        build_parser().parse_args(rest)
    elif script == "evaluate.py":
        from ldm.evaluate_cli import build_parser
        build_parser().parse_args(rest)
    elif script.startswith("benchmarks/") and script.endswith(".py"):
        known = help_text(sys.executable, script)
        unknown = [a for a in rest if a.startswith("--") and a not in known]
        assert not unknown, f"{script}: unknown flags {unknown}"
    elif args[:2] == ["-m", "pytest"]:
        known = help_text(sys.executable, "-m", "pytest")
        for arg in args[2:]:
            assert arg in known if arg.startswith("-") else (ROOT / arg).exists(), f"pytest {arg}"
    else:
        raise AssertionError(f"python {script}: this test does not know how to check it; teach it")


def check_command(command: str) -> None:
    args = shlex.split(command)
    while re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", args[0]):  # environment variables set for the command
        args = args[1:]
    program, rest = args[0], args[1:]
    if program == "make":
        targets = re.findall(r"^\.PHONY:(.*)$", (ROOT / "Makefile").read_text(), re.M)[0].split()
        assert rest and all(t in targets for t in rest), f"make {rest}: targets are {targets}"
        subprocess.run(["make", "-n", *rest], cwd=ROOT, check=True, capture_output=True, timeout=60)
    elif program == "python":
        check_python(rest)
    elif program == "srun":
        check_command(shlex.join(rest))
    elif program == "fabric":
        from lightning.fabric.cli import _run

        assert rest[0] == "run"
        params = _run.make_context("run", rest[1:]).params
        check_python([params["script"], *params["script_args"]])
    elif program == "torchrun":
        from torch.distributed.run import get_args_parser

        parsed = get_args_parser().parse_args(rest)
        check_python([parsed.training_script, *parsed.training_script_args])
    else:
        raise AssertionError(f"{program}: this test does not know how to check it; teach it")


def test_readme_has_commands():
    commands = readme_commands()
    assert len(commands) > 15 and "make demo" in commands and "make test" in commands


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_is_accepted(command, monkeypatch):
    monkeypatch.chdir(ROOT)  # fabric run checks that its script exists
    check_command(command)


def test_the_checks_can_fail(monkeypatch):
    monkeypatch.chdir(ROOT)
    for wrong in ("python train_ldm.py --base configs/demo/ldm_3d.yaml --nmae x",
                  "python train_ldm.py --base configs/demo/ldm_3d.yaml model.params.unet_config.params.imagesize=8",
                  "python train_ldm.py --base configs/demo/nope.yaml", "python sample.py -r x --sampler nope",
                  "python train_ldm.py --base configs/demo/ldm_3d.yaml model.params.ckpt_pth=x", "make deploy",
                  "torchrun --nproc-per-node 2 train_ldm.py --base configs/demo/ldm_3d.yaml trainer.device=2",
                  "python benchmarks/bench_models.py --cases unet --no-such-flag"):
        with pytest.raises((AssertionError, SystemExit)):
            check_command(wrong)
