"""The demo end to end at its reduced size, and the pieces of `prefdata eval` with known answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from demo.data import DemoDataConfig, lexicon_reward, preference_lines
from demo.pipeline import LEXICON_REWARD, DemoConfig, run_demo
from schemas.errors import UserError

STAGES = ["ingest", "curate", "sft-ingest", "sft-shards", "shards"]


def test_lexicon_reward_sums_word_values():
    assert lexicon_reward("The story was wonderful but the ending was dull.") == 1.0  # 2 − 1
    assert lexicon_reward("AWFUL, awful, Good!") == -3.0  # case and punctuation do not matter: −2 −2 +1
    assert lexicon_reward("the camera work felt long") == 0.0  # no lexicon word


def _parsed(lines: list[str]) -> list[dict]:
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def test_dump_carries_each_kind_of_dirt():
    lines = preference_lines(DemoDataConfig(pairs=100, seed=3))
    assert len(lines) == 100 + 4 * 2 + 2  # clean pairs, 2 of each of 4 dirt kinds, bad JSON, truncated line
    assert lines[-2].startswith(lines[-1]) and lines[-1] != lines[-2]  # the last line is cut short
    rows = _parsed(lines)
    assert len(rows) == len(lines) - 2
    assert sum(row["chosen"] == row["rejected"] for row in rows) == 4  # 2 ties + 2 not-alternating rows
    assert len(lines) - len(set(lines)) == 2  # exact duplicates
    assert all(lexicon_reward(r["chosen"]) > lexicon_reward(r["rejected"]) for r in rows if r["chosen"] != r["rejected"])


def test_kl_of_a_model_against_itself_is_exactly_zero(tiny_model_dir):
    import torch

    from train.eval import completion_logps, sequence_kl
    from train.models import load_causal_lm

    model, tokenizer = load_causal_lm(tiny_model_dir, str(tiny_model_dir), torch.float32, torch.device("cpu"))
    prompts = [np.array(tokenizer("The movie was").input_ids), np.array(tokenizer("What is the capital").input_ids)]
    completions = [np.array(tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id])
                   for text in (" a delight", " dull", " of France?", " Paris")]
    with torch.inference_mode():
        assert sequence_kl(model, model, prompts, completions, tokenizer.pad_token_id, 4096) == 0.0
        batched = completion_logps(model, prompts, completions, tokenizer.pad_token_id, 4096)
        # The batched, padded scoring equals a by-hand sum over one unpadded row's token log-probs.
        ids = torch.from_numpy(np.concatenate([prompts[0], completions[1]])).unsqueeze(0)
        token_logps = model(ids).logits[0, :-1].float().log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
        assert batched[1] == pytest.approx(token_logps[len(prompts[0]) - 1:].sum().item(), abs=1e-4)
    assert batched[1] < 0


def test_unknown_reward_is_a_user_error():
    from train.judge import load_reward

    with pytest.raises(UserError, match="--reward nope:f"):
        load_reward("nope:f")
    assert load_reward("demo.data:lexicon_reward")([{"role": "user", "content": "Review:"}], "great") == 1.0


def test_eval_command_on_missing_shards_is_one_line_exit_2(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "prefdata", "eval", str(tmp_path / "none"), "--policy", str(tmp_path),
                           "--reference", str(tmp_path), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("prefdata: error: ") and done.stderr.count("\n") == 1


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    out = tmp_path_factory.mktemp("demo")
    rows = run_demo(DemoConfig(out=str(out), quick=True))
    return out, {row["label"]: row for row in rows}


def test_demo_counts_add_up_at_every_stage(demo):
    out, _ = demo
    counts = {stage: json.loads((out / stage / "manifest.json").read_text())["counts"] for stage in STAGES}
    for stage, c in counts.items():
        assert c["read"] == c["kept"] + sum(c["dropped"].values()), stage
    assert counts["curate"]["read"] == counts["ingest"]["kept"]
    assert counts["shards"]["read"] == counts["curate"]["kept"]
    assert {"invalid_json", "truncated_line", "hh_not_alternating", "identical_answers"} <= set(counts["ingest"]["dropped"])
    assert counts["curate"]["dropped"]["duplicate"] > 0


def test_dpo_beats_the_reference_and_ranks_held_out_pairs(demo):
    out, rows = demo
    dpo, reference = rows["DPO β=0.1"], rows["π_ref (SFT)"]
    assert dpo["accuracy"] > 0.8
    assert dpo["reward"] > dpo["reference_reward"]
    assert dpo["reward"] > reference["reward"]
    assert reference["kl"] == 0.0 and dpo["kl"] > 0
    # π_ref against its own stored log-probs (scored prefix-shared, re-scored padded here): all ties.
    assert reference["accuracy"] == 0.0 and abs(reference["margin"]) < 1e-4
    assert (out / "reward_vs_kl.png").stat().st_size > 0
    assert "| DPO β=0.1 |" in (out / "results.md").read_text()


def test_kto_on_the_unpaired_dump_sits_beside_dpo(demo):
    """The same dump ingested --unpaired (every pair two labelled rows), KTO from π_ref, evaluated
    on the paired eval split as the DPO rows are."""
    out, rows = demo
    kto, reference = rows["KTO β=0.1"], rows["π_ref (SFT)"]
    ingested = json.loads((out / "ingest-unpaired" / "manifest.json").read_text())
    paired = json.loads((out / "ingest" / "manifest.json").read_text())
    # A tie (both answers identical) is quarantined as a pair; unpaired it is one answer labelled
    # both ways, two records that curate drops as conflicting_label.
    ties = paired["counts"]["dropped"]["identical_answers"]
    assert ingested["stats"]["kind"] == "unpaired" and ingested["stats"]["records"] == 2 * (paired["stats"]["records"] + ties)
    curated = json.loads((out / "curate-unpaired" / "manifest.json").read_text())["counts"]
    assert curated["dropped"]["conflicting_label"] == 2 * ties
    assert kto["pairs"] == rows["DPO β=0.1"]["pairs"]  # the same held-out pairs as DPO
    # ...whose prompts KTO never trained on: both curate runs split by prompt.
    import polars as pl

    paired_eval = set(pl.read_ipc(str(out / "shards" / "eval-*.arrow"))["prompt_id"])
    assert paired_eval and not paired_eval & set(pl.read_ipc(str(out / "shards-unpaired" / "train-*.arrow"))["prompt_id"])
    assert kto["accuracy"] > 0.7  # the quick size measured 0.85 on 87 pairs (DPO 0.91)
    assert kto["reward"] > reference["reward"] and kto["kl"] > 0
    unpaired = kto["unpaired_eval"]
    assert unpaired["desirable"] + unpaired["undesirable"] == unpaired["rows"] > 0 and unpaired["margin"] > 0
    assert "| KTO β=0.1 |" in (out / "results.md").read_text()


def test_the_reward_model_ranks_held_out_pairs_beside_the_lexicon_judge(demo):
    """`--objective reward` on the demo's shards, `prefdata eval` of it, and the lexicon on the same
    eval pairs: every count adds up to the eval split, the lexicon agrees with its own labels, and
    the reward model ranks the pairs well above chance."""
    out, _ = demo
    report = json.loads((out / "reward_model.json").read_text())
    rm, judge = report["reward_model"], report["judge"]
    shards = json.loads((out / "shards" / "manifest.json").read_text())["shards"]
    eval_pairs = sum(s["rows"] for s in shards if s["split"] == "eval")
    assert rm["kind"] == "reward_model" and rm["pairs"] == judge["pairs"] == eval_pairs > 0
    assert sum(b["pairs"] for b in rm["calibration"]) == rm["pairs"]
    assert judge["agree"] + judge["disagree"] + judge["tie"] + judge["unjudged"] == judge["pairs"]
    assert judge["agree"] == judge["pairs"] and judge["agreement"] == 1.0  # the labels are the lexicon's choices
    assert rm["accuracy"] > 0.7  # chance is 0.5; the quick size measured 0.90 on 87 pairs
    assert json.loads((out / "eval-reward-model" / "eval.json").read_text())["accuracy"] == rm["accuracy"]
    train_config = json.loads((out / "reward-model" / "final" / "config.json").read_text())
    assert train_config["architectures"][0].endswith("ForSequenceClassification")
    text = (out / "reward_model.md").read_text()
    assert f"| {judge['pairs']} | {round(rm['accuracy'] * rm['pairs'])} | {rm['accuracy']:.3f} |" in text
    assert f"| lexicon judge (`{LEXICON_REWARD}`) | {judge['pairs']} | {judge['pairs']} | 1.000 |" in text


def test_eval_refuses_a_reference_other_than_the_shards_one(demo):
    from train.eval import EvalConfig, evaluate_policy

    out, _ = demo
    policy = out / "DPO-beta0.1" / "final"
    with pytest.raises(UserError, match="--reference .*not the model the shards' reference log-probs"):
        evaluate_policy(EvalConfig(shards=str(out / "shards"), policy=str(policy), reference=str(policy), out=str(out / "x")))


def test_win_rate_counts_ties_as_half_and_leaves_unjudged_pairs_out():
    from train.eval import win_rate

    policy = np.array([[3.0, 1.0], [2.0, 2.0]])
    baseline = np.array([[1.0, 1.0], [3.0, np.nan]])
    result = win_rate(policy, baseline)
    # prompt 0: a win and a tie → 0.75; prompt 1: a loss (its second pair is unjudged) → 0
    assert result["rate"] == pytest.approx(0.375)
    half_width = 1.96 * np.std([0.75, 0.0], ddof=1) / np.sqrt(2)
    assert (result["low"], result["high"]) == (0.0, pytest.approx(min(1.0, 0.375 + half_width)))
    assert (result["wins"], result["ties"], result["losses"], result["unjudged"], result["prompts"]) == (1, 1, 1, 1, 2)


def test_a_policy_against_itself_wins_half_and_best_of_n_beats_single_samples(demo, monkeypatch):
    import weakref

    import train.eval as eval_module
    from train.eval import EvalConfig, evaluate_policy

    loaded, alive_at_each_load, dtypes, load = [], [], [], eval_module.load_causal_lm

    def load_counting_the_models_alive(*args, **kwargs):
        alive_at_each_load.append(sum(model() is not None for model in loaded))
        dtypes.append(args[2])
        model, tokenizer = load(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model, tokenizer

    monkeypatch.setattr(eval_module, "load_causal_lm", load_counting_the_models_alive)
    out, _ = demo
    policy = out / "DPO-beta0.1" / "final"
    result = evaluate_policy(EvalConfig(shards=str(out / "shards"), policy=str(policy), reference=str(out / "reference" / "final"),
                                        out=str(out / "eval-self"), reward=LEXICON_REWARD, baseline=str(policy),
                                        best_of=4, samples=4, max_prompts=20, report_to="tensorboard"))
    win = result["win_rate"]
    # A 95% interval misses the truth 1 time in 20 by design (these prompts at seed 0: its top is 0.498);
    # a policy against itself must sit within 3.3 standard errors of ½ (1 time in 1,000).
    standard_error = (win["high"] - win["low"]) / (2 * 1.96)
    assert abs(win["rate"] - 0.5) <= 3.29 * standard_error and win["prompts"] == 20
    from tests.test_train_tracking import _scalars  # the tracker holds eval.json's numbers
    assert _scalars(out / "eval-self", "win_rate/rate") == [(0, pytest.approx(win["rate"], rel=1e-6))]
    assert _scalars(out / "eval-self", "accuracy") == [(0, pytest.approx(result["accuracy"], rel=1e-6))]
    assert win["wins"] + win["ties"] + win["losses"] + win["unjudged"] == 80
    assert result["best_of_n"]["reward"] > result["reference_reward"]
    # policy, reference, then the baseline beside the reference alone: two models on the device at most
    assert alive_at_each_load == [0, 1, 1]
    assert dtypes == [torch.float32] * 3  # --dtype auto: the shards' reference dtype (float32 on a CPU)


def test_eval_in_bf16_keeps_the_accuracy_and_says_how_much_of_it_is_within_rounding(demo):
    """The reference against its own stored float32 values: every margin is rounding, in float32
    and in bf16, and eval says so. The trained policy in bf16 keeps its float32 accuracy: the
    accuracy's line is the trainer's (a margin above 0), not bf16's worst case."""
    from transformers import AutoModelForCausalLM

    from train.data import open_shards
    from train.distributed import Dist
    from train.eval import preference_metrics, rounding_band

    out, _ = demo
    data = open_shards(str(out / "shards"), True)[2]
    cpu = Dist(0, 1, torch.device("cpu"))

    def metrics(model_dir, dtype):
        model = AutoModelForCausalLM.from_pretrained(model_dir).to(dtype)
        with torch.inference_mode():
            return preference_metrics(model, data, 0.1, 0, 4096, cpu, stored_dtype=torch.float32)

    for dtype in (torch.float32, torch.bfloat16):
        same = metrics(out / "reference" / "final", dtype)
        assert same["within_rounding"] == 1.0 and same["pairs"] == len(data)
        if dtype == torch.float32:
            assert same["accuracy"] == 0.0  # every margin below the 1e-3 line
    trained = {dtype: metrics(out / "DPO-beta0.1" / "final", dtype) for dtype in (torch.float32, torch.bfloat16)}
    assert trained[torch.float32]["accuracy"] > 0.6 and trained[torch.float32]["within_rounding"] < 0.5
    assert abs(trained[torch.bfloat16]["accuracy"] - trained[torch.float32]["accuracy"]) <= 0.1
    long_answer = np.array([400])
    assert rounding_band((torch.float32,), long_answer)[0] < 0.05 < 5 < rounding_band((torch.bfloat16, torch.float32), long_answer)[0]


def test_eval_runs_its_models_in_the_stored_references_dtype_unless_told():
    from schemas.manifest import ModelFingerprint
    from train.eval import models_dtype

    cpu = torch.device("cpu")
    scored_in_bf16 = ModelFingerprint(name_or_path="m", config_sha256="c", weights_sha256="w", dtype="bfloat16", device_type="cuda")
    assert models_dtype("auto", scored_in_bf16, cpu) == torch.bfloat16
    assert models_dtype("float32", scored_in_bf16, cpu) == torch.float32
    assert models_dtype("auto", None, cpu) == torch.float32  # a reward model: no stored reference


def test_the_iterated_round_chains_to_the_offline_reference_and_is_judged(demo):
    out, _ = demo
    rounds = json.loads((out / "rounds.json").read_text())
    manifest = json.loads((out / "iterate" / "manifest.json").read_text())
    assert [r["round"] for r in rounds] == [1] and rounds[0]["pairs"] > 0
    assert manifest["stats"]["rounds"][0]["policy"] == str(out / "reference" / "final")  # π_1 = the SFT reference
    win = rounds[0]["win_rate"]
    assert win["low"] <= win["rate"] <= win["high"] and win["prompts"] == 40
    assert (out / "rounds.png").stat().st_size > 0 and "| 1 |" in (out / "rounds.md").read_text()
