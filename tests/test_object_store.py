"""Data stages on an object store (issue 28: "where outputs go"): ingest, curate and tokenize with
`--out s3://…`, and curate and tokenize reading the set the stage before published there. The
store is a real S3 endpoint (moto's server, in this process) reached through pyarrow's own S3
client, configured as a user configures MinIO: AWS_ENDPOINT_URL and keys in the environment.

What is checked: the same bytes as the stages' local outputs (manifests less the locations the
user named), the manifest uploaded last so that a publish that dies part-way leaves a prefix no
stage reads, and a re-run's prefix holding its own files only."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from prefdata.curate import CurateConfig, curate
from prefdata.ingest import IngestConfig, ingest
from prefdata.inspect import inspect_dir
from prefdata.tokenize import TokenizeConfig, tokenize
from schemas import location
from schemas.errors import UserError

moto_server = pytest.importorskip("moto.server")
ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "ingest"
BUCKET = "runs"


@pytest.fixture(scope="module")
def s3():
    """An S3 endpoint on a free local port with one bucket; the environment points pyarrow at it."""
    import boto3

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield f"s3://{BUCKET}"
    server.stop()


def _remote_files(uri: str) -> dict[str, bytes]:
    """Every file under the prefix, by its path relative to it."""
    from pyarrow import fs

    filesystem, root = location._filesystem(uri)
    out = {}
    for info in filesystem.get_file_info(fs.FileSelector(root, recursive=True, allow_not_found=True)):
        if info.type == fs.FileType.File:
            with filesystem.open_input_stream(info.path) as stream:
                out[info.path[len(root) + 1:]] = stream.read()
    return out


def _local_files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _without_locations(files: dict[str, bytes]) -> dict[str, bytes]:
    """The manifest less what names a location (--out, the input sets, each input file's path):
    those are the user's names, a local path on one side and a URI on the other."""
    manifest = json.loads(files["manifest.json"])
    for key in ("out", "inputs", "input_dir"):
        manifest["config"].pop(key, None)
    for item in manifest["inputs"]:
        item.pop("path")
    return {**files, "manifest.json": json.dumps(manifest, sort_keys=True).encode()}


def _pipeline(inputs: list[str], at: str, tokenizer: Path) -> tuple[str, str, str]:
    """ingest → curate → tokenize, each reading the one before, under `at` (a directory or a URI)."""
    ingested, curated, shards = f"{at}/ingest", f"{at}/curate", f"{at}/shards"
    ingest(IngestConfig(inputs=inputs, out=ingested, row_group_rows=7))
    curate(CurateConfig(inputs=[ingested], out=curated, eval_fraction=0.2, chunk_rows=13))
    tokenize(TokenizeConfig(input_dir=curated, tokenizer=str(tokenizer), out=shards, max_length=256, rows_per_shard=5))
    return ingested, curated, shards


def test_the_data_stages_through_an_object_store_write_the_local_bytes(s3, tmp_path, chat_tokenizer_dir):
    inputs = [str(FIXTURES / "hh.jsonl"), str(FIXTURES / "ultrafeedback.jsonl"), str(FIXTURES / "shp.jsonl")]
    local = _pipeline(inputs, str(tmp_path), chat_tokenizer_dir)
    remote = _pipeline(inputs, f"{s3}/same", chat_tokenizer_dir)
    for here, there in zip(local, remote):
        mine, stored = _local_files(Path(here)), _remote_files(there)
        assert sorted(stored) == sorted(mine) and len(stored) >= 3, there
        assert _without_locations(stored) == _without_locations(mine), there
    manifest = json.loads(_remote_files(remote[2])["manifest.json"])
    assert manifest["config"]["input_dir"] == remote[1]  # the user's names, not a temporary copy's
    assert {item["path"] for item in manifest["inputs"]} == {f"{remote[1]}/train.parquet", f"{remote[1]}/eval.parquet"}


@pytest.mark.parametrize("dies_at", ["quarantine.jsonl", "manifest.json"])
def test_a_publish_that_dies_part_way_leaves_a_prefix_no_stage_reads(s3, tmp_path, monkeypatch, dies_at):
    out = f"{s3}/broken-{dies_at}"
    config = IngestConfig(inputs=[str(FIXTURES / "hh.jsonl")], out=out)
    ingest(config)
    assert "manifest.json" in _remote_files(out)

    upload = location._upload

    def upload_then_fail(source: Path, filesystem, target: str) -> None:
        if source.name == dies_at:
            raise OSError("connection reset by peer")
        upload(source, filesystem, target)

    monkeypatch.setattr(location, "_upload", upload_then_fail)
    with pytest.raises(UserError, match=r"publishing the output failed \(connection reset by peer\)") as failed:
        ingest(config)
    assert "\n" not in str(failed.value)
    assert "manifest.json" not in _remote_files(out)  # the old one went first: no stage reads the mix
    with pytest.raises(UserError, match=rf"broken-{dies_at}: no manifest.json; .* stopped before it finished publishing"):
        curate(CurateConfig(inputs=[out], out=str(tmp_path / "curate")))
    assert not (tmp_path / "curate").exists()

    monkeypatch.setattr(location, "_upload", upload)
    ingest(config)  # run again: whole
    assert "manifest.json" in _remote_files(out)


def test_a_rerun_leaves_only_its_own_files_under_the_prefix(s3, tmp_path, chat_tokenizer_dir):
    ingested, curated = f"{s3}/rerun/ingest", f"{s3}/rerun/curate"
    ingest(IngestConfig(inputs=[str(FIXTURES / "hh.jsonl"), str(FIXTURES / "shp.jsonl")], out=ingested))
    # The command line, as a user runs it: no option mangles a URI into a path.
    done = subprocess.run([sys.executable, "-m", "prefdata", "curate", ingested, "--out", curated, "--eval-fraction", "0.2"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(_remote_files(curated)["manifest.json"])["config"]["inputs"] == [ingested]
    out = f"{s3}/rerun/shards"
    many = tokenize(TokenizeConfig(input_dir=curated, tokenizer=str(chat_tokenizer_dir), out=out, rows_per_shard=2))
    few = tokenize(TokenizeConfig(input_dir=curated, tokenizer=str(chat_tokenizer_dir), out=out, rows_per_shard=1000))
    assert len(many.shards) > len(few.shards)
    assert sorted(_remote_files(out)) == sorted([*few.outputs, "manifest.json"])
    report = inspect_dir(out)
    assert report["directory"] == out and report["stage"] == "tokenize"
    assert sum(report["rows_per_file"].values()) == few.counts.kept


@pytest.mark.parametrize(("where", "message"), [
    ("nosuchscheme://bucket/x", r"nosuchscheme://bucket/x: pyarrow cannot open this location"),
    ("s3://no-such-bucket-here/x", r"s3://no-such-bucket-here/x: there is no bucket \(or top-level directory\) 'no-such-bucket-here'"),
    ("file://otherhost/x", r"file://otherhost/x: a file:// URI names a path on this machine"),
])
def test_an_unusable_location_is_one_line_before_anything_is_read(s3, where, message, monkeypatch):
    def never(*_):
        raise AssertionError("rows were converted before the location was checked")

    monkeypatch.setattr("prefdata.ingest._ingest_source", never)
    with pytest.raises(UserError, match=message) as failed:
        ingest(IngestConfig(inputs=[str(FIXTURES / "hh.jsonl")], out=where))
    assert "\n" not in str(failed.value)


def _local_only_stages(s3: str, tmp: Path) -> list[tuple[str, Any]]:
    """(the message, a call of the stage with one URI option) for every stage that takes local paths."""
    from prefdata.iterate import IterateConfig, iterate
    from train.config import TrainConfig
    from train.eval import EvalConfig, evaluate_policy
    from train.generate import GenerateConfig, generate
    from train.judge import JudgeConfig, judge
    from train.loop import train
    from train.reference import PrecomputeRefConfig, precompute_ref

    here, there, reward = str(tmp / "x"), f"{s3}/x", "demo.data:lexicon_reward"
    return [
        ("train --shards", lambda: train(TrainConfig(shards=there, model="m", out=here))),
        ("train --out", lambda: train(TrainConfig(shards=here, model="m", out=there))),
        ("precompute-ref SHARDS", lambda: precompute_ref(PrecomputeRefConfig(shards=there, model="m"))),
        ("eval SHARDS", lambda: evaluate_policy(EvalConfig(shards=there, policy="m", reference="m", out=here))),
        ("generate --out", lambda: generate(GenerateConfig(prompts=here, policy="m", out=there))),
        ("judge GENERATIONS", lambda: judge(JudgeConfig(generations=there, out=here, reward=reward))),
        ("iterate --prompts", lambda: iterate(IterateConfig(prompts=there, policy="m", out=here, reward=reward))),
        ("iterate --out", lambda: iterate(IterateConfig(prompts=here, policy="m", out=f"file://{tmp}/y", reward=reward))),
        ("ingest INPUTS", lambda: ingest(IngestConfig(inputs=[f"{there}.jsonl", str(FIXTURES / "hh.jsonl")], out=here))),
    ]


def test_stages_that_take_local_paths_refuse_a_uri_in_one_line_before_any_work(s3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a stage that took s3://… for a path would write ./s3:/… here
    for option, run in _local_only_stages(s3, tmp_path):
        with pytest.raises(UserError, match=rf"^\S+: {option} takes a (plain )?local path; ") as refused:
            run()
        assert "\n" not in str(refused.value)
    assert not list(tmp_path.iterdir())  # nothing was written


def test_file_uris_are_local_paths_written_by_a_rename(tmp_path):
    ingest(IngestConfig(inputs=[str(FIXTURES / "hh.jsonl")], out=f"file://{tmp_path}/ingest"))
    assert (tmp_path / "ingest" / "manifest.json").is_file()
    assert not location.is_uri(f"file://{tmp_path}") and location.is_uri("gs://bucket/x")


def test_curate_takes_local_and_object_store_sets_together(s3, tmp_path):
    """One set here, one in the store: the output of both sets given locally."""
    first, second = str(tmp_path / "first"), f"{s3}/mixed/second"
    ingest(IngestConfig(inputs=[str(FIXTURES / "hh.jsonl")], out=first))
    ingest(IngestConfig(inputs=[str(FIXTURES / "ultrafeedback.jsonl")], out=second))
    ingest(IngestConfig(inputs=[str(FIXTURES / "ultrafeedback.jsonl")], out=str(tmp_path / "second")))
    curate(CurateConfig(inputs=[first, second], out=str(tmp_path / "mixed"), eval_fraction=0.2))
    curate(CurateConfig(inputs=[first, str(tmp_path / "second")], out=str(tmp_path / "local"), eval_fraction=0.2))
    assert _without_locations(_local_files(tmp_path / "mixed")) == _without_locations(_local_files(tmp_path / "local"))
    names = [item["path"] for item in json.loads((tmp_path / "mixed" / "manifest.json").read_text())["inputs"]]
    assert names == [f"{first}/records.parquet", f"{second}/records.parquet"]


def test_publishing_leaves_other_files_under_the_prefix_alone(s3):
    """Only the old output's files (those its manifest lists) are replaced or deleted: an output
    published at a parent prefix does not delete another output below it."""
    parent, child = f"{s3}/nest", f"{s3}/nest/child"
    ingest(IngestConfig(inputs=[str(FIXTURES / "shp.jsonl")], out=child))
    ingest(IngestConfig(inputs=[str(FIXTURES / "hh.jsonl")], out=parent))
    ingest(IngestConfig(inputs=[str(FIXTURES / "hh.jsonl")], out=parent))  # a re-run: the old output is replaced
    files = _remote_files(parent)
    assert {"child/manifest.json", "child/records.parquet", "manifest.json", "records.parquet"} <= set(files)


def test_an_input_set_whose_manifest_changes_while_it_is_read_is_refused(s3, tmp_path, monkeypatch):
    out = f"{s3}/racing"
    ingest(IngestConfig(inputs=[str(FIXTURES / "hh.jsonl")], out=out))
    download = location._download

    def download_while_another_run_publishes(filesystem, source: str, target: Path) -> None:
        download(filesystem, source, target)
        if source.endswith("records.parquet"):  # the manifest was read; a new run's lands now
            with filesystem.open_output_stream(f"{source.rsplit('/', 1)[0]}/manifest.json") as stream:
                stream.write(target.with_name("manifest.json").read_bytes() + b" ")

    monkeypatch.setattr(location, "_download", download_while_another_run_publishes)
    with pytest.raises(UserError, match=r"racing: its manifest.json changed while it was read \(another run is publishing there\)"):
        curate(CurateConfig(inputs=[out], out=str(tmp_path / "curate")))


def test_an_input_set_is_read_by_its_manifest_and_errors_name_the_uri(s3, tmp_path, chat_tokenizer_dir, monkeypatch):
    """Only the files the manifest lists are fetched; a wrong stage's output is refused naming the
    URI, not the temporary copy; no temporary directory is left behind."""
    import tempfile

    # A TMPDIR of this test's own: other test processes make and remove theirs meanwhile.
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    out = f"{s3}/byname"
    ingest(IngestConfig(inputs=[str(FIXTURES / "hh.jsonl")], out=out))
    filesystem, root = location._filesystem(out)
    with filesystem.open_output_stream(f"{root}/notes/unrelated.bin") as stream:
        stream.write(b"not part of the output")
    with location.input_dirs([out]) as (local,):
        assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()) == \
            ["manifest.json", "quarantine.jsonl", "records.parquet"]
    shards = f"{s3}/byname-shards"
    tokenize(TokenizeConfig(input_dir=out, tokenizer=str(chat_tokenizer_dir), out=shards))
    with pytest.raises(UserError, match=rf"^{shards}: made by 'tokenize', expected the output of ingest or curate"):
        curate(CurateConfig(inputs=[shards], out=str(tmp_path / "curate")))
    assert not list(temporary.iterdir())
