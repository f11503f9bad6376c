"""train/reference.py and `prefdata precompute-ref`: values, resuming, torchrun, guards."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import torch
from transformers import AutoTokenizer

from prefdata.tokenize import TokenizeConfig, tokenize
from schemas.errors import UserError
from schemas.fingerprint import tokenizer_fingerprint
from schemas.io import sha256_file
from schemas.manifest import Counts, Manifest, ShardFile
from schemas.shard import SHARD_SCHEMA, SHARD_WITH_REF_SCHEMA
from tests.conftest import CORPUS
from tests.records_factory import make_record, write_records_dir
from tests.test_logprobs import trl_precomputed_dataset
from train.batching import TokenColumns
from train.reference import MARKERS_DIR, PrecomputeRefConfig, _verify, precompute_ref

SHARD_NAMES = [f"train-0000{i}.arrow" for i in range(5)] + ["eval-00000.arrow"]
# About one pair per forward pass: slow enough for the kill test to land mid-run. Runs compared
# byte for byte use the same budget (another batching rounds the last float32 bit differently).
BATCH_TOKENS = 64


def _read(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        return ipc.open_file(source).read_all()


def _shas(directory: Path) -> dict[str, str]:
    return {name: sha256_file(directory / name) for name in SHARD_NAMES}


def _run(directory: Path, model: Path, **options) -> object:
    return precompute_ref(PrecomputeRefConfig(shards=str(directory), model=str(model), **options))


@pytest.fixture(scope="session")
def pristine_shards(tiny_model_dir, tmp_path_factory) -> Path:
    """240 pairs of varied lengths tokenized by `prefdata tokenize`: 5 train shards + 1 eval shard."""
    records = [
        make_record(f"{CORPUS[i % 7]} ({i})", CORPUS[(i + 1) % 7][: 8 + (5 * i) % 50], CORPUS[(i + 3) % 7][: 4 + (3 * i) % 45], row=i)
        for i in range(240)
    ]
    root = tmp_path_factory.mktemp("ref")
    write_records_dir(root / "records", {"train": records[:200], "eval": records[200:]})
    tokenize(TokenizeConfig(input_dir=str(root / "records"), tokenizer=str(tiny_model_dir), out=str(root / "shards"),
                            rows_per_shard=40))
    assert sorted(p.name for p in (root / "shards").glob("*.arrow")) == sorted(SHARD_NAMES)
    return root / "shards"


@pytest.fixture(scope="session")
def uninterrupted(pristine_shards, tiny_model_dir, tmp_path_factory) -> Path:
    """One complete run, the baseline the interrupted and multi-process runs must equal."""
    out = tmp_path_factory.mktemp("done") / "shards"
    shutil.copytree(pristine_shards, out)
    _run(out, tiny_model_dir, batch_tokens=BATCH_TOKENS)
    return out


@pytest.fixture
def shards(pristine_shards, tmp_path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(pristine_shards, out)
    return out


@pytest.fixture(scope="session")
def other_model_dir(chat_tokenizer_dir, tmp_path_factory) -> Path:
    from train.tiny import build_model

    return build_model(chat_tokenizer_dir, tmp_path_factory.mktemp("other-model"), seed=1)


# ---------------------------------------------------------------------------------------------
# values


def test_stored_values_equal_trl_precomputed_reference(tiny_model_dir, tmp_path):
    """TRL 1.x DPOTrainer(precompute_ref_log_probs=True) tokenizes and scores rows; we store its
    token ids in a shard, run precompute-ref with the same model, and read back TRL's numbers."""
    data = trl_precomputed_dataset(tiny_model_dir, tmp_path / "trl")
    shards = tmp_path / "shards"
    shards.mkdir()
    table = pa.table({"id": [str(i) for i in range(len(data))], "prompt_id": [str(i) for i in range(len(data))],
                      "prompt_input_ids": data["prompt_ids"], "chosen_input_ids": data["chosen_ids"],
                      "rejected_input_ids": data["rejected_ids"]}, schema=SHARD_SCHEMA)
    with ipc.new_file(shards / "train-00000.arrow", SHARD_SCHEMA) as writer:
        writer.write_table(table)
    fingerprint = tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_model_dir), str(tiny_model_dir))
    Manifest(stage="tokenize", package_version="test", config={}, counts=Counts(read=len(data), kept=len(data)),
             shards=[ShardFile(name="train-00000.arrow", split="train", rows=len(data), sha256=sha256_file(shards / "train-00000.arrow"))],
             tokenizer=fingerprint).write(shards)

    result = _run(shards, tiny_model_dir, batch_tokens=100)  # several batches, sorted out of row order
    stored = _read(shards / "train-00000.arrow")
    assert stored.schema.equals(SHARD_WITH_REF_SCHEMA)
    np.testing.assert_allclose(stored["ref_chosen_logps"].to_numpy(), data["ref_chosen_logps"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(stored["ref_rejected_logps"].to_numpy(), data["ref_rejected_logps"], atol=1e-4, rtol=0)
    assert stored["prompt_input_ids"].to_pylist() == data["prompt_ids"]
    assert result.manifest.shards[0].sha256 == sha256_file(shards / "train-00000.arrow")


def test_manifest_records_reference_and_shards_read_back_everywhere(uninterrupted, tiny_model_dir):
    import polars as pl

    manifest = Manifest.read(uninterrupted)
    assert manifest.stage == "precompute-ref"
    assert manifest.reference.name_or_path == str(tiny_model_dir)
    assert (manifest.reference.dtype, manifest.reference.device_type) == ("float32", "cpu")
    assert manifest.reference.weights_sha256 and manifest.reference.config_sha256 == sha256_file(tiny_model_dir / "config.json")
    assert {s.name: s.sha256 for s in manifest.shards} == _shas(uninterrupted)
    assert manifest.counts.read == manifest.counts.kept == 240
    assert manifest.stats["tokenize"]["counts"]["read"] == 240  # tokenize's accounting is kept
    assert 0.5 < manifest.stats["padding_efficiency"] <= 1 and manifest.stats["tokens_per_s"] > 0
    assert {"torch", "transformers"} <= set(manifest.versions)
    assert not (uninterrupted / MARKERS_DIR).exists()
    frame = pl.scan_ipc(str(uninterrupted / "*.arrow")).collect()
    assert frame.height == 240 and frame["ref_chosen_logps"].dtype == pl.Float32
    assert (frame["ref_chosen_logps"] < 0).all() and frame["ref_rejected_logps"].n_unique() > 200


def test_stored_values_do_not_depend_on_the_batch_budget(uninterrupted, shards, tiny_model_dir):
    _run(shards, tiny_model_dir, batch_tokens=4096)  # dozens of pairs per batch
    for name in SHARD_NAMES:
        a, b = _read(shards / name), _read(uninterrupted / name)
        np.testing.assert_allclose(a["ref_chosen_logps"].to_numpy(), b["ref_chosen_logps"].to_numpy(), atol=1e-4, rtol=0)


def test_verify_rescores_rows_alone_and_catches_a_mismatch(shards, tiny_model_dir):
    result = _run(shards, tiny_model_dir, verify=7)
    assert result.manifest.stats["verified_rows"] == 7
    assert result.manifest.stats["verify_max_abs_diff"] < 1e-3
    from transformers import AutoModelForCausalLM

    table = _read(shards / "train-00000.arrow")
    stored = (table["ref_chosen_logps"].to_numpy(), table["ref_rejected_logps"].to_numpy())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    columns = TokenColumns.from_table(table)
    with torch.inference_mode():
        assert _verify(model, columns, np.array([3, 9]), stored, 0, torch.device("cpu"), torch.float32, Path("x")) < 1e-3
        with pytest.raises(UserError, match="--verify row 9"):
            _verify(model, columns, np.array([3, 9]), (stored[0], stored[1] + np.where(np.arange(40) == 9, 0.01, 0)),
                    0, torch.device("cpu"), torch.float32, Path("x"))


def test_bfloat16_reference_is_close_and_counts_as_another_reference(uninterrupted, shards, tiny_model_dir):
    _run(shards, tiny_model_dir, dtype="bfloat16", verify=4)
    assert Manifest.read(shards).reference.dtype == "bfloat16"
    a, b = _read(shards / "train-00000.arrow"), _read(uninterrupted / "train-00000.arrow")
    np.testing.assert_allclose(a["ref_chosen_logps"].to_numpy(), b["ref_chosen_logps"].to_numpy(), atol=1.0, rtol=0.02)
    with pytest.raises(UserError, match="--force"):
        _run(shards, tiny_model_dir, dtype="float32")


# ---------------------------------------------------------------------------------------------
# re-runs, --force, resuming


def test_rerun_with_same_model_does_nothing(uninterrupted, tiny_model_dir):
    before = {p.name: (p.stat().st_mtime_ns, sha256_file(p)) for p in uninterrupted.iterdir() if p.is_file()}
    result = _run(uninterrupted, tiny_model_dir)
    assert result.scored == [] and sorted(result.skipped) == sorted(SHARD_NAMES)
    assert {p.name: (p.stat().st_mtime_ns, sha256_file(p)) for p in uninterrupted.iterdir() if p.is_file()} == before


def test_another_model_is_refused_unless_forced(shards, tiny_model_dir, other_model_dir):
    _run(shards, tiny_model_dir)
    first = _read(shards / "train-00000.arrow")["ref_chosen_logps"].to_numpy()
    with pytest.raises(UserError, match="--force"):
        _run(shards, other_model_dir)
    result = _run(shards, other_model_dir, force=True)
    assert sorted(result.scored) == sorted(SHARD_NAMES)
    table = _read(shards / "train-00000.arrow")
    assert table.schema.equals(SHARD_WITH_REF_SCHEMA)  # ref columns replaced, not added twice
    assert np.abs(table["ref_chosen_logps"].to_numpy() - first).max() > 0.01
    assert Manifest.read(shards).reference.name_or_path == str(other_model_dir)


def test_kill_9_mid_run_then_rerun_equals_uninterrupted_run(uninterrupted, shards, tiny_model_dir):
    command = [sys.executable, "-m", "prefdata", "precompute-ref", str(shards), "--model", str(tiny_model_dir),
               "--batch-tokens", str(BATCH_TOKENS)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    markers = shards / MARKERS_DIR
    # A second marker means the first shard has been renamed into place (markers precede renames).
    while proc.poll() is None and not (markers.is_dir() and len(list(markers.iterdir())) >= 2):
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"

    pristine = {name: sha for name, sha in zip(SHARD_NAMES, (s.sha256 for s in Manifest.read(shards).shards))}
    rewritten = [name for name, sha in _shas(shards).items() if sha != pristine[name]]
    assert 1 <= len(rewritten) < len(SHARD_NAMES)
    assert Manifest.read(shards).stage == "tokenize"  # the manifest is written only at the end

    result = _run(shards, tiny_model_dir, batch_tokens=BATCH_TOKENS)
    assert sorted(result.skipped) == sorted(rewritten)
    assert _shas(shards) == _shas(uninterrupted)  # byte for byte
    assert Manifest.read(shards).shards == Manifest.read(uninterrupted).shards
    assert not list(shards.glob(".tmp-*")) and not (shards / MARKERS_DIR).exists()


def test_crash_between_marker_and_rename_is_redone(uninterrupted, shards, tiny_model_dir, monkeypatch):
    """The narrowest window: the marker names the new sha, but the new file never replaced the old."""
    real_replace = os.replace

    def crash_on_second_shard(src, dst):
        if str(dst).endswith("train-00001.arrow"):
            raise KeyboardInterrupt("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        _run(shards, tiny_model_dir, batch_tokens=BATCH_TOKENS)
    monkeypatch.setattr(os, "replace", real_replace)
    assert (shards / MARKERS_DIR / "train-00001.arrow.json").is_file()

    result = _run(shards, tiny_model_dir, batch_tokens=BATCH_TOKENS)
    assert result.skipped == ["train-00000.arrow"]
    assert _shas(shards) == _shas(uninterrupted)


def test_torchrun_two_processes_equal_one_process(uninterrupted, shards, tiny_model_dir):
    torchrun = Path(sys.executable).with_name("torchrun")
    # Same thread count as this process: matmul reduction order (and so the last bit) depends on it.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "prefdata", "precompute-ref",
                           str(shards), "--model", str(tiny_model_dir), "--batch-tokens", str(BATCH_TOKENS)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("precompute-ref: scored") == 1  # rank 0 reports
    assert _shas(shards) == _shas(uninterrupted)
    assert Manifest.read(shards).shards == Manifest.read(uninterrupted).shards


# ---------------------------------------------------------------------------------------------
# guards: one-line UserErrors, nothing written


def _cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    from prefdata.cli import main

    monkeypatch.setattr(sys, "argv", ["prefdata", "precompute-ref", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


def test_cli_missing_model_exits_2_with_one_line(shards, monkeypatch, capsys, tmp_path):
    code, err = _cli(monkeypatch, capsys, shards, "--model", tmp_path / "nope")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("prefdata: error: model ") and "no such directory" in err


def test_guards_refuse_bad_input_without_touching_shards(shards, tiny_model_dir, base_tokenizer_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    before = _shas(shards)
    unloadable = tmp_path / "unloadable"
    shutil.copytree(tiny_model_dir, unloadable)
    (unloadable / "model.safetensors").write_bytes(b"not safetensors")
    tiny_vocab = tmp_path / "tiny-vocab"
    LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tiny_vocab)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tiny_vocab)
    other_tokenizer = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_model_dir, other_tokenizer)
    AutoTokenizer.from_pretrained(base_tokenizer_dir).save_pretrained(other_tokenizer)

    cases = [
        (unloadable, "cannot load it"),
        (tiny_vocab, "vocabulary has 16 entries"),
        (other_tokenizer, "tokenizer differs"),
    ]
    for model, message in cases:
        with pytest.raises(UserError, match=message):
            _run(shards, model)
    with pytest.raises(UserError, match="no manifest.json"):
        _run(tmp_path, tiny_model_dir)
    assert _shas(shards) == before and not list(shards.glob(".tmp-*"))

    truncated = shards / "train-00003.arrow"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    with pytest.raises(UserError, match="train-00003.arrow: sha256 differs"):
        _run(shards, tiny_model_dir)


def test_auto_dtype_is_bf16_only_where_the_gpu_has_it_in_hardware(monkeypatch):
    """torch's is_bf16_supported() says yes on a V100 or T4 by default (emulated, slower than
    float32); `auto` asks for the hardware."""
    from train.device import select_dtype
    from train.parallel import mixed_precision

    cuda = torch.device("cuda", 0)
    for hardware, expected in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, hw=hardware: hw or including_emulation)
        assert select_dtype("auto", cuda) == expected  # train's autocast dtype too
        assert (mixed_precision(cuda, "auto") is not None) == hardware
        # Asked for by name, bf16 it is, emulated or not: autocast and FSDP's policy alike.
        assert select_dtype("bfloat16", cuda) == torch.bfloat16 and mixed_precision(cuda, "bfloat16") is not None
    assert mixed_precision(torch.device("cpu"), "bfloat16") is None  # CPU bf16 runs under autocast alone


def test_device_and_dtype_selection_on_this_machine(shards, tiny_model_dir):
    from train.device import select_device, select_dtype

    assert select_dtype("auto", torch.device("cpu")) == torch.float32
    assert select_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    if torch.cuda.is_available():
        assert select_device("auto").type == "cuda"
        return
    assert select_device("auto").type in ("cpu", "mps")
    with pytest.raises(UserError, match="--device cuda: torch sees no CUDA device"):
        _run(shards, tiny_model_dir, device="cuda")
