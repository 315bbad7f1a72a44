"""benchmarks/count_kept_activations.py counts, on the meta device, what recompute_cheap saves at full size."""
from benchmarks.count_kept_activations import main as count_main


def test_recompute_cheap_keeps_well_under_half_the_volumes_at_128_cubed(capsys):
    plain, recomputed = count_main(["--configs", "ae128"])
    assert (plain["recompute_cheap"], recomputed["recompute_cheap"]) == (False, True)
    assert recomputed["volumes_gib"] < 0.45 * plain["volumes_gib"]  # 8.14 vs 21.53 GiB when written
    assert plain["all_gib"] > plain["volumes_gib"] > 1  # a full-size model, not a toy
    assert capsys.readouterr().out.splitlines()[0].startswith("| config | recompute_cheap |")
