import json
import subprocess
import sys

import pytest

from prefdata.inspect import inspect_dir
from prefdata.tokenize import TokenizeConfig, tokenize
from schemas.errors import UserError
from tests.records_factory import make_record, write_records_dir

RECORDS = [
    make_record("abc", "12345", "1", row=1),
    make_record("abcdefghij", "1234567890", "12", row=2),
    make_record([("system", "sys"), ("user", "question [bold]")], "x" * 100, "yy", row=3),
]


@pytest.fixture
def shards(tmp_path, chat_tokenizer_dir):
    src = write_records_dir(tmp_path / "cur", {"train": RECORDS[:2], "eval": RECORDS[2:]})
    tokenize(TokenizeConfig(input_dir=str(src), tokenizer=str(chat_tokenizer_dir), out=str(tmp_path / "shards")))
    return src, tmp_path / "shards"


def test_record_set_lengths_in_characters(shards):
    src, _ = shards
    report = inspect_dir(src)
    assert report["stage"] == "curate" and report["length_unit"] == "characters"
    assert report["rows_per_file"] == {"train.parquet": 2, "eval.parquet": 1}
    # prompt chars: 3, 10, 3+15=18 → nearest-rank p50 = 10, max = 18
    assert report["lengths"]["prompt"] == {"p50": 10, "p90": 18, "p99": 18, "max": 18}
    assert report["lengths"]["chosen"]["max"] == 100 and report["lengths"]["rejected"]["p50"] == 2


def test_shards_lengths_in_tokens_and_samples_decoded(shards, chat_tokenizer_dir):
    from transformers import AutoTokenizer

    _, shard_dir = shards
    report = inspect_dir(shard_dir, sample=2, seed=1)
    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    assert report["length_unit"] == "tokens" and report["tokenizer"]["vocab_size"] == len(tok)
    assert report["rows_per_file"] == {"train-00000.arrow": 2, "eval-00000.arrow": 1}
    assert report["counts"] == {"read": 3, "kept": 3, "dropped": {}}
    expected_max = len(tok.apply_chat_template([{"role": "system", "content": "sys"}, {"role": "user", "content": "question [bold]"}],
                                               add_generation_prompt=True, tokenize=True)["input_ids"])
    assert report["lengths"]["prompt"]["max"] == expected_max
    assert len(report["samples"]) == 2 and all(s["chosen"].endswith("<|im_end|>") for s in report["samples"])


def test_cli_json_and_table(shards):
    _, shard_dir = shards
    out = subprocess.run([sys.executable, "-m", "prefdata", "inspect", str(shard_dir), "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["stage"] == "tokenize"
    table = subprocess.run([sys.executable, "-m", "prefdata", "inspect", str(shard_dir), "--sample", "1"], capture_output=True, text=True)
    assert table.returncode == 0 and "lengths (tokens)" in table.stdout and "train-00000.arrow" in table.stdout


def test_missing_shard_is_one_line_error(shards):
    _, shard_dir = shards
    (shard_dir / "eval-00000.arrow").unlink()
    with pytest.raises(UserError, match="listed in the manifest but missing"):
        inspect_dir(shard_dir)
    out = subprocess.run([sys.executable, "-m", "prefdata", "inspect", str(shard_dir.parent / "nothing")], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1


@pytest.mark.parametrize(("name", "stage"), [("train-00000.arrow", "tokenize"), ("train.parquet", "curate")])
def test_truncated_file_is_one_line_naming_it(shards, name, stage):
    src, shard_dir = shards
    path = (shard_dir if stage == "tokenize" else src) / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a copy that stopped half way
    out = subprocess.run([sys.executable, "-m", "prefdata", "inspect", str(path.parent)], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith(f"prefdata: error: {path}: not a readable ")
    assert f"truncated or corrupted: re-run prefdata {stage}" in out.stderr
