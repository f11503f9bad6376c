"""Ingest inputs and bad input: compressions, directories, globs, parquet, save_to_disk, the Hub
offline; every broken-row case quarantined with its reason; every unusable input a one-line
UserError with nothing written; counts that always add up."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ingest_support import FIXTURES, pairs, reasons, run_ingest

from prefdata.ingest import IngestConfig, ingest, parse_column_map
from prefdata.readers import line_ranges, range_rows, resolve_sources
from schemas.errors import UserError
from schemas.io import sha256_file

U, A = "user", "assistant"


def hh_line(question: str, good: str, bad: str) -> str:
    return json.dumps({"chosen": f"\n\nHuman: {question}\n\nAssistant: {good}",
                       "rejected": f"\n\nHuman: {question}\n\nAssistant: {bad}"})


GOOD = [hh_line("Capital of France?", "Paris.", "Lyon."), hh_line("2+2?", "4", "5")]
GOOD_PAIRS = [(1, [(U, "Capital of France?")], [(A, "Paris.")], [(A, "Lyon.")]),
              (2, [(U, "2+2?")], [(A, "4")], [(A, "5")])]


def write_lines(path, lines, end="\n"):
    path.write_text("".join(line + end for line in lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------- inputs


@pytest.mark.parametrize(("suffix", "opener"), [(".gz", gzip.open), (".bz2", bz2.open), (".zst", zstandard.open)])
def test_compressed_jsonl(tmp_path, suffix, opener):
    path = tmp_path / f"hh.jsonl{suffix}"
    with opener(path, "wt", encoding="utf-8") as fh:
        fh.write("".join(line + "\n" for line in GOOD))
    records, quarantine, manifest = run_ingest(tmp_path / "out", path)
    assert pairs(records) == GOOD_PAIRS and quarantine == []
    assert manifest.inputs[0].sha256 == sha256_file(path)  # the file as stored, not its decompressed bytes


@pytest.mark.parametrize("suffix", [".gz", ".zst", ".zst-streamed"])
def test_truncated_compressed_file_is_a_user_error(tmp_path, suffix):
    """zstandard's own reader ends a frame cut short as if the file ended there: half a download
    would pass as a whole one."""
    data = ("".join(line + "\n" for line in GOOD * 20_000)).encode()
    if suffix == ".gz":
        compressed = gzip.compress(data)
    elif suffix == ".zst":
        compressed = zstandard.ZstdCompressor().compress(data)
    else:  # a frame without its size in the header, as `zstd` writes from a pipe
        compressed = b"".join(zstandard.ZstdCompressor().read_to_iter(io.BytesIO(data)))
    path = tmp_path / f"hh.jsonl{suffix.removesuffix('-streamed')}"
    path.write_bytes(compressed[:len(compressed) // 2])
    with pytest.raises(UserError, match="compressed data is corrupt or cut short"):
        run_ingest(tmp_path / "out", path)
    assert not (tmp_path / "out").exists()


def test_concatenated_zstd_frames_are_read_whole(tmp_path):
    path = tmp_path / "hh.jsonl.zst"
    path.write_bytes(b"".join(zstandard.ZstdCompressor().compress((line + "\n").encode()) for line in GOOD))
    records, _, _ = run_ingest(tmp_path / "out", path)
    assert pairs(records) == GOOD_PAIRS


def test_a_file_given_twice_or_under_two_spellings_is_read_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_lines(tmp_path / "a.jsonl", GOOD)
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "a.jsonl")
    records, _, manifest = run_ingest(tmp_path / "out", "a.jsonl", "./a.jsonl", str(tmp_path / "a.jsonl"), "link.jsonl")
    assert pairs(records) == GOOD_PAIRS and manifest.counts.read == 2 and len(manifest.inputs) == 1


def test_hidden_folders_are_not_input(tmp_path):
    """A killed run's .tmp-* output inside the input folder, .git, caches: never data."""
    data = tmp_path / "data"
    (data / ".tmp-out.x1").mkdir(parents=True)
    write_lines(data / "a.jsonl", GOOD[:1])
    write_lines(data / ".tmp-out.x1" / "b.jsonl", GOOD[1:])
    records, _, manifest = run_ingest(tmp_path / "out", data)
    assert [r["source"] for r in records] == ["a.jsonl"] and manifest.counts.read == 1


def test_out_that_is_not_a_stage_output_or_holds_an_input_is_refused_and_left_alone(tmp_path, monkeypatch):
    """--out is replaced whole: a folder of other files, an input, a folder holding the input or
    the working directory would be deleted; an --out inside an input folder would be read back."""
    data = tmp_path / "data"
    data.mkdir()
    write_lines(data / "train.jsonl", GOOD)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    for out, message in [(tmp_path / "notes", "a folder with files but no manifest.json"),
                         (data, "holds the input"), (tmp_path, "holds the input"),
                         (data / "out", "is inside the input folder"), (data / "train.jsonl", "holds the input")]:
        inputs = [data] if out == data / "out" else [data / "train.jsonl"]
        with pytest.raises(UserError, match=f"^{re.escape(f'--out {out}: {message}')}"):
            run_ingest(out, *inputs)
    monkeypatch.chdir(data)
    with pytest.raises(UserError, match="holds the working directory"):
        run_ingest(tmp_path, FIXTURES / "hh.jsonl")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine" and (data / "train.jsonl").is_file()
    assert sorted(p.name for p in data.iterdir()) == ["train.jsonl"]
    (tmp_path / "empty").mkdir()
    run_ingest(tmp_path / "empty", data)  # an empty folder, and then a stage's output, are replaced
    run_ingest(tmp_path / "empty", data)
    assert (tmp_path / "empty" / "records.parquet").is_file()


def test_directory_and_glob_keep_provenance_per_file(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    write_lines(data / "a.jsonl", GOOD[:1])
    write_lines(data / "sub" / "b.jsonl", GOOD[1:])
    (data / "README.txt").write_text("not data")
    records, _, manifest = run_ingest(tmp_path / "out", data)
    assert [(r["source"], r["source_row"]) for r in records] == [("a.jsonl", 1), ("b.jsonl", 1)]
    assert [(i.path, i.rows, i.sha256) for i in manifest.inputs] == [
        (str(data / "a.jsonl"), 1, sha256_file(data / "a.jsonl")),
        (str(data / "sub" / "b.jsonl"), 1, sha256_file(data / "sub" / "b.jsonl")),
    ]
    assert manifest.stats["sources"]["b.jsonl"] == {
        "format": "hh", "read": 1, "kept": 1, "dropped": {}, "records": 1, "prompts": 1, "skipped": {}
    }
    records, _, _ = run_ingest(tmp_path / "out2", str(data / "**" / "*.jsonl"))
    assert [r["source"] for r in records] == ["a.jsonl", "b.jsonl"]


def test_same_file_name_in_two_folders_gets_distinct_sources(tmp_path):
    for folder, line in (("x", GOOD[0]), ("y", GOOD[1])):
        (tmp_path / folder).mkdir()
        write_lines(tmp_path / folder / "train.jsonl", [line])
    records, _, _ = run_ingest(tmp_path / "out", tmp_path / "x" / "train.jsonl", tmp_path / "y" / "train.jsonl")
    assert [r["source"] for r in records] == ["x/train.jsonl", "y/train.jsonl"]


def test_one_record_set_from_several_formats(tmp_path):
    records, _, manifest = run_ingest(tmp_path / "out", FIXTURES / "hh.jsonl", FIXTURES / "llamafactory_v1.jsonl")
    assert manifest.stats["formats"] == {"hh": {"read": 7, "kept": 3}, "llamafactory_v1": {"read": 3, "kept": 2}}
    assert [r["source_format"] for r in records] == ["hh"] * 3 + ["llamafactory_v1"] * 2
    assert manifest.counts.read == 10 and manifest.counts.kept == 5


@pytest.mark.parametrize("compressed", [False, True])
def test_parquet(tmp_path, compressed):
    table = pa.table({"prompt": ["q1", "q2"], "chosen": ["a1", None], "rejected": ["b1", "b2"]})
    path = tmp_path / "pairs.parquet"
    pq.write_table(table, path)
    if compressed:
        path = tmp_path / "pairs.parquet.gz"
        path.write_bytes(gzip.compress((tmp_path / "pairs.parquet").read_bytes()))
    records, quarantine, _ = run_ingest(tmp_path / "out", path)
    assert pairs(records) == [(1, [(U, "q1")], [(A, "a1")], [(A, "b1")])]
    assert reasons(quarantine) == {2: "null_value"}
    assert json.loads(quarantine[0]["raw"]) == {"prompt": "q2", "chosen": None, "rejected": "b2"}


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    rows = [json.loads(line) for line in GOOD]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    records, _, manifest = run_ingest(tmp_path / "out", tmp_path / "single")
    assert pairs(records) == GOOD_PAIRS
    assert manifest.inputs[0].path == str(tmp_path / "single") and manifest.inputs[0].rows == 2
    assert {r["source"] for r in records} == {"single"}

    split = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])}
    )
    split.save_to_disk(str(tmp_path / "dict"))
    records, _, _ = run_ingest(tmp_path / "out", tmp_path / "dict")
    assert [(r["source"], r["source_row"]) for r in records] == [("dict/train", 1), ("dict/train", 2), ("dict/test", 1)]
    records, _, _ = run_ingest(tmp_path / "out", tmp_path / "dict", split="test")
    assert pairs(records) == GOOD_PAIRS[:1]
    with pytest.raises(UserError, match="no split 'dev'; it has train, test"):
        run_ingest(tmp_path / "out", tmp_path / "dict", split="dev")


def test_hub_name_offline_is_a_one_line_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as info:
        run_ingest(tmp_path / "out", "Anthropic/hh-rlhf")
    message = str(info.value)
    assert message.startswith(
        "Anthropic/hh-rlhf: not a local file or directory, and the Hub dataset could not be loaded"
    )
    assert "\n" not in message
    assert not (tmp_path / "out").exists()


def test_json_file_holds_an_array_or_lines(tmp_path):
    as_array = tmp_path / "array.json"
    as_array.write_text("\ufeff\n  [" + ",\n".join(GOOD) + "]\n", encoding="utf-8")
    as_lines = write_lines(tmp_path / "lines.json", GOOD)
    for path in (as_array, as_lines):
        records, quarantine, _ = run_ingest(tmp_path / "out", path)
        assert pairs(records) == GOOD_PAIRS and quarantine == []


def test_json_array_where_lines_were_expected(tmp_path):
    path = tmp_path / "array.jsonl"
    path.write_text(json.dumps([json.loads(line) for line in GOOD], indent=1) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"row 1: invalid_json, .*; a JSON array belongs in a .json file"):
        run_ingest(tmp_path / "out", path)
    # forced: every line of the array is a bad row, counted
    _, quarantine, manifest = run_ingest(tmp_path / "out", path, format="hh")
    lines = path.read_text().splitlines()
    assert manifest.counts.read == len(lines) == len(quarantine)
    assert quarantine[0]["raw"] == "[" and quarantine[0]["reason"] == "invalid_json"


def test_json_array_read_in_small_chunks(tmp_path, monkeypatch):
    """Elements that straddle the reader's buffer boundary parse the same."""
    import prefdata.readers

    monkeypatch.setattr(prefdata.readers, "CHUNK_CHARS", 7)
    path = tmp_path / "array.json"
    rows = [json.loads(line) for line in GOOD] * 3
    path.write_text(json.dumps(rows, indent=1) + "\n")
    records, quarantine, _ = run_ingest(tmp_path / "out", path)
    assert pairs(records) == [(i + 1, p, c, r) for i, (_, p, c, r) in enumerate(GOOD_PAIRS * 3)]
    assert quarantine == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # broken element: the rest of the array cannot be found reliably → one quarantined row
        ("[" + GOOD[0] + ', {"chosen": tru}, ' + GOOD[1] + "]", {2: "invalid_json"}),
        ("[" + GOOD[0] + ", " + GOOD[1][:30], {2: "truncated_line"}),
        ("[" + GOOD[0] + "] trailing", {2: "invalid_json"}),
        ("[" + GOOD[0] + ", [1, 2]]", {2: "wrong_type"}),
        ("[" + GOOD[0] + ",\n", {2: "truncated_line"}),  # the array never closes
        ("[" + GOOD[0] + " " + GOOD[1] + "]", {2: "invalid_json"}),
        ("[" + GOOD[0] + ", " + "[" * 100_000 + "]" * 100_000 + ", " + GOOD[1] + "]", {2: "invalid_json"}),  # nested too deeply
    ],
)
def test_broken_json_array(tmp_path, text, expected):
    path = tmp_path / "broken.json"
    path.write_text(text, encoding="utf-8")
    records, quarantine, manifest = run_ingest(tmp_path / "out", path)
    assert pairs(records) == GOOD_PAIRS[:1]
    assert reasons(quarantine) == expected
    assert manifest.counts.read == 2


def test_limit_reads_at_most_n_rows_across_inputs(tmp_path):
    first = write_lines(tmp_path / "a.jsonl", GOOD)
    second = write_lines(tmp_path / "b.jsonl", GOOD)
    records, _, manifest = run_ingest(tmp_path / "out", first, second, limit=3)
    assert [(r["source"], r["source_row"]) for r in records] == [("a.jsonl", 1), ("a.jsonl", 2), ("b.jsonl", 1)]
    assert [i.rows for i in manifest.inputs] == [2, 1]


def test_normalisation_bom_crlf_nfc_and_trimming(tmp_path):
    raw = json.dumps({"prompt": "  Cafe\u0301?\r\nYes ", "chosen": "\ufeffOui\r\n", "rejected": " Non "})
    path = tmp_path / "n.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + raw.encode() + b"\r\n")
    records, _, _ = run_ingest(tmp_path / "out", path)
    assert pairs(records) == [(1, [(U, "Café?\nYes")], [(A, "Oui")], [(A, "Non")])]


def test_same_input_gives_the_same_ids_in_parallel(tmp_path):
    """Order and ids do not depend on the number of worker processes."""
    lines = [hh_line(f"Question {i}?", f"Answer {i}.", f"No {i}.") for i in range(2500)]  # three chunks
    path = write_lines(tmp_path / "many.jsonl", lines)
    one, _, _ = run_ingest(tmp_path / "one", path, workers=1)
    two, _, manifest = run_ingest(tmp_path / "two", path, workers=2)
    assert one == two and len(two) == 2500 and manifest.stats["records"] == 2500
    assert len({r["id"] for r in two}) == 2500


def dirty_jsonl(path, rows: int):
    """HH lines with what the cuts between line ranges must not disturb: a BOM, CRLF ends, blank
    lines, bad JSON, bytes that are not UTF-8, an empty answer, and a last line cut short."""
    lines = [b"\xef\xbb\xbf" + hh_line("First?", "Yes.", "No.").encode()]
    for i in range(rows):
        line = hh_line(f"Question {i}?", f"Answer {i}.", f"No {i}.").encode()
        lines.append({3: b"", 5: line[:20], 7: line.replace(b"Answer", b"Caf\xe9"), 11: line + b"\r",
                      13: hh_line(f"Q{i}", " ", "x").encode()}.get(i % 17, line))
    path.write_bytes(b"\n".join(lines) + b"\n" + GOOD[0][:30].encode())
    return path


def test_line_ranges_give_the_rows_one_reader_gives(tmp_path):
    """Ranges of any size cut only after a newline and number their lines as the whole file's reader does."""
    source = resolve_sources([str(dirty_jsonl(tmp_path / "d.jsonl", 200))])[0]
    assert source.has_line_ranges()
    whole = list(source.rows())
    for range_bytes in (1, 2, 50, 333, 4096, 1 << 30):
        ranges = list(line_ranges(source, range_bytes))
        assert [r.start for r in ranges[1:]] == [r.end for r in ranges[:-1]] and ranges[-1].end == os.path.getsize(source.location)
        assert [row for r in ranges for row in range_rows(source, r)] == whole
    lines = Path(source.location).read_bytes().count(b"\n") + 1  # the last line has no newline
    assert len(list(line_ranges(source, 1))) == lines  # a range shorter than a line holds that line


@pytest.mark.parametrize(("workers", "range_bytes"), [(1, 1 << 20), (2, 1 << 20), (2, 1000), (3, 1), (2, 333)])
def test_output_bytes_do_not_depend_on_workers_or_line_ranges(tmp_path, monkeypatch, workers, range_bytes):
    """records.parquet and quarantine.jsonl, byte for byte, as when this process reads every row
    (a --limit above the row count keeps that path): one range or many, cuts mid-file, ranges
    shorter than a line (one line each), row groups that span ranges."""
    import prefdata.ingest

    path = dirty_jsonl(tmp_path / "dirty.jsonl", 300)
    read_here = run_ingest(tmp_path / "read-here", path, row_group_rows=7, limit=10**6)[2]
    monkeypatch.setattr(prefdata.ingest, "RANGE_BYTES", range_bytes)
    ranged = run_ingest(tmp_path / "ranged", path, row_group_rows=7, workers=workers)[2]
    for name in ("records.parquet", "quarantine.jsonl"):
        assert (tmp_path / "ranged" / name).read_bytes() == (tmp_path / "read-here" / name).read_bytes()
    assert ranged.counts == read_here.counts and ranged.stats == read_here.stats
    assert ranged.counts.read == sum(1 for line in path.read_bytes().split(b"\n") if line)  # blank lines are not rows
    assert set(ranged.counts.dropped) == {"invalid_json", "invalid_utf8", "empty_content", "truncated_line"}


# ---------------------------------------------------------------- bad rows (quarantined)


def test_bad_lines_are_quarantined_with_their_reason(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [
        GOOD[0].encode(),                                                  # 1 good
        b'{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: a", "rejected": ',    # 2 invalid JSON (not the last line)
        b'{"chosen": "\\n\\nHuman: caf\xe9\\n\\nAssistant: a", "rejected": "r"}',  # 3 not UTF-8
        b"[1, 2, 3]",                                                      # 4 an array where an object was expected
        json.dumps({"chosen": 5, "rejected": "x"}).encode(),               # 5 wrong type
        json.dumps({"chosen": json.loads(GOOD[0])["chosen"]}).encode(),   # 6 missing field
        json.dumps({"chosen": None, "rejected": "x"}).encode(),            # 7 null
        hh_line("Say nothing", "   ", "Something").encode(),               # 8 empty answer
        b"",                                                               # 9 blank: not a row
        b'{"chosen": "\\n\\nHuman: \\ud800\\n\\nAssistant: a", "rejected": "r"}',  # 10 lone surrogate escape
        GOOD[1].encode(),                                                  # 11 good
        b"[" * 100_000 + b"]" * 100_000,                                    # 12 nested past Python's recursion limit
        GOOD[1][:25].encode(),                                             # 13 truncated last line (no newline)
    ]
    path.write_bytes(b"\n".join(lines))
    records, quarantine, manifest = run_ingest(tmp_path / "out", path)
    assert [r["source_row"] for r in records] == [1, 11]
    assert reasons(quarantine) == {2: "invalid_json", 3: "invalid_utf8", 4: "wrong_type", 5: "wrong_type",
                                   6: "missing_field", 7: "null_value", 8: "empty_content", 10: "invalid_utf8",
                                   12: "invalid_json", 13: "truncated_line"}
    assert manifest.counts.read == 12 and manifest.counts.kept == 2
    assert sum(manifest.counts.dropped.values()) == 10
    by_row = {q["source_row"]: q for q in quarantine}
    assert by_row[3]["raw"] == '{"chosen": "\\n\\nHuman: caf\\xe9\\n\\nAssistant: a", "rejected": "r"}'
    assert by_row[13]["raw"] == GOOD[1][:25] and "nested too deeply" in by_row[12]["message"]
    assert all(set(q) == {"source", "source_row", "reason", "message", "raw"} for q in quarantine)


def test_a_csv_header_with_empty_trailing_names_reads_as_before(tmp_path):
    """A spreadsheet's export ends its lines in commas: the empty names repeat, and name no column."""
    path = write_lines(tmp_path / "sheet.csv", ["prompt,chosen,rejected,,", "Capital of France?,Paris.,Lyon.,,"])
    records, quarantine, _ = run_ingest(tmp_path / "out", path)
    assert len(records) == 1 and quarantine == []


def test_bad_csv_rows(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"question,chosen,rejected\nq1,a1,b1\nq2,a2\nq3,caf\xe9,b3\n\nq4,a4,b4\n")
    records, quarantine, _ = run_ingest(tmp_path / "out", path, options={"column_map": {"prompt": "question"}})
    assert pairs(records) == [(1, [(U, "q1")], [(A, "a1")], [(A, "b1")]), (4, [(U, "q4")], [(A, "a4")], [(A, "b4")])]
    assert reasons(quarantine) == {2: "wrong_field_count", 3: "invalid_utf8"}
    assert json.loads(quarantine[1]["raw"]) == ["q3", "caf\\xe9", "b3"]


GOOD_LINE = st.sampled_from(GOOD + [hh_line("Why?", "Because.", "No."), json.dumps({"chosen": "a", "rejected": "b"})])
BROKEN_LINE = st.one_of(
    st.sampled_from(
        ["{", "[1]", '"text"', "null", '{"chosen": null}', "{'single': 1}", '{"chosen": 1, "rejected": 2}']
    ),
    GOOD_LINE.map(lambda line: line[: len(line) // 2]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r"), min_size=1, max_size=30),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(GOOD_LINE, BROKEN_LINE), min_size=1, max_size=25), newline_at_end=st.booleans())
def test_every_row_is_kept_or_quarantined(tmp_path_factory, lines, newline_at_end):
    tmp = tmp_path_factory.mktemp("prop")
    path = tmp / "mix.jsonl"
    path.write_text("\n".join(lines) + ("\n" if newline_at_end else ""), encoding="utf-8")
    def blank(line: str) -> bool:  # blank for a byte reader: ASCII white space only
        return not line.encode().strip()

    rows = sum(1 for line in lines if not blank(line))
    records, quarantine, manifest = run_ingest(tmp / "out", path, format="hh")
    counts = manifest.counts
    assert counts.read == rows == counts.kept + len(quarantine)
    assert counts.kept == len(records) == manifest.stats["records"]
    assert sorted([r["source_row"] for r in records] + [q["source_row"] for q in quarantine]) == [
        n for n, line in enumerate(lines, 1) if not blank(line)
    ]


# ---------------------------------------------------------------- unusable inputs (UserError, nothing written)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.jsonl", "missing.jsonl: no such file or directory"),
        (lambda d: write_lines(d / "empty.jsonl", []),
         r"empty.jsonl: no rows \(empty input\); remove it from the inputs"),
        (lambda d: write_lines(d / "blank.json", ["", "  "]), "blank.json: no rows"),
        (lambda d: write_lines(d / "header.csv", ["a,b,c"]), "header.csv: no rows"),
        (lambda d: (d / "notes.txt").write_text("x") and d / "notes.txt", "notes.txt: unsupported file type"),
        (lambda d: (d / "void").mkdir() or d / "void", "void: directory holds no .jsonl/.json/.csv/.parquet file"),
        (lambda d: d / "*.parquet", r"\*.parquet: no .jsonl/.json/.csv/.parquet file matches this pattern"),
        (lambda d: write_lines(d / "junk.jsonl", ["{", "nope"]), "junk.jsonl: none of the first 2 rows parses"),
        (lambda d: write_lines(d / "sft.jsonl", ['{"messages": []}']),
         r"no known preference format has columns \[messages\]"),
        (lambda d: write_lines(d / "twice.csv", ["prompt,chosen,rejected,rejected", "q,a,b,c"]),
         "twice.csv: the header names 'rejected' more than once, so one of the columns would be lost"),
    ],
)
def test_unusable_input_is_a_user_error_and_nothing_is_written(tmp_path, make, message):
    good = write_lines(tmp_path / "good.jsonl", GOOD)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message):
        run_ingest(out, good, make(tmp_path))
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_failed_run_leaves_an_existing_output_as_it_was(tmp_path):
    out = tmp_path / "out"
    _, _, first = run_ingest(out, write_lines(tmp_path / "good.jsonl", GOOD))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError):
        run_ingest(out, tmp_path / "good.jsonl", tmp_path / "missing.jsonl")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_unreadable_directory_is_a_user_error(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    (locked / "inner").mkdir(parents=True)
    real_scandir = os.scandir

    def refuse(path="."):  # what os.walk meets on a directory without read permission
        if str(path) == str(locked / "inner"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    with pytest.raises(UserError, match=r"locked/inner: cannot read directory \(Permission denied\)"):
        resolve_sources([str(locked)])


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any directory")
def test_unreadable_directory_for_real(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0)
    try:
        with pytest.raises(UserError, match="cannot read directory"):
            resolve_sources([str(locked)])
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"format": "nope"}, "--format nope: unknown; use auto or one of trl, hh"),
        ({"format": "hh", "options": {"column_map": {"prompt": "q"}}}, "--map is for the tabular format"),
    ],
)
def test_bad_options_are_user_errors(tmp_path, options, message):
    with pytest.raises(UserError, match=message):
        IngestConfig(inputs=["x.jsonl"], out=str(tmp_path), **options)


@pytest.mark.parametrize(
    ("text", "message"),
    [("prompt", "'prompt' is not field=column"), ("answer=a", "unknown field 'answer'"),
     ("prompt=", "not field=column")],
)
def test_bad_map_is_a_user_error(text, message):
    with pytest.raises(UserError, match=message):
        parse_column_map(text)


def test_forced_format_quarantines_rows_without_its_columns(tmp_path):
    records, quarantine, manifest = run_ingest(tmp_path / "out", FIXTURES / "hh.jsonl", format="openai")
    assert records == [] and manifest.counts.dropped == {"missing_field": 7}
    assert quarantine[0]["message"] == "missing field 'input'"


def test_ingest_writes_exactly_its_three_files(tmp_path):
    ingest(IngestConfig(inputs=[str(FIXTURES / "hh.jsonl")], out=str(tmp_path / "out"), workers=1))
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["manifest.json", "quarantine.jsonl", "records.parquet"]
