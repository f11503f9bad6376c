"""`prefdata` command line: one command per stage, each made from the stage's pydantic config
(train/cli.py: one default per field, `--config FILE`, flags over file).

A command is built only when it runs (or shows its help): `prefdata --help` lists them from the
table below without importing any stage, and the model-side stages (torch) are imported only by
their own commands. Errors a user can cause are `UserError`s: one line on stderr, exit code 2.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import typer
from typer.core import TyperGroup

from schemas.errors import UserError


@dataclass(frozen=True)
class Stage:
    help: str
    config: str  # "module:ConfigClass"
    run: str  # "module:function", called with the config; prints what the user should see
    arguments: tuple[str, ...] = ()  # config fields taken as positional arguments
    renames: dict[str, str] = field(default_factory=dict)  # field → option name, where the field's name reads badly
    torchrun: bool = False  # splits its work over torchrun's processes; the others run in one process only


STAGES: dict[str, Stage] = {
    "ingest": Stage("Turn raw comparison dumps into validated records; every rejected row is quarantined with its reason.",
                    "prefdata.ingest:IngestConfig", "prefdata.cli:run_ingest", ("inputs",), {"column_map": "map"}),
    "curate": Stage("Dedupe, drop degenerate pairs, decontaminate, and split train/eval without leaks.",
                    "prefdata.curate:CurateConfig", "prefdata.cli:run_curate", ("inputs",)),
    "tokenize": Stage("Tokenize records into Arrow IPC shards (TRL column names, int32 ids).",
                      "prefdata.tokenize:TokenizeConfig", "prefdata.cli:run_tokenize", ("input_dir",)),
    "precompute-ref": Stage("Add the reference model's log-probs to every shard (resumable; torchrun-aware).",
                            "train.reference:PrecomputeRefConfig", "prefdata.cli:run_precompute_ref", ("shards",), torchrun=True),
    "train": Stage("Train a policy on the shards (DPO and friends; torchrun-aware). Same as python -m train.",
                   "train.config:TrainConfig", "train.loop:train_and_report", torchrun=True),
    "generate": Stage("Sample K answers per prompt from a policy (on-policy data), resumable by chunk.",
                      "train.generate:GenerateConfig", "prefdata.cli:run_generate", ("prompts",), torchrun=True),
    "judge": Stage("Score every sampled answer with a reward model or a function; ingest reads the result.",
                   "train.judge:JudgeConfig", "prefdata.cli:run_judge", ("generations",)),
    "iterate": Stage("Iterative DPO: generate, judge, ingest, curate, tokenize, precompute-ref, train — per round.",
                     "prefdata.iterate:IterateConfig", "prefdata.cli:run_iterate"),
    "eval": Stage("Implicit-reward accuracy on the eval shards; KL, judged reward, win rate, Best-of-N of samples.",
                  "train.eval:EvalConfig", "prefdata.cli:run_eval", ("shards",), torchrun=True),
    "inspect": Stage("Stage, schema, rows per file, length quantiles, drop reasons, fingerprints, samples.",
                     "prefdata.inspect:InspectConfig", "prefdata.cli:run_inspect", ("directory",), {"as_json": "json"}),
}


def _load(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def build_command(name: str) -> Any:
    from train.cli import command

    stage = STAGES[name]
    run = _load(stage.run) if stage.torchrun else _one_process(name, _load(stage.run))
    return command(_load(stage.config), run, name, stage.help, stage.arguments, stage.renames)


def _one_process(name: str, run: Any) -> Any:
    """`run`, refused under torchrun: every process would do the whole stage and write the same files."""
    def checked(config: Any) -> None:
        world = os.environ.get("WORLD_SIZE", "1")
        if world.strip() not in ("", "1"):
            raise UserError(f"prefdata {name} runs in one process, not under torchrun (WORLD_SIZE={world} here): every "
                            "process would write the same output; run it without torchrun, or with WORLD_SIZE=1 where a "
                            "cluster sets it for every job (precompute-ref, train, generate and eval are the stages torchrun splits)")
        run(config)
    return checked


class Commands(TyperGroup):
    """The stages, each built on demand."""

    def list_commands(self, ctx: Any) -> list[str]:
        return list(STAGES)

    def get_command(self, ctx: Any, name: str) -> Any:
        return build_command(name) if name in STAGES else None

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, stage.help) for name, stage in STAGES.items()])


app = typer.Typer(cls=Commands, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Preference data and DPO: ingest → curate → tokenize → precompute-ref → train; "
                       "generate → judge → iterate for on-policy rounds; eval; inspect.")


@app.callback()
def _root() -> None:
    """Preference data and DPO."""


# ---------------------------------------------------------------------------------------------
# What each command does with its config (stage modules imported here, when it runs)


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def run_ingest(config: Any) -> None:
    from prefdata.ingest import ingest, summary_lines

    print("\n".join(summary_lines(ingest(config))))


def run_curate(config: Any) -> None:
    from rich.console import Console

    from prefdata.curate import checked_inputs, curate, summary_table
    from schemas.location import check_output, is_uri, local_path

    check_output(config.out, config.inputs)  # before a --score-with model loads
    scorer = None
    if config.score_with is not None:  # label noise: the model side, only when asked for
        from train.label_scores import load_pair_scorer

        # An unpaired set refuses --score-with before a model loads; an object-store set is checked
        # once curate has fetched it.
        local = [local_path(i) for i in config.inputs if not is_uri(i)]
        if local:
            checked_inputs(config, local)
        scorer = load_pair_scorer(config.score_with, config.score_reference, beta=config.score_beta,
                                  batch_size=config.score_batch_size, device=config.score_device, dtype=config.score_dtype)
    Console().print(summary_table(curate(config, scorer)))


def run_tokenize(config: Any) -> None:
    from prefdata.tokenize import summary_lines, tokenize

    print("\n".join(summary_lines(tokenize(config))))


def run_precompute_ref(config: Any) -> None:
    from train.reference import precompute_ref, summary_lines

    lines = summary_lines(precompute_ref(config))
    if _is_rank0():
        print("\n".join(lines))


def run_generate(config: Any) -> None:
    from train.generate import generate, summary_lines

    lines = summary_lines(generate(config))
    if _is_rank0():
        print("\n".join(lines))


def run_judge(config: Any) -> None:
    from train.judge import judge, summary_lines

    print("\n".join(summary_lines(judge(config))))


def run_iterate(config: Any) -> None:
    from prefdata.iterate import iterate, summary_lines

    print("\n".join(summary_lines(iterate(config))))


def run_eval(config: Any) -> None:
    from train.eval import evaluate_policy, summary_line

    result = evaluate_policy(config)
    if _is_rank0():
        print(summary_line(result))


def run_inspect(config: Any) -> None:
    import json

    from prefdata.inspect import inspect_dir, render

    report = inspect_dir(config.directory, sample=config.sample, seed=config.seed)
    if config.as_json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        render(report)


def main() -> None:
    from train.cli import process_group_left_on_success

    try:
        with process_group_left_on_success():
            app()
    except UserError as exc:
        print(f"prefdata: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
