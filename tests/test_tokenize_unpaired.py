"""Unpaired (KTO) record sets through tokenize, precompute-ref and inspect (issue 27)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
import torch

from prefdata.inspect import inspect_dir
from prefdata.tokenize import KL_RULE, TokenizeConfig, tokenize
from schemas.errors import UserError
from schemas.io import sha256_file
from schemas.manifest import Counts, Manifest
from schemas.records import UnpairedRecord, unpaired_to_table
from schemas.shard import UNPAIRED_SHARD_SCHEMA, UNPAIRED_SHARD_WITH_REF_SCHEMA
from tests.conftest import CORPUS
from tests.records_factory import make_record, write_records_dir
from train.data import open_shards
from train.reference import MARKERS_DIR, PrecomputeRefConfig, precompute_ref

SYSTEM_TURNS = [("system", "You are a helpful assistant."), ("user", "What is the capital of France?"),
                ("assistant", "Paris."), ("user", "And of Italy?")]


def _messages(x, role):
    return [{"role": role, "content": x}] if isinstance(x, str) else [{"role": r, "content": c} for r, c in x]


def unpaired(prompt, completion, label: bool, row: int = 1) -> UnpairedRecord:
    return UnpairedRecord.model_validate(dict(prompt=_messages(prompt, "user"), completion=_messages(completion, "assistant"),
                                              label=label, source="test", source_format="test", source_row=row))


def write_unpaired_dir(out: Path, splits: dict[str, list[UnpairedRecord]], stage: str = "curate") -> Path:
    """An unpaired record set in the curate layout (train.parquet, eval.parquet, manifest.json)."""
    out.mkdir(parents=True, exist_ok=True)
    for stem, records in splits.items():
        pq.write_table(unpaired_to_table(records), out / f"{stem}.parquet")
    total = sum(len(r) for r in splits.values())
    Manifest(stage=stage, package_version="test", config={}, counts=Counts(read=total, kept=total)).write(out)
    return out


def _read(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        return ipc.open_file(source).read_all()


def _rows(directory: Path, split: str = "train") -> list[dict]:
    return [row for p in sorted(directory.glob(f"{split}-*.arrow")) for row in _read(p).to_pylist()]


def _tokenize(src: Path, out: Path, tokenizer: Path, **options) -> Manifest:
    return tokenize(TokenizeConfig(input_dir=str(src), tokenizer=str(tokenizer), out=str(out), **options))


def _kl_sources(rows: list[dict]) -> list[int]:
    """The KL rule written out the slow way: the nearest earlier row with another prompt, else
    (the split's leading rows of one prompt) the first row with another prompt."""
    sources = []
    for i, row in enumerate(rows):
        earlier = [j for j in range(i - 1, -1, -1) if rows[j]["prompt_id"] != row["prompt_id"]]
        sources.append(earlier[0] if earlier else next(j for j in range(len(rows)) if rows[j]["prompt_id"] != row["prompt_id"]))
    return sources


# ---------------------------------------------------------------------------------------------
# tokenize


@pytest.mark.parametrize("tokenizer", ["chat", "base"])
def test_unpaired_ids_equal_the_pair_path(tokenizer, chat_tokenizer_dir, base_tokenizer_dir, tmp_path):
    """A completion is rendered exactly as a pair's chosen answer: same prompt ids, prompt id and
    completion ids, for a multi-turn prompt with a system turn and for the plain template."""
    tok = chat_tokenizer_dir if tokenizer == "chat" else base_tokenizer_dir
    answers = [(SYSTEM_TURNS, "The capital of Italy is Rome.", "I do not know."),
               ("Write a haiku about autumn.", "Leaves fall on the pond.", "No."),
               ("Explain a hash table.", "Keys map to buckets.", "It is a table.")]
    pairs = [make_record(p, c, r, row=i) for i, (p, c, r) in enumerate(answers)]
    # Each answer once as desirable (the pair's chosen), once as undesirable (its rejected).
    records = [unpaired(p, a, label, row=i) for i, (p, c, r) in enumerate(answers) for a, label in ((c, True), (r, False))]
    paired_dir = write_records_dir(tmp_path / "pairs", {"train": pairs, "eval": []})
    unpaired_dir = write_unpaired_dir(tmp_path / "unpaired", {"train": records, "eval": []})
    _tokenize(paired_dir, tmp_path / "ps", tok)
    manifest = _tokenize(unpaired_dir, tmp_path / "us", tok)

    table = _read(tmp_path / "us" / "train-00000.arrow")
    assert table.schema.equals(UNPAIRED_SHARD_SCHEMA)
    rows, pair_rows = table.to_pylist(), _rows(tmp_path / "ps")
    for i, pair in enumerate(pair_rows):
        for row, answer in ((rows[2 * i], "chosen_input_ids"), (rows[2 * i + 1], "rejected_input_ids")):
            assert row["prompt_input_ids"] == pair["prompt_input_ids"] and row["prompt_id"] == pair["prompt_id"]
            assert row["completion_input_ids"] == pair[answer]
    assert [r["label"] for r in rows] == [True, False] * 3 and [r["id"] for r in rows] == [r.id for r in records]
    assert manifest.stats["kind"] == "unpaired" and manifest.stats["kl_rule"] == KL_RULE
    assert manifest.stats["labels_per_split"] == {"train": {"desirable": 3, "undesirable": 3}}
    assert manifest.counts == Counts(read=6, kept=6)
    assert Manifest.read(tmp_path / "ps").stats["kind"] == "paired"


def test_kl_rule_mismatched_prompts_over_kept_rows_any_workers_or_batch(chat_tokenizer_dir, tmp_path):
    """Leading rows of one prompt take the first other prompt's completion; every other row the
    nearest earlier kept row with another prompt; a dropped row is not a source; the shards are
    the same bytes for any worker count, batch size and shard size."""
    spec = [("A", 0), ("A", 1), ("B", 2), ("D", 3), ("C", 4), ("C", 5), ("A", 6), ("E", 7), ("E", 8)]
    too_long = "the movie was a delight from start to finish " * 12
    records = [unpaired(f"question {p}", too_long if p == "D" else f"answer {i} {p}", i % 3 != 0, row=i) for p, i in spec]
    src = write_unpaired_dir(tmp_path / "in", {"train": records, "eval": records[6:]})
    options = dict(max_length=64, max_prompt_length=32)
    base = _tokenize(src, tmp_path / "base", chat_tokenizer_dir, workers=1, **options)
    rows = _rows(tmp_path / "base")
    assert base.counts.dropped == {"too_long": 1}  # D
    assert [r["id"] for r in rows] == [r.id for r in records if r.prompt[0].content != "question D"]
    sources = _kl_sources(rows)
    assert sources == [2, 2, 1, 2, 2, 4, 5, 5]  # rows A A B C C A E E (D dropped)
    for row, source in zip(rows, sources):
        assert row["kl_completion_input_ids"] == rows[source]["completion_input_ids"]
        assert row["prompt_id"] != rows[source]["prompt_id"]
    eval_rows = _rows(tmp_path / "base", "eval")  # per split: rows A E E start their own
    assert [r["kl_completion_input_ids"] for r in eval_rows] == [eval_rows[1]["completion_input_ids"]] + \
        [eval_rows[0]["completion_input_ids"]] * 2
    for n, (workers, batch_rows, rows_per_shard) in enumerate([(2, 1, 2), (2, 2, 3), (1, 3, 100)]):
        other = _tokenize(src, tmp_path / f"o{n}", chat_tokenizer_dir, workers=workers, batch_rows=batch_rows,
                          rows_per_shard=rows_per_shard, **options)
        assert _rows(tmp_path / f"o{n}") == rows and _rows(tmp_path / f"o{n}", "eval") == eval_rows
        assert other.counts == base.counts and other.stats == base.stats
        assert sha256_file(tmp_path / f"o{n}" / "dropped.parquet") == sha256_file(tmp_path / "base" / "dropped.parquet")
    # Bytes as well as rows where only the worker count differs (batches are the files' record batches).
    one = _tokenize(src, tmp_path / "one", chat_tokenizer_dir, workers=1, batch_rows=1, rows_per_shard=2, **options)
    assert [(s.name, s.sha256) for s in one.shards] == [(s.name, s.sha256) for s in Manifest.read(tmp_path / "o0").shards]
    assert pl.read_parquet(tmp_path / "base" / "dropped.parquet").columns == [
        "id", "split", "drop_reason", "prompt_tokens", "completion_tokens"]


@pytest.mark.parametrize("batch_rows", [1, 1024])
def test_a_split_of_one_prompt_is_refused_in_one_line(chat_tokenizer_dir, tmp_path, batch_rows):
    train = [unpaired("q one", "a", True, row=1), unpaired("q two", "b", False, row=2)]
    same = [unpaired("q three", f"answer {i}", bool(i % 2), row=i) for i in range(3)]
    src = write_unpaired_dir(tmp_path / "in", {"train": train, "eval": same})
    with pytest.raises(UserError, match=r"^eval split: all 3 rows share one prompt, so KTO's KL term") as error:
        _tokenize(src, tmp_path / "s", chat_tokenizer_dir, batch_rows=batch_rows, workers=1)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "s").exists() and not list(tmp_path.glob(".tmp-*"))


def test_kl_completion_cut_to_max_length_and_completions_follow_the_pair_policy(chat_tokenizer_dir, tmp_path):
    long_prompt = "hello there, can you help me with the weather " * 2
    long_answer = "the movie was a delight from start to finish " * 6
    records = [unpaired(long_prompt, "Yes.", True, row=1), unpaired("hi", long_answer, False, row=2),
               unpaired("hey", long_answer * 3, True, row=3)]
    src = write_unpaired_dir(tmp_path / "in", {"train": records, "eval": []})
    _tokenize(src, tmp_path / "free", chat_tokenizer_dir)
    free = _rows(tmp_path / "free")
    prompt_len = [len(r["prompt_input_ids"]) for r in free]
    answer_len = [len(r["completion_input_ids"]) for r in free]
    # Row 2 fits exactly; row 1's KL completion (row 2's answer) does not fit after its long prompt;
    # row 3's own completion does not fit.
    max_length = prompt_len[1] + answer_len[1]
    assert prompt_len[0] + answer_len[1] > max_length and prompt_len[2] + answer_len[2] > max_length
    manifest = _tokenize(src, tmp_path / "s", chat_tokenizer_dir, max_length=max_length, max_prompt_length=prompt_len[0])
    rows = _rows(tmp_path / "s")
    assert manifest.counts.dropped == {"too_long": 1} and manifest.counts.kept == 2
    assert pl.read_parquet(tmp_path / "s" / "dropped.parquet")["completion_tokens"].to_list() == [answer_len[2]]
    cut = rows[0]["kl_completion_input_ids"]
    assert len(rows[0]["prompt_input_ids"]) + len(cut) == max_length and cut == free[1]["completion_input_ids"][: len(cut)]
    assert rows[1]["kl_completion_input_ids"] == free[0]["completion_input_ids"]  # fits: whole
    assert manifest.stats["truncated_kl_completions"] == 1
    assert sum(manifest.stats["labels_per_split"]["train"].values()) == manifest.stats["rows_per_split"]["train"] == 2

    truncated = _tokenize(src, tmp_path / "t", chat_tokenizer_dir, max_length=max_length,
                          max_prompt_length=prompt_len[0], overflow="truncate")
    rows = _rows(tmp_path / "t")
    assert truncated.counts == Counts(read=3, kept=3) and truncated.stats["truncated_completions"] == 1
    assert all(len(r["prompt_input_ids"]) + max(len(r["completion_input_ids"]), len(r["kl_completion_input_ids"])) <= max_length
               for r in rows)
    assert rows[2]["completion_input_ids"] == free[2]["completion_input_ids"][: max_length - prompt_len[2]]


def test_mixed_kinds_are_refused(chat_tokenizer_dir, tmp_path):
    src = write_records_dir(tmp_path / "in", {"train": [make_record("q", "a", "b")], "eval": []})
    pq.write_table(unpaired_to_table([unpaired("q", "a", True)]), src / "eval.parquet")
    with pytest.raises(UserError, match="mix paired and unpaired records"):
        _tokenize(src, tmp_path / "s", chat_tokenizer_dir)


def test_crash_leaves_the_old_shards_and_a_rerun_redoes_cleanly(chat_tokenizer_dir, tmp_path, monkeypatch):
    import prefdata.tokenize as tokenize_module

    records = [unpaired(f"question {i % 3}", f"answer {i}", i % 2 == 0, row=i) for i in range(8)]
    src = write_unpaired_dir(tmp_path / "in", {"train": records[:6], "eval": records[6:]})
    out = tmp_path / "s"
    first = _tokenize(src, out, chat_tokenizer_dir, rows_per_shard=4)
    before = {p.name: sha256_file(p) for p in out.iterdir()}

    real_close = tokenize_module.KlCompletions.close

    def crash_on_eval(self):
        if self.split == "eval":
            raise KeyboardInterrupt("power cut")
        real_close(self)

    monkeypatch.setattr(tokenize_module.KlCompletions, "close", crash_on_eval)
    with pytest.raises(KeyboardInterrupt):
        _tokenize(src, out, chat_tokenizer_dir, rows_per_shard=2)
    assert {p.name: sha256_file(p) for p in out.iterdir()} == before  # untouched, no half-written split
    assert not list(tmp_path.glob(".tmp-*"))
    monkeypatch.setattr(tokenize_module.KlCompletions, "close", real_close)
    again = _tokenize(src, out, chat_tokenizer_dir, rows_per_shard=4)
    assert {p.name: sha256_file(p) for p in out.iterdir() if p.suffix == ".arrow"} == \
        {k: v for k, v in before.items() if k.endswith(".arrow")}
    assert again.shards == first.shards


# ---------------------------------------------------------------------------------------------
# precompute-ref


@pytest.fixture(scope="module")
def unpaired_shards(tiny_model_dir, tmp_path_factory) -> Path:
    """18 unpaired rows over 6 prompts, tokenized with the tiny model's tokenizer: 3 train shards + 1 eval."""
    records = [unpaired(CORPUS[i % 6], CORPUS[(i + 2) % 7][: 6 + (7 * i) % 40], i % 3 != 1, row=i)
               for i in range(18)]
    root = tmp_path_factory.mktemp("unpaired")
    write_unpaired_dir(root / "records", {"train": records[:15], "eval": records[15:]})
    _tokenize(root / "records", root / "shards", tiny_model_dir, rows_per_shard=5, max_length=48, max_prompt_length=24,
              overflow="truncate")
    return root / "shards"


@pytest.fixture
def shards(unpaired_shards, tmp_path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(unpaired_shards, out)
    return out


def _direct_logps(model, prompt: list[int], completion: list[int]) -> float:
    """Sum of the completion tokens' float32 log-probs, from the model's own full forward."""
    ids = torch.tensor([prompt + completion])
    logps = model(input_ids=ids).logits.float()[0, :-1].log_softmax(-1)
    token = logps.gather(-1, ids[0, 1:, None]).squeeze(-1)
    return float(token[len(prompt) - 1:].sum())


def test_precompute_ref_stores_completion_and_kl_logps(shards, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    result = precompute_ref(PrecomputeRefConfig(shards=str(shards), model=str(tiny_model_dir), batch_tokens=96, verify=4))
    manifest = result.manifest
    assert manifest.stage == "precompute-ref" and manifest.stats["verified_rows"] == 4
    assert manifest.stats["tokenize"]["stats"]["kind"] == "unpaired"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    checked = 0
    with torch.no_grad():
        for shard in manifest.shards:
            table = _read(shards / shard.name)
            assert table.schema.equals(UNPAIRED_SHARD_WITH_REF_SCHEMA) and sha256_file(shards / shard.name) == shard.sha256
            for row in table.to_pylist():
                for column, ref in (("completion_input_ids", "ref_completion_logps"), ("kl_completion_input_ids", "ref_kl_logps")):
                    expected = _direct_logps(model, row["prompt_input_ids"], row[column])
                    assert row[ref] == pytest.approx(expected, abs=1e-4, rel=1e-5)
                checked += 1
    assert checked == 18
    lazy = pl.scan_ipc(str(shards / "*.arrow"))
    assert lazy.select(pl.col("ref_kl_logps").sum(), pl.col("label").sum()).collect().row(0)[1] == 12
    _, train, eval_split = open_shards(shards, need_ref=True)  # the trainer's view: labels and both ref columns
    first = _read(shards / "train-00000.arrow")
    completion, kl = train.ref_logps(np.arange(5))
    assert np.array_equal(completion, first["ref_completion_logps"].to_numpy()) and np.array_equal(kl, first["ref_kl_logps"].to_numpy())
    assert train.kind == "unpaired" and train.labels[:5].tolist() == first["label"].to_pylist() and len(eval_split) == 3


def test_precompute_ref_resumes_and_force_replaces(unpaired_shards, shards, tiny_model_dir, tmp_path, monkeypatch):
    import train.reference as reference_module
    from train.tiny import build_model

    def run(model, directory=shards, **options):
        return precompute_ref(PrecomputeRefConfig(shards=str(directory), model=str(model), batch_tokens=96, **options))

    whole = tmp_path / "whole"
    shutil.copytree(unpaired_shards, whole)
    run(tiny_model_dir, whole)
    real_score = reference_module._LazyReference.score_shard

    def crash_on_second_shard(self, shards_dir, name, *args):
        if name == "train-00001.arrow":
            raise KeyboardInterrupt("power cut")
        return real_score(self, shards_dir, name, *args)

    monkeypatch.setattr(reference_module._LazyReference, "score_shard", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model_dir)
    monkeypatch.setattr(reference_module._LazyReference, "score_shard", real_score)
    assert [p.name for p in (shards / MARKERS_DIR).iterdir()] == ["train-00000.arrow.json"]
    resumed = run(tiny_model_dir)
    assert resumed.skipped == ["train-00000.arrow"] and len(resumed.scored) == 3
    assert {p.name: sha256_file(p) for p in shards.glob("*.arrow")} == {p.name: sha256_file(p) for p in whole.glob("*.arrow")}
    assert run(tiny_model_dir).scored == []  # same model: nothing to do
    first = _read(shards / "train-00000.arrow")

    other = build_model(tiny_model_dir, tmp_path / "other", seed=1)
    with pytest.raises(UserError, match="--force"):
        run(other)
    assert run(other, force=True).scored == [s.name for s in Manifest.read(shards).shards]
    table = _read(shards / "train-00000.arrow")
    assert table.schema.equals(UNPAIRED_SHARD_WITH_REF_SCHEMA)  # replaced, not added twice
    assert np.abs(table["ref_completion_logps"].to_numpy() - first["ref_completion_logps"].to_numpy()).max() > 0.01
    assert table.select(["completion_input_ids", "kl_completion_input_ids", "label"]).equals(
        first.select(["completion_input_ids", "kl_completion_input_ids", "label"]))


# ---------------------------------------------------------------------------------------------
# inspect


def test_inspect_unpaired_records_and_shards(unpaired_shards, tiny_model_dir):
    records = inspect_dir(unpaired_shards.parent / "records", sample=1)
    assert records["kind"] == "unpaired" and records["length_unit"] == "characters"
    assert set(records["lengths"]) == {"prompt", "completion"}
    assert records["labels"] == {"train.parquet": {"desirable": 10, "undesirable": 5}, "eval.parquet": {"desirable": 2, "undesirable": 1}}
    assert records["samples"][0]["label"] in (True, False) and records["samples"][0]["completion"].startswith("[assistant] ")

    report = inspect_dir(unpaired_shards, sample=2)
    assert report["kind"] == "unpaired" and set(report["lengths"]) == {"prompt", "completion", "kl_completion"}
    assert sum(v["desirable"] for v in report["labels"].values()) == 12
    assert report["rows_per_file"] == {"train-00000.arrow": 5, "train-00001.arrow": 5, "train-00002.arrow": 5, "eval-00000.arrow": 3}
    frame = pl.scan_ipc(str(unpaired_shards / "*.arrow")).select(pl.col("kl_completion_input_ids").list.len()).collect()
    assert report["lengths"]["kl_completion"]["max"] == frame.to_series().max() <= 48
    assert all("kl_completion" in s and "label" in s for s in report["samples"])

    out = subprocess.run([sys.executable, "-m", "prefdata", "inspect", str(unpaired_shards)], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    assert "unpaired records" in out.stdout and "undesirable" in out.stdout and "kl_completion" in out.stdout
    as_json = subprocess.run([sys.executable, "-m", "prefdata", "inspect", str(unpaired_shards), "--json"], capture_output=True, text=True)
    assert json.loads(as_json.stdout)["labels"]["eval-00000.arrow"] == {"desirable": 2, "undesirable": 1}
