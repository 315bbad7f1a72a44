"""What the bandwidth-bound kernels compile to for an H100/H200 (sm_90), checked on the CPU with
benchmarks/kernel_codegen.py: no register spills, and no bf16 tensor read or written element by element (a 2-byte
global access): the channels-last GroupNorm, concatenation, upsampling, residual and thin-convolution kernels load 16
bytes per thread and instruction. A change that loses that (e.g. channel offsets Triton can no longer prove contiguous) fails here, before
any GPU sees it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import triton

ROOT = Path(__file__).resolve().parents[2]
CASES = ["group_norm_4x256x16^3_input_bias", "group_norm_4x512x8^3", "group_norm_4x128x32^3", "concat", "upsample",
         "residual_add", "thin_conv", "master_adamw"]


@pytest.fixture(scope="module")
def codegen(tmp_path_factory):
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (tools / "ptxas").exists() or not (tools / "cuobjdump").exists():
        pytest.skip(f"Triton's bundled ptxas / cuobjdump not found in {tools}")
    out = tmp_path_factory.mktemp("codegen") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_codegen.py"), "--cases", ",".join(CASES),
                    "--json", str(out)], cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=600)
    return json.loads(out.read_text())


def test_every_case_launched_its_kernels(codegen):
    kernels = {(row["case"], row["kernel"]) for row in codegen}
    assert {case for case, _ in kernels} == set(CASES)
    assert ("group_norm_4x512x8^3", "gn_backward_kernel") in kernels
    assert ("residual_add", "_channel_sum_kernel") in kernels  # the bias gradient
    assert ("thin_conv", "_weight_grad_kernel") in kernels


def test_no_kernel_spills(codegen):
    spilled = [(row["case"], row["kernel"], row["local_bytes"]) for row in codegen if row["local_bytes"]]
    assert not spilled


def test_bf16_tensors_move_16_bytes_per_access(codegen):
    for row in codegen:
        loads, stores = dict(row["loads"]), row["stores"]
        if row["kernel"] == "gn_forward_kernel" and row["constants"]["PHASE"] == 1 and not row["constants"]["ONE_TILE"]:
            # The statistics of several tiles are sums shifted by each lane's first value: one bf16 per channel
            # (of x, and of the residual when there is one), a single 2-byte load each.
            assert loads.pop("2", 0) <= 2, f"{row['case']}: more 2-byte loads than the shift's ({row['loads']})"
        if row["kernel"] == "_master_adamw_kernel":
            # Full blocks run unmasked, 16 bytes at a time; each tensor's last, partial block runs masked, element by
            # element: 7 arrays of 16-byte accesses (bf16 gradient, fp32 master and moments) in the full path.
            assert loads.get("16", 0) >= 7 and row["stores"].get("16", 0) >= 7, row
            continue
        assert "2" not in loads and "2" not in stores, f"{row['case']} {row['kernel']}: element-wise bf16 access"
        assert loads.get("16", 0) > 0, f"{row['case']} {row['kernel']}: no 16-byte loads ({loads})"
