"""`make demo` (`python -m demo --out runs/demo [--quick]`): the whole pipeline on the
built-in sentiment task (demo.data), ending with the DPO paper's Figure 2 (left) in
miniature: mean reward against KL(π‖π_ref) for DPO at several β and the Preferred-FT baseline.

Stages, each printing its own summary:
  1. write the raw HH dumps (preference pairs with dirt; the reference corpus);
  2. ingest → curate the preference dump;
  3. tokenizer trained on the corpus (ChatML template, so completions end with `<|im_end|>`),
     tiny Llama from a config;
  4. π_ref = that Llama after SFT (`objective: sft`) on the reference corpus, ingested and tokenized
     on its own: its answers are paired at random, so "chosen" is any continuation, not a preferred one;
  5. tokenize the curated splits with π_ref's tokenizer → precompute-ref;
  6. DPO from π_ref at each β, and Preferred-FT (SFT on the chosen answers) from π_ref;
  6b. the same dump ingested --unpaired, curated, tokenized, scored, and KTO from π_ref (demo/kto.py);
  7. eval each (and π_ref itself) → results.md, results.json, reward_vs_kl.png;
  7b. a reward model (`objective: reward`) from π_ref on the same shards, `prefdata eval` of it
     beside the lexicon judge's agreement with the labels on the same eval pairs (demo/reward.py)
     → reward_model.md, reward_model.json;
  8. `--rounds` on-policy rounds from π_ref (prefdata iterate, judged by the lexicon; demo/rounds.py).
The demo sits above both packages (it drives prefdata and train); modules that import torch are
imported inside the functions, so `python -m demo --help` starts fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from demo.data import DemoDataConfig, sft_lines, write_preference_dump, write_sft_dump
from schemas.io import write_text_atomic

QUICK = {"pairs": 800, "sft_reviews": 1500, "sft_epochs": 2.0, "betas": [0.1], "dpo_steps": 60, "eval_prompts": 40,
         "rounds": 1, "round_samples": 4, "reward_steps": 40}


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: str = Field("runs/demo", description="Directory for every stage's output, results.md and the figures.")
    quick: bool = Field(False, description="The size the tests run: " + ", ".join(f"{k} {v}" for k, v in QUICK.items()) + ".")
    pairs: int = Field(2000, gt=0, description="Preference pairs in the generated dump.")
    sft_reviews: int = Field(3000, gt=0, description="Reviews in the reference corpus π_ref is fine-tuned on.")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="Curate: prompt clusters held out for eval.")
    vocab_size: int = Field(400, gt=0, description="Tokenizer vocabulary.")
    hidden_size: int = Field(64, gt=0, description="Tiny Llama width.")
    num_layers: int = Field(2, gt=0, description="Tiny Llama layers.")
    sft_epochs: float = Field(3.0, gt=0, description="π_ref's SFT epochs.")
    sft_learning_rate: float = Field(3e-3, gt=0, description="π_ref's SFT learning rate.")
    betas: list[float] = Field([0.05, 0.1, 0.5], description="DPO β values, one run each.")
    dpo_steps: int = Field(150, gt=0, description="Optimizer steps of every DPO and Preferred-FT run (and of each iterated round).")
    # 3e-4, not 1e-3: at 1e-3 for 150 steps, DPO at β = 0.05 drove both answers' log-probs down
    # (chosen −19 → −68 nats by step 60) until its samples were byte garbage (reward 0, KL 52) while
    # held-out accuracy stayed 0.94; at 3e-4 every β ends at KL 7–9 with readable samples.
    dpo_learning_rate: float = Field(3e-4, gt=0, description="DPO and Preferred-FT learning rate.")
    batch_size: int = Field(32, gt=0, description="Pairs per step.")
    eval_samples: int = Field(4, gt=0, description="Samples per eval prompt and model.")
    eval_prompts: int = Field(100, gt=0, description="Eval prompts (offline runs and each iterated round).")
    # 1e-3, not the DPO runs' 3e-4: a new score head reading sentiment off the last token's hidden
    # state learns slowly; at 3e-4 the quick size's 40 steps ranked 0.75 of the eval pairs, at 1e-3 0.90.
    kto: bool = Field(True, description="Also the demo's data unpaired (ingest --unpaired) and KTO on it, β 0.1, evaluated "
                      "beside the DPO runs (demo/kto.py).")
    reward_steps: int = Field(100, ge=0, description="Optimizer steps of the demo's reward model (objective reward, from "
                              "π_ref); 0: none.")
    reward_learning_rate: float = Field(1e-3, gt=0, description="The reward model's learning rate.")
    rounds: int = Field(2, ge=0, description="On-policy rounds after the offline runs (prefdata iterate from π_ref, judged "
                        "by the lexicon); 0: none.")
    round_samples: int = Field(8, gt=1, description="Answers sampled per prompt in each round (more samples, fewer ties).")
    round_learning_rate: float = Field(1e-4, gt=0, description="Each round's DPO learning rate: a round moves the policy "
                                       "less than an offline run, so the next round still samples diverse answers.")
    seed: int = Field(0, description="Seed of the data, models, sampling and splits.")

    @model_validator(mode="before")
    @classmethod
    def _quick_sizes(cls, values: Any) -> Any:
        """--quick sets the test's sizes; a size given alongside it still wins."""
        if isinstance(values, dict) and values.get("quick"):
            return {**QUICK, **values}
        return values


def _corpus(config: DemoConfig) -> list[str]:
    """Tokenizer training text: every transcript of the reference corpus."""
    rows = (json.loads(line) for line in sft_lines(DemoDataConfig(sft_reviews=config.sft_reviews, seed=config.seed)))
    return [text for row in rows for text in (row["chosen"], row["rejected"])]


def _ingest(raw: Path, out: Path, unpaired: bool = False) -> Path:
    from prefdata.formats.base import FormatOptions
    from prefdata.ingest import IngestConfig, ingest, summary_lines

    options = FormatOptions(unpaired=unpaired)
    print("\n".join(summary_lines(ingest(IngestConfig(inputs=[str(raw)], out=str(out), options=options)))))
    return out


def _tokenize(records: Path, tokenizer: Path, out: Path) -> Path:
    from prefdata.tokenize import TokenizeConfig, summary_lines, tokenize

    print("\n".join(summary_lines(tokenize(TokenizeConfig(input_dir=str(records), tokenizer=str(tokenizer), out=str(out),
                                                           max_length=128, max_prompt_length=64)))))
    return out


def _train(config: DemoConfig, shards: Path, model: Path, out: Path, **overrides: Any) -> Path:
    from train.config import TrainConfig
    from train.loop import train

    settings = {"batch_size": config.batch_size, "device": "cpu", "seed": config.seed, "log_every": 20, **overrides}
    result = train(TrainConfig(shards=str(shards), model=str(model), out=str(out), **settings))
    print(f"train {out.name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return out / "final"


def build_reference(config: DemoConfig, out: Path, sft_raw: Path) -> tuple[Path, Path]:
    """(tokenizer dir, π_ref dir): tokenizer and tiny Llama made here, then SFT on the reference corpus."""
    from train.tiny import build_model, build_tokenizer

    tokenizer = build_tokenizer(_corpus(config), out / "tokenizer", vocab_size=config.vocab_size)
    initial = build_model(tokenizer, out / "initial", hidden_size=config.hidden_size, num_layers=config.num_layers,
                          intermediate_size=4 * config.hidden_size, max_positions=256, seed=config.seed)
    sft_shards = _tokenize(_ingest(sft_raw, out / "sft-ingest"), tokenizer, out / "sft-shards")
    reference = _train(config, sft_shards, initial, out / "reference", objective="sft", epochs=config.sft_epochs,
                       learning_rate=config.sft_learning_rate, warmup_steps=10)
    return tokenizer, reference


# The demo's judge: the sentiment lexicon its data was made with (demo/data.py).
LEXICON_REWARD = "demo.data:lexicon_reward"


def _evaluate(config: DemoConfig, shards: Path, policy: Path, reference: Path, out: Path, beta: float) -> dict[str, Any]:
    from train.eval import EvalConfig, evaluate_policy, summary_line

    result = evaluate_policy(EvalConfig(shards=str(shards), policy=str(policy), reference=str(reference), out=str(out),
                                        reward=LEXICON_REWARD, beta=beta, samples=config.eval_samples,
                                        max_prompts=config.eval_prompts, seed=config.seed))
    print(summary_line(result))
    return result


def results_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| policy | β | held-out accuracy | margin | mean reward | KL(π‖π_ref) |", "|---|---|---|---|---|---|"]
    for row in rows:
        beta = f"{row['beta']:g}" if row["beta"] is not None else "–"
        lines.append(f"| {row['label']} | {beta} | {row['accuracy']:.3f} | {row['margin']:.3f} | "
                     f"{row['reward']:.3f} | {row['kl']:.3f} |")
    return "\n".join(lines)


def run_demo(config: DemoConfig) -> list[dict[str, Any]]:
    """Every stage in order; returns the results rows (also in results.json / results.md)."""
    from rich.console import Console

    from prefdata.curate import CurateConfig, curate, summary_table
    from train.eval import plot_reward_vs_kl
    from train.reference import PrecomputeRefConfig, precompute_ref, summary_lines

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    data = DemoDataConfig(pairs=config.pairs, sft_reviews=config.sft_reviews, seed=config.seed)
    raw = write_preference_dump(out / "raw" / "sentiment_prefs.jsonl", data)
    sft_raw = write_sft_dump(out / "raw" / "reference_corpus.jsonl", data)
    records = _ingest(raw, out / "ingest")
    Console().print(summary_table(curate(CurateConfig(inputs=[str(records)], out=str(out / "curate"),
                                                      eval_fraction=config.eval_fraction, seed=config.seed))))
    tokenizer, reference = build_reference(config, out, sft_raw)
    shards = _tokenize(out / "curate", tokenizer, out / "shards")
    print("\n".join(summary_lines(precompute_ref(PrecomputeRefConfig(shards=str(shards), model=str(reference),
                                                                     device="cpu")))))
    # Preferred-FT: the paper's baseline, SFT on the chosen answers (same steps and rate as DPO).
    runs = [(f"DPO β={beta:g}", beta, {"beta": beta}) for beta in config.betas] + \
        [("Preferred-FT", None, {"objective": "sft"})]
    rows = [{"label": "π_ref (SFT)", "beta": None, **_evaluate(config, shards, reference, reference, out / "eval-reference", 0.1)}]
    for label, beta, overrides in runs:
        name = label.replace(" ", "-").replace("β=", "beta")
        policy = _train(config, shards, reference, out / name, max_steps=config.dpo_steps,
                        learning_rate=config.dpo_learning_rate, **overrides)
        rows.append({"label": label, "beta": beta, **_evaluate(config, shards, policy, reference, out / f"eval-{name}", beta or 0.1)})
    if config.kto:
        from demo.kto import run_kto

        rows.append(run_kto(config, raw, tokenizer, reference, shards))
    plot_reward_vs_kl(rows, out / "reward_vs_kl.png")
    table = results_table(rows)
    write_text_atomic(out / "results.md", table + "\n")
    write_text_atomic(out / "results.json", json.dumps({"config": config.model_dump(), "results": rows}, indent=2))
    print(table)
    if config.reward_steps:
        from demo.reward import run_reward_model

        run_reward_model(config, shards, reference)
    if config.rounds:
        from demo.rounds import run_rounds

        run_rounds(config, reference)
    return rows


