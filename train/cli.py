"""Command-line commands made from a stage's pydantic config: the one way every command
(`prefdata …`, `python -m train`, `python -m demo`) declares its options.

- Each field is an option (`learning_rate` → `--learning-rate`), its help the field's
  description with the field's default; fields named as `arguments` are positional.
- The fields of a nested config (ingest's FormatOptions) are options of the command too.
- `--config FILE`: YAML with any of the fields (flat, or nested as the stage's manifest saves
  them); a flag given on the command line wins over the file.
- The config is validated once, by pydantic; its first complaint is a one-line UserError.

The commands themselves are declared where their programs start: every `prefdata` command in
prefdata/cli.py's table of stages, `python -m train` in train/__main__.py, `python -m demo` in
demo/__main__.py. This layer lives in `train` because all three use it and `train` must not
import `prefdata`, while `schemas` holds the contracts (pyarrow + pydantic) and no CLI library.
It imports only typer, pydantic and yaml, never torch, so building a data-side command stays fast.
"""

from __future__ import annotations

import inspect
import json
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import typer
import yaml
from pydantic import BaseModel, ValidationError

from schemas.errors import UserError, first_line

CONFIG_OPTION = "config_file"


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(annotation: Any) -> Any:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return members[0] if len(members) == 1 else str
    return annotation


def _cli_type(annotation: Any) -> Any:
    """What the command line parses a field as: bool, int, float, list[str] (a repeatable option),
    or str for everything else (literals, mappings), which the config's own validators read."""
    annotation = _unwrap_optional(annotation)
    if annotation in (bool, int, float):
        return annotation
    if typing.get_origin(annotation) is list:
        return list[str]
    return str


def _shown_default(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return ""
    return "default: " + (value if isinstance(value, str) else json.dumps(value, default=str))


def _help(field: Any) -> str:
    annotation = _unwrap_optional(field.annotation)
    choices = typing.get_args(annotation) if typing.get_origin(annotation) is Literal else ()
    text = (field.description or "").rstrip(".")
    if choices:
        text += f" ({', '.join(map(str, choices))})"
    default = _shown_default(field)
    return " ".join(part for part in (f"{text}." if text else "", f"({default})" if default else "") if part)


def _parameter(name: str, field: Any, positional: bool, cli_name: str) -> inspect.Parameter:
    kind = _cli_type(field.annotation)
    if positional:  # optional here: a --config file may give it; pydantic says when it is missing
        default = typer.Argument(None, help=_help(field), show_default=False)
    elif kind is bool:
        default = typer.Option(None, f"{flag(cli_name)}/--no-{cli_name.replace('_', '-')}", help=_help(field), show_default=False)
    else:
        default = typer.Option(None, flag(cli_name), help=_help(field), show_default=False)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=typing.Optional[kind])  # noqa: UP007 (typer reads typing.Optional)


def _nested(config_cls: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Fields that are themselves configs: their fields become the command's options."""
    return {name: f.annotation for name, f in config_cls.model_fields.items()
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)}


def _fields(config_cls: type[BaseModel]) -> dict[str, Any]:
    nested = _nested(config_cls)
    own = {name: f for name, f in config_cls.model_fields.items() if name not in nested}
    for inner in nested.values():
        own.update(inner.model_fields)
    return own


def read_config_file(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"--config {path}: not valid YAML ({first_line(exc)})") from None
    if not isinstance(values, dict):
        raise UserError(f"--config {path}: expected a mapping of field: value")
    return values


def build_config(config_cls: type[BaseModel], file_values: dict[str, Any], flags: dict[str, Any]) -> BaseModel:
    """File values, then flags over them, validated as one config; nested fields given flat are
    moved into their config."""
    values = {**file_values, **{k: v for k, v in flags.items() if v not in (None, [], ())}}
    for name, inner in _nested(config_cls).items():
        given = {k: values.pop(k) for k in list(values) if k in inner.model_fields}
        values[name] = {**(values.get(name) or {}), **given}
    try:
        return config_cls.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = flag(str(first["loc"][-1])) if first["loc"] else "options"
        raise UserError(f"{where}: {first['msg']}") from None


def command(config_cls: type[BaseModel], run: Callable[[Any], None], name: str, help: str,
            arguments: tuple[str, ...] = (), renames: dict[str, str] | None = None) -> Any:
    """A click command (built by Typer) whose options are `config_cls`'s fields; it builds the
    config and calls `run(config)`."""
    renames = renames or {}
    parameters = [_parameter(field_name, field, field_name in arguments, renames.get(field_name, field_name))
                  for field_name, field in sorted(_fields(config_cls).items(), key=lambda kv: kv[0] not in arguments)]
    parameters.append(inspect.Parameter(CONFIG_OPTION, inspect.Parameter.KEYWORD_ONLY, annotation=typing.Optional[Path],  # noqa: UP007
                                        default=typer.Option(None, "--config", help="YAML file with any of these options; "
                                                             "flags given here win over it.", show_default=False)))

    def invoke(**values: Any) -> None:
        run(build_config(config_cls, read_config_file(values.pop(CONFIG_OPTION)), values))

    invoke.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(name, help=help)(invoke)
    return typer.main.get_command(app)


def run_command(click_command: Any, argv: list[str] | None, prog: str) -> None:
    """Run one command as a program (`python -m train`): a UserError is one line, exit 2."""
    import sys

    try:
        with process_group_left_on_success():
            click_command.main(args=argv, prog_name=prog)
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


@contextmanager
def process_group_left_on_success() -> Iterator[None]:
    """Destroy the torchrun stages' process group when the program succeeds (click ends a command
    with SystemExit(0)): left to the interpreter's exit, NCCL's communicators are torn down in an
    undefined order (torch warns; a rank can hang). Not on an error: the other ranks may be waiting
    in a collective, where destroying could wait for them until the group's timeout, and torchrun
    stops them all once this rank exits. Only where a stage started one: a data command never
    imports torch."""
    try:
        yield
    except SystemExit as exit_:
        if exit_.code in (0, None):
            _leave_process_group()
        raise
    else:
        _leave_process_group()


def _leave_process_group() -> None:
    import sys

    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()
