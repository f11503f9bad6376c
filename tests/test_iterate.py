"""prefdata iterate on tiny models: two rounds chain their manifests, never reuse a prompt, and a
run killed between stages resumes to the same result as an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prefdata.iterate import EVAL_PROMPTS_FILE, IterateConfig, iterate
from schemas.io import sha256_file
from train.models import model_fingerprint

TOPICS = ["movies", "rivers", "gardens", "trains", "letters", "mirrors", "forests", "harbors", "kings", "summers",
          "winters", "music", "recipes", "stories", "science", "history"]


def text_judge(text):
    """Scores that differ between answers (a tie would leave a prompt without a pair)."""
    return float(sum(map(ord, text)) % 101)


@pytest.fixture()
def pool(tmp_path) -> Path:
    path = tmp_path / "pool.txt"
    path.write_text("\n".join(f"Tell me about {t}, please." for t in TOPICS) + "\n")
    return path


def _config(pool: Path, model: Path, out: Path, **train) -> IterateConfig:
    return IterateConfig(prompts=str(pool), policy=str(model), out=str(out), rounds=2, prompts_per_round=6,
                         eval_prompts=3, reward="tests.test_iterate:text_judge", n=3, max_new_tokens=6, device="cpu",
                         keep_truncated=True,  # a random tiny model rarely stops within 6 tokens
                         train={"max_steps": 2, "batch_size": 2, "learning_rate": 1e-3, "log_every": 1, **train})


def _run(config: IterateConfig, after_stage=None):
    return iterate(config, after_stage)


def test_prompt_limit_follows_max_length_unless_given(pool, tmp_path):
    from train.cli import build_config

    flags = {"prompts": str(pool), "policy": "m", "out": str(tmp_path / "it"), "reward": "tests.test_iterate:text_judge"}
    assert build_config(IterateConfig, {}, {**flags, "max_length": 512}).max_prompt_length == 256
    assert build_config(IterateConfig, {}, flags).max_prompt_length == 512
    assert build_config(IterateConfig, {}, {**flags, "max_length": 512, "max_prompt_length": 100}).max_prompt_length == 100


def test_two_rounds_chain_their_manifests_and_never_reuse_a_prompt(pool, tiny_model_dir, tmp_path):
    out = tmp_path / "it"
    manifest = _run(_config(pool, tiny_model_dir, out))
    rounds = manifest.stats["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    # Round 2 sampled from round 1's trained policy, named by the hash of its weights.
    final = out / "round-1" / "train" / "final"
    assert rounds[1]["policy"] == str(final)
    assert rounds[1]["policy_weights_sha256"] == model_fingerprint(final, str(final), torch.float32, torch.device("cpu")).weights_sha256
    for r in rounds:
        for stage, digest in r["manifests_sha256"].items():
            folder = {"ref": "shards"}.get(stage, stage)
            assert sha256_file(out / f"round-{r['round']}" / folder / "manifest.json") == digest
        assert 0 <= r["eval"]["win_rate"]["low"] <= r["eval"]["win_rate"]["rate"] <= r["eval"]["win_rate"]["high"] <= 1
        assert r["eval"]["prompts"] == 3 and r["pairs"] > 0
    prompt_ids = [{json.loads(line)["prompt_id"] for line in (out / f"round-{n}" / "generate" / "generations.jsonl").open()}
                  for n in (1, 2)]
    held = {json.loads(line)["prompt_id"] for line in (out / EVAL_PROMPTS_FILE).open()}
    assert len(prompt_ids[0]) == len(prompt_ids[1]) == 6 and len(held) == 3
    assert not (prompt_ids[0] & prompt_ids[1]) and not (held & (prompt_ids[0] | prompt_ids[1]))
    # Round 2's reference is round 1's policy: its shards were scored with those weights.
    ref = json.loads((out / "round-2" / "shards" / "manifest.json").read_text())["reference"]
    assert ref["weights_sha256"] == rounds[1]["policy_weights_sha256"]


def test_a_run_killed_between_stages_resumes_to_the_uninterrupted_result(pool, tiny_model_dir, tmp_path):
    whole = tmp_path / "whole"
    _run(_config(pool, tiny_model_dir, whole))

    class Killed(Exception):
        pass

    def kill_after_round_2_tokenize(number, stage):
        if (number, stage) == (2, "tokenize"):
            raise Killed

    killed = tmp_path / "killed"
    with pytest.raises(Killed):
        _run(_config(pool, tiny_model_dir, killed), kill_after_round_2_tokenize)
    ran = []
    _run(_config(pool, tiny_model_dir, killed), lambda number, stage: ran.append((number, stage)))
    assert ran == [(2, "ref"), (2, "train"), (2, "eval")]  # nothing done before the kill ran again
    for path in ("round-2/generate/generations.jsonl", "round-2/judge/judged.jsonl"):  # the same answers and scores
        assert _answers(killed / path) == _answers(whole / path), path
    assert (killed / "round-2/train/final/model.safetensors").read_bytes() == (whole / "round-2/train/final/model.safetensors").read_bytes()


def _answers(path: Path) -> list:
    """The rows without the policy's path, which names the run directory."""
    return [(row["prompt_id"], row["responses"]) for row in map(json.loads, path.open())]


def test_lora_rounds_continue_from_the_merged_model(pool, tiny_model_dir, tmp_path):
    """Under --lora-r a round's final/ is the adapter alone: the next round samples from, is scored
    against and trains a new adapter on the merged model, and each eval loads merged models."""
    pytest.importorskip("peft")
    out = tmp_path / "lora"
    rounds = _run(_config(pool, tiny_model_dir, out, lora_r=4, learning_rate=2e-2)).stats["rounds"]
    merged = [out / f"round-{n}" / "train" / "final-merged" for n in (1, 2)]
    assert rounds[1]["policy"] == str(merged[0])
    merged_sha = model_fingerprint(merged[0], str(merged[0]), torch.float32, torch.device("cpu")).weights_sha256
    assert rounds[1]["policy_weights_sha256"] == merged_sha != rounds[0]["policy_weights_sha256"]  # trained, then merged
    ref = json.loads((out / "round-2" / "shards" / "manifest.json").read_text())["reference"]
    assert ref["weights_sha256"] == merged_sha
    assert not list((out / "round-2" / "train" / "final").glob("model*.safetensors"))  # round 2 trained an adapter too
    assert [(r["eval"]["policy"], r["eval"]["baseline"]) for r in rounds] == \
        [(str(merged[0]), str(tiny_model_dir)), (str(merged[1]), str(merged[0]))]


def test_the_summary_says_n_a_where_a_round_judged_nothing():
    """eval.json holds null where nothing was judged; the summary's number format crashed on it."""
    from prefdata.iterate import summary_lines
    from schemas.manifest import Counts, Manifest

    round_eval = {"win_rate": {"rate": None, "low": None, "high": None}, "reward": None, "baseline_reward": 0.25}
    manifest = Manifest(stage="iterate", package_version="t", config={}, counts=Counts(read=0, kept=0),
                        stats={"rounds": [{"round": 1, "pairs": 3, "eval": round_eval}]})
    assert summary_lines(manifest) == ["round 1: 3 pairs; π_2 vs π_1: win rate n/a [n/a, n/a], reward n/a vs 0.250"]
