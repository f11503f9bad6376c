"""Issue 27 evidence for the KTO objective: the loss worked out by hand, and loss, KL and rewards
equal to TRL 1.x `KTOTrainer`'s on its own token ids.

TRL's trainer (precompute_ref_log_probs=True, float32, CPU) tokenizes six unpaired rows, pairs
each with a mismatched KL completion (its batch rotation) and stores the reference log-probs of
both. Its policy and our copy of the model are then perturbed identically, so every log-ratio is
non-zero. TRL's numbers come from its own `compute_loss` on a batch from its own collator; ours
from `sequence_logps` on the same ids (the completion and the KL completion as a row's two
continuations, as an unpaired shard stores them) + `kto_kl` + `kto_loss`.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pytest
import torch
from transformers import AutoModelForCausalLM

from prefdata.tokenize import TokenizeConfig, tokenize
from schemas.errors import UserError
from schemas.io import sha256_file
from schemas.manifest import Manifest
from tests.conftest import CORPUS
from tests.records_factory import unpaired_from_pairs, write_records_dir
from tests.test_logprobs import _columns
from tests.test_train import _config, _learnable, _metrics
from tests.test_train_scale import _weights
from tests.test_train_trl import _perturb
from train.batching import Collator, collate_pairs
from train.data import open_shards
from train.distributed import Dist
from train.eval import preference_metrics
from train.logprobs import sequence_logps
from train.loop import train
from train.losses import Denominators, LossParams, kto_kl, kto_loss
from train.reference import PrecomputeRefConfig, precompute_ref

BETA = 0.1


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_kto_loss_by_hand():
    """Three rows, β = 0.1, λD = 1, λU = 2. KL rows' logratios 0.4, 0.6, −0.1: z0 = 0.3.
    Row 0 desirable, r = 2:    1 − σ(0.1·(2 − 0.3))  = 1 − σ(0.17) = 0.457602
    Row 1 undesirable, r = −1: 2·(1 − σ(0.1·(0.3 + 1))) = 2·(1 − σ(0.13)) = 0.935092
    Row 2 desirable, r = 3:    1 − σ(0.27) = 0.432908
    Loss: the mean over rows, 0.608534. Rewards β·r: desirable mean 0.25, undesirable −0.1."""
    kl = kto_kl(torch.tensor([0.4, 0.6, -0.1]), torch.ones(3))
    assert kl.item() == pytest.approx(0.3, abs=1e-7)
    loss, metrics = kto_loss(torch.tensor([2.0, -1.0, 3.0]), torch.tensor([True, False, True]), kl,
                             LossParams(beta=BETA), desirable_weight=1.0, undesirable_weight=2.0)
    assert loss.item() == pytest.approx((0.457602 + 0.935092 + 0.432908) / 3, abs=1e-6)
    assert loss.item() == pytest.approx(((1 - _sigmoid(0.17)) + 2 * (1 - _sigmoid(0.13)) + (1 - _sigmoid(0.27))) / 3, abs=1e-7)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.25, abs=1e-7)
    assert metrics["rewards/rejected"].item() == pytest.approx(-0.1, abs=1e-7)
    assert metrics["rewards/margins"].item() == pytest.approx(0.35, abs=1e-7)
    assert metrics["rewards/accuracies"].item() == pytest.approx(1.0)  # every reward has its label's sign


def test_kto_kl_is_clamped_at_zero_and_ignores_stand_in_rows():
    assert kto_kl(torch.tensor([-0.5, 0.1]), torch.ones(2)).item() == 0.0
    # A stand-in row (weight 0) does not move the mean, whatever its value.
    assert kto_kl(torch.tensor([0.2, 0.4, 100.0]), torch.tensor([1.0, 1.0, 0.0])).item() == pytest.approx(0.3)
    # Across processes the mean is over every process's rows: (0.2 + 0.4 + 0.9) / 3, not the mean of means.
    other_process = torch.tensor([0.9, 1.0])
    total = lambda sums: sums + other_process  # noqa: E731  (what Dist.sum adds from a second process)
    assert kto_kl(torch.tensor([0.2, 0.4]), torch.ones(2), total).item() == pytest.approx(0.5)


def test_step_shares_add_up_to_the_whole_step():
    """Split over two micro-batches with the step's denominators, the shares sum to the one-batch values."""
    logratios, desirable = torch.tensor([2.0, -1.0, 3.0, -0.5]), torch.tensor([True, False, True, False])
    kl, params = torch.tensor(0.2), LossParams(beta=BETA)
    whole_loss, whole = kto_loss(logratios, desirable, kl, params, 1.0, 1.5)
    step = Denominators(pairs=4, chosen_tokens=0, desirable=2, undesirable=2)
    parts = [kto_loss(logratios[s], desirable[s], kl, params, 1.0, 1.5, step) for s in (slice(0, 1), slice(1, 4))]
    assert sum(p[0].item() for p in parts) == pytest.approx(whole_loss.item(), abs=1e-7)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "kl"):
        assert sum(p[1][name].item() for p in parts) == pytest.approx(whole[name].item(), abs=1e-7), name


# ---------------------------------------------------------------------------------------------
# TRL 1.x KTOTrainer on the same model and ids

LABELS = [True, False, True, True, False, False]


def trl_kto_trainer(model_dir, out_dir, batch_size: int = 3):
    """TRL's `KTOTrainer(precompute_ref_log_probs=True)`, float32 on CPU, over six conversational
    unpaired rows: its train_dataset holds its token ids (prompt_ids, completion_ids,
    KL_completion_ids), labels and the reference log-probs it computed."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    rows = [dict(prompt=[{"role": "user", "content": CORPUS[i]}],
                 completion=[{"role": "assistant", "content": CORPUS[i + 1][: 12 + 9 * i]}], label=label)
            for i, label in enumerate(LABELS)]
    args = KTOConfig(output_dir=str(out_dir), precompute_ref_log_probs=True, per_device_train_batch_size=batch_size,
                     beta=BETA, desirable_weight=1.0, undesirable_weight=1.4, bf16=False, use_cpu=True, report_to="none")
    return KTOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=AutoTokenizer.from_pretrained(model_dir))


@pytest.fixture(scope="module")
def trl_kto(tiny_model_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    trainer = trl_kto_trainer(tiny_model_dir, tmp_path_factory.mktemp("trl-kto"))
    data = trainer.train_dataset
    ours = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for model in (trainer.model, ours):
        _perturb(model)
        model.eval()
    return trainer, data, ours


def _trl_batch_numbers(trainer, data, rows: list[int]) -> dict[str, float]:
    trainer._metrics["train"].clear()
    trainer.model.train()  # `compute_loss` logs under "train" only in training mode; dropout is off in the tiny model
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, trainer.data_collator([data[i] for i in rows])).item()
    logged = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    return {"loss": loss, **{name: logged[name] for name in ("kl", "rewards/chosen", "rewards/rejected")}}


# Our three layouts of an unpaired row: two padded rows; one prefix-shared row [prompt,
# completion, KL completion]; a shared [prompt, completion] row and a no-gradient [prompt, KL
# completion] row (`--kl-completions apart`).
LAYOUTS = {"padded": Collator(0), "shared": Collator(0, shared=True), "apart": Collator(0, shared=True, second_apart=True)}


def _our_batch_numbers(model, data, rows: list[int], layout: str) -> dict[str, float]:
    """The stored-reference path of `train.loop.batch_loss` for an unpaired shard, on TRL's ids."""
    pick = lambda name: [data[i][name] for i in rows]  # noqa: E731
    columns = _columns(pick("prompt_ids"), pick("completion_ids"), pick("KL_completion_ids"))
    with torch.no_grad():
        logps = sequence_logps(model, LAYOUTS[layout](columns, np.arange(len(rows))))
    ref, ref_kl = torch.tensor(pick("ref_logps")), torch.tensor(pick("ref_KL_logps"))
    kl = kto_kl(logps.rejected - ref_kl, torch.ones(len(rows)))
    loss, metrics = kto_loss(logps.chosen - ref, torch.tensor(pick("label")), kl, LossParams(beta=BETA), 1.0, 1.4)
    return {"loss": loss.item(), **{name: metrics[name].item() for name in ("kl", "rewards/chosen", "rewards/rejected")}}


# TRL's batches of three: on the first the KL rows' mean logratio is negative (z0 clamped at 0),
# on the second positive (z0 ≈ 0.17), so both branches of the clamp are compared.
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize(("rows", "kl_clamped"), [([0, 1, 2], True), ([3, 4, 5], False)], ids=["kl-clamped", "kl-positive"])
def test_kto_loss_kl_and_rewards_equal_trl(trl_kto, rows, kl_clamped, layout):
    trainer, data, ours = trl_kto
    # TRL's KL completion of each row is another row's completion (its rotation within the batch).
    assert all(data[i]["KL_completion_ids"] != data[i]["completion_ids"] for i in rows)
    expected = _trl_batch_numbers(trainer, data, rows)
    got = _our_batch_numbers(ours, data, rows, layout)
    assert (expected["kl"] == 0) == kl_clamped and (kl_clamped or expected["kl"] > 0.05)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-4), name


def test_stored_kl_and_completion_references_equal_trl(trl_kto, tiny_model_dir):
    """Our log-prob function on the unperturbed model gives TRL's stored ref_logps and ref_KL_logps."""
    from transformers import AutoModelForCausalLM

    _, data, _ = trl_kto
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    columns = _columns(data["prompt_ids"], data["completion_ids"], data["KL_completion_ids"])
    with torch.inference_mode():
        got = sequence_logps(model, collate_pairs(columns, np.arange(len(columns)), pad_id=0, shared=True))
    np.testing.assert_allclose(got.chosen.numpy(), np.array(data["ref_logps"]), atol=1e-4, rtol=0)
    np.testing.assert_allclose(got.rejected.numpy(), np.array(data["ref_KL_logps"]), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# The loop on unpaired shards: tokenize → precompute-ref → train --objective kto → eval


@pytest.fixture(scope="module")
def kto_shards(tiny_model_dir, tmp_path_factory) -> Path:
    """48 training and 16 eval unpaired rows (desirable answers from GOOD, undesirable from BAD,
    alternating), scored with the tiny model. `unscored/` beside the scored `shards/`."""
    root = tmp_path_factory.mktemp("kto")
    write_records_dir(root / "records", {"train": unpaired_from_pairs(_learnable(48)),
                                          "eval": unpaired_from_pairs(_learnable(16, offset=1000))})
    tokenize(TokenizeConfig(input_dir=str(root / "records"), tokenizer=str(tiny_model_dir), out=str(root / "unscored"),
                            rows_per_shard=20))
    shutil.copytree(root / "unscored", root / "shards")
    precompute_ref(PrecomputeRefConfig(shards=str(root / "shards"), model=str(tiny_model_dir)))
    return root / "shards"


def test_kto_learns_the_labels_and_eval_reads_the_reward_sign(kto_shards, tiny_model_dir, tmp_path):
    out = tmp_path / "kto"
    train(_config(kto_shards, tiny_model_dir, out, objective="kto", beta=0.5, max_steps=12, log_every=1, eval_every=6,
                  desirable_weight=1.0, undesirable_weight=1.2))
    logged = _metrics(out)
    steps = [m for m in logged if "loss" in m]
    assert {"kl", "rewards/chosen", "rewards/rejected", "rewards/accuracies"} <= steps[0].keys()
    assert np.mean([m["loss"] for m in steps[-3:]]) < steps[0]["loss"] - 0.05
    evals = [m for m in logged if "eval/loss" in m]
    assert evals[-1]["eval/rewards/accuracies"] > 0.8 and evals[-1]["eval/rewards/margins"] > 0
    assert evals[-1]["eval/rows"] == 16 and all(m["kl"] >= 0 for m in steps)
    # prefdata eval on the same split reads the same sign: desirable rewards up, undesirable down.
    with torch.inference_mode():
        metrics = preference_metrics(AutoModelForCausalLM.from_pretrained(out / "final"), open_shards(kto_shards, True)[2],
                                     beta=0.5, pad_id=0, batch_tokens=512, dist=Dist(0, 1, torch.device("cpu")),
                                     stored_dtype=torch.float32)
    assert metrics["rows"] == 16 and metrics["desirable"] == metrics["undesirable"] == 8
    assert metrics["accuracy"] == pytest.approx(evals[-1]["eval/rewards/accuracies"], abs=1 / 16 + 1e-9)
    # The loop's held-out margin is the split's (desirable mean − undesirable mean), as prefdata eval's.
    assert metrics["margin"] > 0 and metrics["margin"] == pytest.approx(evals[-1]["eval/rewards/margins"], abs=1e-4)


def test_the_objective_must_fit_the_shards_kind(kto_shards, tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="unpaired shards, but --objective dpo needs paired"):
        train(_config(kto_shards, tiny_model_dir, tmp_path / "dpo"))
    with pytest.raises(UserError, match="ingest the data with --unpaired"):
        train(_config(paired_shards_of(tmp_path, tiny_model_dir), tiny_model_dir, tmp_path / "kto", objective="kto"))


def paired_shards_of(tmp_path: Path, model: Path) -> Path:
    write_records_dir(tmp_path / "pairs", {"train": _learnable(8), "eval": _learnable(2, offset=100)})
    tokenize(TokenizeConfig(input_dir=str(tmp_path / "pairs"), tokenizer=str(model), out=str(tmp_path / "pair-shards")))
    return tmp_path / "pair-shards"


def test_the_step_zero_check_covers_both_kto_columns(kto_shards, tiny_model_dir, tmp_path):
    """Shards scored with another model are refused, naming the unpaired columns."""
    other = tmp_path / "other-reference"
    shutil.copytree(kto_shards, other)
    table = pa.ipc.open_file(other / "train-00000.arrow").read_all()
    shifted = table.set_column(table.schema.get_field_index("ref_kl_logps"), table.schema.field("ref_kl_logps"),
                               pa.compute.add(table.column("ref_kl_logps"), pa.scalar(3.0, pa.float32())))
    assert shifted.schema.equals(table.schema)
    with pa.ipc.new_file(other / "train-00000.arrow", shifted.schema) as writer:
        writer.write_table(shifted)
    # The manifest's sha256 would catch the edit first: this checks the values, so refresh it.
    manifest = Manifest.read(other)
    manifest.shards[0].sha256 = sha256_file(other / "train-00000.arrow")
    manifest.write(other)
    with pytest.raises(UserError, match="KL completion of row"):
        train(_config(other, tiny_model_dir, tmp_path / "run", objective="kto", max_steps=1))


def test_kto_resume_reproduces_the_uninterrupted_run(kto_shards, tiny_model_dir, tmp_path):
    config = dict(objective="kto", save_every=3, gradient_accumulation_steps=2, batch_size=4, max_steps=6, log_every=1)
    full = tmp_path / "full"
    train(_config(kto_shards, tiny_model_dir, full, **config))
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    for later in ("checkpoint-0000006", "final"):
        shutil.rmtree(resumed / later)
    train(_config(kto_shards, tiny_model_dir, resumed, resume=True, **config))
    numbers = lambda out: [(m["step"], m["loss"], m["kl"]) for m in _metrics(out) if "loss" in m]  # noqa: E731
    assert numbers(full) == numbers(resumed)


def test_kto_with_a_live_reference_equals_the_stored_one(kto_shards, tiny_model_dir, tmp_path):
    train(_config(kto_shards, tiny_model_dir, tmp_path / "stored", objective="kto", max_steps=3, log_every=1))
    train(_config(kto_shards.parent / "unscored", tiny_model_dir, tmp_path / "live", objective="kto", max_steps=3,
                  log_every=1, reference="live"))
    for a, b in zip(_metrics(tmp_path / "stored"), _metrics(tmp_path / "live"), strict=True):
        for key in ("loss", "kl", "rewards/chosen", "rewards/rejected"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), key


def test_a_reward_model_is_not_evaluated_on_unpaired_shards(kto_shards, tiny_model_dir, tmp_path):
    """Its pairwise accuracy would compare a completion with its KL completion: refused in one line."""
    from train.eval import EvalConfig, evaluate_policy
    from train.rewards import load_reward_model

    classifier, tokenizer = load_reward_model(tiny_model_dir, str(tiny_model_dir), torch.float32, torch.device("cpu"))
    classifier.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    with pytest.raises(UserError, match="unpaired shards; a reward model is evaluated on pairs"):
        evaluate_policy(EvalConfig(shards=str(kto_shards), policy=str(tmp_path / "rm"), out=str(tmp_path / "eval")))


@pytest.mark.parametrize("packing", [False, True], ids=["shared", "packed"])
def test_kl_completions_scored_apart_give_the_shared_rows_numbers(kto_shards, tiny_model_dir, tmp_path, packing):
    """`--kl-completions apart` ([prompt, completion] trained, [prompt, KL completion] scored in a
    forward of its own without gradients) against `shared` (one trained row of both): the same
    losses, KL, gradients and final weights."""
    runs = {}
    for mode in ("shared", "apart"):
        out = tmp_path / mode
        train(_config(kto_shards, tiny_model_dir, out, objective="kto", max_steps=4, log_every=1, eval_every=2,
                      kl_completions=mode, packing=packing))
        runs[mode] = out
    shared, apart = _metrics(runs["shared"]), _metrics(runs["apart"])
    assert [m.get("kl_apart") for m in apart if "loss" in m] == [True] * 4
    assert [m.get("kl_apart") for m in shared if "loss" in m] == [False] * 4
    for a, b in zip(shared, apart, strict=True):
        for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "grad_norm", "eval/loss", "eval/kl", "tokens"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), key
    for name, value in _weights(runs["shared"] / "final").items():
        torch.testing.assert_close(_weights(runs["apart"] / "final")[name], value, atol=1e-5, rtol=1e-4)


def test_auto_scores_kl_completions_apart_where_prompts_are_short_against_them():
    """3·(P + C + K) token-passes shared against 3·(P + C) + (P + K) apart: apart wins when P < 2K."""
    short_prompts = _columns([[1, 2]], [[3, 4]], [[5, 6]])  # P 2 < 2K 4
    long_prompts = _columns([[1, 2, 3, 4, 5]], [[3, 4]], [[5, 6]])  # P 5 > 2K 4
    assert short_prompts.second_apart_is_cheaper() and not long_prompts.second_apart_is_cheaper()
    assert (short_prompts.first_only.rejected.lengths == 0).all()
    assert short_prompts.second_only.chosen.row(0).tolist() == [5, 6]


def test_a_label_missing_from_a_step_is_left_out_of_its_mean_not_counted_as_zero(kto_shards, tiny_model_dir, tmp_path):
    """One row per step: each step has one label only. Logged every 4 steps, a label's reward is the
    mean over the steps that had it (TRL's logging), which the per-step records give."""
    every_step, every_four = tmp_path / "every-step", tmp_path / "every-four"
    for out, log_every in ((every_step, 1), (every_four, 4)):
        train(_config(kto_shards, tiny_model_dir, out, objective="kto", batch_size=1, max_steps=8, log_every=log_every))
    steps = [m for m in _metrics(every_step) if "loss" in m]
    assert all(("rewards/chosen" in m) != ("rewards/rejected" in m) and "rewards/margins" not in m for m in steps)
    for window, logged in zip((steps[:4], steps[4:]), [m for m in _metrics(every_four) if "loss" in m], strict=True):
        for name in ("rewards/chosen", "rewards/rejected"):
            values = [m[name] for m in window if name in m]
            if values:
                assert logged[name] == pytest.approx(np.mean(values), abs=1e-6), name
            else:
                assert name not in logged
        assert logged["loss"] == pytest.approx(np.mean([m["loss"] for m in window]), abs=1e-6)


def test_kl_completions_apart_is_refused_without_prefix_sharing(kto_shards, tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="--kl-completions apart scores the KL completions beside prefix-shared rows"):
        train(_config(kto_shards, tiny_model_dir, tmp_path / "run", objective="kto", kl_completions="apart",
                      prefix_sharing="off", max_steps=1))
