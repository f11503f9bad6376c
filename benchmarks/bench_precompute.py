"""Reference log-prob throughput: `prefdata precompute-ref` against TRL 1.x's precompute, same
model, same rows, same process (issue 6's target: ≥ 2× TRL's tokens/s on a CPU).

    .venv/bin/python benchmarks/bench_precompute.py [--rows 300] [--max-length 768] [--keep DIR]

Rows: LLaMA-Factory's dpo_en_demo (real multi-turn chats, GPT-4-length answers) from
../shared/realdata, through `prefdata ingest` and `prefdata tokenize` (ChatML; pairs longer than
--max-length are dropped by tokenize, as in a real run). Model: a randomly initialised Llama (~4M parameters) over a BPE
tokenizer trained on those rows. TRL: `DPOTrainer._precompute_ref_logps` — the method
`precompute_ref_log_probs=True` runs — on a `datasets.Dataset` holding exactly our shards' token
ids, with TRL's default batch size (per_device_train_batch_size = 8), float32 on CPU.

Tokens/s counts real tokens (prompt twice + both answers) over wall time. Ours is the whole
stage (reading, sha256, scoring, writing shards and manifest); the "compute only" figure is the
scoring loop alone. Both runs use the same torch thread count.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DUMP = ROOT.parent / "shared" / "realdata" / "llamafactory_dpo_en_demo" / "dpo_en_demo.json"
# Real multi-turn HH-RLHF helpful-base rows (SHP column schema): long shared prompts, short answers.
HH_DUMP = ROOT.parent / "shared" / "realdata" / "steamshp_format_hh_helpful_test" / "anthropic_helpful_test_head.jsonl"
DUMPS = {"uniform": DUMP, "hh": HH_DUMP}


def prepare(work: Path, rows: int, max_length: int, dump: Path = DUMP) -> tuple[Path, Path]:
    """Records → tokenizer + ~4M-parameter model → shards. Returns (model dir, shards dir)."""
    import pyarrow.parquet as pq

    from prefdata.ingest import IngestConfig, ingest
    from prefdata.tokenize import TokenizeConfig, tokenize
    from train.tiny import build_model, build_tokenizer

    ingest(IngestConfig(inputs=[str(dump)], out=str(work / "records"), limit=rows, workers=1))
    table = pq.read_table(work / "records" / "records.parquet", columns=["prompt", "chosen", "rejected"])
    corpus = [m["content"] for column in table.columns for row in column.to_pylist() for m in row]
    tokenizer = build_tokenizer(corpus, work / "tokenizer", vocab_size=4096)
    model = build_model(tokenizer, work / "model", hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4,
                        intermediate_size=512, max_positions=max_length)
    tokenize(TokenizeConfig(input_dir=str(work / "records"), tokenizer=str(model), out=str(work / "shards"),
                            max_length=max_length, max_prompt_length=max_length // 2))
    return model, work / "shards"


def bench_device() -> str:
    """Where the model stages run: the GPU when the machine has one (docs/benchmarks.md keeps that table apart)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_ours(model: Path, shards: Path, batch_tokens: int) -> dict:
    from train.reference import PrecomputeRefConfig, precompute_ref

    start = time.perf_counter()
    config = PrecomputeRefConfig(shards=str(shards), model=str(model), device=bench_device(), batch_tokens=batch_tokens)
    manifest = precompute_ref(config).manifest
    seconds = time.perf_counter() - start
    stats = manifest.stats
    return {"tokens": stats["real_tokens"], "seconds": seconds, "compute_tokens_per_s": stats["tokens_per_s"],
            "padding_efficiency": stats["padding_efficiency"]}


def trl_token_ids(shards: Path) -> dict[str, list]:
    """Our shards' token ids under TRL's column names (a `datasets.Dataset.from_dict` input)."""
    import polars as pl

    frame = pl.read_ipc(str(shards / "train-00000.arrow"))
    return {"prompt_ids": frame["prompt_input_ids"].to_list(), "chosen_ids": frame["chosen_input_ids"].to_list(),
            "rejected_ids": frame["rejected_input_ids"].to_list()}


def add_child_arguments(parser, variants) -> None:
    """The hidden flags with which a benchmark re-runs itself as one variant in a fresh process."""
    import argparse

    parser.add_argument("--child", choices=variants, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--shards", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)


def trl_step_window(trainer, steps: int):
    """A callback added to `trainer` that times steps 2..`steps` (end of step 1 to end of the last)
    and counts the tokens TRL itself counts over them (attention-mask sums, gathered over
    processes); `.tokens_per_s` once `trainer.train()` returns (None on a short run)."""
    from transformers import TrainerCallback

    class StepWindow(TrainerCallback):
        tokens_per_s = None

        def on_step_end(self, _args, state, *_, **__):
            if state.global_step == 1:
                self.start, self.tokens = time.perf_counter(), trainer._total_train_tokens
            if state.global_step == steps:
                self.tokens_per_s = (trainer._total_train_tokens - self.tokens) / (time.perf_counter() - self.start)

    window = StepWindow()
    trainer.add_callback(window)
    return window


def trl_placeholder():
    from datasets import Dataset

    return Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
                               "rejected": [{"role": "assistant", "content": "b"}]}])


def trl_trainer(model: Path, args, peft_config=None, placeholder=None):
    """A float32 TRL `DPOTrainer` built on a one-row placeholder dataset (`trl_placeholder()` unless
    given): TRL always tokenizes its train_dataset from text, so callers hand it our token ids
    afterwards (same ids on both sides)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    placeholder = trl_placeholder() if placeholder is None else placeholder
    return DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), args=args, peft_config=peft_config,
                      train_dataset=placeholder, processing_class=AutoTokenizer.from_pretrained(model))


def run_trl(model: Path, shards: Path, work: Path) -> dict:
    from datasets import Dataset
    from trl import DPOConfig

    ids = trl_token_ids(shards)
    dataset = Dataset.from_dict(ids)
    args = DPOConfig(output_dir=str(work / "trl"), precompute_ref_log_probs=True, bf16=False, use_cpu=bench_device() == "cpu",
                     report_to="none", disable_tqdm=True)
    trainer = trl_trainer(model, args)
    batch = args.precompute_ref_batch_size or args.per_device_train_batch_size
    start = time.perf_counter()
    scored = trainer._precompute_ref_logps(dataset, "bench", batch)
    seconds = time.perf_counter() - start
    p, c, r = (np.array([len(x) for x in ids[k]]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
    real = 2 * p + c + r
    widths = p + np.maximum(c, r)
    processed = sum(2 * len(widths[i : i + batch]) * widths[i : i + batch].max() for i in range(0, len(widths), batch))
    return {"rows": len(dataset), "tokens": int(real.sum()), "seconds": seconds, "padding_efficiency": real.sum() / processed,
            "batch_size": batch, "ref_chosen_logps": np.array(scored["ref_chosen_logps"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--max-length", type=int, default=768)
    parser.add_argument("--batch-tokens", type=int, default=4096, help="precompute-ref --batch-tokens")
    parser.add_argument("--repeats", type=int, default=2, help="alternate the two runs; report each one's best")
    parser.add_argument("--keep", type=Path, help="work directory to keep (default: a temp dir)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-precompute-"))
    import torch

    model, shards = prepare(work, args.rows, args.max_length)
    params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(model).parameters())
    pristine = work / "shards-tokenized"
    shutil.copytree(shards, pristine)
    ours, trl = None, None
    for _ in range(args.repeats):  # other load on the machine varies: alternate, keep each one's best
        shutil.rmtree(shards)
        shutil.copytree(pristine, shards)
        run = run_ours(model, shards, args.batch_tokens)
        ours = run if ours is None or run["seconds"] < ours["seconds"] else ours
        run = run_trl(model, pristine, work)
        trl = run if trl is None or run["seconds"] < trl["seconds"] else trl
        print(f"run: ours {ours['seconds']:.2f} s, TRL {run['seconds']:.2f} s", file=sys.stderr)

    import polars as pl

    stored = pl.read_ipc(str(shards / "train-00000.arrow"))["ref_chosen_logps"].to_numpy()
    agree = float(np.abs(stored - trl["ref_chosen_logps"]).max())
    ours_tps, trl_tps = ours["tokens"] / ours["seconds"], trl["tokens"] / trl["seconds"]
    print(f"model: Llama, {params / 1e6:.2f}M parameters, float32, CPU, {torch.get_num_threads()} threads")
    print(f"rows: {trl['rows']} pairs ({args.rows} read, longer than {args.max_length} tokens dropped), "
          f"{ours['tokens']:,} real tokens")
    print(f"prefdata precompute-ref (--batch-tokens {args.batch_tokens}): {ours_tps:,.0f} tokens/s end to end ({ours['seconds']:.2f} s), "
          f"{ours['compute_tokens_per_s']:,.0f} tokens/s scoring only, padding efficiency {ours['padding_efficiency']:.1%}")
    print(f"TRL {__import__('trl').__version__} precompute (batch {trl['batch_size']}): {trl_tps:,.0f} tokens/s "
          f"({trl['seconds']:.2f} s), padding efficiency {trl['padding_efficiency']:.1%}")
    print(f"speed-up: {ours_tps / trl_tps:.2f}x; max |ours - TRL| on ref_chosen_logps: {agree:.2e}")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
