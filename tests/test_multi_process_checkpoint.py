"""Sharded checkpoints (ldm/engine/sharded.py): shards written by two gloo processes read back whole in one.

FSDP itself needs a GPU, so the two ranks write what its sharded state dict is made of, DTensors split along dim 0,
in the layout Fabric's FSDPStrategy writes (torch.distributed.checkpoint entries "model" and "optimizer_<i>"), beside
a checkpoint file that names the folder, as `Trainer.state` does.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ldm.engine import sharded
from ldm.engine.checkpoint import CheckpointError, atomic_torch_save, load_checkpoint, save_rotating

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def whole_states() -> tuple[dict, dict]:
    generator = torch.Generator().manual_seed(0)
    model = {"net.weight": torch.randn(6, 3, generator=generator), "net.bias": torch.randn(6, generator=generator)}
    optimizer = {"state": {"net.weight": {"exp_avg": torch.randn(6, 3, generator=generator),
                                          "step": torch.tensor(4.0)}},
                 "param_groups": [{"lr": 0.01, "params": ["net.weight", "net.bias"]}]}
    return model, optimizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_shards(rank: int, world_size: int, port: int, folder: str) -> None:
    from torch.distributed.checkpoint import save
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        model, optimizer = whole_states()
        shard = lambda tensor: distribute_tensor(tensor, mesh, [Shard(0)])
        optimizer["state"]["net.weight"]["exp_avg"] = shard(optimizer["state"]["net.weight"]["exp_avg"])
        save({"model": {name: shard(tensor) for name, tensor in model.items()}, "optimizer_0": optimizer},
             checkpoint_id=folder)
    finally:
        dist.destroy_process_group()


def test_shards_of_two_ranks_load_whole_in_one_process(tmp_path):
    directory = tmp_path / "checkpoints"
    folder = directory / sharded.shard_folder_name(8)
    mp.start_processes(write_shards, args=(2, free_port(), str(folder)), nprocs=2, start_method="spawn")
    assert len(list(folder.glob("*.distcp"))) == 2  # one file per rank
    save_rotating({"global_step": 8, "epoch": 1, sharded.SHARDS_KEY: folder.name}, directory, 8, keep_last_k=1)

    checkpoint = load_checkpoint(directory / "last.ckpt")
    model, optimizer = whole_states()
    assert checkpoint["global_step"] == 8 and sharded.SHARDS_KEY not in checkpoint
    assert checkpoint["state_dict"].keys() == model.keys()
    for name, tensor in model.items():
        torch.testing.assert_close(checkpoint["state_dict"][name], tensor, rtol=0, atol=0)
    restored = checkpoint["optimizer_states"][0]
    torch.testing.assert_close(restored["state"]["net.weight"]["exp_avg"], optimizer["state"]["net.weight"]["exp_avg"],
                               rtol=0, atol=0)
    assert restored["param_groups"] == optimizer["param_groups"]

    output = tmp_path / "consolidated.ckpt"
    assert sharded.main([str(directory / "step=8.ckpt"), str(output)]) == 0
    assert torch.load(output, weights_only=True)["state_dict"]["net.bias"].equal(model["net.bias"])
    assert sharded.main([str(directory / "step=8.ckpt"), str(output)]) == 2  # exists, no --overwrite

    # rotation deleted step=8.ckpt's file: its folder goes once no checkpoint file names it
    save_rotating({"global_step": 9, sharded.SHARDS_KEY: "step=9.shards"}, directory, 9, keep_last_k=1)
    assert sharded.remove_unreferenced(directory) == [folder] and not folder.exists()


def test_a_missing_shard_folder_is_named(tmp_path):
    atomic_torch_save({"global_step": 3, sharded.SHARDS_KEY: "step=3.shards"}, tmp_path / "step=3.ckpt")
    with pytest.raises(CheckpointError, match=r"step=3.ckpt: its shard folder .*step=3.shards does not exist"):
        load_checkpoint(tmp_path / "step=3.ckpt")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_the_trainer_saves_shards_beside_its_checkpoints_and_resumes_from_them(tmp_path, monkeypatch):
    """The loop's side of sharded checkpoints in one CPU process: FSDP is stood in for by a plain module (the
    trainer takes it as sharded) and Fabric's sharded save by torch.distributed.checkpoint's, which it calls."""
    from lightning.fabric import Fabric
    from omegaconf import OmegaConf
    from torch.distributed.checkpoint import save
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from ldm.engine.config import trainer_config_from
    from ldm.engine.loop import Trainer
    from ldm.util import instantiate_from_config
    from tests.engine.helpers import TOY_CONFIG
    from tests.engine.toy import ToyRegressor

    def sharded_save(fabric, path, state):
        module = state["model"]._forward_module
        optimizers = {key: get_optimizer_state_dict(module, value.optimizer) for key, value in state.items()
                      if key.startswith("optimizer_")}
        save({"model": get_model_state_dict(module), **optimizers}, checkpoint_id=path, no_dist=True)

    monkeypatch.setattr(Fabric, "save", sharded_save)
    monkeypatch.setattr(Trainer, "sharded", property(lambda trainer: True))

    def trained(max_steps: int, resume: dict | None = None) -> tuple[Trainer, ToyRegressor]:
        trainer = Trainer(trainer_config_from({"accelerator": "cpu", "max_steps": max_steps, "logger": [],
                                               "checkpoint": {"every_n_steps": 2, "keep_last_k": 1}}))
        trainer.config.strategy = {"name": "fsdp", "state_dict_type": "sharded"}  # FSDP's check of the CPU passed
        trainer.attach(tmp_path, [], {})
        torch.manual_seed(0)
        model = ToyRegressor()
        model.learning_rate = 0.1
        trainer.fit(model, instantiate_from_config(OmegaConf.load(TOY_CONFIG).data), resume=resume)
        return trainer, model

    trainer, model = trained(4)
    directory = tmp_path / "checkpoints"
    assert trainer.sharded_checkpoints
    assert sorted(p.name for p in directory.iterdir()) == ["last.ckpt", "step=4.ckpt", "step=4.shards"]
    checkpoint = load_checkpoint(directory / "last.ckpt")
    assert checkpoint["global_step"] == 4 and checkpoint["state_dict"].keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(checkpoint["state_dict"][name], tensor, rtol=0, atol=0)

    trainer, model = trained(6, resume=checkpoint)
    assert sorted(p.name for p in directory.iterdir()) == ["last.ckpt", "step=6.ckpt", "step=6.shards"]
    # Adam's step count went on from the restored 4
    assert load_checkpoint(directory / "last.ckpt")["optimizer_states"][0]["state"]["linear.weight"]["step"] == 6
