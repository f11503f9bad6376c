"""Every command of README.md's quick start, as written there, on the demo's data.

The commands are read out of the README's "Quick start" block, so a README that drifts from the
command line (a renamed flag, a path one stage does not write) fails here. What `make demo` would
leave behind is made small instead: the demo's raw dump at 200 pairs, and in place of its SFT
reference a tiny Llama of the demo's size on a tokenizer trained on that dump.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

from prefdata import cli

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = ".venv/bin/prefdata"


def quick_start_commands(readme: str) -> list[list[str]]:
    """The first ```bash block after the "## Quick start" heading, one command per line."""
    _, found, section = readme.partition("\n## Quick start\n")
    if not found:
        raise AssertionError("README.md has no '## Quick start' section")
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


def test_the_commands_are_the_quick_start_blocks_lines():
    readme = "# x\n## Quick start\ntext\n```bash\nprefdata a --out 'b c'\n\nprefdata d\n```\n```bash\nnot this\n```\n## Next\n"
    assert quick_start_commands(readme) == [["prefdata", "a", "--out", "b c"], ["prefdata", "d"]]
    with pytest.raises(AssertionError, match="no '## Quick start'"):
        quick_start_commands("# x\n## Start\n```bash\nprefdata a\n```\n")


@pytest.fixture()
def demo_outputs(tmp_path: Path) -> Path:
    """runs/demo/raw/sentiment_prefs.jsonl and runs/demo/reference/final, where `make demo` writes them."""
    from demo.data import DemoDataConfig, write_preference_dump
    from train.tiny import build_model, build_tokenizer

    demo = tmp_path / "runs" / "demo"
    raw = write_preference_dump(demo / "raw" / "sentiment_prefs.jsonl", DemoDataConfig(pairs=200))
    # the dump's dirt includes a line of bad JSON and a truncated last line: leave those out
    rows = [json.loads(line) for line in raw.read_text().splitlines() if line.endswith("}")]
    tokenizer = build_tokenizer([text for row in rows for text in (row["chosen"], row["rejected"])], tmp_path / "tokenizer",
                                vocab_size=400)
    build_model(tokenizer, demo / "reference" / "final", hidden_size=64, num_layers=2, intermediate_size=256, max_positions=256)
    return tmp_path


def test_every_quick_start_command_runs_on_the_demo_data(demo_outputs, monkeypatch, capsys):
    commands = quick_start_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(commands) >= 8 and all(command[0] == PROGRAM for command in commands)
    monkeypatch.chdir(demo_outputs)
    for command in commands:
        monkeypatch.setattr(sys, "argv", ["prefdata", *command[1:]])
        with pytest.raises(SystemExit) as done:  # the console script's own path: cli.main, exit code
            cli.main()
        assert done.value.code == 0, f"{shlex.join(command)}: {capsys.readouterr().err[-2000:]}"
        if "--out" in command:
            out = Path(command[command.index("--out") + 1])
            assert (out / "manifest.json").is_file() or (out / "eval.json").is_file(), shlex.join(command)
