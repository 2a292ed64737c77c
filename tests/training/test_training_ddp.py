"""DDP training with 2 gloo processes on the CPU: both ranks end with identical weights."""

import os
import socket

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from tests.training.test_training import tiny_config, write_folders
from training.config import new_model
from training.state import read_progress
from training.train import train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, folders, run, out) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    model = train(tiny_config(folders, run, epochs=2, batch_size=12))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / f"rank{rank}.safetensors")


def test_two_gloo_processes_end_with_identical_weights(tmp_path):
    folders = write_folders(tmp_path / "data")
    run = tmp_path / "run"
    mp.spawn(worker, args=(2, free_port(), folders, run, tmp_path), nprocs=2, join=True)
    a, b = (load_file(tmp_path / f"rank{r}.safetensors") for r in range(2))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    progress = read_progress(run)
    assert (progress["epoch"], progress["step"]) == (2, 2 * (36 // 12))  # the global batch is split
    torch.manual_seed(0)
    initial = new_model(tiny_config(folders, run), 3, 16).state_dict()
    assert not torch.equal(a["classifier.weight"], initial["classifier.weight"])  # it trained
