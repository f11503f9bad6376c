"""One CLI layer: every command's options come from its stage's config (help text and default
included), `--config FILE` works for every stage, flags win over the file, and a manifest's saved
config repeats the run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prefdata.cli import STAGES, build_command
from prefdata.ingest import IngestConfig
from schemas.errors import UserError
from train.cli import build_config

FIXTURES = Path(__file__).parent / "fixtures" / "ingest"
ROOT = Path(__file__).resolve().parents[1]


def _prefdata(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefdata", *args], capture_output=True, text=True, cwd=ROOT,
                          env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", **(env or {})})


def test_prefdata_help_lists_every_command():
    done = _prefdata("--help")
    assert done.returncode == 0
    for name in STAGES:
        assert f"  {name} " in done.stdout, name


@pytest.mark.parametrize("name", list(STAGES))
def test_every_command_shows_each_option_with_its_help_and_default(name):
    from prefdata.cli import _load

    config_cls = _load(STAGES[name].config)
    command = build_command(name)
    options = {o for p in command.params for o in p.opts}
    assert "--config" in options
    helps = {o: p.help for p in command.params for o in p.opts}
    for field_name, field in config_cls.model_fields.items():
        if field_name in STAGES[name].arguments or isinstance(field.annotation, type) and hasattr(field.annotation, "model_fields"):
            continue
        flag = "--" + STAGES[name].renames.get(field_name, field_name).replace("_", "-")
        assert flag in options, (name, flag)
        assert field.description and field.description.rstrip(".") in helps[flag], (name, flag)


def test_curate_help_shows_the_configs_help_and_default():
    done = _prefdata("curate", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "Fraction of prompt clusters held out for eval. (default: 0.02)" in text


def test_flags_win_over_the_file_and_nested_options_may_be_flat_or_nested():
    config = build_config(IngestConfig, {"inputs": ["a.jsonl"], "out": "o", "options": {"pairs": "all", "lang": "en"},
                                         "min_margin": 0.5}, {"pairs": "adjacent", "limit": None})
    assert (config.options.pairs, config.options.lang, config.options.min_margin) == ("adjacent", "en", 0.5)
    with pytest.raises(UserError, match="--pairs"):
        build_config(IngestConfig, {}, {"inputs": ["a"], "out": "o", "pairs": "nope"})


def test_a_manifests_config_repeats_the_run(tmp_path):
    source = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Question {i}?", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first = _prefdata("ingest", str(source), "--out", str(tmp_path / "a"), "--workers", "1")
    assert first.returncode == 0, first.stderr
    saved = json.loads((tmp_path / "a" / "manifest.json").read_text())["config"]
    config_file = tmp_path / "again.yaml"
    config_file.write_text(yaml.safe_dump({**saved, "out": str(tmp_path / "b")}))
    again = _prefdata("ingest", "--config", str(config_file))
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "b" / "records.parquet").read_bytes() == (tmp_path / "a" / "records.parquet").read_bytes()


def test_a_bad_config_file_or_value_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    for args in (["curate", "x", "--out", "o", "--config", str(bad)], ["curate", "x", "--out", "o", "--eval-fraction", "2"],
                 ["tokenize", "x", "--out", "o"]):
        done = _prefdata(*args)
        assert done.returncode == 2 and done.stderr.startswith("prefdata: error: ") and done.stderr.count("\n") == 1, done.stderr


def test_the_stages_torchrun_does_not_split_refuse_to_run_under_it(tmp_path):
    """Under torchrun every process would run the whole stage and write the same files."""
    assert {name for name, stage in STAGES.items() if stage.torchrun} == {"precompute-ref", "train", "generate", "eval"}
    records = tmp_path / "records"
    for args in (["ingest", str(FIXTURES / "hh.jsonl"), "--out", str(records)], ["curate", str(records), "--out", str(tmp_path / "c")],
                 ["judge", str(tmp_path / "g"), "--reward", "demo.data:lexicon_reward", "--out", str(tmp_path / "j")]):
        done = _prefdata(*args, env={"WORLD_SIZE": "2"})
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert f"prefdata {args[0]} runs in one process, not under torchrun (WORLD_SIZE=2 here)" in done.stderr
    assert not records.exists()
    assert _prefdata("ingest", str(FIXTURES / "hh.jsonl"), "--out", str(records), env={"WORLD_SIZE": "1"}).returncode == 0


@pytest.mark.parametrize("fails", [False, True])
def test_a_command_leaves_its_process_group_when_it_succeeds_and_only_then(tmp_path, fails):
    """On an error the other ranks may wait in a collective, where destroying the group could wait
    for them: the failing rank exits and torchrun stops the rest."""
    import click
    import torch.distributed as dist

    from train.cli import run_command

    @click.command()
    def stage() -> None:  # a model stage under torchrun joins a group (train.distributed.Dist.start)
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
        if fails:
            raise UserError("stopped")

    try:
        with pytest.raises(SystemExit) as exit_:
            run_command(stage, [], "stage")
        assert exit_.value.code == (2 if fails else 0) and dist.is_initialized() == fails
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
