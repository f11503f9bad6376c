"""`prefdata` command line: one thin Typer command per stage.

Stage modules (and torch, through `train`) are imported inside the commands so `prefdata --help`
starts fast. Errors a user can cause are `UserError`s: one line on stderr, exit code 2.
"""

from __future__ import annotations

import sys
from typing import Optional

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


@app.command("ingest")
def ingest_command(
    raw: list[str] = typer.Argument(
        ..., help="Files (.jsonl/.json/.csv/.parquet, optionally .gz/.zst/.bz2), directories, globs, "
        "save_to_disk directories or Hub dataset names."),
    out: str = typer.Option(..., "--out", help="Directory for records.parquet, quarantine.jsonl, manifest.json."),
    format: str = typer.Option(
        "auto", "--format",
        help="auto (from the columns), trl, hh, llamafactory, llamafactory_v1, openai, tabular, shp, ultrafeedback, "
        "ultrafeedback_binarized, oasst, oasst_tree, arena, arena_conversations, nectar, pku_saferlhf, helpsteer2, "
        "helpsteer2_preference, judged (prefdata judge's output)."),
    column_map: str = typer.Option(
        "", "--map", help="field=column,... for a generic table (fields: system, prompt, chosen, rejected, "
        "chosen_score, rejected_score); implies --format tabular."),
    limit: int = typer.Option(None, "--limit", help="Read at most N rows in total."),
    split: str = typer.Option(
        None, "--split", help="Split of a Hub dataset (default train) or of a save_to_disk dict."),
    workers: int = typer.Option(None, "--workers", help="Processes that validate rows (default: one per CPU core)."),
    pairs: str = typer.Option(
        "best-vs-worst", "--pairs",
        help="Several scored answers per prompt: best-vs-worst, best-vs-rest, all, adjacent."),
    min_margin: float = typer.Option(0.0, "--min-margin", help="Keep pairs whose scores differ by at least this."),
    score: str = typer.Option(
        None, "--score", help="UltraFeedback: mean-aspects (default), overall, aspect:NAME. "
        "HelpSteer2: helpfulness (default), weighted."),
    min_score_ratio: float = typer.Option(
        None, "--min-score-ratio", help="SHP: keep pairs with this score ratio or more."),
    lang: str = typer.Option(None, "--lang", help="OASST: only messages in this language (e.g. en)."),
    label: str = typer.Option("better", "--label", help="PKU-SafeRLHF: better or safer."),
    keep_truncated: bool = typer.Option(
        False, "--keep-truncated", help="Judged samples: also pair responses that generation cut at --max-new-tokens."),
) -> None:
    """Turn raw comparison dumps into validated records; every rejected row is quarantined with its reason."""
    from prefdata.formats.base import FormatOptions
    from prefdata.ingest import IngestConfig, ingest, parse_column_map, summary_lines

    options = _config(FormatOptions, column_map=parse_column_map(column_map), pairs=pairs, min_margin=min_margin,
                      score=score, min_score_ratio=min_score_ratio, lang=lang, label=label,
                      keep_truncated=keep_truncated)
    chosen = {"limit": limit, "split": split, "workers": workers}
    config = _config(IngestConfig, inputs=raw, out=out, format=format, options=options,
                     **{k: v for k, v in chosen.items() if v is not None})
    print("\n".join(summary_lines(ingest(config))))


@app.command("curate")
def curate_command(
    inputs: list[str] = typer.Argument(..., help="Record sets: outputs of `prefdata ingest` (or curate)."),
    out: str = typer.Option(..., "--out", help="Directory for train/eval/dropped.parquet and manifest.json."),
    near_dup: bool = typer.Option(True, "--near-dup/--no-near-dup", help="Cluster near-duplicate prompts (MinHash LSH)."),
    ngram: int = typer.Option(5, help="Word n-gram size of the MinHash shingles for prompts of 120+ words "
                              "(shorter prompts: word 1+2-grams, see README)."),
    threshold: float = typer.Option(0.8, help="Jaccard similarity at which prompts are near-duplicates; also caps the "
                                    "length-adapted threshold of short prompts."),
    num_perm: int = typer.Option(128, help="MinHash permutations."),
    max_pairs_per_prompt: Optional[int] = typer.Option(None, help="Keep at most K pairs per prompt cluster (largest margins)."),
    min_margin: Optional[float] = typer.Option(None, help="Drop pairs whose chosen_score - rejected_score is below X."),
    min_chars: int = typer.Option(1, help="Drop pairs with an answer shorter than this."),
    max_chars: Optional[int] = typer.Option(None, help="Drop pairs with an answer longer than this."),
    decontaminate: list[str] = typer.Option([], help="Evaluation set (any ingestible file, record dir, or .txt); repeatable."),
    decontaminate_ngram: int = typer.Option(13, help="Shared word n-gram length that counts as contamination."),
    eval_fraction: float = typer.Option(0.02, help="Fraction of prompt clusters held out for eval."),
    seed: int = typer.Option(0, help="Seed of the split hash and the MinHash permutations."),
    chunk_rows: int = typer.Option(200_000, help="Records held in memory at once in each pass. Lower it to reduce "
                                   "peak memory; the output does not depend on it."),
) -> None:
    """Dedupe, drop degenerate pairs, decontaminate, and split train/eval without leaks."""
    from rich.console import Console

    from prefdata.curate import CurateConfig, curate, summary_table

    config = _config(CurateConfig, inputs=inputs, out=out, near_dup=near_dup, ngram=ngram, threshold=threshold,
                     num_perm=num_perm, max_pairs_per_prompt=max_pairs_per_prompt, min_margin=min_margin,
                     min_chars=min_chars, max_chars=max_chars, decontaminate=decontaminate,
                     decontaminate_ngram=decontaminate_ngram, eval_fraction=eval_fraction, seed=seed, chunk_rows=chunk_rows)
    Console().print(summary_table(curate(config)))


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
    workers: int = typer.Option(None, "--workers", help="Processes that render and encode (default: one per CPU core)."),
) -> None:
    """Tokenize records into Arrow IPC shards (TRL column names, int32 ids)."""
    from prefdata.tokenize import TokenizeConfig, summary_lines, tokenize

    config = _config(TokenizeConfig, input_dir=input_dir, tokenizer=tokenizer, out=out, template=template,
                     max_length=max_length, max_prompt_length=max_prompt_length, overflow=overflow,
                     rows_per_shard=rows_per_shard, **({} if workers is None else {"workers": workers}))
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


@app.command("precompute-ref")
def precompute_ref_command(
    shards: str = typer.Argument(..., help="Output of `prefdata tokenize` (shards + manifest.json)."),
    model: str = typer.Option(..., "--model", help="Reference model: a directory (save_pretrained) or Hub name."),
    device: str = typer.Option("auto", help="auto: CUDA if present, else MPS, else CPU. Or cuda, mps, cpu."),
    dtype: str = typer.Option("auto", help="auto: bfloat16 on a GPU that has it, else float32. Or float32, bfloat16, float16."),
    batch_tokens: int = typer.Option(16_384, help="Padded tokens per forward pass (chosen + rejected rows)."),
    attn_implementation: str = typer.Option(None, help="Passed to from_pretrained: sdpa, eager, flash_attention_2, …"),
    verify: int = typer.Option(0, help="Re-score N random rows one at a time and compare with the batched values."),
    force: bool = typer.Option(False, "--force", help="Replace log-probs that another model (or dtype) wrote."),
    parallelism: str = typer.Option("ddp", help="Under torchrun: ddp (each process a whole model, its own shards) or "
                                    "fsdp (the model sharded over the processes, for a reference too large for one device)."),
    prefix_sharing: str = typer.Option("auto", help="auto: each pair's prompt goes through the model once where that gives "
                                       "the same numbers (attention that takes a mask: sdpa, eager); off: two padded rows per pair."),
) -> None:
    """Add the reference model's log-probs (ref_chosen_logps, ref_rejected_logps) to every shard.
    Resumable shard by shard; under torchrun, rank r takes shards r, r+W, … (with --parallelism fsdp,
    all processes score each shard together)."""
    import os

    from train.reference import PrecomputeRefConfig, precompute_ref, summary_lines

    config = _config(PrecomputeRefConfig, shards=shards, model=model, device=device, dtype=dtype,
                     batch_tokens=batch_tokens, attn_implementation=attn_implementation, verify=verify, force=force,
                     parallelism=parallelism, prefix_sharing=prefix_sharing)
    lines = summary_lines(precompute_ref(config))
    if os.environ.get("RANK", "0") == "0":
        print("\n".join(lines))


@app.command("eval")
def eval_command(
    shards: str = typer.Argument(..., help="Output of `prefdata precompute-ref`; its eval split is used."),
    policy: str = typer.Option(..., "--policy", help="The trained model directory (e.g. OUT/final)."),
    reference: str = typer.Option(..., "--reference", help="The reference model the shards were scored with."),
    out: str = typer.Option(..., "--out", help="Directory for eval.json and reward_vs_kl.png."),
    reward: str = typer.Option("prefdata.demo_data:lexicon_reward", help="Reward function, module:function (text → float)."),
    beta: float = typer.Option(0.1, help="β of the implicit reward margin."),
    samples: int = typer.Option(4, help="Completions sampled per prompt, from each model."),
    temperature: float = typer.Option(1.0, help="Sampling temperature."),
    max_new_tokens: int = typer.Option(32, help="Longest completion sampled."),
    max_prompts: Optional[int] = typer.Option(None, help="Use the first N distinct eval prompts."),
    seed: int = typer.Option(0, help="Sampling seed."),
) -> None:
    """Implicit-reward accuracy and margin on the eval shards; reward and KL(policy‖reference) of samples."""
    from train.eval import EvalConfig, evaluate_policy, summary_line

    config = _config(EvalConfig, shards=shards, policy=policy, reference=reference, out=out, reward=reward, beta=beta,
                     samples=samples, temperature=temperature, max_new_tokens=max_new_tokens,
                     max_prompts=max_prompts, seed=seed)
    print(summary_line(evaluate_policy(config)))


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
