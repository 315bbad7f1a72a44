"""benchmarks/bench_data.py --quick runs every pipeline through 2-worker loaders and prints its table."""
from benchmarks.bench_data import main


def test_quick_run_times_every_pipeline(capsys):
    rows = main(["--quick"])
    assert [(row["dataset"], row["cache"]) for row in rows] == [("SimpleDataset", "0"), ("SimpleDataset", "1"),
                                                                ("NiftiFolder", "0"), ("NiftiFolder", "1"),
                                                                ("HeadPhantom", "-")]
    assert all(row["volumes"] == 4 and row["volumes_per_s"] > 0 and row["workers"] == 2 for row in rows)
    table = capsys.readouterr().out.splitlines()
    assert table[-6].split() == ["dataset", "cache", "workers", "volumes/s", "first", "epoch", "s", "build", "s"]
