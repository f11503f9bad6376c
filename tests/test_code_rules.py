"""Rules about the code itself, checked on its syntax tree.

One name per thing: a top-level function, class or constant (an upper-case name) of prefdata/,
train/, schemas/ or demo/ is defined in one module only, private names included. Two `load_tokenizer` with
different signatures, or two `DROPPED_SCHEMA` with different columns, are a reader's trap: an
import or a grep finds the wrong one.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("prefdata", "train", "schemas", "demo")

# Names that several modules define on purpose, because a caller finds them by module:
SHARED_BY_CONVENTION = {
    "main",  # each entry point's function (prefdata/cli.py, train/__main__.py, demo/__main__.py)
    "summary_lines",  # each stage's one-screen result summary, which its command prints
}


def _defined_names(tree: ast.Module) -> set[str]:
    names = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        names |= {t.id for t in targets if isinstance(t, ast.Name) and t.id.isupper()}
    return names


def names_defined_twice(root: Path, packages: tuple[str, ...]) -> dict[str, list[str]]:
    """name → the modules (paths relative to root) that define it, for names defined in more than one."""
    modules: dict[str, list[str]] = defaultdict(list)
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            for name in _defined_names(ast.parse(path.read_text(), filename=str(path))):
                modules[name].append(path.relative_to(root).as_posix())
    return {name: paths for name, paths in modules.items() if len(paths) > 1}


def test_no_name_is_defined_in_two_modules():
    collisions = {name: paths for name, paths in names_defined_twice(ROOT, PACKAGES).items()
                  if name not in SHARED_BY_CONVENTION}
    assert collisions == {}, "rename one of each: " + "; ".join(f"{n} in {', '.join(p)}" for n, p in sorted(collisions.items()))


def test_the_check_sees_functions_classes_and_constants(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.py").write_text("def _read(): pass\nclass Scorer: pass\nDROPPED_SCHEMA = 1\nLIMIT = 2\n")
    (tmp_path / "a" / "two.py").write_text("def _read(): pass\nclass Scorer: pass\nDROPPED_SCHEMA = 3\nLIMIT = 4\n"
                                           "def outer():\n    def _read(): pass\n")
    assert names_defined_twice(tmp_path, ("a",)) == {
        "_read": ["a/one.py", "a/two.py"], "Scorer": ["a/one.py", "a/two.py"], "DROPPED_SCHEMA": ["a/one.py", "a/two.py"],
        "LIMIT": ["a/one.py", "a/two.py"]}
