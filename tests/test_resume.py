"""Exact resume: a two-process run (DDP, FSDP2, LoRA) killed mid-way and resumed from its last
checkpoint logs the same numbers and ends with the same weights as the run that was never
stopped; the checkpoint it was writing when it died is never picked up. And each process's
random generators, its GPU's included, travel with the checkpoint."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.gpu_check import KILLED_RUN  # train, killed as it writes a given checkpoint's trainer state
from schemas.errors import UserError
from tests.test_train import _metrics, shards  # noqa: F401  (shards is a fixture)
from tests.test_train_scale import _weights
from train.parallel import latest_checkpoint, restore_rng_state, rng_state

ROOT = Path(__file__).resolve().parents[1]

# How each kind of run differs from a two-process DDP run of `_common`'s settings.
RUNS = {
    "ddp": [],
    "fsdp": ["--parallelism", "fsdp"],
    # Adapter dropout draws from every process's generators: the resumed steps see the same
    # masks only if each rank gets its own generator states back.
    "lora": ["--lora-r", "4", "--lora-dropout", "0.1", "--learning-rate", "2e-2"],
}


def _two_processes(port: int, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                           *command], capture_output=True, text=True, cwd=ROOT)


def _torchrun(port: int, *args: str) -> None:
    run = _two_processes(port, "-m", "train", *args)
    assert run.returncode == 0, run.stderr[-3000:]


def _common(shards_dir: Path, model: Path, *extra: str) -> list[str]:
    return ["--shards", str(shards_dir), "--model", str(model), "--learning-rate", "5e-3", "--beta", "0.5", "--max-steps", "4",
            "--log-every", "1", "--seed", "0", "--eval-batch-tokens", "300", "--warmup-steps", "2", *extra]


def _killed_at_checkpoint(port: int, step: int, *args: str) -> None:
    run = _two_processes(port, str(KILLED_RUN), str(step), *args)
    assert run.returncode != 0 and "SIGKILL" in run.stderr, run.stderr[-3000:]


def _records(out: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock rate, which no two runs share."""
    return [{k: v for k, v in record.items() if k != "tokens_per_s"} for record in _metrics(out)]


@pytest.mark.parametrize(("run", "port"), [("ddp", 29561), ("fsdp", 29564), ("lora", 29567)])
def test_a_two_process_run_killed_mid_way_resumes_to_the_same_losses_and_weights(shards, tiny_model_dir, tmp_path,  # noqa: F811
                                                                                  run, port):
    args = _common(shards, tiny_model_dir, "--batch-size", "4", "--save-every", "2", *RUNS[run])
    whole = tmp_path / "whole"
    _torchrun(port, *args, "--out", str(whole))
    if run == "fsdp":  # each process's shard of the weights and optimizer, through torch.distributed.checkpoint
        assert (whole / "checkpoint-0000002" / "state" / ".metadata").is_file()

    killed = tmp_path / "killed"
    _killed_at_checkpoint(port + 1, 4, *args, "--out", str(killed))
    assert not (killed / "final").exists() and [r["step"] for r in _metrics(killed) if "loss" in r] == [1, 2, 3, 4]
    assert list(killed.glob(".tmp-checkpoint-0000004/rng-*.pt"))  # checkpoint 4 was half-written …
    assert latest_checkpoint(killed) == killed / "checkpoint-0000002"  # … and is not what a resume reads

    _torchrun(port + 2, *args, "--resume", "--out", str(killed))
    assert _records(killed) == _records(whole)
    assert not list(killed.glob(".tmp-*"))
    for folder in ("final", "final-merged") if run == "lora" else ("final",):
        resumed, uninterrupted = _weights(killed / folder), _weights(whole / folder)
        assert resumed.keys() == uninterrupted.keys() and resumed
        for name, value in uninterrupted.items():
            assert torch.equal(resumed[name], value), f"{folder}/{name}"


# ---------------------------------------------------------------------------------------------
# Random generators


def _draws() -> tuple:
    return torch.rand(4).tolist(), np.random.rand(4).tolist(), [random.random() for _ in range(4)]


def test_the_cpu_generators_come_back_and_no_gpu_state_is_kept_off_the_gpu(tmp_path):
    state = rng_state(torch.device("cpu"))
    assert "cuda" not in state
    torch.save(state, tmp_path / "rng-0.pt")  # through the file, as a checkpoint keeps it
    expected = _draws()
    restore_rng_state(torch.load(tmp_path / "rng-0.pt", weights_only=False), torch.device("cpu"), tmp_path)
    assert _draws() == expected


def test_a_gpu_process_saves_and_restores_its_own_gpu_generator(tmp_path, monkeypatch):
    """CUDA cannot run here: torch.cuda's two generator calls are stood in for, to show which GPU's
    state is read, kept and set back."""
    gpu = torch.device("cuda", 1)
    generators = {gpu: torch.arange(16, dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: generators[torch.device(device)].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: generators.__setitem__(torch.device(device), state))

    torch.save(rng_state(gpu), tmp_path / "rng-1.pt")
    generators[gpu] = torch.zeros(16, dtype=torch.uint8)  # the GPU drew on after the checkpoint
    restore_rng_state(torch.load(tmp_path / "rng-1.pt", weights_only=False), gpu, tmp_path)
    assert torch.equal(generators[gpu], torch.arange(16, dtype=torch.uint8))


def test_a_checkpoint_without_gpu_state_is_refused_by_a_gpu_run_in_one_line(tmp_path):
    """Written on the CPU, or before the GPU's generator was kept: loads on the CPU (the test
    above), but a GPU run could not continue it exactly."""
    with pytest.raises(UserError, match=r"^--resume: .* holds no CUDA random state .*; start without --resume$"):
        restore_rng_state(rng_state(torch.device("cpu")), torch.device("cuda", 0), tmp_path)
    # A run that draws no GPU random numbers (dropout off, the default) continues it: nothing to set.
    cpu_generator = torch.get_rng_state()
    torch.rand(3)
    restore_rng_state({**rng_state(torch.device("cpu")), "torch": cpu_generator}, torch.device("cuda", 0), tmp_path,
                      gpu_random_used=False)
    assert torch.equal(torch.get_rng_state(), cpu_generator)
