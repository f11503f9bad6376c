"""--engine ray (issue 28) on a real cluster of processes: a head and two worker nodes started on
this machine by ray.cluster_utils.Cluster, shared by every test here. Every output file of ingest
and curate is compared byte for byte with the local engine's (manifests less the engine's own
config fields), on the shared real dumps and the hostile file; near-duplicate components found on
the cluster equal the local ones; a Ray worker process killed mid-stage is retried to the same
bytes, or, without retries, the stage fails in one line and leaves --out as it was."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

import prefdata.engine_ray as engine_ray  # noqa: E402
import prefdata.ingest as ingest_module  # noqa: E402
import prefdata.neardup_ray as engine_ray_neardup  # noqa: E402
from prefdata.curate import CurateConfig, curate  # noqa: E402
from prefdata.ingest import IngestConfig, ingest  # noqa: E402
from prefdata.neardup import components  # noqa: E402
from prefdata.tokenize import TokenizeConfig, tokenize  # noqa: E402
from schemas.errors import UserError  # noqa: E402
from tests.records_factory import make_record, unpaired_from_pairs, write_records_dir  # noqa: E402
from tests.test_curate_chunked import _mixed_records, _records_dir  # noqa: E402
from tests.test_ingest_inputs import dirty_jsonl  # noqa: E402
from tests.test_object_store import s3  # noqa: E402, F401 - the S3 endpoint fixture

RAY = {"engine": "ray"}


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    head = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        head.add_node(num_cpus=1)
    ray.init(address=head.address, logging_level="ERROR", log_to_driver=False)
    head.wait_for_nodes()
    yield head
    ray.shutdown()
    head.shutdown()


def _outputs(out: Path, engine: str) -> dict[str, bytes]:
    """Every file the stage wrote; the manifest without the engine's own config fields, which must
    name `engine` (a run that fell back to the local engine would compare equal otherwise)."""
    files = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    manifest = json.loads(files.pop("manifest.json"))
    assert manifest["config"].pop("execution")["engine"] == engine
    return {**files, "manifest.json": json.dumps(manifest, sort_keys=True).encode()}


def _ingest_both(tmp_path: Path, name: str, inputs: list[Path], **options) -> dict[str, bytes]:
    outs = {}
    for engine in ("local", "ray"):
        out = tmp_path / name  # one --out for both: it is in the manifest
        ingest(IngestConfig(inputs=[str(i) for i in inputs], out=str(out), execution={"engine": engine}, **options))
        outs[engine] = _outputs(out, engine)
    assert set(outs["ray"]) == {"records.parquet", "quarantine.jsonl", "manifest.json"}
    for file in outs["local"]:
        assert outs["ray"][file] == outs["local"][file], file
    return outs["ray"]


def test_ingest_on_ray_writes_the_local_bytes_for_the_real_dumps(cluster, tmp_path, realdata):
    _ingest_both(tmp_path, "dumps", [realdata / "llamafactory_dpo_en_demo" / "dpo_en_demo.json",  # a JSON array: rows read here
                                     realdata / "llamafactory_v1_dpo_demo" / "v1_dpo_demo.jsonl",
                                     realdata / "steamshp_format_hh_helpful_test" / "anthropic_helpful_test_head.jsonl",
                                     realdata / "oasst_export_trees" / "en_100_tree.jsonl"], row_group_rows=97)
    _ingest_both(tmp_path, "orca", [realdata / "orca_dpo_pairs" / "orca_dpo_pairs_demo.csv"],
                 options={"column_map": {"system": "system", "prompt": "question"}})


def test_ingest_on_ray_writes_the_local_bytes_for_the_hostile_file(cluster, tmp_path, monkeypatch):
    """BOM, CRLF, blank lines, bad JSON, bytes that are not UTF-8, an empty answer, a last line
    cut short, in byte ranges of a few lines each read by the workers on three nodes."""
    monkeypatch.setattr(ingest_module, "RANGE_BYTES", 700)
    outputs = _ingest_both(tmp_path, "hostile", [dirty_jsonl(tmp_path / "dirty.jsonl", 400)], row_group_rows=37)
    assert outputs["quarantine.jsonl"].count(b"\n") > 50


@pytest.mark.parametrize("options", [{"eval_fraction": 0.3},
                                     {"eval_fraction": 0.3, "max_pairs_per_prompt": 2, "min_margin": 0.5, "seed": 4}])
def test_curate_on_ray_writes_the_local_bytes_with_near_duplicates(cluster, tmp_path, options):
    """Shuffled records (pass 2 bucket-sorts), chunks of 7 records: many signature blocks and
    partitions, near-duplicate clusters across them."""
    src = _records_dir(tmp_path, "in", _mixed_records(seed=3), shuffle_seed=2)
    outs = {}
    for engine in ("local", "ray"):
        manifest = curate(CurateConfig(inputs=[str(src)], out=str(tmp_path / "out"), chunk_rows=7,
                                       execution={"engine": engine}, **options))
        outs[engine] = _outputs(tmp_path / "out", engine)
    assert manifest.stats["rows_in_multi_member_clusters"] > 10 and manifest.stats["eval"] > 0
    assert set(outs["ray"]) == {"train.parquet", "eval.parquet", "dropped.parquet", "manifest.json"}
    for file in outs["local"]:
        assert outs["ray"][file] == outs["local"][file], file


def _record_reads(monkeypatch, marks: Path, pause: float = 0.0) -> None:
    """Every Ray read appends the id of the node it ran on to `marks` (the wrapper is defined here,
    so Ray ships it by value to the workers, where a monkeypatch of this process cannot reach);
    `pause` seconds before each job it yields keep a read streaming long enough to be killed on a
    busy machine (a read done before the kill landed is not re-run)."""
    real_map = engine_ray.RayPool.map_units

    def recorded(pool, units, read, here=False):
        def read_and_record(unit):
            with open(marks, "a") as out:
                out.write(f"{ray.get_runtime_context().get_node_id()}\n")
            for job in read(unit):
                time.sleep(pause)
                yield job
        return real_map(pool, units, read_and_record, here)

    monkeypatch.setattr(engine_ray.RayPool, "map_units", recorded)


def test_sets_fetched_from_an_object_store_are_read_on_the_drivers_node(cluster, s3, tmp_path, chat_tokenizer_dir,  # noqa: F811
                                                                        monkeypatch):
    """A set read from a URI is this process's temporary copy, which other nodes lack: its reads
    run on this process's node (each read records the node it ran on; unpinned, Ray Data spreads
    tasks over the three nodes), and curate and tokenize write the local engine's bytes."""
    marks = tmp_path / "read-nodes"
    _record_reads(monkeypatch, marks)
    records = _records_dir(tmp_path, "in", _mixed_records(seed=4), shuffle_seed=1)
    curate(CurateConfig(inputs=[str(records)], out=f"{s3}/fetched/curated", eval_fraction=0.3))
    outs = {}
    for engine in ("local", "ray"):
        curate(CurateConfig(inputs=[f"{s3}/fetched/curated"], out=str(tmp_path / "curated"), chunk_rows=9,
                            execution={"engine": engine}))
        tokenize(TokenizeConfig(input_dir=f"{s3}/fetched/curated", tokenizer=str(chat_tokenizer_dir), out=str(tmp_path / "shards"),
                                max_length=64, batch_rows=5, rows_per_shard=7, execution={"engine": engine}))
        outs[engine] = {f"{stage}/{name}": data for stage in ("curated", "shards")
                        for name, data in _outputs(tmp_path / stage, engine).items()}
    # curate's reads of the set's train and eval files, and tokenize's, each on this process's node
    assert marks.read_text().split() == [ray.get_runtime_context().get_node_id()] * 4
    assert outs["ray"] == outs["local"]


def test_components_on_the_cluster_equal_the_local_ones(cluster):
    """Chains (many rounds of propagation), stars, repeated edges and lone nodes, the edges split
    over several partitions as the object store holds them."""
    from prefdata.neardup_ray import _components

    rng = np.random.default_rng(0)
    n = 500
    path = rng.permutation(np.arange(100, 199))  # the edges of a path 100–199, in random order
    sources = np.r_[path, rng.integers(200, 400, 150), 7, 7]
    targets = np.r_[path + 1, rng.integers(200, 400, 150), 450, 450]
    parts = np.array_split(rng.permutation(len(sources)), 4)
    refs = [ray.put((sources[p], targets[p])) for p in parts]
    assert np.array_equal(_components(n, refs), components(n, sources, targets))


def test_a_signature_block_is_read_from_the_object_store_without_copies(cluster):
    """Every partition's verify task reads the blocks its candidates are in: their texts and
    signatures are mapped from the store (two reads, one memory), not unpickled each time."""
    import pyarrow as pa

    sign = engine_ray.remote(engine_ray_neardup._sign_block, num_returns=2)
    # Enough for the shared-memory store (an object under 100 KiB is inlined in the owner instead);
    # large_string, as curate's prompt spill (a polars frame's Arrow) hands the texts over.
    texts = pa.array([f"prompt number {i} about the weather in town {i % 7}" for i in range(5000)], pa.large_string())
    _, block = sign.remote(np.arange(5000), texts, 2, 32, 0)
    first, second = ray.get(block), ray.get(block)
    assert first["text"].to_pylist() == texts.to_pylist()
    assert first["text"].buffers()[2].address == second["text"].buffers()[2].address
    (_, signatures), (_, again) = (next(iter(b["sig"].values())) for b in (first, second))
    assert np.shares_memory(signatures, again)


TASKS = ("ray::MapBatches(_read_jobs)", "ray::MapBatches(_apply)",  # the titles of our tasks' workers: Ray Data's operators,
         "ray::_sign_block", "ray::_band_pieces", "ray::_partition_edges")  # and near-duplicates' plain tasks


def _kill_a_worker_mid_stage(stage, titles: tuple[str, ...] = TASKS, ready=lambda: True) -> tuple[list[int], BaseException | None]:
    """Run `stage()` on a thread; SIGKILL the first Ray worker process seen running a task of it
    whose title is one of `titles`, once `ready()` (the task has begun its work, not only its
    start-up)."""
    killed, error = [], []

    def run():
        try:
            stage()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            error.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    while thread.is_alive() and not killed:
        if not ready():
            time.sleep(0.001)
            continue
        for process in psutil.Process(os.getpid()).children(recursive=True):
            try:
                if process.cmdline()[:1] and process.cmdline()[0] in titles:
                    os.kill(process.pid, signal.SIGKILL)
                    killed.append(process.pid)
                    break
            except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
                continue
        time.sleep(0.01)
    thread.join()
    return killed, error[0] if error else None


@pytest.mark.parametrize("task", ["read", "apply"])
def test_a_killed_worker_is_retried_to_the_same_bytes(cluster, tmp_path, monkeypatch, task):
    """Either operator's worker: a read task streaming a compressed file's rows (re-run from the
    file's start, its jobs already delivered not repeated), or a task applying the per-row code."""
    monkeypatch.setattr(ingest_module, "RANGE_BYTES", 300)
    monkeypatch.setattr(ingest_module, "CHUNK_ROWS", 10)  # 300 jobs: the read streams long enough to be killed
    path = dirty_jsonl(tmp_path / "dirty.jsonl", 3000)
    if task == "read":
        path = tmp_path / "dirty.jsonl.gz"
        path.write_bytes(gzip.compress((tmp_path / "dirty.jsonl").read_bytes()))
    ingest(IngestConfig(inputs=[str(path)], out=str(tmp_path / "out"), workers=2))
    local = _outputs(tmp_path / "out", "local")
    config = IngestConfig(inputs=[str(path)], out=str(tmp_path / "out"), execution=RAY)
    marks = tmp_path / "reads"
    _record_reads(monkeypatch, marks, pause=0.01 if task == "read" else 0.0)  # a read of 300 jobs: 3 s at least
    killed, error = _kill_a_worker_mid_stage(lambda: ingest(config), (f"ray::MapBatches(_{task}{'_jobs' * (task == 'read')})",),
                                             ready=marks.exists)  # the read has begun
    assert killed and error is None
    reads = len(marks.read_text().split())
    assert reads == (2 if task == "read" else 1), reads  # the killed read was run again; a killed apply's read was not
    assert _outputs(tmp_path / "out", "ray") == local


def test_a_killed_worker_in_curate_is_retried_to_the_same_bytes(cluster, tmp_path):
    src = _records_dir(tmp_path, "in", _mixed_records(seed=5, n_groups=100), shuffle_seed=1)
    options = dict(inputs=[str(src)], out=str(tmp_path / "out"), chunk_rows=5, eval_fraction=0.3)
    curate(CurateConfig(**options))
    local = _outputs(tmp_path / "out", "local")
    killed, error = _kill_a_worker_mid_stage(lambda: curate(CurateConfig(**options, execution=RAY)))
    assert killed and error is None
    assert _outputs(tmp_path / "out", "ray") == local


def test_an_input_error_in_a_read_task_is_the_local_engines_one_line(cluster, tmp_path):
    """A compressed file cut short is found by the read task streaming it, on some node: the stage
    stops with the local engine's one line, and --out is not written."""
    whole = gzip.compress(dirty_jsonl(tmp_path / "dirty.jsonl", 2000).read_bytes())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    messages = {}
    for engine in ("local", "ray"):
        with pytest.raises(UserError) as exc:
            ingest(IngestConfig(inputs=[str(path)], out=str(tmp_path / "out"), execution={"engine": engine}))
        messages[engine] = str(exc.value)
    assert messages["ray"] == messages["local"] and "cut short" in messages["ray"] and "\n" not in messages["ray"]
    assert not (tmp_path / "out").exists()


def test_a_tasks_user_error_is_itself_and_a_bug_keeps_its_traceback(cluster):
    """A UserError raised by the per-row code in a task is raised here as that UserError (Ray wraps
    it in a RayTaskError whose text is the remote traceback); an error that is not the input's
    is not dressed up as a lost worker."""
    from prefdata.ingest import parse_column_map

    pool = engine_ray.RayPool(parse_column_map, in_flight=4)
    assert list(pool.map_units([["prompt=question", "system=sys"]], list)) == [{"prompt": "question"}, {"system": "sys"}]
    with pytest.raises(UserError) as exc:
        list(pool.map_units([["prompt=question", "no-equals-sign"]], list))
    assert type(exc.value) is UserError
    assert str(exc.value) == "--map: 'no-equals-sign' is not field=column (e.g. --map system=system,prompt=question)"
    with pytest.raises(Exception) as exc:
        list(engine_ray.RayPool(len, in_flight=4).map_units([[3]], list))  # len(3): a TypeError in the task
    assert isinstance(exc.value, TypeError) and not isinstance(exc.value, UserError) and "File \"" in str(exc.value)  # its frames


def test_the_cli_on_ray_prints_one_line_for_bad_input(cluster, tmp_path):
    """The whole of stderr, through the CLI joined to the cluster by RAY_ADDRESS: no Ray Data
    plan or progress lines, no traceback logged beside the error."""
    whole = gzip.compress(dirty_jsonl(tmp_path / "dirty.jsonl", 2000).read_bytes())
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "prefdata", "ingest", str(tmp_path / "cut.jsonl.gz"), "--out", str(tmp_path / "out"),
                          "--engine", "ray"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode != 0 and "cut short" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_many_failing_tasks_print_one_line(cluster):
    """Every in-flight task raising (a bad row in each chunk, say): the stage reports the first, and
    the others' failures, never read, are not logged beside it (as Ray's "unhandled errors")."""
    script = ("import sys\n"
              "from prefdata.engine_ray import RayPool, connected\n"
              "from prefdata.ingest import parse_column_map\n"
              "from schemas.errors import UserError\n"
              "try:\n"
              "    with connected(None, 16):\n"
              "        list(RayPool(parse_column_map, 16).map_units([['bad'] * 12], list))\n"
              "except UserError as exc:\n"
              "    print(exc, file=sys.stderr)\n"
              "    sys.exit(1)\n")
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    env.pop("RAY_IGNORE_UNHANDLED_ERRORS", None)  # as a user's shell has it: not set
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == ["--map: 'bad' is not field=column (e.g. --map system=system,prompt=question)"], run.stderr


def test_a_worker_killed_past_the_retries_fails_in_one_line_and_leaves_out(cluster, tmp_path, monkeypatch):
    monkeypatch.setattr(ingest_module, "RANGE_BYTES", 300)
    monkeypatch.setattr(engine_ray, "MAX_RETRIES", 0)
    path = dirty_jsonl(tmp_path / "dirty.jsonl", 3000)
    out = tmp_path / "out"
    ingest(IngestConfig(inputs=[str(dirty_jsonl(tmp_path / "before.jsonl", 5))], out=str(out)))  # a previous run's output
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    killed, error = _kill_a_worker_mid_stage(lambda: ingest(IngestConfig(inputs=[str(path)], out=str(out), execution=RAY)))
    assert killed and isinstance(error, UserError)
    assert "\n" not in str(error) and str(error).startswith("ray: prefdata.ingest._convert failed after 0 retries")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_unreachable_address_and_missing_ray_are_one_line(cluster, tmp_path, monkeypatch):
    config = IngestConfig(inputs=[str(dirty_jsonl(tmp_path / "d.jsonl", 5))], out=str(tmp_path / "out"),
                          execution={"engine": "ray", "ray_address": "127.0.0.1:9"})
    # This process holds the test cluster's connection: another address is refused, not ignored.
    with pytest.raises(UserError, match=r"^--ray-address 127.0.0.1:9: this process is already connected to the Ray cluster"):
        ingest(config)
    # A process without a connection probes the address before ray.init would retry it for minutes.
    monkeypatch.setattr(engine_ray.ray, "is_initialized", lambda: False)
    with pytest.raises(UserError, match=r"^--ray-address \(or RAY_ADDRESS\) 127.0.0.1:9: no Ray cluster answers there") as exc:
        ingest(config)
    assert "\n" not in str(exc.value) and not (tmp_path / "out").exists()
    # A Ray Client driver is on no node, so the tasks could not read what it names.
    with pytest.raises(UserError, match=r"^--ray-address \(or RAY_ADDRESS\) ray://127.0.0.1:10001: Ray Client \(ray://\) "
                                        r"addresses are not supported"):
        ingest(config.model_copy(update={"execution": config.execution.model_copy(update={"ray_address": "ray://127.0.0.1:10001"})}))
    # The same for a dead RAY_ADDRESS with no --ray-address (ray.init would retry it for minutes).
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    with pytest.raises(UserError, match=r"^--ray-address \(or RAY_ADDRESS\) 127.0.0.1:9: no Ray"):
        ingest(config.model_copy(update={"execution": config.execution.model_copy(update={"ray_address": None})}))
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.delitem(sys.modules, "prefdata.engine_ray")  # imported again, as if the extra were not installed:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(UserError, match=r"^--engine ray needs Ray \(ray is not installed\); pip install 'prefdata\[ray\]'"):
        ingest(config.model_copy(update={"execution": config.execution.model_copy(update={"ray_address": None})}))


@pytest.mark.parametrize("kind", ["paired", "unpaired"])
def test_tokenize_on_ray_writes_the_local_bytes(cluster, tmp_path, chat_tokenizer_dir, kind):
    """Shards, dropped rows and manifest, with batches of two rows encoded across the nodes and a
    pair too long for --max-length; unpaired rows too (their KL completions are chosen on the
    driver from the ordered results)."""
    records = [make_record(f"question {i}" + " word" * 30 * (i % 7 == 3), f"answer {i}", f"other {i}", row=i) for i in range(23)]
    records = unpaired_from_pairs(records) if kind == "unpaired" else records
    src = write_records_dir(tmp_path / "in", {"train": records[:19], "eval": records[19:]})
    outs = {}
    for engine in ("local", "ray"):
        tokenize(TokenizeConfig(input_dir=str(src), tokenizer=str(chat_tokenizer_dir), out=str(tmp_path / "out"), max_length=40,
                                max_prompt_length=30, batch_rows=2, rows_per_shard=4, execution={"engine": engine}))
        outs[engine] = _outputs(tmp_path / "out", engine)
    assert len([name for name in outs["ray"] if name.endswith(".arrow")]) >= 4 and b"too_long" in outs["ray"]["manifest.json"]
    assert outs["ray"] == outs["local"]


def test_components_take_few_rounds_on_a_long_chain():
    """Hooking each edge's endpoints' roots, not only the endpoints: the chain 0–(n−1)–(n−2)–…–1
    took n rounds with endpoints alone (a round is a cluster-wide task per partition); now a few."""
    from prefdata.neardup_ray import _next_labels, _proposals

    n = 3000
    chain = np.r_[0, np.arange(n - 1, 0, -1)]
    edges = (chain[:-1], chain[1:])
    labels, rounds = np.arange(n, dtype=np.int64), 0
    while not np.array_equal(moved := _next_labels(labels, [_proposals(labels, edges)]), labels):
        labels, rounds = moved, rounds + 1
    assert np.array_equal(labels, components(n, *edges)) and (labels == 0).all()
    assert rounds <= 5


def test_the_ray_runs_really_ran_on_the_cluster(cluster, tmp_path, monkeypatch):
    """The byte comparisons above would pass if --engine ray quietly ran locally: count the tasks."""
    calls = []
    real_map = engine_ray.RayPool.map_units

    def counted(pool, units, read, here=False):
        for result in real_map(pool, units, read, here):
            calls.append(pool.fn.__name__)
            yield result

    monkeypatch.setattr(engine_ray.RayPool, "map_units", counted)
    near_dup = []
    real_nodes = engine_ray_neardup.near_duplicate_nodes
    monkeypatch.setattr(engine_ray_neardup, "near_duplicate_nodes", lambda *a, **k: near_dup.append(1) or real_nodes(*a, **k))
    src = _records_dir(tmp_path, "in", _mixed_records(seed=3), shuffle_seed=2)
    curate(CurateConfig(inputs=[str(src)], out=str(tmp_path / "out"), chunk_rows=7, execution=RAY))
    assert set(calls) == {"_narrow_job"} and len(calls) >= 2 and near_dup == [1]
