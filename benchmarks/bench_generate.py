"""Generate and judge throughput (issue 16): `prefdata generate` beside a plain `model.generate`
loop, one prompt per call and batched, and `prefdata judge` in responses/s.

    .venv/bin/python benchmarks/bench_generate.py [--quick] [--json PATH]

The model and prompts of bench_precompute (a ~4M-parameter Llama, LLaMA-Factory's dpo_en_demo
prompts, chat template), float32, on the GPU if there is one. Every side samples the same prompts
`SAMPLES` times with the same settings (temperature 1, top-k off, top-p 1, the same
max_new_tokens) and stops on the same tokens (schemas.render.stop_token_ids: the template's end of
turn, the tokenizer's EOS, the generation config's):

    ours          prefdata generate: prompts sorted by length, batches bounded by BATCH prompts and a
                  token budget (--batch-tokens)
    loop          the prompts in input order, one `model.generate(num_return_sequences=SAMPLES)` per
                  prompt: what a script without batching does
    loop batched  the prompts in input order, BATCH per call, left-padded: what a script that batches does

The same work is inside every timer: rendering and tokenizing the prompts come before it (ours
renders before its sampling loop, the loops with the same renderer), and inside it are sampling,
cutting each answer after its first stop token, decoding, and writing one JSON line per prompt.
Tokens/s = generated tokens (up to and including the stop token) over that time, the model already
loaded. Judge: responses/s of `prefdata judge` with a reward model of the same size (the same Llama
with a one-output head) and with a Python function.
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
PEERS = {"loop": "model.generate loop, 1 prompt per call", "loop_batched": f"model.generate loop, {BATCH} prompts per call"}
SIZES = {"full": dict(prompts=64, max_new_tokens=64), "quick": dict(prompts=16, max_new_tokens=32)}


def ours(model: Path, records: Path, out: Path, prompts: int, max_new_tokens: int) -> dict:
    from train.generate import GenerateConfig, generate

    manifest = generate(GenerateConfig(prompts=str(records), policy=str(model), out=str(out), n=SAMPLES, top_p=1.0,
                                       max_new_tokens=max_new_tokens, batch_size=BATCH, max_prompts=prompts,
                                       device=bench_device(), dtype="float32"))
    return {"tokens_per_s": manifest.stats["tokens_per_s"], "responses": manifest.stats["responses"]}


def loop(model_path: Path, records: Path, generations: Path, out: Path, prompts: int, max_new_tokens: int,
         batch: int) -> dict:
    """The prompts ours answered, in input order, `batch` per `model.generate` call (1: one prompt
    at a time), timed over the work ours' timer covers (see the module docstring)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from schemas.records import prompt_hash
    from schemas.render import make_renderer, prompt_token_ids, stop_token_ids
    from train.generate import distinct_prompts, raw_prompts
    from train.models import padding_id

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(bench_device()).eval()
    answered = {json.loads(line)["prompt_id"] for line in generations.read_text().splitlines()}
    messages = [m for m in distinct_prompts(raw_prompts(str(records), "train")[0], set(), prompts)[0]
                if prompt_hash(m) in answered]
    renderer = make_renderer(tokenizer, "auto")
    ids, _ = prompt_token_ids(renderer, messages)
    stop_ids = stop_token_ids(renderer, model.generation_config.eos_token_id)
    pad_id = padding_id(tokenizer)
    generated, start = 0, time.perf_counter()
    with torch.inference_mode(), open(out, "w", encoding="utf-8") as fh:
        for first in range(0, len(ids), batch):
            rows = ids[first:first + batch]
            width = max(len(r) for r in rows)
            input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            sampled = model.generate(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device),
                                     do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                                     num_return_sequences=SAMPLES, eos_token_id=stop_ids, pad_token_id=pad_id)
            answers = []
            for row in sampled[:, width:].cpu().numpy():
                stops = np.flatnonzero(np.isin(row, stop_ids))
                answers.append(row[: stops[0] + 1] if len(stops) else row)
            texts = tokenizer.batch_decode(answers, skip_special_tokens=True)
            responses = [{"text": t.strip(), "finish_reason": "stop" if np.isin(a[-1:], stop_ids).any() else "length",
                          "tokens": len(a)} for t, a in zip(texts, answers)]
            for j, prompt in enumerate(messages[first:first + batch]):
                fh.write(json.dumps({"prompt": prompt, "responses": responses[j * SAMPLES:(j + 1) * SAMPLES]},
                                    ensure_ascii=False) + "\n")
            generated += sum(len(a) for a in answers)
    return {"tokens_per_s": generated / (time.perf_counter() - start), "prompts_per_call": batch}


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
    for name, batch in (("loop", 1), ("loop_batched", BATCH)):
        result[name] = loop(model, records, generations, work / f"{name}.jsonl", size["prompts"], size["max_new_tokens"], batch)
    result["judge_responses_per_s"] = judge_rates(model, generations, work)
    return result


def markdown(result: dict) -> str:
    answered = result["ours"]["responses"] // result["samples"]  # prompts too long for the model are left out
    lines = [f"{answered} prompts × {result['samples']} samples, ≤ {result['max_new_tokens']} new tokens, "
             f"{result['device']}, float32.", "",
             "| stage | ours | peer | peer value | ratio |", "|---|---|---|---|---|"]
    for name, peer in PEERS.items():
        ratio = result["ours"]["tokens_per_s"] / result[name]["tokens_per_s"]
        lines.append(f"| generate, tokens/s | {result['ours']['tokens_per_s']:,.0f} | {peer} | "
                     f"{result[name]['tokens_per_s']:,.0f} | {ratio:.2f}× |")
    lines += [f"| judge ({name}), responses/s | {rate:,.0f} | — | — | — |" for name, rate in result["judge_responses_per_s"].items()]
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
