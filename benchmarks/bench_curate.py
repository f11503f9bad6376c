"""Curate N records (exact + near dedupe + split) and report records/s and peak RSS.

    python benchmarks/bench_curate.py [--rows 1000000] [--prompts uniform|realistic] [--workdir DIR]
                                      [--chunk-rows 200000] [--shuffled]

The record set is generated straight into Arrow (not through pydantic): this measures curate, not
the generator, and is reused from --workdir when it is already there with the same size. Two kinds
of prompts:
  uniform    40 random words each; 5% of pairs are exact duplicates and 10% of prompts are
             near-duplicates (one word changed), so every step has work to do;
  realistic  prompts from real chat dumps (REAL_DUMPS in ../shared/realdata, read at bench time and
             never copied into the project), resampled with edits: every user turn on its own (real
             follow-ups: "Thanks.", "Why not?", one word and up) and every multi-turn conversation.
             A draw is repeated verbatim at the rate the dumps repeat prompts of its length (short
             ones repeat: greetings, thanks), else made a new prompt of the same length by replacing
             a third of its words (at least one) with words drawn from the dumps; NEAR_RATE of
             records are light edits of the record before (case, punctuation, one word from 12
             words on), and 5% of pairs exact duplicates, as in the uniform set.
Curate runs in a fresh process and reports its own peak RSS (VmHWM: ru_maxrss would carry the
generating parent's peak).
--shuffled writes the records out of (source, source_row) order, so curate's pass 2 goes through its
on-disk bucket sort. Issue 15 target on this 2-core machine: 10M records under 6 GiB, at no less
than 12.8k records/s; memory follows --chunk-rows, not --rows.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.process_memory import peak_rss_mib  # noqa: E402
from schemas.manifest import Counts, Manifest  # noqa: E402
from schemas.records import RECORD_SCHEMA  # noqa: E402

REALDATA = ROOT.parent / "shared" / "realdata"
REAL_DUMPS = ("steamshp_format_hh_helpful_test/anthropic_helpful_test_head.jsonl",  # HH-RLHF helpful, multi-turn
              "llamafactory_dpo_en_demo/dpo_en_demo.json",  # long instructions
              "oasst_export_trees/en_100_tree.jsonl")  # Open-Assistant conversation trees
SHORT_WORDS = 4  # prompts of up to this many words repeat at their own rate (greetings, thanks, "continue")
NEAR_RATE = 0.10  # light edits of the record before: set here, as in the uniform set (the dumps hold too few to measure)


def _messages(role: str, texts: list[str]) -> pa.Array:
    return pa.array([[{"role": role, "content": t}] for t in texts], RECORD_SCHEMA.field("prompt").type)


def generate(out: Path, rows: int, seed: int = 0, shuffled: bool = False) -> None:
    rng = np.random.default_rng(seed)
    order = np.random.default_rng(seed + 1).permutation(rows) if shuffled else None
    vocab = np.array([f"w{i}" for i in range(20_000)])
    out.mkdir(parents=True, exist_ok=True)
    writer = pq.ParquetWriter(out / "records.parquet", RECORD_SCHEMA)
    chunk = 100_000
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        words = vocab[rng.integers(0, len(vocab), size=(n, 40))]
        near = rng.random(n) < 0.10  # copy the previous prompt with one word changed
        words[1:][near[1:]] = words[:-1][near[1:]]
        words[near, -1] = vocab[rng.integers(0, len(vocab), size=near.sum())]
        prompts = [" ".join(w) for w in words]
        chosen = [f"good answer {i} " + " ".join(w[:10]) for i, w in zip(range(start, start + n), words)]
        rejected = [f"bad answer {i}" for i in range(start, start + n)]
        dup = rng.random(n) < 0.05  # exact duplicates of the previous pair
        for i in np.flatnonzero(dup[1:]) + 1:
            prompts[i], chosen[i], rejected[i] = prompts[i - 1], chosen[i - 1], rejected[i - 1]
        ids = [f"{start + i:032x}" for i in range(n)]  # curate never recomputes ids
        table = pa.table({
            "id": ids, "prompt": _messages("user", prompts), "chosen": _messages("assistant", chosen),
            "rejected": _messages("assistant", rejected), "source": ["bench.jsonl"] * n, "source_format": ["bench"] * n,
            "source_row": (np.arange(start, start + n) if order is None else order[start:start + n]) + 1,
            "chosen_score": pa.nulls(n, pa.float64()), "rejected_score": pa.nulls(n, pa.float64()), "meta": ["{}"] * n,
        }, schema=RECORD_SCHEMA)
        writer.write_table(table)
    writer.close()
    Manifest(stage="ingest", package_version="bench", config={}, counts=Counts(read=rows, kept=rows)).write(out)


class RealPool:
    """The dumps' prompts as resampling draws them: each user turn alone and each multi-turn
    conversation (distinct ones), with the answers of a record they came from; the words of every
    turn (drawn by frequency for replacements); and, per length class, how often a prompt repeats
    one seen before (folded: case, punctuation, spacing)."""

    def __init__(self, records: Path) -> None:
        table = pq.read_table(records / "records.parquet", columns=["prompt", "chosen", "rejected"]).to_pylist()
        self.prompts, self.answers, seen = [], [], set()
        for record in table:
            key = json.dumps(record["prompt"])
            if key in seen:  # the same conversation rated several times is one prompt
                continue
            seen.add(key)
            answers = (record["chosen"][0]["content"], record["rejected"][0]["content"])
            self.prompts += [[turn] for turn in record["prompt"] if turn["role"] == "user"]
            self.answers += [answers] * sum(turn["role"] == "user" for turn in record["prompt"])
            if len(record["prompt"]) > 1:
                self.prompts.append(record["prompt"])
                self.answers.append(answers)
        self.words = [w for prompt in self.prompts for turn in prompt for w in turn["content"].split()]
        folded, repeats, counts = set(), [0, 0], [0, 0]
        for prompt in self.prompts:
            text = _folded(prompt)
            short = len(text.split()) <= SHORT_WORDS
            repeats[short] += text in folded
            counts[short] += 1
            folded.add(text)
        self.repeat_rate = {short: repeats[short] / max(counts[short], 1) for short in (False, True)}


def _folded(prompt: list[dict]) -> str:
    return re.sub(r"[\W_]+", " ", " ".join(turn["content"] for turn in prompt).lower()).strip()


def real_pool(work: Path) -> RealPool:
    """The dumps ingested by prefdata into `work` (once), as a resampling pool."""
    from prefdata.ingest import IngestConfig, ingest

    records = work / "real-records"
    if not (records / "manifest.json").is_file():
        ingest(IngestConfig(inputs=[str(REALDATA / dump) for dump in REAL_DUMPS], out=str(records), workers=1))
    return RealPool(records)


def _renewed(rng: random.Random, text: str, words: list[str]) -> str:
    """The text with a third of its words (at least one) replaced by words of the dumps: a new
    prompt of the same length, more than a near-duplicate's edit away from the original."""
    tokens = text.split() or [""]
    for position in rng.sample(range(len(tokens)), max(1, len(tokens) // 3)):
        tokens[position] = rng.choice(words)
    return " ".join(tokens)


def _near(rng: random.Random, text: str, words: list[str]) -> str:
    """An edit a person would still call the same prompt: case, punctuation, or (from 12 words on) one word."""
    edits = [str.upper, str.lower, lambda t: t.rstrip("?.!") + rng.choice(["", "?", "!!", " ."])]
    tokens = text.split()
    if len(tokens) >= 12:
        def one_word(t: str) -> str:
            tokens[rng.randrange(len(tokens))] = rng.choice(words)
            return " ".join(tokens)
        edits.append(one_word)
    return rng.choice(edits)(text)


def generate_realistic(out: Path, rows: int, pool: RealPool, seed: int = 0) -> None:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    writer = pq.ParquetWriter(out / "records.parquet", RECORD_SCHEMA)
    chunk = 100_000
    previous: tuple[list[dict], str, str] | None = None
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        prompts, chosen, rejected = [], [], []
        for _ in range(n):
            draw = rng.randrange(len(pool.prompts))
            prompt, (good, bad) = pool.prompts[draw], pool.answers[draw]
            if previous is not None and rng.random() < 0.05:  # an exact duplicate of the pair before
                prompt, good, bad = previous
            elif previous is not None and rng.random() < NEAR_RATE:
                prompt = previous[0][:-1] + [{**previous[0][-1], "content": _near(rng, previous[0][-1]["content"], pool.words)}]
            elif rng.random() >= pool.repeat_rate[len(_folded(prompt).split()) <= SHORT_WORDS]:
                prompt = [{**turn, "content": _renewed(rng, turn["content"], pool.words)} for turn in prompt]
            previous = (prompt, good, bad)
            prompts.append(prompt)
            chosen.append([{"role": "assistant", "content": good}])
            rejected.append([{"role": "assistant", "content": bad}])
        messages = RECORD_SCHEMA.field("prompt").type
        table = pa.table({
            "id": [f"{start + i:032x}" for i in range(n)], "prompt": pa.array(prompts, messages),
            "chosen": pa.array(chosen, messages), "rejected": pa.array(rejected, messages),
            "source": ["bench-realistic.jsonl"] * n, "source_format": ["bench"] * n, "source_row": np.arange(start, start + n) + 1,
            "chosen_score": pa.nulls(n, pa.float64()), "rejected_score": pa.nulls(n, pa.float64()), "meta": ["{}"] * n,
        }, schema=RECORD_SCHEMA)
        writer.write_table(table)
    writer.close()
    Manifest(stage="ingest", package_version="bench", config={}, counts=Counts(read=rows, kept=rows)).write(out)


def run_curate(src: Path, out: Path, chunk_rows: int | None) -> dict:
    from prefdata.curate import CurateConfig, curate

    options = {} if chunk_rows is None else {"chunk_rows": chunk_rows}
    start = time.perf_counter()
    manifest = curate(CurateConfig(inputs=[str(src)], out=str(out), **options))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "records_per_s": manifest.counts.read / seconds, "chunk_rows": manifest.config.get("chunk_rows"),
            "peak_rss_gib": peak_rss_mib() / 1024,
            "read": manifest.counts.read, "dropped": manifest.counts.dropped, "stats": manifest.stats}


def _generated(records: Path, rows: int) -> bool:
    path = records / "records.parquet"
    return path.is_file() and (records / "manifest.json").is_file() and pq.ParquetFile(path).metadata.num_rows == rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--chunk-rows", type=int, default=None, help="curate's chunk_rows (default: curate's default)")
    parser.add_argument("--shuffled", action="store_true", help="records out of output order (pass 2 bucket-sorts on disk)")
    parser.add_argument("--prompts", choices=("uniform", "realistic"), default="uniform",
                        help="random 40-word prompts, or real chat prompts resampled with edits")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # measured in a fresh process so peak RSS is curate's own
        print(json.dumps(run_curate(args.child, args.child.parent / "curated", args.chunk_rows)))
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-curate-"))
    if args.prompts == "realistic":
        records = work / "records-realistic"
        if not _generated(records, args.rows):
            generate_realistic(records, args.rows, real_pool(work))
    else:
        records = work / ("records-shuffled" if args.shuffled else "records")
        if not _generated(records, args.rows):
            generate(records, args.rows, shuffled=args.shuffled)
    command = [sys.executable, __file__, "--child", str(records)]
    if args.chunk_rows is not None:
        command += ["--chunk-rows", str(args.chunk_rows)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"curate failed:\n{result.stderr[-4000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(json.dumps(report, indent=2))
    print(f"curate: {args.rows:,} records in {report['seconds']:.1f} s = {report['records_per_s']:,.0f} records/s, "
          f"peak RSS {report['peak_rss_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
