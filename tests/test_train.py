"""The trainer end to end on a tiny model: learning, resume, refusals, divergence (more than one
process: tests/test_multiprocess.py, tests/test_resume.py)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from prefdata.tokenize import TokenizeConfig, tokenize
from schemas.errors import UserError
from tests.records_factory import make_record, write_records_dir
from train.config import TrainConfig
from train.loop import train
from train.reference import PrecomputeRefConfig, precompute_ref

GOOD = ["a delight", "warm and funny", "what a movie", "the capital is Paris"]
BAD = ["a waste of two hours", "dull and wooden", "I do not know", "no"]


def _learnable(n: int, offset: int = 0):
    """Chosen answers are always from GOOD, rejected from BAD: a preference a tiny model can learn."""
    return [make_record(f"Tell me about movie {i}.", f"It was {GOOD[i % 4]}.", f"It was {BAD[(i * 3) % 4]}.", row=i + offset)
            for i in range(n)]


@pytest.fixture(scope="session")
def shards(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    write_records_dir(root / "records", {"train": _learnable(64), "eval": _learnable(16, offset=1000)})
    tokenize(TokenizeConfig(input_dir=str(root / "records"), tokenizer=str(tiny_model_dir), out=str(root / "shards"),
                            rows_per_shard=32))
    unscored = root / "unscored"
    shutil.copytree(root / "shards", unscored)
    precompute_ref(PrecomputeRefConfig(shards=str(root / "shards"), model=str(tiny_model_dir)))
    return root / "shards"


def _config(shards, model, out, **over) -> TrainConfig:
    """β 0.5 where the objective has one (sft and reward refuse it: they never read it)."""
    base = dict(shards=str(shards), model=str(model), out=str(out), batch_size=8, learning_rate=5e-3,
                max_steps=12, log_every=2, warmup_steps=2, seed=0)
    beta = {} if over.get("objective") in ("sft", "reward") else {"beta": 0.5}
    return TrainConfig(**{**base, **beta, **over})


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_dpo_learns_the_preference(shards, tiny_model_dir, tmp_path):
    result = train(_config(shards, tiny_model_dir, tmp_path / "run", max_steps=24, eval_every=12, log_every=1))
    logged = [m for m in _metrics(tmp_path / "run") if "loss" in m]
    evals = [m for m in _metrics(tmp_path / "run") if "eval/loss" in m]
    assert logged[0]["loss"] == pytest.approx(np.log(2), abs=0.05)  # policy == reference at the start
    assert logged[-1]["loss"] < 0.35 and logged[-1]["rewards/accuracies"] > 0.9
    assert evals[-1]["eval/rewards/accuracies"] > 0.9 and evals[-1]["eval/rewards/margins"] > 0
    assert [m["step"] for m in evals] == [12, 24, 24]  # every 12 steps, and the final eval
    assert result["eval/pairs"] == 16
    expected = {"grad_norm", "learning_rate", "tokens", "tokens_per_s", "padding_efficiency", "logps/chosen", "rewards/margins"}
    assert expected <= set(logged[-1])
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    AutoTokenizer.from_pretrained(tmp_path / "run" / "final")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stage"] == "train" and manifest["config"]["max_steps"] == 24


def test_resume_reproduces_the_uninterrupted_run(shards, tiny_model_dir, tmp_path):
    full = tmp_path / "full"
    train(_config(shards, tiny_model_dir, full, save_every=6, gradient_accumulation_steps=2, batch_size=4))
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    for later in ("checkpoint-0000012", "final"):
        shutil.rmtree(resumed / later)
    train(_config(shards, tiny_model_dir, resumed, save_every=6, gradient_accumulation_steps=2, batch_size=4, resume=True))
    losses = lambda out: [(m["step"], m["loss"], m["rewards/margins"]) for m in _metrics(out) if "loss" in m]  # noqa: E731
    assert losses(full) == losses(resumed)


def test_refuses_shards_without_reference(shards, tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="prefdata precompute-ref"):
        train(_config(shards.parent / "unscored", tiny_model_dir, tmp_path / "r"))
    # reference-free objective and a live reference both run on them
    train(_config(shards.parent / "unscored", tiny_model_dir, tmp_path / "sft", objective="sft", max_steps=2))
    train(_config(shards.parent / "unscored", tiny_model_dir, tmp_path / "live", reference="live", max_steps=2))


@pytest.mark.parametrize("objective", ["simpo", "cpo", "orpo"])
def test_reference_free_objectives_learn_on_shards_without_reference(shards, tiny_model_dir, tmp_path, objective):
    out = tmp_path / objective
    params = {"simpo": dict(beta=2.0), "cpo": dict(beta=0.5), "orpo": dict(beta=0.5)}[objective]
    train(_config(shards.parent / "unscored", tiny_model_dir, out, objective=objective, max_steps=12, log_every=1,
                  eval_every=1, **params))
    logged = [m for m in _metrics(out) if "loss" in m]
    assert np.mean([m["loss"] for m in logged[-3:]]) < logged[0]["loss"] - 0.05
    # Margins on the same held-out pairs: step 1 (learning rate 0 in warmup) scores the starting model.
    # Training batches differ in length from step to step, and these rewards are β·log π, not ratios.
    evals = [m for m in _metrics(out) if "eval/rewards/margins" in m]
    assert evals[-1]["eval/rewards/margins"] > evals[0]["eval/rewards/margins"]


@pytest.mark.parametrize("prefix_sharing", ["auto", "off"])
def test_batches_group_pairs_by_the_length_of_the_rows_the_layout_builds(tiny_model_dir, tmp_path, prefix_sharing):
    """Long prompt with short answers, and short prompt with long answers, at interleaved padded
    lengths (prompt + longer answer): grouping by that length puts both kinds in every batch,
    and a prefix-shared row (prompt + both answers) of the second kind is twice the first."""
    long_prompt = [make_record("the " * (24 + i), "yes", "no", row=i) for i in range(16)]
    long_answers = [make_record("hi", "the " * (24 + i), "a " * (24 + i), row=100 + i) for i in range(16)]
    write_records_dir(tmp_path / "records", {"train": long_prompt + long_answers, "eval": long_prompt[:2]})
    tokenize(TokenizeConfig(input_dir=str(tmp_path / "records"), tokenizer=str(tiny_model_dir), out=str(tmp_path / "shards")))
    out = tmp_path / "run"
    train(_config(tmp_path / "shards", tiny_model_dir, out, objective="sft", prefix_sharing=prefix_sharing, max_steps=4,
                  log_every=4))
    (logged,) = [m for m in _metrics(out) if "loss" in m]
    assert logged["prefix_sharing"] is (prefix_sharing == "auto")
    assert logged["padding_efficiency"] > 0.9


def test_live_reference_equals_precomputed(shards, tiny_model_dir, tmp_path):
    train(_config(shards, tiny_model_dir, tmp_path / "pre", max_steps=4, log_every=1))
    train(_config(shards, tiny_model_dir, tmp_path / "live", max_steps=4, log_every=1, reference="live"))
    pre, live = _metrics(tmp_path / "pre"), _metrics(tmp_path / "live")
    for a, b in zip(pre, live):
        assert a.get("loss") == pytest.approx(b.get("loss"), abs=1e-5)


def _edit_ref(source: Path, target: Path, row: slice, change) -> Path:
    """A copy of `source` whose first train shard has `change` applied to ref_chosen_logps[row],
    with the manifest's sha256 updated (so only the values are wrong, not the file)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    from schemas.io import atomic_path, sha256_file
    from schemas.manifest import Manifest

    shutil.copytree(source, target)
    path = target / "train-00000.arrow"
    with pa.memory_map(str(path)) as source_map:
        table = ipc.open_file(source_map).read_all()
        values = table.column("ref_chosen_logps").to_numpy().copy()
    values[row] = change(values[row])
    index = table.schema.get_field_index("ref_chosen_logps")
    table = table.set_column(index, table.schema.field(index), pa.array(values, pa.float32()))
    with atomic_path(path) as tmp, ipc.new_file(tmp, table.schema) as writer:
        writer.write_table(table)
    manifest = Manifest.read(target)
    manifest.shards[0] = manifest.shards[0].model_copy(update={"sha256": sha256_file(path)})
    manifest.write(target)
    return target


def test_stale_reference_is_refused(shards, tiny_model_dir, tmp_path):
    stale = _edit_ref(shards, tmp_path / "stale", slice(None), lambda v: v - 1.0)
    with pytest.raises(UserError, match="stale"):
        train(_config(stale, tiny_model_dir, tmp_path / "r"))


def test_divergence_stops_with_step_and_rows(shards, tiny_model_dir, tmp_path):
    # A corrupted value past the rows the step-0 check reads: the loss becomes inf where it is used.
    broken = _edit_ref(shards, tmp_path / "broken", slice(20, 21), lambda v: v + np.inf)
    with pytest.raises(UserError, match=r"loss is (nan|inf) at step \d+, rows \['"):
        train(_config(broken, tiny_model_dir, tmp_path / "r", max_steps=8))


def parse_args(argv: list[str]) -> TrainConfig:
    """The config `python -m train ARGV` would run with."""
    from train.cli import command

    parsed: list[TrainConfig] = []
    command(TrainConfig, parsed.append, "train", "").main(args=argv, standalone_mode=False)
    return parsed[0]


def test_cli_yaml_and_overrides(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("shards: s\nmodel: m\nout: o\nbeta: 0.3\nloss: {sigmoid: 1.0, hinge: 0.5}\nmax_steps: 5\n")
    parsed = parse_args(["--config", str(config), "--max-steps", "7", "--no-gradient-checkpointing"])
    assert parsed.beta == 0.3 and parsed.max_steps == 7 and parsed.loss == {"sigmoid": 1.0, "hinge": 0.5}
    assert parse_args(["--shards", "s", "--model", "m", "--out", "o", "--loss", "ipo:1,sigmoid:0.5"]).loss == {"ipo": 1.0, "sigmoid": 0.5}
    for used in (["--loss", "sigmoid", "--label-smoothing", "0.1"],
                 ["--objective", "simpo", "--simpo-gamma", "1", "--label-smoothing", "0.1"], ["--objective", "cpo", "--cpo-alpha", "2"],
                 ["--lora-r", "4", "--lora-alpha", "8"],
                 ["--reference", "live", "--reference-model", "m2"], ["--objective", "reward", "--center-rewards-coefficient", "0.1"],
                 *(["--objective", objective, "--beta", "0.5"] for objective in ("dpo", "kto", "simpo", "cpo", "orpo"))):
        parse_args(["--shards", "s", "--model", "m", "--out", "o", *used])  # read by their runs: accepted
    with pytest.raises(UserError, match="unknown loss"):
        parse_args(["--shards", "s", "--model", "m", "--out", "o", "--loss", "nope"])
    # A negative weight trained the opposite preference; 0 or NaN nothing. AdamW's betas are in [0, 1).
    for flags, message in [(["--loss", "sigmoid:-1"], "loss weights must be positive numbers"),
                           (["--loss", "sigmoid:1,hinge:nan"], "loss weights must be positive numbers"),
                           (["--adam-beta1", "1.5"], "--adam-beta1: Input should be less than 1"),
                           (["--adam-beta2", "-1"], "--adam-beta2: Input should be greater than or equal to 0"),
                           # Options the run would not read, while config.yaml said they were set.
                           (["--objective", "simpo", "--loss", "ipo"], "--loss is not read by --objective simpo"),
                           (["--objective", "reward", "--beta", "0.5"], "--beta is not read by --objective reward"),
                           (["--objective", "sft", "--beta", "0.5"], "--beta is not read by --objective sft"),
                           (["--loss", "ipo", "--label-smoothing", "0.1"],
                            "--label-smoothing is not read by --objective dpo with --loss ipo"),
                           (["--reference-model", "x"], "--reference-model is read with --reference live only"),
                           (["--lora-alpha", "8"], "--lora-alpha is read with --lora-r only"),
                           (["--lora-target-modules", "q_proj"], "--lora-target-modules is read with --lora-r only"),
                           (["--objective", "reward", "--center-rewards-coefficient", "0.1", "--reference", "live"],
                            "--reference live: --objective reward has no reference model")]:
        with pytest.raises(UserError, match=message):
            parse_args(["--shards", "s", "--model", "m", "--out", "o", *flags])
    bad = subprocess.run([sys.executable, "-m", "train", "--shards", str(tmp_path), "--model", str(tmp_path), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


@pytest.mark.parametrize("objective", ["dpo", "reward"])
def test_gradient_checkpointing_gives_the_same_losses(shards, tiny_model_dir, tmp_path, objective):
    """A reward model's last layer, read at the scored tokens only without checkpointing, runs whole under it."""
    train(_config(shards, tiny_model_dir, tmp_path / "plain", max_steps=3, log_every=1, objective=objective))
    train(_config(shards, tiny_model_dir, tmp_path / "ckpt", max_steps=3, log_every=1, gradient_checkpointing=True,
                  objective=objective))
    losses = lambda out: [m["loss"] for m in _metrics(out) if "loss" in m]  # noqa: E731
    assert losses(tmp_path / "plain") == pytest.approx(losses(tmp_path / "ckpt"), abs=1e-6)


@pytest.mark.parametrize("objective", ["dpo", "reward"])
def test_compile_option_gives_the_same_losses(shards, tiny_model_dir, tmp_path, objective):
    train(_config(shards, tiny_model_dir, tmp_path / "eager", max_steps=2, log_every=1, objective=objective))
    train(_config(shards, tiny_model_dir, tmp_path / "compiled", max_steps=2, log_every=1, compile=True, objective=objective))
    losses = lambda out: [m["loss"] for m in _metrics(out) if "loss" in m]  # noqa: E731
    assert losses(tmp_path / "eager") == pytest.approx(losses(tmp_path / "compiled"), abs=1e-4)


def test_adamw_takes_the_fused_kernel_where_torch_has_one(tmp_path, monkeypatch):
    """The optimizer TRL's trainers use by default (transformers' `adamw_torch_fused`), on the
    devices torch has the kernel for; elsewhere torch's default implementation, not an error."""
    import torch

    from train.loop import adamw

    config = TrainConfig(shards=str(tmp_path), model="m", out=str(tmp_path / "out"))
    on_cpu = adamw([torch.nn.Parameter(torch.ones(3))], config)
    assert on_cpu.param_groups[0]["fused"] is True
    on_meta = adamw([torch.nn.Parameter(torch.ones(3, device="meta"))], config)
    assert not on_meta.param_groups[0]["fused"]
    # A torch without the private list of fused devices: the default kernel, not an ImportError.
    with monkeypatch.context() as patch:
        patch.delattr("torch.utils._foreach_utils._get_fused_kernels_supported_devices")
        assert not adamw([torch.nn.Parameter(torch.ones(3))], config).param_groups[0]["fused"]


def test_a_checkpoint_from_another_adamw_kernel_resumes_on_this_runs(tmp_path):
    """A run checkpointed with torch's default AdamW resumes on the fused kernel with the same
    moments, and its next step equals the default kernel's within rounding."""
    import torch

    from train.distributed import Dist
    from train.loop import adamw
    from train.parallel import load_checkpoint, save_checkpoint

    config = TrainConfig(shards=str(tmp_path), model="m", out=str(tmp_path / "out"), learning_rate=0.1)
    dist, data = Dist(0, 1, torch.device("cpu")), torch.randn(16, 4, generator=torch.Generator().manual_seed(0))

    def step(model, optimizer):
        optimizer.zero_grad()
        model(data).square().mean().backward()
        optimizer.step()

    torch.manual_seed(0)
    saved = torch.nn.Linear(4, 3)
    default = torch.optim.AdamW(saved.parameters(), lr=0.1)
    for _ in range(3):
        step(saved, default)
    save_checkpoint(tmp_path / "ckpt", saved, default, {"step": 3}, dist)
    resumed = torch.nn.Linear(4, 3)
    fused = adamw(list(resumed.parameters()), config)
    assert load_checkpoint(tmp_path / "ckpt", resumed, fused, dist) == {"step": 3}
    assert fused.param_groups[0]["fused"] is True
    step(saved, default)
    step(resumed, fused)
    for ours, reference in zip(resumed.parameters(), saved.parameters()):
        torch.testing.assert_close(ours, reference)


def test_an_out_that_is_or_holds_an_input_is_refused_before_any_work(shards, tiny_model_dir, tmp_path):
    """train wrote its manifest over the shards' and its final/ over a model given as OUT/final."""
    import shutil

    from schemas.errors import UserError

    before = (shards / "manifest.json").read_bytes()
    with pytest.raises(UserError, match="holds the input"):
        train(_config(shards, tiny_model_dir, shards))
    run = tmp_path / "run0"
    shutil.copytree(tiny_model_dir, run / "final")
    with pytest.raises(UserError, match="holds the input"):
        train(_config(shards, run / "final", run))
    assert (shards / "manifest.json").read_bytes() == before and not (run / "metrics.jsonl").exists()


def test_a_model_too_small_for_the_shards_is_refused_in_one_line(shards, tiny_model_dir, tmp_path):
    """A smaller embedding failed inside the forward (IndexError); rows past the model's positions
    were scored (RoPE) or failed (learned positions) without a word."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from schemas.errors import UserError
    from train.eval import EvalConfig, evaluate_policy

    def model(name: str, **config) -> Path:
        directory = tmp_path / name
        LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1, **config)).save_pretrained(directory)
        AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(directory)
        return directory

    vocabulary = len(AutoTokenizer.from_pretrained(tiny_model_dir))
    for small, message in [(model("vocab", vocab_size=16), "hold token id .* but its vocabulary has 16 entries"),
                           (model("positions", vocab_size=vocabulary, max_position_embeddings=8),
                            r"hold a row of \d+ tokens, past the model's 8 positions")]:
        with pytest.raises(UserError, match=f"the train shards {message}"):
            train(_config(shards, small, tmp_path / "run", reference="live"))
        with pytest.raises(UserError, match=f"the eval shards {message}"):
            evaluate_policy(EvalConfig(shards=str(shards), policy=str(small), reference=str(tiny_model_dir),
                                       out=str(tmp_path / "eval")))


def test_a_model_changed_at_the_path_its_shards_were_scored_from_is_refused(shards, tiny_model_dir, tmp_path):
    """The step-0 check compares a policy with the reference it is; retrained in place, the policy
    is another model under the same name, and its stored log-probs were silently the old one's."""
    import shutil

    from schemas.errors import UserError
    from train.reference import PrecomputeRefConfig, precompute_ref
    from train.tiny import build_model

    scored = tmp_path / "shards"
    shutil.copytree(shards, scored)
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    precompute_ref(PrecomputeRefConfig(shards=str(scored), model=str(model), force=True))
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "transformers_version": "9.9.9"}))  # re-saved, same weights
    train(_config(scored, model, tmp_path / "resaved", max_steps=1))
    build_model(tiny_model_dir, model, seed=1)  # retrained in place
    with pytest.raises(UserError, match=r"stored reference log-probs do not match .* the shards are stale"):
        train(_config(scored, model, tmp_path / "run"))


def test_a_resume_with_other_settings_is_refused_and_one_with_its_own_runs(shards, tiny_model_dir, tmp_path):
    """The restored scheduler kept the old learning rate while config.yaml showed the new one, and a
    new batch size re-read the data from another place."""
    from schemas.errors import UserError

    out = tmp_path / "run"
    train(_config(shards, tiny_model_dir, out, max_steps=4, save_every=2))
    for change, flag in [({"learning_rate": 1e-4}, "--learning-rate 0.005 → 0.0001"), ({"batch_size": 3}, "--batch-size 8 → 3")]:
        with pytest.raises(UserError, match=re.escape(flag)):
            train(_config(shards, tiny_model_dir, out, max_steps=6, save_every=2, resume=True, **change))
    train(_config(shards, tiny_model_dir, out, max_steps=6, save_every=2, log_every=1, resume=True))  # longer, logged more often
    assert max(m["step"] for m in _metrics(out)) == 6


def test_a_run_saved_with_an_option_its_objective_never_read_resumes(shards, tiny_model_dir, tmp_path):
    """An SFT run from before --beta was refused for SFT holds β 0.5 in its config.yaml: it never
    read it, so resuming with the default is resuming with its own settings."""
    out = tmp_path / "sft"
    train(_config(shards, tiny_model_dir, out, objective="sft", max_steps=2, save_every=2))
    saved = out / "config.yaml"
    saved.write_text(saved.read_text().replace("beta: 0.1\n", "beta: 0.5\n"))
    assert "beta: 0.5" in saved.read_text()
    train(_config(shards, tiny_model_dir, out, objective="sft", max_steps=3, save_every=2, resume=True))
    assert max(m["step"] for m in _metrics(out)) == 3
