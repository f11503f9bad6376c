"""Label noise for curate (`--score-with`): each pair's margin under a model, and the pairs it
prefers the other way round (docs/curate.md, "Label noise").

The data side only: records are rendered and encoded by `prefdata.tokenize`'s own code (the
renderer, the batch encoder and the length policy with `--overflow truncate`), with the scorer's
tokenizer, so a reward model trained on tokenize's shards scores the very ids it was trained on.
The scorer itself (`train.label_scores.PairScorer`: torch, models) is built by the CLI and handed
in; this module never imports torch or train.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

SUSPECT_LABEL = "suspect_label"
SCORED_COLUMNS = ["prompt", "chosen", "rejected"]
ENCODE_ROWS = 1024  # records rendered and encoded at once: bounds the ids held in memory


class LabelScorer(Protocol):
    """What curate needs of a scorer (train.label_scores.PairScorer is one)."""

    tokenizer: Any
    info: dict[str, Any]

    def margins(self, prompt: list[list[int]], chosen: list[list[int]], rejected: list[list[int]]) -> np.ndarray: ...


class PairIds:
    """Records → the ids `prefdata tokenize` would store for them (at `max_length`, truncating as
    `--overflow truncate` does), and for each record whether it could be rendered at all."""

    def __init__(self, tokenizer: Any, config: Any) -> None:
        from prefdata.tokenize import TokenizeConfig, batch_encoder
        from schemas.render import make_renderer

        self.config = TokenizeConfig(input_dir="-", tokenizer=config.score_with, out="-", template=config.score_template,
                                     chat_template_kwargs=config.score_chat_template_kwargs,
                                     system_turn=config.score_system_turn, max_length=config.score_max_length,
                                     overflow="truncate", workers=1)
        self.renderer = make_renderer(tokenizer, self.config.template, self.config.chat_template_kwargs,
                                      self.config.system_turn)
        self.encode = batch_encoder(tokenizer)
        self.bos_id = tokenizer.bos_token_id
        self.refused: Counter = Counter()  # why records could not be scored: the template's reasons

    def __call__(self, rows: list[dict]) -> tuple[np.ndarray, list[list[int]], list[list[int]], list[list[int]]]:
        from prefdata.tokenize import apply_length_policy, encode_batch

        enc = encode_batch(rows, self.renderer, self.encode)
        apply_length_policy(enc, self.config, self.bos_id, Counter())
        ok = np.array([reason is None for reason in enc.reason], dtype=bool)
        self.refused.update(reason for reason in enc.reason if reason is not None)
        keep = np.flatnonzero(ok)
        return ok, [enc.prompt[i] for i in keep], [enc.chosen[i] for i in keep], [enc.rejected[i] for i in keep]


def label_margins(chunks: Iterator[pa.Table], row_of_pos: np.ndarray, wanted: np.ndarray, scorer: LabelScorer,
                  config: Any, bar: Any = None) -> tuple[np.ndarray, dict[str, int]]:
    """(margin per row, NaN where not scored; why records could not be rendered).

    `chunks` are the inputs' records (SCORED_COLUMNS) in input order, `row_of_pos` maps an input
    position to its row, and `wanted[row]` says which rows to score (those still kept after the
    per-record rules, conflicts, duplicates and decontamination). Memory: one chunk of records,
    and the ids of ENCODE_ROWS of them, at a time."""
    margins = np.full(len(row_of_pos), np.nan, dtype=np.float64)
    encoder = PairIds(scorer.tokenizer, config)
    pos = 0
    for table in chunks:
        rows = row_of_pos[pos:pos + table.num_rows]
        take = np.flatnonzero(wanted[rows])
        for lo in range(0, len(take), ENCODE_ROWS):
            part = take[lo:lo + ENCODE_ROWS]
            ok, prompt, chosen, rejected = encoder(table.take(pa.array(part)).to_pylist())
            margins[rows[part[ok]]] = scorer.margins(prompt, chosen, rejected)
            if bar is not None:
                bar.advance(len(part))
        pos += table.num_rows
    return margins, dict(sorted(encoder.refused.items()))


def label_stats(margins: np.ndarray, source: np.ndarray, source_names: list[str], suspect: np.ndarray,
                dropped: np.ndarray | None, config: Any, scorer: LabelScorer, refused: dict[str, int]) -> dict[str, Any]:
    """The manifest's `label_noise` entry: the scorer, the threshold, and per source how many
    pairs were scored, how many the scorer agrees with (margin > 0), how many are suspect and
    (with --drop-suspect) dropped."""
    scored = ~np.isnan(margins)

    def counts(mask: np.ndarray) -> dict[str, Any]:
        values = margins[mask & scored]
        entry = {"scored": int(len(values)), "agree": int((values > 0).sum()), "suspect": int((mask & suspect).sum()),
                 "mean_margin": float(values.mean()) if len(values) else None}
        if dropped is not None:
            entry["dropped"] = int((mask & dropped).sum())
        return entry

    by_source = {name: counts(source == code) for code, name in enumerate(source_names)}
    return {"scorer": scorer.info, "suspect_margin": config.suspect_margin, "drop_suspect": config.drop_suspect,
            **counts(np.ones(len(margins), dtype=bool)), "not_rendered": refused,
            "by_source": dict(sorted(by_source.items()))}
