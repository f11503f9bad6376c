"""Each pair's label margin under a model, for `prefdata curate --score-with` (label noise).

    reward model            margin = r(x, y_chosen) − r(x, y_rejected)       (train.rewards.pair_rewards)
    policy + reference      margin = β·[(log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))]
                            (the DPO implicit reward; train.logprobs.sequence_logps, the one log-prob function)

A positive margin agrees with the record's label; a pair the model prefers the other way by more
than curate's `--suspect-margin` is a suspect label. Scoring takes token ids as `prefdata tokenize`
stores them (prompt ids, completion ids): curate renders them with `prefdata.tokenize`'s own
encoder and the scorer's tokenizer (`PairScorer.tokenizer`), so a reward model sees exactly the
rows it was trained on. This module never imports prefdata; curate reaches it through the CLI.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from schemas.errors import UserError
from schemas.fingerprint import tokenizer_fingerprint
from schemas.shard import PAIRED, TOKEN_COLUMNS
from train.batching import TokenColumns, collate_pairs
from train.device import dtype_name, select_device, select_dtype
from train.models import load_causal_lm, model_dir, model_fingerprint, padding_id
from train.rewards import is_reward_model


class PairScorer:
    """Label margins of pairs given as token ids, `batch_size` pairs per forward, in float64."""

    def __init__(self, kind: str, models: list[Any], tokenizer: Any, device: torch.device, batch_size: int,
                 beta: float, info: dict[str, Any]) -> None:
        self.kind, self.models, self.tokenizer = kind, models, tokenizer
        self.device, self.batch_size, self.beta = device, batch_size, beta
        self.pad_id = padding_id(tokenizer)
        # What renders the records: the tokenizer the margins were computed on ids of.
        self.info = {**info, "tokenizer": tokenizer_fingerprint(tokenizer, info.get("model", info.get("policy", {})).get(
            "name_or_path", "")).model_dump()}

    def margins(self, prompt: list[list[int]], chosen: list[list[int]], rejected: list[list[int]]) -> np.ndarray:
        """[n] float64: each pair's margin (chosen over rejected). Pairs are batched by length, so a
        batch pads little; the padded layout, so any architecture the loaders accept works."""
        n = len(prompt)
        result = np.full(n, np.nan, dtype=np.float64)
        if n == 0:
            return result
        table = pa.table({name: pa.array(ids, type=pa.list_(pa.int32()))
                          for name, ids in zip(TOKEN_COLUMNS[PAIRED], (prompt, chosen, rejected))})
        columns = TokenColumns.from_table(table)
        order = np.argsort(columns.pair_lengths, kind="stable")
        with torch.inference_mode():
            for start in range(0, n, self.batch_size):
                rows = order[start:start + self.batch_size]
                batch = collate_pairs(columns, rows, self.pad_id).to(self.device)
                result[rows] = self._batch_margins(batch)
        return result

    def _batch_margins(self, batch: Any) -> np.ndarray:
        if self.kind == "reward_model":
            from train.rewards import RewardScorer, pair_rewards

            chosen, rejected = pair_rewards(RewardScorer(self.models[0]), batch)
            return (chosen.double() - rejected.double()).cpu().numpy()
        from train.logprobs import sequence_logps

        policy, reference = (sequence_logps(model, batch) for model in self.models)
        margin = ((policy.chosen.double() - reference.chosen.double())
                  - (policy.rejected.double() - reference.rejected.double()))
        return (self.beta * margin).cpu().numpy()


def load_pair_scorer(score_with: str, reference: str | None = None, *, beta: float = 0.1, batch_size: int = 16,
                     device: str = "auto", dtype: str = "auto") -> PairScorer:
    """A reward model (`score_with` alone: a one-output sequence classifier, e.g. `prefdata train
    --objective reward`'s final/), or a policy and its reference (the implicit reward). Refuses a
    causal LM without a reference: a new, untrained head would score noise."""
    torch_device = select_device(device)
    torch_dtype = select_dtype(dtype, torch_device)
    directory = model_dir(score_with)
    if reference is None:
        if not is_reward_model(directory):
            raise UserError(f"--score-with {score_with}: not a reward model (a one-output sequence classifier); give "
                            "--score-reference REF to score with a policy's implicit reward, or train a reward model "
                            "with prefdata train --objective reward")
        from train.rewards import load_reward_model

        model, tokenizer = load_reward_model(directory, score_with, torch_dtype, torch_device)
        info = {"kind": "reward_model", "model": model_fingerprint(directory, score_with, torch_dtype, torch_device).model_dump()}
        return PairScorer("reward_model", [model.eval()], tokenizer, torch_device, batch_size, beta, info)
    if is_reward_model(directory):
        raise UserError(f"--score-with {score_with} is a reward model; score with it alone (no --score-reference)")
    ref_directory = model_dir(reference)
    policy, tokenizer = load_causal_lm(directory, score_with, torch_dtype, torch_device)
    ref_model, ref_tokenizer = load_causal_lm(ref_directory, reference, torch_dtype, torch_device)
    if tokenizer_fingerprint(tokenizer, score_with).files_sha256 != tokenizer_fingerprint(ref_tokenizer, reference).files_sha256:
        raise UserError(f"--score-with {score_with} and --score-reference {reference} have different tokenizers; "
                        "the implicit reward compares log-probs of the same ids")
    info = {"kind": "implicit_reward", "beta": beta, "dtype": dtype_name(torch_dtype),
            "policy": model_fingerprint(directory, score_with, torch_dtype, torch_device).model_dump(),
            "reference": model_fingerprint(ref_directory, reference, torch_dtype, torch_device).model_dump()}
    return PairScorer("implicit_reward", [policy.eval(), ref_model.eval()], tokenizer, torch_device, batch_size, beta, info)
