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


def main() -> None:
    try:
        app()
    except UserError as exc:
        print(f"prefdata: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("prefdata: interrupted", file=sys.stderr)
        sys.exit(130)
