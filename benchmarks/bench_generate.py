"""Generate and judge throughput (issue 16): `prefdata generate` beside a plain `model.generate`
loop, and `prefdata judge` in responses/s.

    .venv/bin/python benchmarks/bench_generate.py [--quick] [--json PATH]

The model and prompts of bench_precompute (a ~4M-parameter Llama, LLaMA-Factory's dpo_en_demo
prompts, chat template), float32, on the GPU if there is one. Both sides sample the same prompts
`SAMPLES` times with the same settings (temperature 1, top-k off, top-p 1, the same
max_new_tokens, stop at EOS):

    ours    prefdata generate: prompts sorted by length, BATCH prompts × SAMPLES per call
    plain   a loop over the prompts, one `model.generate(ids, num_return_sequences=SAMPLES)` each:
            what a script without batching does

Tokens/s = generated tokens (up to and including the stop token) over the sampling time, the
model already loaded on both sides. Judge: responses/s of `prefdata judge` with a reward model of
the same size (the same Llama with a one-output head) and with a Python function.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_precompute import bench_device, prepare  # noqa: E402

SAMPLES = 4
BATCH = 16
SIZES = {"full": dict(prompts=64, max_new_tokens=64), "quick": dict(prompts=16, max_new_tokens=32)}


def ours(model: Path, records: Path, out: Path, prompts: int, max_new_tokens: int) -> dict:
    from train.generate import GenerateConfig, generate

    manifest = generate(GenerateConfig(prompts=str(records), policy=str(model), out=str(out), n=SAMPLES, top_p=1.0,
                                       max_new_tokens=max_new_tokens, batch_size=BATCH, max_prompts=prompts,
                                       device=bench_device(), dtype="float32"))
    return {"tokens_per_s": manifest.stats["tokens_per_s"], "responses": manifest.stats["responses"]}


def plain(model_path: Path, generations: Path, max_new_tokens: int) -> dict:
    """The same prompts (read back from ours' output), one generate call per prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(bench_device()).eval()
    prompts = [json.loads(line)["prompt"] for line in generations.read_text().splitlines()]
    generated, start = 0, time.perf_counter()
    with torch.inference_mode():
        for prompt in prompts:
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            out = model.generate(**ids.to(model.device), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new_tokens, num_return_sequences=SAMPLES,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for row in out[:, ids["input_ids"].shape[1]:].cpu():
                stops = (row == tokenizer.eos_token_id).nonzero()
                generated += int(stops[0]) + 1 if len(stops) else len(row)
    return {"tokens_per_s": generated / (time.perf_counter() - start)}


def length_reward(text: str) -> float:
    return float(len(text.split()))


def judge_rates(model: Path, generations: Path, work: Path) -> dict:
    from train.judge import JudgeConfig, judge
    from train.tiny import build_model

    reward_model = build_model(model, work / "reward-model", hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4,
                               intermediate_size=512, reward_head=True)
    rates = {}
    for name, options in (("reward model", {"reward_model": str(reward_model)}),
                          ("function", {"reward": "benchmarks.bench_generate:length_reward"})):
        start = time.perf_counter()
        manifest = judge(JudgeConfig(generations=str(generations.parent), out=str(work / f"judged-{len(rates)}"),
                                     device=bench_device(), dtype="float32", **options))
        rates[name] = manifest.counts.read / (time.perf_counter() - start)
    return rates


def run(quick: bool, work: Path | None = None) -> dict:
    work = Path(work or tempfile.mkdtemp(prefix="bench-generate-"))
    size = SIZES["quick" if quick else "full"]
    model, _ = prepare(work / "model-work", size["prompts"] * 2, 768)
    records = work / "model-work" / "records"
    result = {"samples": SAMPLES, "batch": BATCH, **size, "device": bench_device(),
              "ours": ours(model, records, work / "generated", size["prompts"], size["max_new_tokens"])}
    generations = work / "generated" / "generations.jsonl"
    result["plain"] = plain(model, generations, size["max_new_tokens"])
    result["judge_responses_per_s"] = judge_rates(model, generations, work)
    return result


def markdown(result: dict) -> str:
    ratio = result["ours"]["tokens_per_s"] / result["plain"]["tokens_per_s"]
    answered = result["ours"]["responses"] // result["samples"]  # prompts too long for the model are left out
    lines = [f"{answered} prompts × {result['samples']} samples, ≤ {result['max_new_tokens']} new tokens, "
             f"{result['device']}, float32.", "",
             "| stage | ours | plain model.generate loop | ratio |", "|---|---|---|---|",
             f"| generate, tokens/s | {result['ours']['tokens_per_s']:,.0f} | {result['plain']['tokens_per_s']:,.0f} | {ratio:.2f}× |"]
    lines += [f"| judge ({name}), responses/s | {rate:,.0f} | — | — |" for name, rate in result["judge_responses_per_s"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer prompts and tokens: a smoke test, not figures to quote")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = run(args.quick)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(markdown(result))


if __name__ == "__main__":
    main()
