"""Model fingerprints read each weight file once (issue 13, item 6): per-file sha256 cached in the
user's cache by (resolved path, size, mtime, ctime); a changed file is hashed again."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import torch

import schemas.io as io
from train.models import model_fingerprint

CPU = torch.device("cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private cache dir (never the user's)."""
    monkeypatch.setenv(io.CACHE_DIR_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "sha256-cache.json"


@pytest.fixture
def hashed(monkeypatch) -> list[str]:
    """Names of the files read in full, in order: a counter around the one full-file hash."""
    calls: list[str] = []
    real = io.sha256_file
    monkeypatch.setattr(io, "sha256_file", lambda path, *a, **k: calls.append(Path(path).name) or real(path, *a, **k))
    return calls


@pytest.fixture
def model(tmp_path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    for name, size in (("model-00001.safetensors", 3000), ("model-00002.safetensors", 2000)):
        (d / name).write_bytes(os.urandom(size))
    return d


def _settled(monkeypatch) -> None:
    """Files written by the test a moment ago count as old enough to cache (see RACY_WINDOW_NS)."""
    monkeypatch.setattr(io, "RACY_WINDOW_NS", 0)


def _fp(directory: Path):
    return model_fingerprint(directory, str(directory), torch.float32, CPU)


def test_second_fingerprint_reads_no_weight_file(cache, hashed, model, monkeypatch):
    _settled(monkeypatch)
    first = _fp(model)
    assert sorted(n for n in hashed if n.endswith(".safetensors")) == ["model-00001.safetensors", "model-00002.safetensors"]
    hashed.clear()
    assert _fp(model) == first
    assert [n for n in hashed if n.endswith(".safetensors")] == []
    # The cached value is the file's real sha256, keyed by the resolved path.
    entries = json.loads(cache.read_text())["files"]
    path = str((model / "model-00002.safetensors").resolve())
    assert entries[path]["sha256"] == hashlib.sha256((model / "model-00002.safetensors").read_bytes()).hexdigest()


def test_same_fingerprint_with_and_without_cache(cache, model, monkeypatch, tmp_path):
    _settled(monkeypatch)
    cached = (_fp(model), _fp(model))
    monkeypatch.setenv(io.CACHE_DIR_ENV, str(tmp_path / "other-cache"))
    assert cached[0] == cached[1] == _fp(model)


def test_a_rewritten_file_is_hashed_again_even_with_its_size_and_mtime_restored(cache, hashed, model, monkeypatch):
    _settled(monkeypatch)
    first = _fp(model)
    weights = model / "model-00001.safetensors"
    before = weights.stat()
    time.sleep(0.05)  # past the filesystem's timestamp tick, so the rewrite gets a new ctime
    weights.write_bytes(os.urandom(before.st_size))
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # `cp -p` / `touch -d` style
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    hashed.clear()
    assert _fp(model).weights_sha256 != first.weights_sha256
    assert "model-00001.safetensors" in hashed and "model-00002.safetensors" not in hashed


def test_a_file_of_another_size_is_hashed_again(cache, hashed, model, monkeypatch):
    _settled(monkeypatch)
    first = _fp(model)
    with open(model / "model-00002.safetensors", "ab") as fh:
        fh.write(b"x")
    hashed.clear()
    assert _fp(model).weights_sha256 != first.weights_sha256
    assert hashed.count("model-00002.safetensors") == 1


def test_a_file_written_just_now_is_not_trusted_to_the_cache(cache, hashed, model):
    # Default window: a second write in the same timestamp tick would be invisible, so a fresh
    # file's hash is not cached and the next run reads it again.
    _fp(model)
    hashed.clear()
    _fp(model)
    assert sorted(n for n in hashed if n.endswith(".safetensors")) == ["model-00001.safetensors", "model-00002.safetensors"]


@pytest.mark.parametrize("content", ["{not json", "[]", '{"version": 1, "files": {"x": 3}}', '{"version": 99, "files": {}}'])
def test_a_corrupt_cache_is_ignored_and_rewritten(cache, model, monkeypatch, content, tmp_path):
    _settled(monkeypatch)
    cache.parent.mkdir(parents=True)
    cache.write_text(content)
    first = _fp(model)
    assert json.loads(cache.read_text())["version"] == 1
    monkeypatch.setenv(io.CACHE_DIR_ENV, str(tmp_path / "fresh"))
    assert first == _fp(model)


def test_a_cache_entry_with_a_wrong_stat_is_not_used(cache, model, monkeypatch):
    _settled(monkeypatch)
    first = _fp(model)
    raw = json.loads(cache.read_text())
    for entry in raw["files"].values():
        entry["sha256"] = "0" * 64
        entry["mtime_ns"] += 1
    cache.write_text(json.dumps(raw))
    assert _fp(model) == first


def test_an_unwritable_cache_still_fingerprints(model, monkeypatch, tmp_path):
    _settled(monkeypatch)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv(io.CACHE_DIR_ENV, str(blocker / "cache"))
    assert _fp(model) == _fp(model)


def test_cache_dir_follows_xdg_and_the_override(monkeypatch, tmp_path):
    monkeypatch.delenv(io.CACHE_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert io.cache_dir() == tmp_path / "xdg" / "prefdata"
    monkeypatch.setenv(io.CACHE_DIR_ENV, str(tmp_path / "mine"))
    assert io.cache_dir() == tmp_path / "mine"


def test_entries_for_deleted_files_are_dropped(cache, model, monkeypatch):
    _settled(monkeypatch)
    _fp(model)
    gone = model / "model-00002.safetensors"
    gone.unlink()
    (model / "model-00003.safetensors").write_bytes(b"new")
    _fp(model)
    assert str(gone.resolve()) not in json.loads(cache.read_text())["files"]
