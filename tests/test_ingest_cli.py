"""`prefdata ingest` on the command line: exit code 0 and a summary, or exit code 2 and one line
on stderr (no traceback) with nothing written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from ingest_support import FIXTURES

from prefdata import cli


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefdata", "ingest", *args], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def test_cli_map_applies_to_every_input(tmp_path):
    done = run_cli(str(FIXTURES / "tabular.csv"), str(FIXTURES / "hh.jsonl"), "--out", str(tmp_path / "out"),
                   "--map", "system=sys,prompt=question,chosen=good,rejected=bad")
    assert done.returncode == 2  # the HH file has none of the mapped columns
    assert done.stderr.splitlines() == [
        f"prefdata: error: {FIXTURES / 'hh.jsonl'}: format tabular needs column(s) bad, good, question, sys; "
        "the rows have [chosen, rejected] (see --map)"
    ]
    assert not (tmp_path / "out").exists()


def test_cli_ingests_and_prints_a_summary(tmp_path):
    out = tmp_path / "out"
    done = run_cli(str(FIXTURES / "hh.jsonl"), str(FIXTURES / "trl_explicit.jsonl"), "--out", str(out),
                   "--limit", "9", "--workers", "2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        'ingest: read 9, kept 5, quarantined 4 {"hh_not_alternating": 2, "hh_prefix_mismatch": 1, "empty_content": 1}',
        "  hh.jsonl (hh): read 7, kept 3",
        "  trl_explicit.jsonl (trl): read 2, kept 2",
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["config"]["limit"], manifest["config"]["workers"], manifest["config"]["format"]) == (9, 2, "auto")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.jsonl"], "prefdata: error: missing.jsonl: no such file or directory"),
        ([str(FIXTURES / "hh.jsonl"), "--map", "prompt"],
         "prefdata: error: --map: 'prompt' is not field=column (e.g. --map system=system,prompt=question)"),
        ([str(FIXTURES / "hh.jsonl"), "--limit", "0"], "prefdata: error: --limit: Input should be greater than 0"),
        ([str(FIXTURES / "shp.jsonl"), "--pairs", "best"],
         "prefdata: error: --pairs: Input should be 'best-vs-worst', 'best-vs-rest', 'all' or 'adjacent'"),
        ([str(FIXTURES / "shp.jsonl"), "--min-score-ratio", "0.5"],
         "prefdata: error: --min-score-ratio: Input should be greater than or equal to 1"),
    ],
)
def test_cli_user_errors_are_one_line_and_exit_2(tmp_path, args, message):
    done = run_cli(*args, "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [message]
    assert not (tmp_path / "out").exists()


def test_cli_unknown_format_of_a_real_file(tmp_path, realdata, monkeypatch, capsys):
    """In-process through cli.main(), the same path the console script takes."""
    path = realdata / "openai_chat_jsonl" / "toy_chat_fine_tuning.jsonl"
    monkeypatch.setattr(sys, "argv", ["prefdata", "ingest", str(path), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"prefdata: error: {path}: no known preference format has columns [messages]")
    assert not (tmp_path / "out").exists()


def test_a_full_disk_is_one_line_and_leaves_the_previous_output(tmp_path, monkeypatch, capsys):
    import errno

    import pyarrow.parquet as pq

    out = tmp_path / "out"
    argv = ["prefdata", "ingest", str(FIXTURES / "hh.jsonl"), "--out", str(out), "--workers", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(*_args, **_kwargs):  # what pyarrow raises: the errno, no file name
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", disk_full)
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and [line for line in err.splitlines() if not line.startswith("[ingest]")] == [
        f"prefdata: error: {out}: not written, no space left on device; free space on its disk and run again "
        f"(the previous {out} is unchanged)"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left behind


def test_a_full_disk_names_the_file_a_whole_file_write_was_writing(tmp_path, monkeypatch):
    import errno

    from schemas.io import NoSpaceError, atomic_dir, write_text_atomic

    def fsync(_fd):  # the last step of an atomic file write, where a full disk shows at the latest
        raise OSError(errno.ENOSPC, "No space left on device")

    write_text_atomic(tmp_path / "judged.jsonl", "old\n")
    monkeypatch.setattr("os.fsync", fsync)
    with pytest.raises(NoSpaceError, match=rf"^{tmp_path / 'judged.jsonl'}: not written, no space left on device"):
        write_text_atomic(tmp_path / "judged.jsonl", "new\n")
    assert (tmp_path / "judged.jsonl").read_text() == "old\n"
    with pytest.raises(NoSpaceError, match=rf"^{tmp_path / 'stage' / 'manifest.json'}: not written, .*"
                                           rf"\(the previous {tmp_path / 'stage'} is unchanged\)$"):
        with atomic_dir(tmp_path / "stage") as tmp:
            write_text_atomic(tmp / "manifest.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["judged.jsonl"]


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_a_stages_output_has_the_permissions_the_users_umask_gives(tmp_path, umask, file_mode, dir_mode):
    """Written through private temporaries (mkstemp, mkdtemp) and renamed: without a chmod a team's
    curated records on a shared filesystem would be readable by their writer alone."""
    import os

    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "prefdata", "ingest", str(FIXTURES / "hh.jsonl"), "--out", str(out)],
                          capture_output=True, text=True, preexec_fn=lambda: os.umask(umask),
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    written = list(out.iterdir())
    assert {p.name for p in written} >= {"manifest.json", "records.parquet"}
    assert out.stat().st_mode & 0o777 == dir_mode
    assert {p.name: p.stat().st_mode & 0o777 for p in written} == {p.name: file_mode for p in written}


def test_rewriting_a_file_keeps_the_permissions_it_had(tmp_path):
    from schemas.io import write_text_atomic

    kept = tmp_path / "judged.jsonl"
    write_text_atomic(kept, "old\n")
    kept.chmod(0o640)
    write_text_atomic(kept, "new\n")
    assert kept.read_text() == "new\n" and kept.stat().st_mode & 0o777 == 0o640


def test_a_stage_directory_in_a_setgid_directory_keeps_the_bit_as_mkdir_would(tmp_path):
    """A team's shared directory is setgid so that what lands in it stays in the team's group."""
    import os
    import stat

    from schemas.io import atomic_dir, write_text_atomic

    shared = tmp_path / "team"
    shared.mkdir()
    shared.chmod(0o2775)
    previous = os.umask(0o022)
    try:
        with atomic_dir(shared / "curated") as tmp:
            write_text_atomic(tmp / "manifest.json", "{}")
        (shared / "by-mkdir").mkdir()
    finally:
        os.umask(previous)
    made = (shared / "curated").stat().st_mode
    assert made & 0o7777 == (shared / "by-mkdir").stat().st_mode & 0o7777 == 0o2755 and made & stat.S_ISGID
    assert (shared / "curated" / "manifest.json").stat().st_mode & 0o777 == 0o644
