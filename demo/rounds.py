"""The demo, iterated: on-policy rounds from π_ref with `prefdata iterate`, judged by the lexicon.

Round r samples `round_samples` answers per prompt from π_r, the lexicon scores them, the best and
worst become a pair, and DPO (β = 0.1, `round_learning_rate`, the offline runs' step budget) trains
π_{r+1} from π_r with π_r as the reference. Each round draws prompts no earlier round drew; the held-out
prompts judge π_{r+1} against π_r. → rounds.md, rounds.json, rounds.png in the demo's directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from schemas.io import write_text_atomic

ITERATE_DIR = "iterate"


def run_rounds(config: Any, reference: Path) -> dict[str, Any]:
    from demo.pipeline import LEXICON_REWARD
    from prefdata.iterate import IterateConfig, iterate, summary_lines

    out = Path(config.out)
    manifest = iterate(IterateConfig(
        prompts=str(out / "curate"), policy=str(reference), out=str(out / ITERATE_DIR), rounds=config.rounds,
        eval_prompts=config.eval_prompts, reward=LEXICON_REWARD, n=config.round_samples, max_new_tokens=48, max_length=128,
        max_prompt_length=64, seed=config.seed, device="cpu",
        train={"beta": 0.1, "learning_rate": config.round_learning_rate, "max_steps": config.dpo_steps,
               "batch_size": config.batch_size, "log_every": 20}))
    print("\n".join(summary_lines(manifest)))
    rounds = [r["eval"] | {"round": r["round"], "pairs": r["pairs"]} for r in manifest.stats["rounds"]]
    table = rounds_table(rounds)
    write_text_atomic(out / "rounds.md", table + "\n")
    write_text_atomic(out / "rounds.json", json.dumps(rounds, indent=2))
    plot_rounds(rounds, out / "rounds.png")
    print(table)
    return {"rounds": rounds}


def rounds_table(rounds: list[dict[str, Any]]) -> str:
    lines = ["| round | pairs | π_{r+1} vs π_r: win rate [95%] | mean reward π_r → π_{r+1} | KL(π_{r+1} ‖ π_r) |",
             "|---|---|---|---|---|"]
    for r in rounds:
        win = r["win_rate"]
        lines.append(f"| {r['round']} | {r['pairs']} | {win['rate']:.3f} [{win['low']:.3f}, {win['high']:.3f}] | "
                     f"{r['baseline_reward']:.3f} → {r['reward']:.3f} | {r['kl']:.2f} |")
    return "\n".join(lines)


def plot_rounds(rounds: list[dict[str, Any]], path: Path) -> None:
    """Left: mean judged reward of π_1 … π_{R+1}; right: each round's win rate with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rewards, wins) = plt.subplots(1, 2, figsize=(9, 3.6))
    policies = [f"π_{r['round']}" for r in rounds] + [f"π_{rounds[-1]['round'] + 1}"]
    rewards.plot(policies, [rounds[0]["baseline_reward"]] + [r["reward"] for r in rounds], marker="o")
    rewards.set_ylabel("mean lexicon reward (held-out prompts)")
    rewards.set_title("reward per policy")
    labels = [f"π_{r['round'] + 1} vs π_{r['round']}\nKL {r['kl']:.1f}" for r in rounds]
    rates = [r["win_rate"]["rate"] for r in rounds]
    errors = [[rate - r["win_rate"]["low"] for rate, r in zip(rates, rounds)],
              [r["win_rate"]["high"] - rate for rate, r in zip(rates, rounds)]]
    wins.bar(labels, rates, yerr=errors, capsize=4)
    wins.axhline(0.5, color="grey", lw=0.8, ls="--")
    wins.set_ylim(0, 1)
    wins.set_title("win rate against the previous policy")
    for ax in (rewards, wins):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
