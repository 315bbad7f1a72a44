"""The latent cache (ldm/data/latent_cache.py) with the demo 3D LDM at 16^3: cached training batches against the
encoder's own (float64 first stage), reuse, invalidation, damaged files, a killed build, and train_ldm.py with it."""
from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from ldm.cli import main as train_main
from ldm.data.base import ItemSeededDataset, item_seed
from ldm.data.latent_cache import AUGMENTATION_SEED, LATENT_MOMENTS, CachedLatents
from ldm.util import instantiate_from_config
from tests.engine.helpers import REPO, only_run_dir
from tests.test_sample_cli import TINY_3D

pytestmark = pytest.mark.usefixtures("single_thread")
ONE_PROCESS = SimpleNamespace(global_rank=0, world_size=1, barrier=lambda: None, broadcast=lambda obj, src: obj)
LENGTH = 3  # odd: the last encoding batch is short


def tiny_config(cache_dir: Path | None, copies: int = 1):
    config = OmegaConf.load(REPO / "configs" / "demo" / "ldm_3d.yaml")
    config = OmegaConf.merge(config, OmegaConf.from_dotlist([
        *[item for item in TINY_3D if item.startswith(("model.", "data."))],
        f"data.params.train.params.length={LENGTH}"]))
    if cache_dir is not None:
        config.model.params.cache_latents = {"dir": str(cache_dir), "copies": copies}
    del config.model.base_learning_rate  # read by the command line, not the model
    return config


def build(cache_dir: Path | None, copies: int = 1):
    """(model with a float64 first stage, data module)."""
    config = tiny_config(cache_dir, copies)
    torch.manual_seed(0)
    model = instantiate_from_config(config.model)
    model.first_stage_model.double()
    return model, instantiate_from_config(config.data)


def raw_batch(datamodule, indices: list[int], copy: int = 0) -> dict:
    """The train items as the cache reads them (copy `copy`'s augmentation seed), collated."""
    reader = ItemSeededDataset(datamodule.datasets["train"])
    items = [reader[(i, item_seed(AUGMENTATION_SEED, copy, 0, i))] for i in indices]
    return {key: torch.stack([torch.as_tensor(item[key]) for item in items]) for key in ("image", "mask")}


def cached_batch(dataset, indices: list[int]) -> dict:
    items = [dataset[i] for i in indices]
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def counting(model) -> list[int]:
    """Wrap model.encode_moments to count its calls; the list holds the count."""
    calls, encode = [0], model.encode_moments

    def counted(x):
        calls[0] += 1
        return encode(x)

    model.encode_moments = counted
    return calls


def test_cached_batches_match_the_encoder_exactly(tmp_path):
    model, datamodule = build(tmp_path / "cache")
    model.train()
    uncached = raw_batch(datamodule, [0, 1])
    model.prepare_training_data(datamodule, ONE_PROCESS)
    cached = cached_batch(datamodule.datasets["train"], [0, 1])
    assert cached[LATENT_MOMENTS].dtype == torch.float64
    assert torch.equal(cached["mask"], uncached["mask"])
    posterior = model.first_stage_model.encode(uncached["image"].double())
    assert torch.equal(cached[LATENT_MOMENTS], posterior.parameters)
    # Same seed, same draws: the sampled latents and the training loss agree to the bit.
    for seed in (1, 2):
        torch.manual_seed(seed)
        z_uncached, (loss_uncached, _) = model.get_input(uncached), model.training_step(uncached, 0, 0)
        torch.manual_seed(seed)
        z_cached, (loss_cached, _) = model.get_input(cached), model.training_step(cached, 0, 0)
        assert torch.equal(z_cached, z_uncached) and torch.equal(loss_cached, loss_uncached)
    # A batch without images shows the reconstruction of the posterior mean.
    assert torch.equal(model.images(cached), model.decode(model.get_input(uncached, sample_posterior=False)))


def test_copies_are_the_item_under_other_augmentations(tmp_path):
    model, datamodule = build(tmp_path / "cache", copies=2)
    expected = [model.encode_moments(raw_batch(datamodule, [1], copy)["image"])[0] for copy in range(2)]
    model.prepare_training_data(datamodule, ONE_PROCESS)
    dataset = datamodule.datasets["train"]
    assert not torch.equal(expected[0], expected[1])  # random crops: the copies differ
    drawn = set()
    for seed in range(16):
        moments = ItemSeededDataset(dataset)[(1, seed)][LATENT_MOMENTS]
        drawn.add(next(copy for copy in range(2) if torch.equal(moments, expected[copy])))
    assert drawn == {0, 1}


def test_reuse_and_invalidation(tmp_path, capsys):
    cache = tmp_path / "cache"
    model, datamodule = build(cache)
    model.prepare_training_data(datamodule, ONE_PROCESS)
    assert "no cache yet; encoding 3 items x 1 copies" in capsys.readouterr().out
    built = (cache / "moments-0.npy").read_bytes()

    model, datamodule = build(cache)
    calls = counting(model)
    model.prepare_training_data(datamodule, ONE_PROCESS)
    assert calls[0] == 0 and "latent cache" not in capsys.readouterr().out
    assert isinstance(datamodule.datasets["train"], CachedLatents)

    with torch.no_grad():
        next(model.first_stage_model.parameters()).add_(1e-3)  # another autoencoder checkpoint
    model.prepare_training_data(datamodule, ONE_PROCESS)
    assert "the first stage's weights changed" in capsys.readouterr().out
    assert (cache / "moments-0.npy").read_bytes() != built

    config = tiny_config(cache)
    config.data.params.train.params.crop_to = [16, 16, 24]  # another transform
    datamodule = instantiate_from_config(config.data)
    model.prepare_training_data(datamodule, ONE_PROCESS)
    assert "the data config changed" in capsys.readouterr().out


@pytest.mark.parametrize("damage, notice", [("truncate", "is missing or truncated"),
                                            ("flip", "is corrupt"), ("index", "index.json is unreadable")])
def test_damaged_cache_is_rebuilt(tmp_path, capsys, damage, notice):
    cache = tmp_path / "cache"
    model, datamodule = build(cache)
    model.prepare_training_data(datamodule, ONE_PROCESS)
    good = (cache / "moments-0.npy").read_bytes()
    if damage == "truncate":
        (cache / "moments-0.npy").write_bytes(good[:-7])
    elif damage == "flip":
        (cache / "moments-0.npy").write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    else:
        (cache / "index.json").write_text((cache / "index.json").read_text()[:-5])
    capsys.readouterr()
    model, datamodule = build(cache)
    model.prepare_training_data(datamodule, ONE_PROCESS)
    assert notice in capsys.readouterr().out
    assert (cache / "moments-0.npy").read_bytes() == good


def test_killed_build_leaves_no_cache_in_use(tmp_path, capsys):
    cache = tmp_path / "cache"
    model, datamodule = build(cache)
    encode = model.encode_moments

    def dies_on_second_batch(x, calls=[]):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return encode(x)

    model.encode_moments = dies_on_second_batch
    with pytest.raises(KeyboardInterrupt):
        model.prepare_training_data(datamodule, ONE_PROCESS)
    assert not cache.exists()
    model.encode_moments = encode
    model.prepare_training_data(datamodule, ONE_PROCESS)
    assert "no cache yet" in capsys.readouterr().out
    assert json.loads((cache / "index.json").read_text())["length"] == LENGTH


@pytest.mark.parametrize("options, message", [({"copies": 2}, "dir required"),
                                              ({"dir": "x", "copy": 2}, "unknown: copy"),
                                              ({"dir": "x", "copies": 0}, "copies: must be an integer >= 1")])
def test_bad_options(options, message):
    config = tiny_config(None)
    config.model.params.cache_latents = options
    with pytest.raises(ValueError, match=message):
        instantiate_from_config(config.model)


def test_train_ldm_with_the_cache(tmp_path, capsys):
    cache = tmp_path / "cache"
    args = ["-b", str(REPO / "configs" / "demo" / "ldm_3d.yaml"), "-t", "--no_test", *TINY_3D,
            f"data.params.train.params.length={LENGTH}", f"model.params.cache_latents.dir={cache}",
            "model.params.cache_latents.copies=2"]
    assert train_main("ldm", [*args, "-l", str(tmp_path / "first")]) == 0
    assert "latent cache" in capsys.readouterr().out
    assert (only_run_dir(tmp_path / "first") / "checkpoints" / "last.ckpt").is_file()
    assert train_main("ldm", [*args, "-l", str(tmp_path / "second")]) == 0  # same seed, same untrained autoencoder
    assert "latent cache" not in capsys.readouterr().out


class ThreadRank:
    """One rank of a process group played by threads: barrier and broadcast through shared state."""

    def __init__(self, rank: int, world_size: int, barrier: threading.Barrier, shared: dict):
        self.global_rank, self.world_size, self._barrier, self._shared = rank, world_size, barrier, shared

    def barrier(self) -> None:
        self._barrier.wait()

    def broadcast(self, obj, src: int):
        if self.global_rank == src:
            self._shared["value"] = obj
        self.barrier()
        value = self._shared["value"]
        self.barrier()
        return value


def test_two_ranks_encode_their_shares_into_one_cache(tmp_path, monkeypatch):
    # Ranks here are threads, which share torch's global generator (processes do not): an item's seeding and its
    # random crop must not interleave with the other thread's.
    lock, seeded_read = threading.Lock(), ItemSeededDataset.__getitem__

    def one_thread_at_a_time(self, key):
        with lock:
            return seeded_read(self, key)

    monkeypatch.setattr(ItemSeededDataset, "__getitem__", one_thread_at_a_time)
    model, datamodule = build(tmp_path / "one")
    model.prepare_training_data(datamodule, ONE_PROCESS)
    expected = [datamodule.datasets["train"][i] for i in range(LENGTH)]
    model.cache_latents["dir"] = str(tmp_path / "two")
    barrier, shared, errors = threading.Barrier(2), {}, []
    datamodules = [instantiate_from_config(tiny_config(None).data) for _ in range(2)]

    def rank(r: int) -> None:
        try:
            model.prepare_training_data(datamodules[r], ThreadRank(r, 2, barrier, shared))
        except BaseException as err:  # reported below, in the test's thread
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert sorted(path.name for path in (tmp_path / "two").glob("*.npy")) == [
        "carry0-0.npy", "carry0-1.npy", "moments-0.npy", "moments-1.npy"]
    for datamodule in datamodules:
        for i in range(LENGTH):
            item = datamodule.datasets["train"][i]
            assert torch.equal(item["mask"], expected[i]["mask"])
            torch.testing.assert_close(item[LATENT_MOMENTS], expected[i][LATENT_MOMENTS], rtol=1e-12, atol=1e-12)


def test_bucketed_dataset_is_refused_by_name(tmp_path):
    from ldm.data.latent_cache import prepare_latent_cache

    bucketed = SimpleNamespace(bucket_ids=[0, 1], __len__=lambda: 2)
    with pytest.raises(ValueError, match="aspect-ratio buckets"):
        prepare_latent_cache(tmp_path / "cache", bucketed, encode=None, key={}, image_key="image", carry=[],
                             copies=1, batch_size=1, fabric=ONE_PROCESS)
    assert not (tmp_path / "cache").exists()
