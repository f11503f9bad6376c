"""curves.png: loss, reward accuracy and reward margin against steps, train and eval."""

from __future__ import annotations

import json
from pathlib import Path

PANELS = (("loss", "eval/loss", "loss"), ("rewards/accuracies", "eval/rewards/accuracies", "reward accuracy"),
          ("rewards/margins", "eval/rewards/margins", "reward margin"))


def plot_curves(metrics_path: Path, out_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.5))
    for ax, (train_key, eval_key, title) in zip(axes, PANELS):
        for key, label, style in ((train_key, "train", "-"), (eval_key, "eval", "o--")):
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points), style, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:  # an SFT run has no reward curves
            ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
