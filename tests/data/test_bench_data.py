"""benchmarks/bench_data.py --quick runs every pipeline through 2-worker loaders and prints its table."""
import pytest

from benchmarks.bench_data import main


def test_quick_run_times_every_pipeline(capsys):
    rows = main(["--quick"])
    assert [(row["dataset"], row["cache"]) for row in rows] == [("SimpleDataset", "0"), ("SimpleDataset", "1"),
                                                                ("NiftiFolder", "0"), ("NiftiFolder", "1"),
                                                                ("HeadPhantom", "-")]
    assert all(row["volumes"] == 4 and row["volumes_per_s"] > 0 and row["workers"] == 2 for row in rows)
    table = capsys.readouterr().out.splitlines()
    assert table[-6].split() == ["dataset", "cache", "workers", "volumes/s", "per", "worker", "first", "epoch", "s",
                                 "build", "s"]
    assert all(row["volumes_per_s_per_worker"] == row["volumes_per_s"] / 2 for row in rows)


def test_brats_quick_times_the_brats_dataset_uncached_in_memory_and_on_disk(capsys):
    rows = main(["--brats", "--quick"])
    assert [(row["dataset"], row["cache"]) for row in rows] == [("BraTS2021_3D", "0"), ("BraTS2021_3D", "1"),
                                                                ("BraTS2021_3D", "persistent")]
    assert all(row["volumes"] == 4 and row["volumes_per_s"] > 0 for row in rows)
    assert rows[2]["files_on_disk"] == 4  # PersistentDataset wrote each subject's deterministic part once
    out = capsys.readouterr().out
    assert "4 BraTS subjects of 4 x 40 x 40 x 32 -> random crops of 24^3" in out
    assert out.splitlines()[-1].split()[:3] == ["BraTS2021_3D", "persistent", "2"]


def test_crop_larger_than_the_brats_volumes_is_refused():
    with pytest.raises(SystemExit) as exit_info:
        main(["--brats", "--crop", "160"])  # the volumes are 155 deep
    assert exit_info.value.code == 2
