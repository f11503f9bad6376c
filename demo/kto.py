"""The demo's data unpaired, and KTO on it: the same raw dump ingested with `--unpaired` (each
pair's chosen answer a desirable row, its rejected answer an undesirable one), curated, tokenized
with π_ref's tokenizer and scored by π_ref, then `--objective kto` from π_ref.

Like for like with the DPO rows: the same β (0.1), learning rate and number of steps, and twice
the batch size in rows, so that a KTO step sees the same answers a DPO step sees as pairs. The
policy is evaluated exactly as the DPO rows are, on the paired eval split (held-out pairwise
accuracy against π_ref, mean lexicon reward and KL(π‖π_ref) of samples on the same prompts);
the reward-sign accuracy on the unpaired eval split goes beside it in results.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

KTO_BETA = 0.1


def run_kto(config: Any, raw: Path, tokenizer: Path, reference: Path, paired_shards: Path) -> dict[str, Any]:
    """One results row for KTO (the keys of the DPO rows), plus `unpaired_eval`."""
    from rich.console import Console

    from demo.pipeline import _evaluate, _ingest, _tokenize, _train
    from prefdata.curate import CurateConfig, curate, summary_table
    from train.reference import PrecomputeRefConfig, precompute_ref, summary_lines

    out = Path(config.out)
    records = _ingest(raw, out / "ingest-unpaired", unpaired=True)
    Console().print(summary_table(curate(CurateConfig(inputs=[str(records)], out=str(out / "curate-unpaired"),
                                                      eval_fraction=config.eval_fraction, seed=config.seed))))
    shards = _tokenize(out / "curate-unpaired", tokenizer, out / "shards-unpaired")
    print("\n".join(summary_lines(precompute_ref(PrecomputeRefConfig(shards=str(shards), model=str(reference), device="cpu")))))
    policy = _train(config, shards, reference, out / "KTO-beta0.1", objective="kto", beta=KTO_BETA, max_steps=config.dpo_steps,
                    learning_rate=config.dpo_learning_rate, batch_size=2 * config.batch_size)
    row = _evaluate(config, paired_shards, policy, reference, out / "eval-KTO-beta0.1", KTO_BETA)
    unpaired = _evaluate(config, shards, policy, reference, out / "eval-KTO-beta0.1-unpaired", KTO_BETA)
    return {"label": f"KTO β={KTO_BETA:g}", "beta": KTO_BETA, **row,
            "unpaired_eval": {k: unpaired[k] for k in ("accuracy", "margin", "rows", "desirable", "undesirable")}}
