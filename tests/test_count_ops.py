"""benchmarks/count_ops.py on the tiny UNet of bench_models --quick: the backward kernels that the GroupNorm fusions
remove stay removed. Run as its own process, as the script asks (it records Triton launches, interpreter off)."""
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.bench_models import QUICK_CASES, build_ours

ROOT = Path(__file__).resolve().parents[1]


def backward_ops(tmp_path: Path) -> dict[str, list]:
    out = tmp_path / "ops.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "count_ops.py"), "--quick", "--case", "unet", "--size",
                    "8", "--json", str(out)], cwd=ROOT, env=env, check=True,
                   capture_output=True, text=True, timeout=300)
    return json.loads(out.read_text())["backward_ops"]


def test_unet_backward_adds_only_where_encoder_outputs_meet_their_skip_gradients(tmp_path):
    """Every residual block's norm passes the block input on (pass_input), so autograd adds no gradients inside a
    block; what is left is one full-size add per encoder output, which feeds the next block and a decoder concat."""
    adds = sum(n for _, n in backward_ops(tmp_path)["add"])
    assert adds == len(build_ours(QUICK_CASES["unet"], "torch", compvis_decoder=False).input_blocks)
