"""benchmarks/bench_models.py --quick trains tiny copies of ours and MONAI's networks on CPU and reports them."""
import gzip
import json

import pytest
import torch

from benchmarks.bench_models import print_top_kernels
from benchmarks.bench_models import main as bench_main

pytestmark = pytest.mark.usefixtures("single_thread")


def test_quick_run_measures_every_variant(tmp_path, capsys):
    # kernels=triton is left out: on CPU it runs in Triton's interpreter, at ~15 s per step even at this size.
    rows = bench_main(["--quick", "--kernels", "torch", "--channels-last", "--out", str(tmp_path)])
    variants = ["MONAI", "MONAI flash", "ours torch", "ours torch CL"]
    assert [(r["case"], r["variant"]) for r in rows] == [(case, v) for case in ("ae-quick", "unet-quick")
                                                         for v in variants]
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    for case in ("ae-quick", "unet-quick"):
        ours, monai = (next(r for r in rows if r["case"] == case and r["model"] == m) for m in ("ours", "monai"))
        assert abs(ours["params"] - monai["params"]) < 0.01 * monai["params"]  # the same architecture
        assert ours["conv_tflop_per_step"] == pytest.approx(monai["conv_tflop_per_step"], rel=0.01)
    for row in rows:
        assert row["step_ms"] > 0 and row["conv_tflops"] > 0 and row["time_vs_monai_best"] > 0
    assert min(r["time_vs_monai_best"] for r in rows if r["model"] == "monai") == pytest.approx(1.0)
    report = json.loads((tmp_path / "bench_models.json").read_text())
    assert report["matmul_tflops"] > 0 and len(report["rows"]) == len(rows)
    table = capsys.readouterr().out.strip().splitlines()
    assert table[-len(rows) - 2].startswith("| case | input | variant | params | step ms | alloc GiB | reserved GiB")
    assert table[-1].startswith("| unet-quick | 1x4x8x8x8 | ours torch CL | ")


def test_gn_tunings_add_labelled_triton_variants():
    from benchmarks.bench_models import parse_args, variants
    from kernels.group_norm import GroupNormTuning

    args = parse_args(["--kernels", "triton", "--channels-last-only", "--no-monai",
                       "--gn-tunings", "splits=8;forward_tile=4096,fused=False"])
    labels = [v.label for v in variants(args, torch.device("cpu"))]
    assert labels == ["ours triton CL", "ours triton CL [splits=8]", "ours triton CL [forward_tile=4096,fused=False]"]
    tuning = GroupNormTuning.parse("forward_tile=4096,fused=True,splits=None")
    assert (tuning.forward_tile, tuning.fused, tuning.splits) == (4096, True, None)
    with pytest.raises(ValueError, match="unknown field 'packed'"):
        GroupNormTuning.parse("packed=True")
    with pytest.raises(ValueError, match="forward_tile='big' is not an integer"):
        GroupNormTuning.parse("forward_tile=big")


def test_weight_copies_add_netgraph_variants_only():
    """--weight-copies: a "WC" variant of each of ours' netgraph variants (trained on a GPU only; the mechanism is
    tests/engine/test_weight_copies.py's)."""
    from benchmarks.bench_models import parse_args, variants

    args = parse_args(["--kernels", "torch", "--no-monai", "--graph-network", "--weight-copies", "--precision", "bf16"])
    labels = [v.label for v in variants(args, torch.device("cuda"))]
    assert labels == ["ours torch", "ours torch netgraph", "ours torch WC netgraph"]
    args = parse_args(["--kernels", "triton", "--no-monai", "--graph-network", "--weight-copies", "--precision", "bf16",
                       "--channels-last-only", "--gn-tunings", "splits=8"])
    labels = [v.label for v in variants(args, torch.device("cuda"))]
    assert labels[-2:] == ["ours triton CL WC netgraph", "ours triton CL [splits=8] WC netgraph"]
    args = parse_args(["--kernels", "triton", "--only-flash", "--graph-network", "--netgraph-only", "--precision",
                       "bf16", "--channels-last-only", "--gn-tunings", "splits=8"])
    labels = [v.label for v in variants(args, torch.device("cuda"))]
    assert labels == ["MONAI flash netgraph", "ours triton CL netgraph", "ours triton CL [splits=8] netgraph"]
    with pytest.raises(SystemExit):
        parse_args(["--netgraph-only"])
    for wrong in (["--weight-copies", "--graph-network", "--precision", "fp32"], ["--weight-copies"]):
        with pytest.raises(SystemExit):
            parse_args(wrong)


def test_profile_prints_the_top_ops(capsys):
    x = torch.randn(64, 64, requires_grad=True)
    print_top_kernels(lambda: (x @ x).sum().backward(), torch.device("cpu"), "matmul", top=3)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("matmul: top 3 CPU ops (self time) of one step")
    assert lines[1] == "| kernel | ms | % | calls |" and len(lines) == 3 + 3
    # Which op ranks first depends on timing (on a busy CPU an allocation can); the full list must hold the three
    # products (forward + 2 backward) as one row.
    print_top_kernels(lambda: (x @ x).sum().backward(), torch.device("cpu"), "matmul", top=50)
    rows = capsys.readouterr().out.strip().splitlines()[3:]
    assert any(row.startswith("| aten::mm |") and row.endswith("| 3 |") for row in rows), rows


def test_full_size_cases_match_monai_architecture():
    """At the anchors' sizes (built on the meta device) ours differs from MONAI only where the designs do: the AE
    encoder's output conv (mean and log-variance: 2 x latent channels) and quant conv; the UNets are equal."""
    from benchmarks.bench_models import CASES, build_monai, build_ours, parameter_count

    expected = {"ae96": (3_273_349, 3_266_401), "ae128": (13_034_661, 13_020_801),
                "ae256": (13_034_661, 13_020_801), "unet": (166_498_820, 166_498_820)}
    with torch.device("meta"):
        for name, case in CASES.items():
            ours, monai = build_ours(case, "torch", compvis_decoder=False), build_monai(case, flash=False)
            assert (parameter_count(ours), parameter_count(monai)) == expected[name], name
            if case.kind == "ae":
                top, latent = case.channels[-1], case.latent_channels
                # encoder conv_out: 3^3 conv to 2 * latent (ours) vs latent (MONAI); quant: one 2L->2L 1x1 conv vs
                # two L->L ones
                extra = (top * 27 + 1) * latent + (2 * latent) * (2 * latent + 1) - 2 * latent * (latent + 1)
                assert parameter_count(ours) - parameter_count(monai) == extra


def test_conv_flops_count_forward_and_needed_gradients():
    """2 * outputs * in_channels * kernel volume forward, the same for the weight gradient; no input gradient for an
    input that needs none, one more for the second conv's input; whether the conv is called through its module or
    not."""
    from benchmarks.bench_models import conv_flops
    first, second = torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.Conv3d(4, 4, 1)
    x = torch.randn(1, 2, 4, 4, 4)
    forward = 2 * 4 * 64 * 2 * 27 + 2 * 4 * 64 * 4 * 1
    flops = conv_flops(lambda: second._conv_forward(first(x), second.weight, None).sum(), torch.device("cpu"), "fp32")
    assert flops == 2 * forward + 2 * 4 * 64 * 4


def test_kernel_categories_name_what_a_kernel_does():
    from benchmarks.bench_models import kernel_category
    assert kernel_category("gn_backward_kernel") == "GroupNorm"
    assert kernel_category("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_ndhwc_kernel") == "convolution"
    assert kernel_category("void at::native::elementwise_kernel<128, 4, direct_copy_kernel_cuda>") == "layout / copy"
    assert kernel_category("void at::native::vectorized_elementwise_kernel<4, AddFunctor<float>>") == "elementwise"
    assert kernel_category("flash_fwd_kernel") == "attention"
    assert kernel_category("Memset (Device)") == "other"
    assert kernel_category("nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_NNN") == "matmul (linear layers)"
    assert kernel_category("void multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata<4>, FusedAdamMathFunctor>"
                           ) == "optimizer"
    assert kernel_category("_channel_sum_kernel") == "reduction"


def test_conv_flops_counted_at_a_halved_input_scale_exactly():
    """Above FLOP_COUNT_VOXELS the count runs at the input halved per axis, times the voxel ratio: the same number."""
    from benchmarks.bench_models import QUICK_CASES, Variant, build_ours, conv_flops, flop_count_input, make_loss

    case, variant = QUICK_CASES["ae"], Variant("ours", "torch")
    model = build_ours(case, "torch", compvis_decoder=False)
    x = torch.randn(1, 1, 16, 16, 16)
    small, scale = flop_count_input(x, max_voxels=8 ** 3)
    assert small.shape == (1, 1, 8, 8, 8) and scale == 8 and torch.equal(small, x[:, :, :8, :8, :8])
    assert flop_count_input(x, max_voxels=16 ** 3) == (x, 1)
    full = conv_flops(make_loss(case, variant, model, x), x.device, "fp32")
    assert scale * conv_flops(make_loss(case, variant, model, small), x.device, "fp32") == full


def test_profile_trace_is_a_gzipped_chrome_timeline(tmp_path, capsys):
    x = torch.randn(64, 64, requires_grad=True)
    trace = tmp_path / "trace.json.gz"
    print_top_kernels(lambda: (x @ x).sum().backward(), torch.device("cpu"), "matmul", top=3, trace=str(trace))
    with gzip.open(trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    assert any(e.get("name") == "aten::mm" for e in events)
    assert f"timeline written to {trace}" in capsys.readouterr().out


def test_traces_go_to_an_output_folder_that_did_not_exist(tmp_path):
    out = tmp_path / "new" / "folder"
    rows = bench_main(["--quick", "--only", "unet", "--no-monai", "--kernels", "torch", "--steps", "1", "--warmup",
                       "0", "--profile", "2", "--trace", "--out", str(out)])
    assert [r["status"] for r in rows] == ["ok"]
    assert (out / "trace_unet-quick_ours_torch.json.gz").is_file() and (out / "bench_models.json").is_file()


COMPILED_GRAPHS = []


def counting_eager(graph_module, example_inputs):
    """A torch.compile backend that runs Dynamo's graphs as they are (no code generated) and keeps them."""
    COMPILED_GRAPHS.append(graph_module)
    return graph_module.forward


def test_compile_adds_compiled_rows_that_train_as_eager(tmp_path, capsys):
    """--compile default: a compiled row beside each eager one (MONAI's and ours), compiled in its first warm-up step
    (Dynamo captures MONAI's network and our encoder and decoder), with the eager row's losses on the same seed. The
    backend is one that compiles nothing, so the test needs no C++ compiler."""
    from torch._dynamo import list_backends, register_backend

    if "bench_counting_eager" not in list_backends(exclude_tags=()):
        register_backend(counting_eager, name="bench_counting_eager")
    COMPILED_GRAPHS.clear()
    rows = bench_main(["--quick", "--only", "ae", "--no-flash", "--kernels", "torch", "--steps", "1",
                       "--compile", "default", "--compile-backend", "bench_counting_eager", "--out", str(tmp_path)])
    assert [r["variant"] for r in rows] == ["MONAI", "MONAI compile", "ours torch", "ours torch compile"]
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    assert len(COMPILED_GRAPHS) >= 3  # MONAI's autoencoder, our encoder, our decoder
    for model in ("monai", "ours"):
        eager, compiled = (next(r for r in rows if r["model"] == model and r["compile"] == c) for c in ("", "default"))
        assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-5)
        assert compiled["first_step_s"] > 0 and compiled["time_vs_monai_best"] > 0
    assert min(r["time_vs_monai_best"] for r in rows if r["model"] == "monai") == pytest.approx(1.0)
    assert "| ae-quick | 1x1x16x16x16 | ours torch compile |" in capsys.readouterr().out


def test_compile_modes_are_checked():
    from benchmarks.bench_models import parse_args, variants

    args = parse_args(["--compile", "default,max-autotune", "--kernels", "torch", "--only-flash"])
    assert [v.label for v in variants(args, torch.device("cpu"))] == [
        "MONAI flash", "MONAI flash compile", "MONAI flash compile max-autotune",
        "ours torch", "ours torch compile", "ours torch compile max-autotune"]
    for wrong in (["--compile", "fast"], ["--compile", "default", "--warmup", "0"],
                  ["--compile", "default", "--compile-backend", "nonesuch"]):
        with pytest.raises(SystemExit):
            parse_args(wrong)
