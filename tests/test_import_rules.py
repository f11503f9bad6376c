"""DESIGN.md's import rules, checked by walking every module's imports:

    schemas/   imports neither prefdata nor train (nor demo);
    prefdata/  never imports train at module level; only the CLI (prefdata/cli.py) and the
               orchestration of on-policy rounds (prefdata/iterate.py) reach into train, inside
               functions, so `prefdata ingest --help` never loads torch;
    train/     never imports prefdata (nor demo), anywhere;
    demo/      sits above both and may import anything.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAZY_TRAIN_ALLOWED = {"prefdata/cli.py", "prefdata/iterate.py"}


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported top-level package, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    module_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        else:
            continue
        found += [(name.split(".")[0], id(node) in module_level) for name in names]
    return found


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", ["schemas", "prefdata", "train"])
def test_packages_import_only_in_the_allowed_direction(package):
    forbidden = {"schemas": {"prefdata", "train", "demo"}, "prefdata": {"demo"}, "train": {"prefdata", "demo"}}[package]
    broken = []
    for path in _modules(package):
        relative = path.relative_to(ROOT).as_posix()
        for name, at_module_level in _imports(path):
            if name in forbidden or (package == "prefdata" and name == "train"
                                     and (at_module_level or relative not in LAZY_TRAIN_ALLOWED)):
                broken.append(f"{relative} imports {name}{' at module level' if at_module_level else ''}")
    assert not broken, "\n".join(broken)


def test_the_data_side_cli_does_not_load_torch():
    code = ("import sys; from prefdata.cli import build_command, app; "
            "[build_command(n) for n in ('ingest', 'curate', 'tokenize', 'inspect', 'iterate')]; "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
