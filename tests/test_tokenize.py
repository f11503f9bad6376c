import json
import re
import shutil

import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from transformers import AutoTokenizer

from prefdata.tokenize import TokenizeConfig, batch_encoder, load_tokenizer, tokenize
from schemas.errors import UserError
from schemas.io import sha256_file
from schemas.manifest import Manifest
from schemas.records import prompt_hash
from schemas.shard import SHARD_SCHEMA
from tests.records_factory import make_record, write_records_dir

MULTI_TURN = make_record(
    [("system", "You are a helpful assistant."), ("user", "What is the capital of France?"),
     ("assistant", "Paris."), ("user", "And of Italy?")],
    "The capital of Italy is Rome.",
    "I do not know.",
)
SINGLE = make_record("Write a haiku about autumn.", "Leaves fall on the pond.", "No.", row=2)


def _read_shard(path):
    with pa.memory_map(str(path)) as source:
        return ipc.open_file(source).read_all()


@pytest.fixture
def records_dir(tmp_path):
    return write_records_dir(tmp_path / "curated", {"train": [MULTI_TURN, SINGLE], "eval": [SINGLE.model_copy()]})


def test_chat_prompt_ids_equal_apply_chat_template(records_dir, chat_tokenizer_dir, tmp_path):
    manifest = tokenize(TokenizeConfig(input_dir=str(records_dir), tokenizer=str(chat_tokenizer_dir), out=str(tmp_path / "shards")))
    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    table = _read_shard(tmp_path / "shards" / "train-00000.arrow")
    assert table.schema.equals(SHARD_SCHEMA)
    row = table.to_pylist()[0]
    messages = [m.model_dump() for m in MULTI_TURN.prompt]
    expected_prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert row["prompt_input_ids"] == expected_prompt
    # prompt + completion is the full conversation the template renders, minus its trailing newline.
    answer = {"role": "assistant", "content": "The capital of Italy is Rome."}
    full = tok.apply_chat_template(messages + [answer], tokenize=True)["input_ids"]
    assert row["prompt_input_ids"] + row["chosen_input_ids"] == full[: len(row["prompt_input_ids"]) + len(row["chosen_input_ids"])]
    for ids in (row["chosen_input_ids"], row["rejected_input_ids"]):
        assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
    assert tok.decode(row["chosen_input_ids"], skip_special_tokens=True) == "The capital of Italy is Rome."
    assert tok.bos_token_id not in row["prompt_input_ids"]  # ChatML renders no BOS, and none is added
    assert manifest.counts.read == 3 and manifest.counts.kept == 3
    assert [(s.name, s.split, s.rows) for s in manifest.shards] == [("train-00000.arrow", "train", 2), ("eval-00000.arrow", "eval", 1)]
    assert all(s.sha256 == sha256_file(tmp_path / "shards" / s.name) for s in manifest.shards)
    assert manifest.tokenizer.chat_template_sha256 is not None
    assert Manifest.read(tmp_path / "shards") == manifest


def test_plain_template_single_bos_and_eos(records_dir, base_tokenizer_dir, tmp_path):
    manifest = tokenize(TokenizeConfig(input_dir=str(records_dir), tokenizer=str(base_tokenizer_dir), out=str(tmp_path / "s")))
    tok = AutoTokenizer.from_pretrained(base_tokenizer_dir)
    row = _read_shard(tmp_path / "s" / "train-00000.arrow").to_pylist()[1]
    assert manifest.stats["template"] == "plain"
    assert row["prompt_input_ids"][0] == tok.bos_token_id and row["prompt_input_ids"].count(tok.bos_token_id) == 1
    assert tok.decode(row["prompt_input_ids"], skip_special_tokens=True) == "Human: Write a haiku about autumn.\n\nAssistant:"
    assert tok.decode(row["chosen_input_ids"]) == " Leaves fall on the pond.</s>"
    assert row["rejected_input_ids"][-1] == tok.eos_token_id


def test_too_long_dropped_and_counted(records_dir, chat_tokenizer_dir, tmp_path):
    manifest = tokenize(TokenizeConfig(input_dir=str(records_dir), tokenizer=str(chat_tokenizer_dir), out=str(tmp_path / "s"),
                                       max_length=40, max_prompt_length=30))
    assert manifest.counts.dropped == {"too_long": 1} and manifest.counts.kept == 2
    dropped = pl.read_parquet(tmp_path / "s" / "dropped.parquet")
    assert dropped["id"].to_list() == [MULTI_TURN.id] and dropped["drop_reason"].to_list() == ["too_long"]


def test_truncate_cuts_prompt_left_and_completions_right(tmp_path, chat_tokenizer_dir):
    long_answer = "the movie was a delight from start to finish " * 5
    rec = make_record([("user", "hello there " * 30)], "yes " + long_answer, "no " + long_answer)
    same_after_cut = make_record("hi", long_answer + "A", long_answer + "B", row=2)
    src = write_records_dir(tmp_path / "in", {"train": [rec, same_after_cut], "eval": []})
    manifest = tokenize(TokenizeConfig(input_dir=str(src), tokenizer=str(chat_tokenizer_dir), out=str(tmp_path / "s"),
                                       max_length=48, max_prompt_length=16, overflow="truncate"))
    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    full_prompt = tok.apply_chat_template([m.model_dump() for m in rec.prompt], add_generation_prompt=True, tokenize=True)["input_ids"]
    rows = _read_shard(tmp_path / "s" / "train-00000.arrow").to_pylist()
    assert manifest.counts.dropped == {"identical_after_truncation": 1}
    (row,) = rows
    assert row["prompt_input_ids"] == full_prompt[-16:]  # the newest 16 tokens survive
    assert len(row["prompt_input_ids"]) + len(row["chosen_input_ids"]) == 48
    assert manifest.stats["truncated_prompts"] == 1 and manifest.stats["truncated_completions"] == 4


def test_shards_read_by_polars_pyarrow_and_datasets(records_dir, chat_tokenizer_dir, tmp_path):
    import datasets

    out = tmp_path / "s"
    tokenize(TokenizeConfig(input_dir=str(records_dir), tokenizer=str(chat_tokenizer_dir), out=str(out), rows_per_shard=1))
    assert sorted(p.name for p in out.glob("*.arrow")) == ["eval-00000.arrow", "train-00000.arrow", "train-00001.arrow"]
    frame = pl.scan_ipc(str(out / "*.arrow")).select(pl.col("chosen_input_ids").list.len().alias("n")).collect()
    assert frame.height == 3
    ds = datasets.load_dataset("arrow", data_files=sorted(str(p) for p in out.glob("train-*.arrow")), split="train")
    assert ds.num_rows == 2 and ds.features["prompt_input_ids"].feature.dtype == "int32"
    assert _read_shard(out / "train-00001.arrow").num_rows == 1


def test_same_output_with_one_or_two_workers(chat_tokenizer_dir, tmp_path):
    """The pool changes where batches are encoded, never what is written or in which order."""
    records = [make_record(f"question {i}", f"answer {i}", f"other {i}", row=i) for i in range(9)]
    src = write_records_dir(tmp_path / "in", {"train": [MULTI_TURN, *records], "eval": [SINGLE]})
    options = dict(input_dir=str(src), tokenizer=str(chat_tokenizer_dir), max_length=40, max_prompt_length=30,
                   batch_rows=2, rows_per_shard=4)
    one = tokenize(TokenizeConfig(out=str(tmp_path / "one"), workers=1, **options))
    two = tokenize(TokenizeConfig(out=str(tmp_path / "two"), workers=2, **options))
    assert [(s.name, s.rows, s.sha256) for s in one.shards] == [(s.name, s.rows, s.sha256) for s in two.shards]
    assert len(one.shards) == 4 and one.counts == two.counts and one.counts.dropped == {"too_long": 1}
    assert sha256_file(tmp_path / "one" / "dropped.parquet") == sha256_file(tmp_path / "two" / "dropped.parquet")
    assert one.stats == two.stats
    ids = pl.read_ipc(tmp_path / "two" / "train-00000.arrow")["id"].to_list()
    assert ids == [r.id for r in records[:4]]  # input order, MULTI_TURN (too long) left out


def test_pairs_sharing_a_prompt_get_its_ids_and_hash(chat_tokenizer_dir, tmp_path):
    """Each distinct prompt of a batch is encoded once; interleaved rows must still get their own."""
    turns = [("system", "Be brief."), ("user", "Name a colour.")]
    records = [make_record(turns, "Red.", "Blue, I think.", row=1), make_record("Name a fruit.", "Apple.", "Pear?", row=2),
               make_record(turns, "Green.", "Red.", row=3), make_record(turns, "Blue.", "Green!", row=4)]
    src = write_records_dir(tmp_path / "in", {"train": records, "eval": []})
    tokenize(TokenizeConfig(input_dir=str(src), tokenizer=str(chat_tokenizer_dir), out=str(tmp_path / "s"), workers=1))
    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    rows = _read_shard(tmp_path / "s" / "train-00000.arrow").to_pylist()
    for record, row in zip(records, rows):
        messages = [m.model_dump() for m in record.prompt]
        assert row["prompt_input_ids"] == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
        assert row["prompt_id"] == prompt_hash(record.prompt)
        assert tok.decode(row["chosen_input_ids"], skip_special_tokens=True) == record.chosen[0].content
    assert rows[0]["prompt_id"] == rows[2]["prompt_id"] == rows[3]["prompt_id"] != rows[1]["prompt_id"]


def test_batch_encoder_ignores_stored_truncation_and_keeps_special_tokens(chat_tokenizer_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    tok.backend_tokenizer.enable_truncation(4)  # a tokenizer.json saved with truncation switched on
    tok.save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(str(tmp_path / "tok"))
    texts = ["a fairly long sentence about the weather<|im_end|>", "", "short"]
    ids = batch_encoder(tok)(texts)
    assert ids == tok(texts, add_special_tokens=False)["input_ids"]
    assert len(ids[0]) > 4 and ids[0][-1] == tok.eos_token_id and ids[1] == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tokenizer": "/nonexistent/tok"}, "does not exist"),
        ({"max_length": 100, "max_prompt_length": 100}, "must be smaller than --max-length"),
        ({"template": "chat", "tokenizer": "BASE"}, "has no chat template"),
    ],
)
def test_bad_options(records_dir, chat_tokenizer_dir, base_tokenizer_dir, tmp_path, kwargs, message):
    options = {"tokenizer": str(chat_tokenizer_dir), **kwargs}
    if options["tokenizer"] == "BASE":
        options["tokenizer"] = str(base_tokenizer_dir)
    with pytest.raises(UserError, match=message):
        tokenize(TokenizeConfig(input_dir=str(records_dir), out=str(tmp_path / "s"), **options))
    assert not (tmp_path / "s").exists()


def test_prompt_limit_defaults_to_half_of_max_length(records_dir, chat_tokenizer_dir, tmp_path):
    from train.cli import build_config

    # `prefdata tokenize --max-length 512`: the flag alone, as the command line builds the config
    config = build_config(TokenizeConfig, {}, {"input_dir": str(records_dir), "tokenizer": str(chat_tokenizer_dir),
                                               "out": str(tmp_path / "s"), "max_length": 512, "max_prompt_length": None})
    assert config.max_prompt_length == 256
    manifest = tokenize(TokenizeConfig(input_dir=str(records_dir), tokenizer=str(chat_tokenizer_dir), out=str(tmp_path / "s"),
                                       max_length=41))
    assert (manifest.config["max_length"], manifest.config["max_prompt_length"]) == (41, 20)  # what ran is saved
    assert TokenizeConfig(input_dir="r", tokenizer="t", out="o").max_prompt_length == 512  # the old default at 1024
    assert TokenizeConfig(input_dir="r", tokenizer="t", out="o", max_length=512, max_prompt_length=400).max_prompt_length == 400


def test_directory_without_tokenizer_or_records(tmp_path, chat_tokenizer_dir, records_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no tokenizer files"):
        tokenize(TokenizeConfig(input_dir=str(records_dir), tokenizer=str(tmp_path / "empty"), out=str(tmp_path / "s")))
    with pytest.raises(UserError, match="no manifest.json"):
        tokenize(TokenizeConfig(input_dir=str(tmp_path / "empty"), tokenizer=str(chat_tokenizer_dir), out=str(tmp_path / "s")))


def test_a_damaged_record_file_or_an_out_over_the_input_is_one_line_and_nothing_is_written(records_dir, chat_tokenizer_dir,
                                                                                             tmp_path):
    def run(input_dir, out):
        return tokenize(TokenizeConfig(input_dir=str(input_dir), tokenizer=str(chat_tokenizer_dir), out=str(out)))

    with pytest.raises(UserError, match="^" + re.escape(f"--out {records_dir}: holds the input {records_dir}")):
        run(records_dir, records_dir)
    assert (records_dir / "train.parquet").is_file()
    damaged = tmp_path / "damaged"
    shutil.copytree(records_dir, damaged)
    data = (damaged / "train.parquet").read_bytes()
    (damaged / "train.parquet").write_bytes(data[:len(data) // 2])  # cut short, as a copy that died
    with pytest.raises(UserError, match=r"train.parquet: not a readable parquet file \(.*\); re-run prefdata curate"):
        run(damaged, tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_cli_one_line_error_and_success(records_dir, chat_tokenizer_dir, tmp_path):
    import subprocess
    import sys

    base = [sys.executable, "-m", "prefdata", "tokenize", str(records_dir), "--out", str(tmp_path / "s")]
    bad = subprocess.run(base + ["--tokenizer", str(tmp_path / "nope")], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
    ok = subprocess.run(base + ["--tokenizer", str(chat_tokenizer_dir), "--workers", "2"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "read 3, kept 3" in ok.stdout
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["stage"] == "tokenize" and manifest["config"]["workers"] == 2


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_a_special_tokens_string_in_a_message_drops_the_record_with_its_reason(chat_tokenizer_dir, tmp_path, template):
    """Encoded, `<|im_end|>` or `</s>` inside an answer is that token: an end of turn or of text in
    the middle of what the model learns, where the shard format promises one at the end."""
    tokenizer = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    injected = [make_record("Say it.", f"Done{tokenizer.eos_token} and more.", "No.", row=3),
                make_record("Quote <|im_start|>user please.", "Sure.", "No.", row=4)]
    records = write_records_dir(tmp_path / "records", {"train": [SINGLE, *injected], "eval": []})
    manifest = tokenize(TokenizeConfig(input_dir=str(records), tokenizer=str(chat_tokenizer_dir), out=str(tmp_path / "s"),
                                       template=template))
    assert manifest.counts.model_dump() == {"read": 3, "kept": 1, "dropped": {"special_token_in_text": 2}}
    dropped = pl.read_parquet(tmp_path / "s" / "dropped.parquet")
    assert sorted(dropped["id"].to_list()) == sorted(r.id for r in injected)
    # Kept on request, the string encoded as the token itself (TRL's behaviour).
    kept = tokenize(TokenizeConfig(input_dir=str(records), tokenizer=str(chat_tokenizer_dir), out=str(tmp_path / "k"),
                                   template=template, special_tokens_in_text="keep"))
    assert kept.counts.kept == 3 and kept.config["special_tokens_in_text"] == "keep"
