"""curate --score-with (issue 26, item 7): each pair's margin under a reward model or a policy's
implicit reward, suspect labels flagged, counted per source, and dropped on request.

The data hold labels flipped on purpose; a tiny reward model trained for a few steps on clean
pairs of the same kind ranks exactly those first. Off by default, and flagging without dropping
decides nothing differently."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from prefdata.curate import CURATED_COLUMNS, CURATED_SCHEMA, CurateConfig, curate
from prefdata.label_noise import PairIds
from schemas.errors import UserError
from tests.records_factory import make_record, write_records_dir

GOOD = ["a delight", "warm and funny", "what a movie", "the capital is Paris"]
BAD = ["a waste of two hours", "dull and wooden", "I do not know", "no"]
WORDS = ("movie plot actor scene story ending music camera city river winter summer garden kitchen letter "
         "window market train village castle forest island doctor teacher painter").split()
FLIPPED = {"src-a": (2, 7, 11), "src-b": (4, 15)}


def _prompt(rng: random.Random) -> str:
    words = rng.sample(WORDS, 6)
    return f"What links the {', '.join(words[:5])} and {words[5]}?"


def _pairs(n: int, source: str, flipped=(), seed: int = 0, offset: int = 0):
    """Chosen from GOOD, rejected from BAD, except the `flipped` indices, whose labels are swapped."""
    rng = random.Random(f"{source}:{seed}")
    records = []
    for i in range(n):
        good, bad = f"It was {GOOD[i % 4]}.", f"It was {BAD[(i * 3) % 4]}."
        chosen, rejected = (bad, good) if i in flipped else (good, bad)
        record = make_record(_prompt(rng), chosen, rejected, row=i + offset)
        records.append(record.model_copy(update={"source": source}))
    return records


class _Config:
    """The scoring fields PairIds reads, at curate's defaults."""

    score_with, score_template, score_chat_template_kwargs, score_system_turn, score_max_length = "rm", "auto", {}, "fold", 2048


def _columns(encoder: PairIds, records) -> tuple:
    from train.batching import TokenColumns

    ok, *ids = encoder([r.model_dump(include={"prompt", "chosen", "rejected"}) for r in records])
    assert ok.all()
    return TokenColumns.from_table(pa.table({name: pa.array(x, type=pa.list_(pa.int32())) for name, x in
                                             zip(("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"), ids)}))


@pytest.fixture(scope="module")
def reward_model(tiny_model_dir, tmp_path_factory) -> Path:
    """A reward model trained for 30 steps on clean pairs (other prompts than the curated ones)."""
    from train.batching import collate_pairs
    from train.losses import reward_loss
    from train.rewards import RewardScorer, load_reward_model, pair_rewards

    torch.manual_seed(0)
    model, tokenizer = load_reward_model(tiny_model_dir, str(tiny_model_dir), torch.float32, torch.device("cpu"))
    columns = _columns(PairIds(tokenizer, _Config()), _pairs(64, "train", seed=1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scorer = RewardScorer(model.train())
    rng = np.random.default_rng(0)
    for _ in range(30):
        chosen, rejected = pair_rewards(scorer, collate_pairs(columns, rng.choice(64, 16, replace=False), pad_id=0))
        loss, _ = reward_loss(chosen, rejected)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    out = tmp_path_factory.mktemp("label-rm")
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def noisy(tmp_path_factory) -> Path:
    records = _pairs(24, "src-a", FLIPPED["src-a"]) + _pairs(20, "src-b", FLIPPED["src-b"], offset=100)
    return write_records_dir(tmp_path_factory.mktemp("noisy") / "records", {"records": records}, stage="ingest")


def _flipped_ids(noisy: Path) -> set[str]:
    table = pl.read_parquet(noisy / "records.parquet")
    wanted = [(s, row + offset) for s, offset in (("src-a", 0), ("src-b", 100)) for row in FLIPPED[s]]
    return set(table.filter(pl.struct("source", "source_row").is_in([{"source": s, "source_row": r} for s, r in wanted]))["id"])


def _scorer(path: Path, reference: Path | None = None):
    from train.label_scores import load_pair_scorer

    return load_pair_scorer(str(path), str(reference) if reference else None, batch_size=5, device="cpu", dtype="float32")


def _all_rows(out: Path) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(out / name) for name in ("train.parquet", "eval.parquet", "dropped.parquet")],
                     how="diagonal")


def _config(noisy: Path, out: Path, **over) -> CurateConfig:
    return CurateConfig(inputs=[str(noisy)], out=str(out), eval_fraction=0.3, chunk_rows=7, **over)


def test_flipped_labels_rank_first_and_are_flagged_per_source(reward_model, noisy, tmp_path):
    manifest = curate(_config(noisy, tmp_path / "flagged", score_with=str(reward_model), suspect_margin=0.5),
                      _scorer(reward_model))
    rows = _all_rows(tmp_path / "flagged").sort("label_margin")
    flipped = _flipped_ids(noisy)
    assert set(rows["id"][:len(flipped)]) == flipped  # the flipped pairs have the lowest margins
    assert rows["label_margin"][len(flipped)] > 0 > rows["label_margin"][len(flipped) - 1]
    assert set(rows.filter(pl.col("label_suspect"))["id"]) == flipped
    assert rows["label_margin"].null_count() == 0  # nothing was dropped before scoring here
    labels = manifest.stats["label_noise"]
    assert labels["scorer"]["kind"] == "reward_model" and labels["suspect_margin"] == 0.5
    assert {name: (entry["scored"], entry["suspect"], entry["agree"]) for name, entry in labels["by_source"].items()} == {
        "src-a": (24, 3, 21), "src-b": (20, 2, 18)}
    assert labels["scored"] == 44 and labels["suspect"] == 5 and "dropped" not in labels
    # Flagged, not dropped: every record is still in train or eval.
    assert manifest.counts.kept == 44 and not manifest.counts.dropped


def test_drop_suspect_drops_them_with_their_reason_and_the_counts_add_up(reward_model, noisy, tmp_path):
    manifest = curate(_config(noisy, tmp_path / "dropped", score_with=str(reward_model), suspect_margin=0.5, drop_suspect=True),
                      _scorer(reward_model))
    dropped = pl.read_parquet(tmp_path / "dropped" / "dropped.parquet")
    assert set(dropped.filter(pl.col("drop_reason") == "suspect_label")["id"]) == _flipped_ids(noisy)
    assert manifest.counts.dropped == {"suspect_label": 5}
    assert manifest.counts.read == 44 == manifest.counts.kept + sum(manifest.counts.dropped.values())
    assert manifest.stats["train"] + manifest.stats["eval"] == manifest.counts.kept == 39
    by_source = manifest.stats["label_noise"]["by_source"]
    assert {name: entry["dropped"] for name, entry in by_source.items()} == {"src-a": 3, "src-b": 2}
    kept = pl.concat([pl.read_parquet(tmp_path / "dropped" / f) for f in ("train.parquet", "eval.parquet")])
    assert not kept["label_suspect"].any() and (kept["label_margin"] > -0.5).all()
    on_disk = json.loads((tmp_path / "dropped" / "manifest.json").read_text())
    assert on_disk["counts"]["dropped"] == {"suspect_label": 5} and on_disk["config"]["drop_suspect"] is True


def test_records_dropped_before_scoring_are_not_scored(reward_model, noisy, tmp_path):
    """Duplicates (and every earlier drop) are not scored: null margin, not counted as scored."""
    doubled = write_records_dir(tmp_path / "doubled", {"records": [*_pairs(6, "src-a"), *_pairs(6, "src-a", offset=50)]},
                                stage="ingest")
    manifest = curate(_config(doubled, tmp_path / "out", score_with=str(reward_model)), _scorer(reward_model))
    rows = _all_rows(tmp_path / "out")
    duplicates = rows.filter(pl.col("drop_reason") == "duplicate")
    assert duplicates.height == 6 and duplicates["label_margin"].null_count() == 6
    assert duplicates["label_suspect"].null_count() == 6
    assert manifest.stats["label_noise"]["scored"] == 6


def test_margins_are_the_reward_models_on_the_ids_tokenize_stores(reward_model, noisy, tmp_path):
    from prefdata.tokenize import TokenizeConfig, tokenize
    from train.batching import collate_pairs
    from train.data import open_shards
    from train.rewards import RewardScorer, load_reward_model, pair_rewards

    curate(_config(noisy, tmp_path / "c", score_with=str(reward_model)), _scorer(reward_model))
    tokenize(TokenizeConfig(input_dir=str(tmp_path / "c"), tokenizer=str(reward_model), out=str(tmp_path / "t"), workers=1))
    model, _ = load_reward_model(reward_model, str(reward_model), torch.float32, torch.device("cpu"))
    _, data, _ = open_shards(str(tmp_path / "t"), need_ref=False)
    with torch.inference_mode():
        chosen, rejected = pair_rewards(RewardScorer(model.eval()), collate_pairs(data.columns, np.arange(len(data)), pad_id=0))
    margins = dict(zip([data.ids[i] for i in range(len(data))], (chosen - rejected).double().numpy()))
    curated = pl.read_parquet(tmp_path / "c" / "train.parquet")
    assert curated.height == len(data) > 0
    np.testing.assert_allclose(curated["label_margin"].to_numpy(), [margins[i] for i in curated["id"]], atol=1e-5)


def test_implicit_reward_of_a_policy_and_its_reference(tiny_model_dir, noisy, tmp_path):
    """β·(Δ log π − Δ log π_ref): a policy trained a few steps towards the clean chosen answers ranks
    the flipped pairs first; a policy scored against itself gives every pair margin 0."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.batching import collate_pairs
    from train.logprobs import sequence_logps

    same = curate(_config(noisy, tmp_path / "same", score_with=str(tiny_model_dir), score_reference=str(tiny_model_dir)),
                  _scorer(tiny_model_dir, tiny_model_dir))
    assert (_all_rows(tmp_path / "same")["label_margin"] == 0).all()
    assert same.stats["label_noise"]["suspect"] == 0 and same.stats["label_noise"]["scorer"]["kind"] == "implicit_reward"

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    columns = _columns(PairIds(tokenizer, _Config()), _pairs(64, "train", seed=1))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    for _ in range(12):  # chosen up, rejected down: the preference the clean pairs hold
        logps = sequence_logps(policy, collate_pairs(columns, rng.choice(64, 16, replace=False), pad_id=0))
        loss = -torch.nn.functional.logsigmoid(0.1 * (logps.chosen - logps.rejected)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    policy.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")

    manifest = curate(_config(noisy, tmp_path / "implicit", score_with=str(tmp_path / "policy"),
                              score_reference=str(tiny_model_dir), suspect_margin=0.0),
                      _scorer(tmp_path / "policy", tiny_model_dir))
    rows = _all_rows(tmp_path / "implicit").sort("label_margin")
    flipped = _flipped_ids(noisy)
    assert set(rows["id"][:len(flipped)]) == flipped
    assert set(rows.filter(pl.col("label_suspect"))["id"]) == flipped
    assert manifest.stats["label_noise"]["scorer"]["beta"] == 0.1


def test_off_by_default_and_flagging_changes_no_decision(reward_model, noisy, tmp_path):
    plain = curate(_config(noisy, tmp_path / "plain"))
    for name in ("train.parquet", "eval.parquet"):
        assert pq.read_schema(tmp_path / "plain" / name).names == CURATED_SCHEMA.names  # no label columns when off
    assert "label_noise" not in plain.stats and plain.config["score_with"] is None
    flagged = curate(_config(noisy, tmp_path / "flagged", score_with=str(reward_model)), _scorer(reward_model))
    for name in ("train.parquet", "eval.parquet", "dropped.parquet"):
        with_labels = pl.read_parquet(tmp_path / "flagged" / name).drop("label_margin", "label_suspect")
        assert with_labels.equals(pl.read_parquet(tmp_path / "plain" / name)), name
    assert {k: v for k, v in flagged.stats.items() if k != "label_noise"} == plain.stats
    assert set(CURATED_COLUMNS) < set(pq.read_schema(tmp_path / "flagged" / "train.parquet").names)


def test_refusals(tiny_model_dir, noisy, tmp_path):
    with pytest.raises(UserError, match="need --score-with"):
        _config(noisy, tmp_path / "x", drop_suspect=True)
    with pytest.raises(UserError, match="need --score-with"):
        _config(noisy, tmp_path / "x", score_reference=str(tiny_model_dir))
    with pytest.raises(UserError, match="needs its scorer"):
        curate(_config(noisy, tmp_path / "x", score_with=str(tiny_model_dir)))
    with pytest.raises(UserError, match="not a reward model"):
        _scorer(tiny_model_dir)  # a causal LM alone would get an untrained head


def test_cli_scores_drops_and_reports(reward_model, noisy, tmp_path):
    from typer.testing import CliRunner

    from prefdata.cli import app

    done = CliRunner().invoke(app, ["curate", str(noisy), "--out", str(tmp_path / "cli"), "--score-with", str(reward_model),
                                    "--suspect-margin", "0.5", "--drop-suspect", "--score-device", "cpu",
                                    "--eval-fraction", "0.3"])
    assert done.exit_code == 0, done.output
    assert "suspect" in done.output
    manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert manifest["counts"]["dropped"] == {"suspect_label": 5}
