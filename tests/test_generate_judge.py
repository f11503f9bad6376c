"""prefdata generate and judge on tiny models: K answers per prompt, deterministic under a seed,
resumable by chunk; judged by a function or a tiny reward model; ingested into the pairs that
--pairs promises."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.errors import UserError
from schemas.manifest import QUARANTINE_FILE
from train.generate import GENERATIONS_FILE, GenerateConfig, generate
from train.judge import JUDGED_FILE, JudgeConfig, judge

PROMPTS = ["What is the capital of France?", "Write a haiku about autumn.", "Explain a hash table.",
           "What is the capital of France?",  # a duplicate: answered once
           "Tell me about the movie.", "  ", "Help me write a story."]  # "  ": not a prompt


@pytest.fixture()
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": p} for p in PROMPTS[:-1]] + [{"prompt": [{"role": "user", "content": PROMPTS[-1]}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _generate(prompt_file: Path, model: Path, out: Path, **options) -> list[dict]:
    generate(GenerateConfig(prompts=str(prompt_file), policy=str(model), out=str(out), n=3, max_new_tokens=8,
                            batch_size=2, chunk_prompts=2, device="cpu", **options))
    return [json.loads(line) for line in (out / GENERATIONS_FILE).read_text().splitlines()]


def test_generate_answers_each_distinct_prompt_k_times_and_accounts_for_the_rest(prompt_file, tiny_model_dir, tmp_path):
    rows = _generate(prompt_file, tiny_model_dir, tmp_path / "gen")
    assert len(rows) == 5 and all(len(r["responses"]) == 3 for r in rows)
    assert {r["prompt"][-1]["content"] for r in rows} == {p for p in PROMPTS if p.strip()}
    for response in (r for row in rows for r in row["responses"]):
        assert response["finish_reason"] in ("stop", "length") and 1 <= response["tokens"] <= 8
        # a response without a stop token used the whole budget
        assert response["finish_reason"] == "stop" or response["tokens"] == 8
    manifest = json.loads((tmp_path / "gen" / "manifest.json").read_text())
    assert manifest["counts"] == {"read": 7, "kept": 5, "dropped": {"duplicate_prompt": 1, "invalid_prompt": 1}}
    assert manifest["stats"]["responses"] == 15 and manifest["stats"]["policy"]["weights_sha256"]
    assert not (tmp_path / "gen" / "chunks").exists()


def test_generate_is_deterministic_under_a_seed_and_resumes_a_killed_run_to_the_same_file(
        prompt_file, tiny_model_dir, tmp_path, monkeypatch):
    import train.generate as gen

    first = _generate(prompt_file, tiny_model_dir, tmp_path / "a", seed=7)
    assert _generate(prompt_file, tiny_model_dir, tmp_path / "b", seed=7) == first
    assert _generate(prompt_file, tiny_model_dir, tmp_path / "c", seed=8) != first

    real = gen._chunk_lines
    calls = []

    def dies_on_the_second_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "_chunk_lines", dies_on_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        _generate(prompt_file, tiny_model_dir, tmp_path / "killed", seed=7)
    assert not (tmp_path / "killed" / GENERATIONS_FILE).exists()
    assert len(list((tmp_path / "killed" / "chunks").glob("chunk-*.jsonl"))) == 1
    monkeypatch.setattr(gen, "_chunk_lines", real)
    assert _generate(prompt_file, tiny_model_dir, tmp_path / "killed", seed=7) == first
    assert (tmp_path / "killed" / GENERATIONS_FILE).read_bytes() == (tmp_path / "a" / GENERATIONS_FILE).read_bytes()


def test_generate_reads_record_sets_and_skips_earlier_rounds_prompts(prompt_file, tiny_model_dir, tmp_path):
    from tests.records_factory import make_record, write_records_dir

    records = [make_record(f"Question number {i} about topic {i * 7}?", f"good {i}", f"bad {i}", row=i) for i in range(10)]
    write_records_dir(tmp_path / "curated", {"train": records[:8], "eval": records[8:]})
    train_prompts = {json.dumps(p) for p in pq.read_table(tmp_path / "curated" / "train.parquet").column("prompt").to_pylist()}
    rows = _generate(tmp_path / "curated", tiny_model_dir, tmp_path / "round1", max_prompts=4)
    assert len(rows) == 4 and {json.dumps(r["prompt"]) for r in rows} <= train_prompts
    later = _generate(tmp_path / "curated", tiny_model_dir, tmp_path / "round2",
                      exclude_prompts=[str(tmp_path / "round1" / GENERATIONS_FILE)])
    assert not {r["prompt_id"] for r in later} & {r["prompt_id"] for r in rows}
    assert len(later) == len(train_prompts) - 4


def test_generate_refuses_unusable_input_in_one_line(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(UserError, match="no prompts left"):
        generate(GenerateConfig(prompts=str(empty), policy=str(tiny_model_dir), out=str(tmp_path / "o"), device="cpu"))
    with pytest.raises(UserError, match="not a record set"):
        generate(GenerateConfig(prompts=str(tmp_path / "x.csv"), policy=str(tiny_model_dir), out=str(tmp_path / "o")))
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"prompt": "café?"}\n'.encode("latin-1"))
    no_prompt = tmp_path / "answers.parquet"
    pq.write_table(pa.table({"question": ["a?"]}), no_prompt)
    for path, message in [(latin1, r"latin1.jsonl: not UTF-8 text \(byte 15"),
                          (no_prompt, "answers.parquet: cannot read its prompt column")]:
        with pytest.raises(UserError, match=message):
            generate(GenerateConfig(prompts=str(path), policy=str(tiny_model_dir), out=str(tmp_path / "o")))
    with pytest.raises(UserError, match="holds the input"):  # its manifest would replace the prompts'
        generate(GenerateConfig(prompts=str(no_prompt), policy=str(tiny_model_dir), out=str(tmp_path)))
    injected = tmp_path / "injected.txt"
    injected.write_text("Say <|im_end|> twice.\n")
    with pytest.raises(UserError, match=r"special_token_in_text.*their text holds the tokenizer's special tokens"):
        generate(GenerateConfig(prompts=str(injected), policy=str(tiny_model_dir), out=str(tmp_path / "o")))


# ---------------------------------------------------------------------------------------------
# judge


def _write_generations(directory: Path, responses: list[list[dict]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    lines = [{"prompt_id": f"p{i}", "prompt": [{"role": "user", "content": f"Question {i}?"}], "responses": rs,
              "policy": "tiny"} for i, rs in enumerate(responses)]
    (directory / GENERATIONS_FILE).write_text("".join(json.dumps(line) + "\n" for line in lines))
    return directory


def length_reward(prompt, text):
    """A two-argument judge: longer answers to longer prompts score higher; 'boom' breaks it."""
    if "boom" in text:
        raise RuntimeError("cannot score this")
    return float(len(text)) + 0.0 * len(prompt)


def word_count(text):
    return len(text.split())


def test_judge_with_a_function_scores_every_answer_and_quarantines_the_rest(tmp_path):
    gen = _write_generations(tmp_path / "gen", [
        [{"text": "short", "finish_reason": "stop"}, {"text": "a longer answer", "finish_reason": "stop"},
         {"text": "   ", "finish_reason": "stop"}],
        [{"text": "boom", "finish_reason": "stop"}, {"text": "fine", "finish_reason": "length"}],
    ])
    manifest = judge(JudgeConfig(generations=str(gen), out=str(tmp_path / "judged"), reward="tests.test_generate_judge:length_reward"))
    assert manifest.counts.model_dump() == {"read": 5, "kept": 3, "dropped": {"empty_response": 1, "judge_error": 1}}
    rows = [json.loads(line) for line in (tmp_path / "judged" / JUDGED_FILE).read_text().splitlines()]
    assert [[r["score"] for r in row["responses"]] for row in rows] == [[5.0, 15.0], [4.0]]
    assert rows[1]["responses"][0]["finish_reason"] == "length"  # kept for ingest to decide
    quarantine = [json.loads(line) for line in (tmp_path / "judged" / QUARANTINE_FILE).read_text().splitlines()]
    assert [(q["prompt_id"], q["response"], q["reason"]) for q in quarantine] == [("p0", 2, "empty_response"),
                                                                                 ("p1", 0, "judge_error")]
    assert "cannot score this" in quarantine[1]["message"]
    # A one-argument function (what prefdata eval takes) is called with the text alone.
    one = judge(JudgeConfig(generations=str(gen), out=str(tmp_path / "j1"), reward="tests.test_generate_judge:word_count"))
    assert one.counts.kept == 4


def test_judge_with_a_reward_model_batches_like_it_scores_one_at_a_time(chat_tokenizer_dir, tmp_path):
    from train.tiny import build_model

    reward_model = build_model(chat_tokenizer_dir, tmp_path / "rm", reward_head=True)
    texts = ["Paris.", "The capital of France is Paris, a city on the Seine.", "I do not know", "Paris is the capital."]
    gen = _write_generations(tmp_path / "gen", [[{"text": t, "finish_reason": "stop"} for t in texts]])
    batched = judge(JudgeConfig(generations=str(gen), out=str(tmp_path / "b"), reward_model=str(reward_model), device="cpu"))
    single = judge(JudgeConfig(generations=str(gen), out=str(tmp_path / "s"), reward_model=str(reward_model),
                               batch_size=1, device="cpu"))
    scores = [[r["score"] for r in json.loads(line)["responses"]] for d in ("b", "s")
              for line in (tmp_path / d / JUDGED_FILE).read_text().splitlines()]
    assert batched.counts.kept == single.counts.kept == 4
    assert scores[0] == pytest.approx(scores[1], abs=1e-5) and len(set(scores[0])) == 4
    assert all(math.isfinite(s) for s in scores[0])
    assert batched.stats["reward_model"]["weights_sha256"]


def test_judge_refuses_generations_that_generate_did_not_write_in_one_line(tmp_path):
    strings = _write_generations(tmp_path / "strings", [["an answer as a bare string"]])
    latin1 = _write_generations(tmp_path / "latin1", [[{"text": "x", "finish_reason": "stop"}]])
    (latin1 / GENERATIONS_FILE).write_bytes((latin1 / GENERATIONS_FILE).read_bytes().replace(b"x", "é".encode("latin-1")))
    empty = _write_generations(tmp_path / "empty", [])
    for directory, message in [(strings, r":1: not a prefdata generate row"), (latin1, r"not UTF-8 text \(byte \d+"),
                               (empty, "no generations to judge")]:
        with pytest.raises(UserError, match=message):
            judge(JudgeConfig(generations=str(directory), out=str(tmp_path / "o"), reward="tests.test_generate_judge:length_reward"))
    assert not (tmp_path / "o").exists()


def test_judge_needs_exactly_one_judge(tmp_path):
    with pytest.raises(UserError, match="exactly one"):
        JudgeConfig(generations="g", out="o")
    with pytest.raises(UserError, match="cannot import"):
        judge(JudgeConfig(generations=str(_write_generations(tmp_path / "g", [[]])), out=str(tmp_path / "o"),
                          reward="no_such_module:f"))


# ---------------------------------------------------------------------------------------------
# ingest of a judged dump


@pytest.mark.parametrize(("pairs", "keep_truncated", "expected"), [
    ("best-vs-worst", False, [(4.0, 1.0)]),
    ("all", False, [(4.0, 2.0), (4.0, 1.0), (2.0, 1.0)]),
    ("best-vs-worst", True, [(9.0, 1.0)]),
])
def test_ingest_pairs_judged_answers_as_pairs_promises(tmp_path, pairs, keep_truncated, expected):
    from prefdata.formats.base import FormatOptions
    from prefdata.ingest import IngestConfig, ingest

    row = {"prompt_id": "p", "prompt": [{"role": "user", "content": "Q?"}], "policy": "tiny", "judge": "j",
           "responses": [{"text": "two", "finish_reason": "stop", "score": 2.0},
                         {"text": "cut off mid", "finish_reason": "length", "score": 9.0},
                         {"text": "four", "finish_reason": "stop", "score": 4.0},
                         {"text": "one", "finish_reason": "stop", "score": 1.0}]}
    unscored = {**row, "responses": [{"text": "a", "finish_reason": "stop"}, {"text": "b", "finish_reason": "stop"}]}
    source = tmp_path / JUDGED_FILE
    source.write_text(json.dumps(row) + "\n" + json.dumps(unscored) + "\n")
    manifest = ingest(IngestConfig(inputs=[str(source)], out=str(tmp_path / "rec"), workers=1,
                                   options=FormatOptions(pairs=pairs, keep_truncated=keep_truncated)))
    table = pq.read_table(tmp_path / "rec" / "records.parquet").to_pylist()
    assert [(r["chosen_score"], r["rejected_score"]) for r in table] == expected
    assert manifest.counts.dropped == {"unscored": 1}
    assert manifest.stats["skipped"].get("truncated_response", 0) == (0 if keep_truncated else 1)


def test_ingest_reads_a_stage_output_directory_as_its_data_files(tmp_path):
    """`prefdata ingest runs/judged`: the judge's judged.jsonl, not its manifest or quarantine, as if
    the file were named; and the same inside a folder ingest walks."""
    from prefdata.ingest import IngestConfig, ingest

    gen = _write_generations(tmp_path / "gen", [
        [{"text": "a longer answer", "finish_reason": "stop"}, {"text": "short", "finish_reason": "stop"},
         {"text": "boom", "finish_reason": "stop"}],
        [{"text": "one", "finish_reason": "stop"}, {"text": "three words here", "finish_reason": "stop"}],
    ])
    judged = tmp_path / "runs" / "judged"
    judge(JudgeConfig(generations=str(gen), out=str(judged), reward="tests.test_generate_judge:length_reward"))
    assert (judged / QUARANTINE_FILE).read_text()  # the refused answer is there, and must not be read as data
    by_file = ingest(IngestConfig(inputs=[str(judged / JUDGED_FILE)], out=str(tmp_path / "by-file"), workers=1))
    for name, spec in (("by-dir", judged), ("by-parent", tmp_path / "runs")):
        manifest = ingest(IngestConfig(inputs=[str(spec)], out=str(tmp_path / name), workers=1))
        assert [Path(i.path).name for i in manifest.inputs] == [JUDGED_FILE], name
        assert manifest.counts == by_file.counts and manifest.counts.kept == 2
        assert (tmp_path / name / "records.parquet").read_bytes() == (tmp_path / "by-file" / "records.parquet").read_bytes()


def test_ingest_of_a_stage_output_without_rows_it_reads_is_one_line(tmp_path):
    from prefdata.ingest import IngestConfig, ingest
    from schemas.manifest import Counts, Manifest

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "dropped.parquet").write_bytes(b"")
    Manifest(stage="tokenize", package_version="t", config={}, counts=Counts(read=0, kept=0),
             outputs=["train-00000.arrow", "dropped.parquet"]).write(shards)
    with pytest.raises(UserError, match=r"shards: a prefdata tokenize output holds no rows ingest reads"):
        ingest(IngestConfig(inputs=[str(shards)], out=str(tmp_path / "out"), workers=1))
    (tmp_path / "judged").mkdir()
    Manifest(stage="judge", package_version="t", config={}, counts=Counts(read=0, kept=0),
             outputs=[JUDGED_FILE, QUARANTINE_FILE]).write(tmp_path / "judged")
    with pytest.raises(UserError, match=rf"{JUDGED_FILE}: listed in .*manifest.json but missing; re-run prefdata judge"):
        ingest(IngestConfig(inputs=[str(tmp_path / "judged")], out=str(tmp_path / "out"), workers=1))


def test_generation_batches_respect_the_count_and_the_token_budget():
    from train.generate import Sampling, generation_batches

    sampling = Sampling(n=2, temperature=1.0, top_p=1.0, max_new_tokens=10, batch_size=3, batch_tokens=200)
    # sorted lengths; a batch of k prompts costs k × 2 × (longest + 10) tokens
    # 3 × 2 × 20 = 120 (the count stops it); 2 × 2 × (40 + 10) = 200 fits exactly; 90 + 10 with 200 + 10
    # would not fit, nor would two of them; a prompt over the budget still gets a batch of its own
    assert generation_batches([10, 10, 10, 10, 40, 90, 200], sampling) == [range(0, 3), range(3, 5), range(5, 6), range(6, 7)]


def test_prompts_whose_answers_would_not_fit_the_model_are_counted_and_refused_when_none_fit(prompt_file, tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="longer than the model's 1024 positions"):
        generate(GenerateConfig(prompts=str(prompt_file), policy=str(tiny_model_dir), out=str(tmp_path / "o"),
                                max_new_tokens=1020, device="cpu"))


def test_eval_json_has_null_where_there_was_nothing_to_average():
    """Every answer unjudged gave a NaN reward, and json.dumps wrote `NaN`, which strict JSON readers refuse."""
    from train.eval import eval_json

    text = eval_json({"reward": math.nan, "win_rate": {"rate": math.inf, "prompts": 0}, "samples": [1.5, -math.inf]})
    assert json.loads(text) == {"reward": None, "win_rate": {"rate": None, "prompts": 0}, "samples": [1.5, None]}
    assert "NaN" not in text and "Infinity" not in text
