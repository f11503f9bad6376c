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
    filesystem, root = location._filesystem(uri)
    out = {}
    for name in location._files(filesystem, root):
        with filesystem.open_input_stream(f"{root}/{name}") as stream:
            out[name] = stream.read()
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


def test_a_publish_that_dies_part_way_leaves_a_prefix_no_stage_reads(s3, tmp_path, monkeypatch):
    out = f"{s3}/broken"
    config = IngestConfig(inputs=[str(FIXTURES / "hh.jsonl")], out=out)
    ingest(config)
    assert "manifest.json" in _remote_files(out)

    upload = location._upload

    def upload_then_fail(source: Path, filesystem, target: str) -> None:
        if source.name == "quarantine.jsonl":
            raise OSError("connection reset by peer")
        upload(source, filesystem, target)

    monkeypatch.setattr(location, "_upload", upload_then_fail)
    with pytest.raises(UserError, match=r"publishing the output failed \(connection reset by peer\)") as failed:
        ingest(config)
    assert "\n" not in str(failed.value)
    assert "manifest.json" not in _remote_files(out)  # the old one went first: no stage reads the mix
    with pytest.raises(UserError, match=r"broken: no manifest.json; .* stopped before it finished publishing"):
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
    ("s3://no-such-bucket-here/x", r"s3://no-such-bucket-here/x: publishing the output failed"),
])
def test_an_unusable_location_is_one_line(s3, where, message):
    with pytest.raises(UserError, match=message) as failed:
        ingest(IngestConfig(inputs=[str(FIXTURES / "hh.jsonl")], out=where))
    assert "\n" not in str(failed.value)


def test_file_uris_are_local_paths_written_by_a_rename(tmp_path):
    ingest(IngestConfig(inputs=[str(FIXTURES / "hh.jsonl")], out=f"file://{tmp_path}/ingest"))
    assert (tmp_path / "ingest" / "manifest.json").is_file()
    assert not location.is_uri(f"file://{tmp_path}") and location.is_uri("gs://bucket/x")
