"""The demo's reward model: `--objective reward` on the demo's preference shards, from π_ref,
through the same entry as the DPO runs (`demo.pipeline._train` → `train.loop.train`), then
`prefdata eval` on it (pairwise accuracy, margin, calibration on the eval split), beside the
lexicon judge's agreement with the labels on the same pairs (the eval split's token ids decoded,
as `prefdata eval` decodes samples before judging them). The demo's labels are the lexicon's own
choices (demo/data.py), so its agreement is the ceiling: the reward model's accuracy says how much
of the labeller it recovered from the pairs. → reward_model.md, reward_model.json in the demo's
directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from schemas.io import write_text_atomic

REWARD_DIR = "reward-model"


def judge_agreement(shards: Path, reward: str) -> dict[str, Any]:
    """How often the judge `reward` (module:function) scores the chosen answer of each eval pair
    above the rejected one: agree + disagree + tie + unjudged = pairs."""
    import numpy as np

    from train.data import open_shards
    from train.eval import prompt_messages
    from train.judge import JudgeError, JudgeOptions, build_judge, score_responses
    from train.models import load_model_tokenizer

    manifest, _, data = open_shards(shards, need_ref=False)
    name = manifest.tokenizer.name_or_path  # the tokenizer the shards were made with
    tokenizer = load_model_tokenizer(Path(name), name)
    columns, rows = data.columns, np.arange(len(data))
    texts = {side: [t.strip() for t in tokenizer.batch_decode([getattr(columns, side).row(i) for i in rows],
                                                               skip_special_tokens=True)] for side in ("chosen", "rejected")}
    judge, _ = build_judge(JudgeOptions(reward=reward, device="cpu"))
    responses = [[{"text": c}, {"text": r}] for c, r in zip(texts["chosen"], texts["rejected"])]
    scores = score_responses(judge, prompt_messages(str(shards), [data.ids[i] for i in rows]), responses, batch_size=256)
    counts = {"agree": 0, "disagree": 0, "tie": 0, "unjudged": 0}
    for chosen, rejected in scores:
        if isinstance(chosen, JudgeError) or isinstance(rejected, JudgeError):
            counts["unjudged"] += 1
        else:
            counts["agree" if chosen > rejected else "disagree" if chosen < rejected else "tie"] += 1
    return {"judge": reward, "pairs": len(data), **counts, "agreement": counts["agree"] / len(data)}


def run_reward_model(config: Any, shards: Path, reference: Path) -> dict[str, Any]:
    """Train the reward model from π_ref, evaluate it, judge the same pairs with the lexicon;
    returns {"reward_model": eval's result, "judge": judge_agreement's counts, "seconds": ...}."""
    import time

    from demo.pipeline import LEXICON_REWARD, _train
    from train.eval import EvalConfig, evaluate_policy, summary_line

    out = Path(config.out)
    start = time.perf_counter()
    model = _train(config, shards, reference, out / REWARD_DIR, objective="reward", max_steps=config.reward_steps,
                   learning_rate=config.reward_learning_rate)
    seconds = time.perf_counter() - start
    result = evaluate_policy(EvalConfig(shards=str(shards), policy=str(model), out=str(out / f"eval-{REWARD_DIR}")))
    print(summary_line(result))
    report = {"reward_model": {k: v for k, v in result.items() if k != "policy"}, "judge": judge_agreement(shards, LEXICON_REWARD),
              "train_seconds": seconds, "steps": config.reward_steps, "learning_rate": config.reward_learning_rate}
    table = reward_table(report)
    write_text_atomic(out / "reward_model.md", table + "\n")
    write_text_atomic(out / "reward_model.json", json.dumps(report, indent=2))
    print(table)
    return report


def reward_table(report: dict[str, Any]) -> str:
    rm, judge = report["reward_model"], report["judge"]
    lines = ["| scorer of the eval pairs | pairs | agrees with the label | accuracy | mean margin | calibration gap |",
             "|---|---|---|---|---|---|",
             f"| reward model ({report['steps']} steps, `--objective reward`) | {rm['pairs']} | "
             f"{round(rm['accuracy'] * rm['pairs'])} | {rm['accuracy']:.3f} | {rm['margin']:.3f} | {rm['calibration_gap']:.3f} |",
             f"| lexicon judge (`{judge['judge']}`) | {judge['pairs']} | {judge['agree']} | {judge['agreement']:.3f} | – | – |"]
    return "\n".join(lines)
