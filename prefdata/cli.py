"""`prefdata` command line: one thin Typer command per stage.

Stage modules (and torch, through `train`) are imported inside the commands so `prefdata --help`
starts fast. Errors a user can cause are `UserError`s: one line on stderr, exit code 2.
"""

from __future__ import annotations

import sys

import typer

from schemas.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Preference-data preparation: ingest → curate → tokenize → precompute-ref, and inspect.",
)


@app.callback()
def _root() -> None:
    """Preference-data preparation: ingest → curate → tokenize → precompute-ref, and inspect."""


@app.command("tokenize")
def tokenize_command(
    input_dir: str = typer.Argument(..., help="Output of `prefdata curate` (train/eval) or `prefdata ingest`."),
    tokenizer: str = typer.Option(..., "--tokenizer", help="Tokenizer directory or Hub name (offline: a directory)."),
    out: str = typer.Option(..., "--out", help="Directory for the shards, dropped.parquet and manifest.json."),
    template: str = typer.Option("auto", help="auto: the tokenizer's chat template if it has one, else plain."),
    max_length: int = typer.Option(1024, help="Prompt + completion tokens, per answer."),
    max_prompt_length: int = typer.Option(512, help="Prompt tokens."),
    overflow: str = typer.Option("drop", help="drop: pairs that do not fit are dropped (too_long); truncate: cut them."),
    rows_per_shard: int = typer.Option(50_000, help="Rows per Arrow file."),
) -> None:
    """Tokenize records into Arrow IPC shards (TRL column names, int32 ids)."""
    from prefdata.tokenize import TokenizeConfig, summary_lines, tokenize

    config = _config(TokenizeConfig, input_dir=input_dir, tokenizer=tokenizer, out=out, template=template,
                     max_length=max_length, max_prompt_length=max_prompt_length, overflow=overflow,
                     rows_per_shard=rows_per_shard)
    print("\n".join(summary_lines(tokenize(config))))


@app.command("inspect")
def inspect_command(
    directory: str = typer.Argument(..., help="Any stage's output directory."),
    sample: int = typer.Option(0, "--sample", help="Show N decoded examples."),
    seed: int = typer.Option(0, help="Which examples --sample picks."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable report on stdout."),
) -> None:
    """Stage, schema, rows per file, length quantiles, drop reasons, fingerprints, samples."""
    import json

    from prefdata.inspect import inspect_dir, render

    report = inspect_dir(directory, sample=sample, seed=seed)
    if as_json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        render(report)


def _config(config_cls, **options):
    """Build a stage config; option values it rejects become one-line UserErrors."""
    from pydantic import ValidationError

    try:
        return config_cls(**options)
    except ValidationError as exc:
        first = exc.errors()[0]
        option = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "options"
        raise UserError(f"{option}: {first['msg']}") from None


def main() -> None:
    try:
        app()
    except UserError as exc:
        print(f"prefdata: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("prefdata: interrupted", file=sys.stderr)
        sys.exit(130)
