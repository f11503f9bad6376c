"""Every model stage under torchrun, as the first multi-GPU run would start it, emulated on the
CPU with gloo: uneven data (13 training pairs over 3 processes, 2 pairs each per batch, so the
last global batch leaves two processes without a pair), equality with one process on the same
global batches, and every collective recorded (tests/collective_probe.py) to show it crosses
ranks through train/distributed.py on a device its backend serves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from prefdata.tokenize import TokenizeConfig, tokenize
from schemas.manifest import Manifest
from tests.records_factory import unpaired_from_pairs, write_records_dir
from tests.test_train import _config, _learnable, _metrics
from tests.test_train_scale import _weights
from train.distributed import Dist, backend_for, served_devices
from train.eval import EvalConfig, evaluate_policy
from train.generate import GENERATIONS_FILE, GenerateConfig, generate
from train.loop import train
from train.reference import PrecomputeRefConfig, precompute_ref

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PAIRS = 13


@pytest.fixture(scope="module")
def uneven(tiny_model_dir, tmp_path_factory) -> Path:
    """13 training and 5 eval pairs in shards of 5 rows (train 5 + 5 + 3, eval 5): no count is a
    multiple of 2 or 3. `unscored/` beside the scored `shards/`."""
    root = tmp_path_factory.mktemp("uneven")
    write_records_dir(root / "records", {"train": _learnable(TRAIN_PAIRS), "eval": _learnable(5, offset=1000)})
    tokenize(TokenizeConfig(input_dir=str(root / "records"), tokenizer=str(tiny_model_dir), out=str(root / "unscored"),
                            rows_per_shard=5))
    shutil.copytree(root / "unscored", root / "shards")
    precompute_ref(PrecomputeRefConfig(shards=str(root / "shards"), model=str(tiny_model_dir)))
    return root


def _torchrun(processes: int, probe: Path, *module_and_args: str) -> subprocess.CompletedProcess:
    """The command on `processes` processes, checked: it succeeded, its collectives crossed ranks
    through train/distributed.py."""
    env = {**os.environ, "COLLECTIVE_PROBE_DIR": str(probe), "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                          "-m", "tests.collective_probe", *module_and_args], capture_output=True, text=True, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    _check_collectives(probe, processes)
    return run


def _check_collectives(probe: Path, processes: int) -> None:
    """Each process's collectives: made by train/distributed.py or by torch itself (DDP, FSDP,
    DCP), never elsewhere in our code; each on devices its backend serves; the backend the one
    `backend_for` picks for this device."""
    files = sorted(probe.glob("rank-*.jsonl"))
    assert len(files) == processes
    for path in files:
        calls = [json.loads(line) for line in path.read_text().splitlines()]
        ours = [c for c in calls if c["caller"].startswith(str(ROOT)) and "site-packages" not in c["caller"]]
        assert ours, f"{path.name}: no collective went through train/distributed.py"
        assert {Path(c["caller"]).relative_to(ROOT).as_posix() for c in ours} == {"train/distributed.py"}, ours
        for call in calls:
            assert call["backend"] == backend_for(torch.device("cpu")), call
            assert set(call["devices"]) <= served_devices(call["backend"]), call


def _ref_columns(shards: Path) -> dict[str, np.ndarray]:
    tables = [pa.ipc.open_file(path).read_all() for path in sorted(shards.glob("*.arrow"))]
    return {name: np.concatenate([t.column(name).to_numpy() for t in tables]) for name in ("ref_chosen_logps", "ref_rejected_logps")}


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_precompute_ref_on_three_processes_equals_one_process(uneven, tiny_model_dir, tmp_path, parallelism):
    """Under FSDP2 the reference's weights are sharded over the processes, which score each
    shard's batches between them; --verify rescores rows on the sharded model too."""
    shards = tmp_path / "shards"
    shutil.copytree(uneven / "unscored", shards)
    verify = ["--verify", "6"] if parallelism == "fsdp" else []
    run = _torchrun(3, tmp_path / "probe", "prefdata", "precompute-ref", str(shards), "--model", str(tiny_model_dir),
                    "--parallelism", parallelism, "--batch-tokens", "64", *verify)
    shard_files = len(list(shards.glob("*.arrow")))
    assert run.stdout.count(f"precompute-ref: scored {shard_files} shard(s)") == 1, run.stdout  # rank 0 reports the run's
    for name, values in _ref_columns(uneven / "shards").items():
        np.testing.assert_allclose(_ref_columns(shards)[name], values, atol=1e-5, err_msg=name)
    stats = Manifest.read(shards).stats
    assert stats["verified_rows"] == (6 if verify else 0)
    # tokens/s per process: a shard scored by three FSDP processes together took three process-seconds a second.
    processes = 3 if parallelism == "fsdp" else 1
    assert [shard["processes"] for shard in stats["shards"].values()] == [processes] * shard_files
    process_seconds = sum(shard["seconds"] * processes for shard in stats["shards"].values())
    assert stats["tokens_per_s"] == pytest.approx(stats["real_tokens"] / process_seconds)
    if parallelism == "fsdp":  # every process scores every shard with the others: each one's bar ends at all rows
        assert run.stderr.count(f"[precompute-ref] {stats['rows']}/{stats['rows']}") == 3, run.stderr[-3000:]


def _args(shards: Path, model: Path, out: Path, **options: object) -> list[str]:
    flags = {"shards": shards, "model": model, "out": out, "learning_rate": 5e-3, "epochs": 1, "log_every": 1,
             "seed": 0, "warmup_steps": 1, "eval_every": 1, "eval_batch_tokens": 40,
             **({} if options.get("objective") in ("sft", "reward") else {"beta": 0.5}), **options}
    def parts(name: str, value: object) -> list[str]:
        flag = name.replace("_", "-")
        return [f"--{flag}"] if value is True else [f"--no-{flag}"] if value is False else [f"--{flag}", str(value)]

    return [part for name, value in flags.items() for part in parts(name, value)]


@pytest.mark.parametrize(("options", "steps"), [
    ({"parallelism": "ddp"}, 3),
    ({"parallelism": "fsdp"}, 3),
    # Two micro-batches per step: the epoch's second step holds its last batch alone (one pair).
    # The adapters under FSDP2, merged after training from a fresh base (LoRA under DDP: the KTO cases).
    ({"parallelism": "fsdp", "lora_r": 4, "learning_rate": 2e-2, "gradient_accumulation_steps": 2, "warmup_steps": 0}, 2),
    # FSDP2 reduce-scatters every micro-batch (parallel.gradient_sync): the shards' sums are the
    # step's. Activation checkpointing on the processes alone: it recomputes, and must change no number.
    ({"parallelism": "fsdp", "gradient_accumulation_steps": 2, "gradient_checkpointing": True}, 2),
    # A reward model sharded: its classifier's layers under FSDP2, the same loop and stand-in rows.
    ({"parallelism": "fsdp", "objective": "reward"}, 3),
], ids=["ddp", "fsdp", "lora-fsdp-accumulated", "fsdp-accumulated-checkpointed", "reward-fsdp"])
def test_train_on_three_processes_equals_one_process_on_the_same_global_batches(uneven, tiny_model_dir, tmp_path,
                                                                                 options, steps):
    """Global batches of 6 pairs: 6, 6 and 1. One process takes all 6; three take 2 each, and in
    the last batch two of them none."""
    _three_processes_equal_one(uneven / "shards", tiny_model_dir, tmp_path, options, steps,
                               ("loss", "rewards/margins", "rewards/accuracies", "grad_norm", "eval/loss", "eval/pairs"))


@pytest.mark.parametrize(("options", "steps"), [
    ({"parallelism": "ddp", "kl_completions": "shared"}, 3),
    # The KL completions in a no-gradient forward of their own before the trained one: under FSDP2
    # its weight gathers happen on every process alike.
    ({"parallelism": "fsdp", "kl_completions": "apart"}, 3),
    ({"parallelism": "ddp", "lora_r": 4, "learning_rate": 2e-2, "gradient_accumulation_steps": 2, "warmup_steps": 0}, 2),
], ids=["ddp-kl-shared", "fsdp-kl-apart", "lora-accumulated"])
def test_kto_on_three_processes_equals_one_process(uneven_unpaired, tiny_model_dir, tmp_path, options, steps):
    """KTO's KL estimate is a mean over the whole micro-batch: on three processes (and in the last
    batch, two of them holding only a stand-in row) it must be the one-process value."""
    _three_processes_equal_one(uneven_unpaired / "shards", tiny_model_dir, tmp_path, {"objective": "kto", **options}, steps,
                               ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "grad_norm",
                                "eval/loss", "eval/kl"))


@pytest.fixture(scope="module")
def uneven_unpaired(tiny_model_dir, tmp_path_factory) -> Path:
    """`uneven`'s 13 training and 5 eval prompts as unpaired rows (alternately a desirable and an undesirable answer)."""
    root = tmp_path_factory.mktemp("uneven-unpaired")
    write_records_dir(root / "records", {"train": unpaired_from_pairs(_learnable(TRAIN_PAIRS)),
                                          "eval": unpaired_from_pairs(_learnable(5, offset=1000))})
    tokenize(TokenizeConfig(input_dir=str(root / "records"), tokenizer=str(tiny_model_dir), out=str(root / "shards"),
                            rows_per_shard=5))
    precompute_ref(PrecomputeRefConfig(shards=str(root / "shards"), model=str(tiny_model_dir)))
    return root


def _three_processes_equal_one(shards: Path, model: Path, tmp_path: Path, options: dict, steps: int, keys: tuple[str, ...]) -> None:
    one = tmp_path / "one"
    single = {k: v for k, v in options.items() if k not in ("parallelism", "gradient_checkpointing")}
    train(_config(shards, model, one, **{"batch_size": 6, "max_steps": None, "epochs": 1, "log_every": 1, "warmup_steps": 1,
                                         "eval_every": 1, "eval_batch_tokens": 40, **single}))
    three = tmp_path / "three"
    _torchrun(3, tmp_path / "probe", "train", *_args(shards, model, three, batch_size=2, **options))
    ran = json.loads((three / "manifest.json").read_text())["config"]
    assert {key: ran[key] for key in options} == options  # the command line gave the processes these settings
    logged_one, logged_three = _metrics(one), _metrics(three)
    assert [m["step"] for m in logged_one] == [m["step"] for m in logged_three]
    assert max(m["step"] for m in logged_one) == steps  # one epoch: every pair once, the short batch included
    assert sum(m.get("tokens", 0) for m in logged_three) == sum(m.get("tokens", 0) for m in logged_one)
    for a, b in zip(logged_one, logged_three, strict=True):
        for key in keys:
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)
    # LoRA: the merged models, and the adapters themselves. The LoRA cases start at full learning
    # rate, so step 1 moves B (initialised to 0) and step 2 is A's first update, where AdamW's
    # update of a weight whose gradient is near its ε turns the rounding that differs between one
    # process and three into up to ~3e-4 (measured; a different weight each run). Through B (~lr)
    # that is ~1e-5 in the merged weights, held to 5e-5 like every other run's; the adapters to a
    # tenth of a step (lr 2e-2). A gradient summed wrongly over the processes shows in grad_norm,
    # compared above at 1e-5.
    tolerances = {"final-merged": 5e-5, "final": 2e-3} if "lora_r" in options else {"final": 5e-5}
    for folder, atol in tolerances.items():
        ours, theirs = _weights(one / folder), _weights(three / folder)
        assert ours.keys() == theirs.keys() and ours
        for name, value in ours.items():
            torch.testing.assert_close(theirs[name], value, atol=atol, rtol=1e-4)
    base, trained = _weights(model), _weights(three / ("final-merged" if "lora_r" in options else "final"))
    assert any(not torch.equal(trained[name], value) for name, value in base.items() if name in trained)  # training moved it


def test_generate_and_eval_on_two_processes(uneven, tiny_model_dir, tmp_path):
    one = tmp_path / "generate-one"
    options = {"n": 2, "max_new_tokens": 6, "chunk_prompts": 3, "split": "all"}
    generate(GenerateConfig(prompts=str(uneven / "records"), policy=str(tiny_model_dir), out=str(one), **options))
    two = tmp_path / "generate-two"
    # In a file: torchrun's own parser would take `--n` for an abbreviation of its options.
    (tmp_path / "generate.yaml").write_text("".join(f"{k}: {v}\n" for k, v in options.items()))
    _torchrun(2, tmp_path / "probe-generate", "prefdata", "generate", str(uneven / "records"), "--policy", str(tiny_model_dir),
              "--out", str(two), "--config", str(tmp_path / "generate.yaml"))
    # A chunk's seed is its number's: the same answers whichever process wrote it.
    assert (two / GENERATIONS_FILE).read_text() == (one / GENERATIONS_FILE).read_text()
    tokens = Manifest.read(one).stats["generated_tokens"]
    assert tokens > 0 and Manifest.read(two).stats["generated_tokens"] == tokens  # every process's, counted once

    # A killed run whose only missing chunk is process 1's (chunks 0, 2, 4 are process 0's): the
    # resumed run's rate is process 1's new tokens, not process 0's none.
    lines = (one / GENERATIONS_FILE).read_text().splitlines(keepends=True)
    resumed = tmp_path / "generate-resumed"
    (resumed / "chunks").mkdir(parents=True)
    for number in (0, 2, 3, 4, 5):
        (resumed / "chunks" / f"chunk-{number:05d}.jsonl").write_text("".join(lines[3 * number:3 * number + 3]))
    _torchrun(2, tmp_path / "probe-resumed", "prefdata", "generate", str(uneven / "records"), "--policy", str(tiny_model_dir),
              "--out", str(resumed), "--config", str(tmp_path / "generate.yaml"))
    assert (resumed / GENERATIONS_FILE).read_text() == (one / GENERATIONS_FILE).read_text()
    stats = Manifest.read(resumed).stats
    assert 0 < stats["generated_tokens"] < tokens and stats["tokens_per_s"] > 0

    # A policy that is not the reference: every margin and log-ratio is something to add up.
    policy = tmp_path / "policy"
    train(_config(uneven / "shards", tiny_model_dir, policy, batch_size=6, max_steps=3, learning_rate=2e-2, warmup_steps=0))
    options = {"batch_tokens": 40, "samples": 2, "max_new_tokens": 6}
    single = evaluate_policy(EvalConfig(shards=str(uneven / "shards"), policy=str(policy / "final"), reference=str(tiny_model_dir),
                                        out=str(tmp_path / "eval-one"), **options))
    _torchrun(2, tmp_path / "probe-eval", "prefdata", "eval", str(uneven / "shards"), "--policy", str(policy / "final"),
              "--reference", str(tiny_model_dir), "--out", str(tmp_path / "eval-two"),
              *[part for k, v in options.items() for part in (f"--{k.replace('_', '-')}", str(v))])
    shared = json.loads((tmp_path / "eval-two" / "eval.json").read_text())
    assert shared["pairs"] == single["pairs"] == 5
    assert abs(single["margin"]) > 1e-3 and 0 < single["accuracy"]  # the trained policy moved
    assert shared["accuracy"] == single["accuracy"] and shared["margin"] == pytest.approx(single["margin"], abs=1e-6)
    assert shared["samples"] == single["samples"] == 2 * single["prompts"]
    # Each process samples its own prompts under its own seed: the estimates differ, neither is 0.
    assert abs(shared["kl"]) > 1e-3 and abs(single["kl"]) > 1e-3


class _Ranks(Dist):
    """`world` processes in one: each rank's share computed here, as all_gather_object would collect it."""

    def __init__(self, world: int, share) -> None:
        super().__init__(0, world, torch.device("cpu"))
        object.__setattr__(self, "share", share)

    def gather_objects(self, value):
        return [self.share(rank) for rank in range(self.world)]


def test_shared_samples_come_back_prompt_major_in_prompt_order(monkeypatch):
    """Each process samples every world-th prompt; the gathered completions are put back per prompt."""
    import train.eval as eval_module

    prompts = [np.array([p]) for p in range(7)]
    per_prompt = 2
    fake_sample = lambda model, share, config, tokenizer, stop_ids, n=None: [  # noqa: E731
        np.array([int(p[0]), j]) for p in share for j in range(per_prompt)]
    monkeypatch.setattr(eval_module, "sample", fake_sample)
    ranks = _Ranks(3, lambda rank: fake_sample(None, prompts[rank::3], None, None, None))
    config = EvalConfig(shards="s", policy="p", reference="r", out="o", samples=per_prompt)
    completions = eval_module.sample_shared(None, prompts, config, None, [], ranks)
    assert [c.tolist() for c in completions] == [[p, j] for p in range(7) for j in range(per_prompt)]


def test_a_cuda_run_binds_its_gpu_and_uses_gloo_beside_nccl(monkeypatch):
    """What `Dist.start` does on a GPU node, with torch's CUDA and process-group calls recorded."""
    calls: dict[str, object] = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.__setitem__("set_device", device))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, timeout: calls.__setitem__("backend", backend))
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("RANK", "11")  # the second node of two, 8 GPUs each
    monkeypatch.setenv("LOCAL_RANK", "3")
    dist = Dist.start("auto", timedelta(minutes=1))
    assert dist.device == torch.device("cuda", 3) and (dist.rank, dist.world) == (11, 16)
    assert calls == {"set_device": torch.device("cuda", 3), "backend": "cpu:gloo,cuda:nccl"}
    # A process that sees one GPU (Slurm's --gpus-per-task=1): that one, whatever its LOCAL_RANK.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert Dist.start("cuda", timedelta(minutes=1)).device == torch.device("cuda", 0) == calls["set_device"]
    assert served_devices(calls["backend"]) == {"cpu", "cuda"}  # the CPU metric totals cross through gloo
    assert backend_for(torch.device("cpu")) == "gloo" and served_devices("nccl") == {"cuda"}


def _accumulate_one_micro_batch(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from train import parallel

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        with parallel.gradient_sync(model, enabled=False):  # a micro-batch before the step's last
            model(torch.ones(2, 8)).sum().backward()
        grads = [None if p.grad is None else list(p.grad.to_local().shape) for p in model.parameters()]
        shards = [list(p.to_local().shape) for p in model.parameters()]
        Path(out_dir, f"{rank}.json").write_text(json.dumps({"grads": grads, "shards": shards}))
    finally:
        torch.distributed.destroy_process_group()


def test_fsdp_keeps_only_its_shard_of_the_gradients_between_accumulated_micro_batches(tmp_path):
    """FSDP2's sync switched off would hold every gradient whole on every process until the step
    (the whole model's fp32 gradients per GPU); reduce-scattered each micro-batch, each process
    holds its shard's only, as after any step."""
    torch.multiprocessing.spawn(_accumulate_one_micro_batch, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        result = json.loads((tmp_path / f"{rank}.json").read_text())
        assert result["grads"] == result["shards"]
