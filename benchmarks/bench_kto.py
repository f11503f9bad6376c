"""KTO training throughput and memory: `--objective kto` with stored references against TRL 1.x
`KTOTrainer(precompute_ref_log_probs=True)` (issue 27).

    .venv/bin/python benchmarks/bench_kto.py [--rows 200] [--max-length 768] [--steps N] [--repeats 3] [--rows-set uniform|hh]

Like for like, as `bench_train.py` for DPO: the same dump rows (`bench_precompute.prepare`: the
same ~4M-parameter Llama checkpoint and tokenizer), ingested `--unpaired` (each pair's chosen
answer a desirable row, its rejected answer an undesirable one) and tokenized; both sides train on
exactly those shards' ids, with the same KL completion per row (ours fixed at tokenize time; TRL
is handed the same `KL_completion_ids` instead of its own rotation), batch 8 rows, float32, β 0.1,
the same learning rate, one epoch by default, no activation checkpointing either side, and the
reference log-probs computed before training on both sides (ours by precompute-ref, TRL in its
constructor; neither is timed):
    ours-kto   `train()` with objective kto: one prefix-shared row [prompt, completion, KL completion]
               per row, trained, the trainer's length-grouped batches
    trl-kto    TRL `KTOTrainer`: a padded row prompt + completion trained and a padded row prompt + KL
               completion scored without gradients, batches in dataset order (its KL term requires it)
Each run is its own subprocess, alternating; peak RSS is that process's own high-water mark.
Throughput is rows/s over the whole epoch, step 1 included on both sides (the two samplers put
different rows in step 1, so leaving it out would time different work): from the start of step 1
to the end of step N, loading, reference passes and saving left out. TRL's token counter leaves
out the KL rows and ours counts them, so rows are the unit both sides count alike. The FLOP bound
of the two layouts on the same batches is `bench_bounds.py --objective kto`; ours runs what
`--kl-completions auto` picks for the rows (the table row says which).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_train  # noqa: E402
from benchmarks.bench_precompute import bench_device, prepare  # noqa: E402
from benchmarks.bench_train import BATCH_SIZE, LEARNING_RATE  # noqa: E402
from benchmarks.process_memory import peak_rss_mib  # noqa: E402

VARIANTS = ("ours-kto", "trl-kto")
BETA = 0.1
# What ours ran, by what `--kl-completions auto` picked for the rows.
OURS = {False: "ours --objective kto (one trained prefix-shared row [prompt, completion, KL completion], length-grouped)",
        True: "ours --objective kto ([prompt, completion] trained, [prompt, KL completion] scored without gradients, "
              "prefix-shared rows, length-grouped)"}
PEER = "TRL KTOTrainer, precomputed reference (2 padded rows per row: trained, and KL scored without gradients)"


def prepare_unpaired(work: Path, rows: int, max_length: int, dump: Path) -> tuple[Path, Path]:
    """bench_precompute's model, and `unpaired_shards` of the same dump rows. Returns (model dir, shards dir)."""
    model, _ = prepare(work, rows, max_length, dump)
    return model, unpaired_shards(work, model, rows, max_length, dump)


def unpaired_shards(work: Path, model: Path, rows: int, max_length: int, dump: Path) -> Path:
    """The dump's first `rows` rows ingested --unpaired, tokenized with `model`'s tokenizer and
    bench_precompute's length limits, and scored by precompute-ref."""
    from prefdata.formats.base import FormatOptions
    from prefdata.ingest import IngestConfig, ingest
    from prefdata.tokenize import TokenizeConfig, tokenize
    from train.reference import PrecomputeRefConfig, precompute_ref

    ingest(IngestConfig(inputs=[str(dump)], out=str(work / "unpaired-records"), limit=rows, workers=1,
                        options=FormatOptions(unpaired=True)))
    shards = work / "unpaired-shards"
    tokenize(TokenizeConfig(input_dir=str(work / "unpaired-records"), tokenizer=str(model), out=str(shards),
                            max_length=max_length, max_prompt_length=max_length // 2))
    precompute_ref(PrecomputeRefConfig(shards=str(shards), model=str(model), device=bench_device(), batch_tokens=4096))
    return shards


def train_split(shards: Path) -> dict[str, list]:
    """The train split's ids and labels, every train shard in order, under TRL's KTO column names."""
    import polars as pl

    frame = pl.concat([pl.read_ipc(str(path)) for path in sorted(shards.glob("train-*.arrow"))])
    return {"prompt_ids": frame["prompt_input_ids"].to_list(), "completion_ids": frame["completion_input_ids"].to_list(),
            "KL_completion_ids": frame["kl_completion_input_ids"].to_list(), "label": frame["label"].to_list()}


def steps_rows(shards: Path, steps: int) -> int:
    """Rows in the first `steps` steps of an epoch (the last batch may be short)."""
    return min(len(train_split(shards)["label"]), steps * BATCH_SIZE)


def train_ours(model: Path, shards: Path, steps: int, out: Path) -> dict:
    from train.config import TrainConfig
    from train.loop import train

    config = TrainConfig(shards=str(shards), model=str(model), out=str(out), objective="kto", beta=BETA, batch_size=BATCH_SIZE,
                         max_steps=steps, log_every=1, learning_rate=LEARNING_RATE, gradient_checkpointing=False,
                         prefix_sharing="auto", device=bench_device(), dtype="float32")
    train(config)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "tokens_per_s" in line]
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in records)
    return {"rows_per_s": steps_rows(shards, steps) / seconds, "kl_apart": records[0]["kl_apart"]}


def train_trl(model: Path, shards: Path, steps: int, out: Path) -> dict:
    """TRL's `train()` on our ids: `_prepare_dataset` (its tokenization and KL rotation) is skipped,
    since the dataset already holds what it would make; the rest is KTOTrainer's own."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    class OnOurIds(KTOTrainer):
        def _prepare_dataset(self, dataset, *_args, **_kwargs):
            return dataset

    args = KTOConfig(output_dir=str(out), per_device_train_batch_size=BATCH_SIZE, max_steps=steps, learning_rate=LEARNING_RATE,
                     beta=BETA, precompute_ref_log_probs=True, bf16=False, use_cpu=bench_device() == "cpu",
                     gradient_checkpointing=False, max_length=None, report_to="none", disable_tqdm=True, save_strategy="no",
                     logging_steps=steps, train_sampling_strategy="sequential")
    trainer = OnOurIds(model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), args=args,
                       train_dataset=Dataset.from_dict(train_split(shards)), processing_class=AutoTokenizer.from_pretrained(model))
    window = epoch_window(steps)
    trainer.add_callback(window)
    trainer.train()
    return {"rows_per_s": steps_rows(shards, steps) / window.seconds}


def epoch_window(steps: int):
    """A TrainerCallback timing from the start of step 1 to the end of step `steps` (`.seconds`),
    as our metrics time an epoch (step 1 from just before its batch)."""
    import time

    from transformers import TrainerCallback

    class EpochWindow(TrainerCallback):
        seconds = None

        def on_step_begin(self, _args, state, *_, **__):
            if state.global_step == 0:
                self.start = time.perf_counter()

        def on_step_end(self, _args, state, *_, **__):
            if state.global_step == steps:
                self.seconds = time.perf_counter() - self.start

    return EpochWindow()


def run_child(variant: str, model: Path, shards: Path, steps: int, out: Path) -> dict:
    result = train_ours(model, shards, steps, out) if variant == "ours-kto" else train_trl(model, shards, steps, out)
    # bench_train's runner logs and takes medians of "tokens_per_s": here it holds rows/s.
    return {"tokens_per_s": result["rows_per_s"], **result, "peak_rss_mib": peak_rss_mib()}


def compare(model: Path, shards: Path, steps: int, repeats: int, work: Path) -> dict[str, dict]:
    return bench_train.compare(model, shards, steps, repeats, work, VARIANTS, __file__)


def table_rows(rows_set: str, results: dict[str, dict], limits, row) -> list[dict]:
    """The bench table's rows for one row set: rows/s beside TRL's (target ≥ 1.5×, the issue's, and
    the FLOP bound beside it), peak RSS (≤ TRL), and the bound's own rows. `row` is run_all.row."""
    ours = results["ours-kto"]
    return bench_train.peer_rows(f"train KTO [{rows_set}], precomputed reference both sides, no checkpointing either side",
                                 f"rows/s, {OURS[bool(ours['kl_apart'])]}", "rows_per_s", ours, results["trl-kto"], PEER,
                                 f"≥ 1.5× (FLOP bound {limits.ratios()['flops']:.2f}×)", limits, row)


def main() -> None:
    bench_train.peer_main(__doc__, __file__, VARIANTS, prepare_unpaired, run_child, "kto", "rows_per_s", "rows/s")


if __name__ == "__main__":
    main()
