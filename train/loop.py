"""The training loop, top to bottom: set-up, then step after step, then the final model.

Each optimizer step: `gradient_accumulation_steps` micro-batches of `batch_size` pairs per process;
chosen and rejected of a micro-batch go through one forward (`train.logprobs.sequence_logps`); the
reference terms are read from the shards (`ref_chosen_logps` / `ref_rejected_logps`) — the
reference model is never run, unless `--reference live` asks for it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from schemas.errors import UserError
from schemas.io import atomic_dir
from schemas.location import check_apart, local_only
from schemas.manifest import Counts, InputFile, Manifest, ModelFingerprint, package_version
from schemas.progress import progress
from schemas.shard import PAIRED, UNPAIRED
from train import parallel
from train.batching import Collator, LengthGroupedSampler, PairBatch, token_budget_batches
from train.config import OBJECTIVE_OPTIONS, TrainConfig
from train.data import SplitData, open_shards, shards_kind
from train.device import select_dtype
from train.distributed import Dist
from train.layouts import check_packing, prefix_sharing_exact
from train.logprobs import SequenceScorer, sequence_logps
from train.losses import (
    REFERENCE_FREE_LOSSES,
    Denominators,
    kto_kl,
    kto_loss,
    preference_loss,
    reference_free_loss,
    reward_loss,
    sft_loss,
)
from train.models import (
    attention_kernel,
    check_fits,
    check_tokenizer,
    disable_dropout,
    load_causal_lm,
    model_dir,
    model_fingerprint,
    padding_id,
    same_weights,
)
from train.rewards import RewardScorer, load_reward_model, pair_rewards, score_margins
from train.tracking import Tracker, open_tracker


class TrainingDiverged(UserError):
    """NaN or inf loss: the run stops with the step and the rows that caused it."""


# ---------------------------------------------------------------------------------------------
# Processes and devices


def _autocast(device: torch.device, compute_dtype: torch.dtype) -> Any:
    if compute_dtype == torch.float32:
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=compute_dtype)


# ---------------------------------------------------------------------------------------------
# Schedule, checkpoints, metrics


# TrainConfig.lr_schedule → transformers' schedule; each warms up linearly from 0 first.
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


# What a resumed run may set anew: where it is (a run copied elsewhere), how long it runs, how
# often and where it reports, and how it computes (not what). Anything else would silently mix two
# runs: the restored scheduler keeps the old learning rate while config.yaml shows the new one, a
# new batch size re-reads the data from another place, new shards or loss train another run on top.
RESUMABLE_SETTINGS = frozenset({"out", "cpu_offload", "max_steps", "epochs", "log_every", "eval_every", "save_every",
                                "eval_batch_tokens", "report_to", "resume", "device", "gradient_checkpointing", "compile",
                                "attn_implementation", "check_reference_rows"})


def check_resumed_settings(config: TrainConfig, out: Path) -> None:
    """The run being resumed had these settings (its config.yaml), bar RESUMABLE_SETTINGS."""
    saved = out / "config.yaml"
    if not saved.is_file():
        return
    # A setting the saved file lacks (a run from before it existed) had its default; paths compare resolved.
    before = {**TrainConfig.defaults(), **yaml.safe_load(saved.read_text())}
    now = yaml.safe_load(yaml.safe_dump(config.model_dump(), sort_keys=False))
    # An option this objective never reads (β of an SFT run saved before it was refused) changes nothing.
    unread = set(OBJECTIVE_OPTIONS) - config.options_used()
    changed = [key for key in now if key not in RESUMABLE_SETTINGS and key not in unread and before.get(key) != now[key]
               and not (key in ("shards", "model", "reference_model") and before.get(key) and now[key]
                        and _same_location(before[key], now[key]))]
    if changed:
        listed = ", ".join(f"--{key.replace('_', '-')} {before.get(key)!r} → {now[key]!r}" for key in changed)
        raise UserError(f"--resume: {out} is a run with other settings ({listed}); resume with its own (config.yaml), "
                        "or start a new run in another --out")


def _is_shards_reference(manifest: Manifest, config: TrainConfig, policy: ModelFingerprint) -> bool:
    """Whether the policy is meant to be the model the shards' reference log-probs were scored
    with, so the step-0 check compares the two: the same weights, or the model at the path they
    were scored from (re-saved there, or retrained in place: then the check finds them stale)."""
    reference = manifest.reference
    return same_weights(reference, policy) or (reference is not None and _same_location(reference.name_or_path, config.model))


def _same_location(a: str, b: str) -> bool:
    """One model directory (however the path is written), or one Hub name."""
    if Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a == b and not Path(a).exists()


def _check_fits_shards(model: Any, name_or_path: str, train_data: Any, eval_data: Any) -> None:
    """Both splits' rows are the model's ids and fit its positions (`check_fits`): the policy
    and a live reference score the same rows."""
    for split, name in ((train_data, "train"), (eval_data, "eval")):
        if split is not None:
            check_fits(model, name_or_path, split.columns, f"the {name} shards")


def adamw(trainable: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with the fused kernel where torch has one for the parameters' device (CPU and CUDA do):
    one kernel per step instead of a dozen elementwise passes over every parameter (about half
    the optimizer step's time on the bench's 4M-parameter model, in one profile). transformers'
    Trainer, so TRL, uses the same kernel by default (`adamw_torch_fused`)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = _get_fused_kernels_supported_devices()
    except ImportError:  # private in torch: a release without it trains with the default kernel
        devices = []
    fused = all(p.device.type in devices and p.is_floating_point() for p in trainable)
    return torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay,
                             betas=(config.adam_beta1, config.adam_beta2), fused=fused or None)


def lr_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    """transformers' schedules (the same learning rates as a Trainer run with these settings);
    their state goes into each checkpoint."""
    from transformers import get_scheduler

    return get_scheduler(SCHEDULES[config.lr_schedule], optimizer, num_warmup_steps=config.warmup_steps,
                         num_training_steps=total_steps)


@dataclass
class Position:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # where the next batch comes from
    batch_index: int = 0


def save_run_checkpoint(out: Path, position: Position, scorer: Any, optimizer: Any, scheduler: Any, dist: Dist) -> None:
    parallel.save_checkpoint(out / f"checkpoint-{position.step:07d}", scorer, optimizer,
                             {"position": position.__dict__, "scheduler": scheduler.state_dict()}, dist)


def load_run_checkpoint(config: TrainConfig, checkpoint: Path, scorer: Any, optimizer: Any, scheduler: Any,
                        dist: Dist) -> Position:
    # Dropout is the only GPU random draw in a step: without it a checkpoint lacking the GPU's
    # generator (an older one) still continues exactly.
    state = parallel.load_checkpoint(checkpoint, scorer, optimizer, dist,
                                     gpu_random_used=not config.disable_dropout or config.lora_dropout > 0)
    scheduler.load_state_dict(state["scheduler"])
    return Position(**state["position"])


class MetricsLog:
    """metrics.jsonl, one line per logged step or eval, and the same records to the `--report-to`
    tracker; on resume, lines past the checkpoint go."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None, tracker: Tracker | None) -> None:
        self.path, self.enabled, self.tracker = path, enabled, tracker
        if enabled and resume_step is not None and path.is_file():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif enabled:
            path.write_text("")
        if tracker is not None:
            tracker.start(resume_step)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
        if self.tracker is not None:
            self.tracker.log(record)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()


class MetricsWindow:
    """The steps since the last metrics record. Each micro-batch adds its share of its step's
    means (`step_denominators`), so a step's shares summed over micro-batches and processes are
    that step's means over all its pairs, and the record is their average over the window's
    steps that had the metric: the numbers one process would log on the same global batches. (A
    metric can be missing from a step: KTO's reward of a label the step has no row of.)"""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps_with: dict[str, int] = {}
        self._this_step: set[str] = set()
        self.tokens = self.computed = self.padded = 0
        self.start = time.perf_counter()

    def add(self, shares: dict[str, torch.Tensor], weight: float, batch: PairBatch | None) -> None:
        # Every process adds every name of the step, a stand-in batch's at weight 0, so the sums
        # line up across processes (which names a step has is decided by the whole step's rows).
        for name, value in shares.items():
            self.sums[name] = self.sums.get(name, 0.0) + weight * value.item()
            self._this_step.add(name)
        if batch is not None:
            self.tokens += batch.real_tokens
            self.computed += batch.computed_tokens
            self.padded += batch.padded_tokens

    def end_step(self) -> None:
        for name in self._this_step:
            self.steps_with[name] = self.steps_with.get(name, 0) + 1
        self._this_step.clear()

    def summary(self, dist: Dist) -> dict[str, float]:
        """The window's means and throughput over all processes (a collective)."""
        names = list(self.sums)
        totals = dist.sum(torch.tensor([self.sums[n] for n in names] + [self.tokens, self.computed, self.padded],
                                       dtype=torch.float64)).tolist()
        tokens, computed, padded = totals[len(names):]
        return {**{name: total / self.steps_with[name] for name, total in zip(names, totals)}, "tokens": int(tokens),
                "tokens_per_s": tokens / (time.perf_counter() - self.start), "computed_tokens": int(computed),
                "padding_efficiency": computed / max(padded, 1)}


# ---------------------------------------------------------------------------------------------
# One batch: loss and metrics


def batch_loss(config: TrainConfig, scorer: Any, batch: PairBatch, data: SplitData, ref_model: Any,
               autocast: Any, denominators: Denominators | None = None, dist: Dist | None = None,
               weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective's loss and metrics on one batch: means over the batch, or with `denominators`
    this batch's share of a larger mean (`step_denominators`). KTO's KL estimate is over the
    batch on every process of `dist` (`weight` 0: this process's rows are a stand-in)."""
    if config.objective == "reward":
        with autocast():
            chosen, rejected = pair_rewards(scorer, batch)
        margin = None if data.score_margins is None else torch.from_numpy(data.score_margins[batch.rows]).to(chosen.device)
        return reward_loss(chosen, rejected, config.center_rewards_coefficient, denominators, margin)
    with autocast():
        logps = sequence_logps(scorer, batch)
    if config.objective == "sft":
        loss = sft_loss(logps.chosen, logps.chosen_tokens, denominators)
        chosen = logps.chosen.detach()
        return loss, {"logps/chosen": chosen.mean() if denominators is None else chosen.sum() / denominators.pairs}
    if config.objective in REFERENCE_FREE_LOSSES:
        return reference_free_loss(config.objective, logps.chosen, logps.rejected, logps.chosen_tokens,
                                   logps.rejected_tokens, config.loss_params, denominators)
    ref_chosen, ref_rejected = _reference_logps(ref_model, batch, data, autocast, logps.chosen.device)
    if config.objective == "kto":
        # An unpaired row's two continuations: its completion (chosen slot) and KL completion.
        weights = torch.full_like(ref_rejected, weight)
        kl = kto_kl(logps.rejected - ref_rejected, weights, None if dist is None else dist.sum)
        desirable = torch.from_numpy(data.labels[batch.rows]).to(logps.chosen.device)
        return kto_loss(logps.chosen - ref_chosen, desirable, kl, config.loss_params, config.desirable_weight,
                        config.undesirable_weight, denominators)
    return preference_loss(logps.chosen, logps.rejected, ref_chosen, ref_rejected, logps.chosen_tokens,
                           logps.rejected_tokens, config.loss, config.loss_params, config.sft_weight, denominators)


def _reference_logps(ref_model: Any, batch: PairBatch, data: SplitData, autocast: Any,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's log-probs of the batch's two continuations: stored, or from `--reference live`."""
    if ref_model is None:
        return tuple(torch.from_numpy(x).to(device) for x in data.ref_logps(batch.rows))
    with torch.inference_mode(), autocast():
        ref = sequence_logps(ref_model, batch)
    return ref.chosen.clone(), ref.rejected.clone()


def step_denominators(data: SplitData, micro_batches: list[np.ndarray]) -> Denominators:
    """The pairs (rows, when unpaired) and chosen tokens of a whole optimizer step, every
    micro-batch on every process: each process's loss is its rows' share of the step's mean, so
    the gradients the processes average (× world) are the gradient of the one-process step,
    however unevenly the pairs fall."""
    rows = np.concatenate(micro_batches)
    desirable = int(data.labels[rows].sum()) if data.labels is not None else 0
    undesirable = len(rows) - desirable if data.labels is not None else 0
    return Denominators(pairs=float(len(rows)), chosen_tokens=float(data.columns.chosen.lengths[rows].sum()),
                        desirable=float(desirable), undesirable=float(undesirable))


def check_objective_fits(config: TrainConfig) -> None:
    """KTO reads unpaired shards, every other objective pairs: the other kind is refused in one
    line, before anything else about the shards (a missing reference) is."""
    wanted, found = UNPAIRED if config.objective == "kto" else PAIRED, shards_kind(config.shards)
    if found is not None and found != wanted:
        hint = ("train them with --objective kto" if found == UNPAIRED else
                "KTO needs unpaired shards: ingest the data with --unpaired (pairs split into a desirable and an undesirable row)")
        raise UserError(f"{config.shards}: {found} shards, but --objective {config.objective} needs {wanted} ones; {hint}")


def _inference_view(scorer: Any) -> Any:
    """The module to score held-out or check rows with. DDP's forward is a collective that the
    processes would call different numbers of times, so its inner module; an FSDP module itself,
    since its layers' weights exist only when gathered (`equal_shares` keeps the calls in step)."""
    return scorer if parallel.is_sharded(scorer) else parallel.unwrap(scorer)


@torch.no_grad()
def evaluate(config: TrainConfig, scorer: Any, data: SplitData, ref_model: Any, collate: Collator, device: torch.device,
             dist: Dist, autocast: Any) -> dict[str, float]:
    """Held-out loss, implicit-reward accuracy and margin over the whole eval split (each process
    scores its share of the batches; sums are all-reduced)."""
    model = _inference_view(scorer)
    model.eval()
    lengths, rows_per_pair = collate.batch_lengths(data.columns)
    batches = token_budget_batches(lengths, config.eval_batch_tokens, rows_per_pair)
    # Each batch's metrics are its share of the split's means, so summed over batches and
    # processes they are the split's own (KTO's per-label rewards included), not batch averages.
    split = step_denominators(data, batches)
    names = ["loss"] + (["rewards/accuracies", "rewards/margins"] if config.objective != "sft" else []) + (
        ["kl"] if config.objective == "kto" else [])
    totals = torch.zeros(len(names), dtype=torch.float64)
    for rows, counts in parallel.equal_shares(batches, dist, parallel.is_sharded(scorer)):
        batch = collate(data.columns, rows).to(device)
        loss, metrics = batch_loss(config, model, batch, data, ref_model, autocast, split)
        if counts:
            totals += torch.tensor([loss.item()] + [metrics[n].item() if n in metrics else 0.0 for n in names[1:]],
                                   dtype=torch.float64)
    parallel.reshard(model)
    model.train()
    totals = dist.sum(totals)
    # KTO's margin needs rows of both labels in the split.
    present = [n for n in names if n != "rewards/margins" or data.labels is None or split.desirable * split.undesirable]
    counted = "eval/rows" if data.labels is not None else "eval/pairs"  # unpaired rows, or pairs
    return {**{f"eval/{n}": totals[names.index(n)].item() for n in present}, counted: len(data)}


def check_stored_reference(config: TrainConfig, scorer: Any, data: SplitData, collate: Collator, device: torch.device,
                           autocast: Any, compute_dtype: torch.dtype, stored_dtype: str) -> None:
    """The policy starts from the reference model: its log-probs on a few rows must be the stored
    ones. If not, the shards were scored with another model (or an older copy of this one).

    Scored as precompute-ref scored them, without dropout. The two sides may come from different
    numerics (reference stored in bf16, policy in fp32, or the reverse): the coarser dtype's
    tolerance applies, which grows with the answer's length (`reference_check_tolerance`)."""
    from train.device import DTYPES
    from train.reference import reference_check_tolerance

    rows = np.arange(min(config.check_reference_rows, len(data)))
    if not len(rows):
        return
    model = _inference_view(scorer)
    model.eval()
    # no_grad, not inference_mode: FSDP would keep the weights it gathers here as inference
    # tensors and refuse to gather into them again in the first training step.
    with torch.no_grad(), autocast():
        logps = sequence_logps(model, collate(data.columns, rows).to(device))
    parallel.reshard(model)
    model.train()
    names = ("completion", "KL completion") if data.kind == UNPAIRED else ("chosen", "rejected")
    stored_chosen, stored_rejected = data.ref_logps(rows)
    for answer, policy, stored, tokens in ((names[0], logps.chosen, stored_chosen, logps.chosen_tokens),
                                           (names[1], logps.rejected, stored_rejected, logps.rejected_tokens)):
        tokens = tokens.cpu().numpy()
        gap = np.abs(policy.float().cpu().numpy() - stored)
        allowed = np.maximum(reference_check_tolerance(DTYPES[stored_dtype], tokens),
                             reference_check_tolerance(compute_dtype, tokens))
        if not (gap <= allowed).all():  # `not <=`: a NaN fails too
            worst = int(np.argmax(gap / allowed))
            raise UserError(f"{config.shards}: stored reference log-probs do not match {config.model} on rows "
                            f"{list(data.ids[rows])} ({answer} of row {data.ids[rows][worst]}: {gap[worst]:.3g} nats over "
                            f"{tokens[worst]} tokens, {allowed[worst]:.3g} allowed); the shards are stale: re-run "
                            "prefdata precompute-ref --force (or, if they are this model's, --check-reference-rows 0)")


def _load_policy(config: TrainConfig, policy_dir: Path, device: torch.device, manifest: Manifest,
                 policy_fingerprint: ModelFingerprint, dist: Dist) -> tuple[Any, Any, Any]:
    """(causal LM — or the reward model, for `--objective reward` —, its peft wrapper or None,
    tokenizer). Full fp32 master weights; under FSDP loaded on the CPU by rank 0 alone
    (`parallel.loads_weights`), since `fully_shard` moves only each process's shard to the device."""
    load_device = torch.device("cpu") if config.parallelism == "fsdp" else device
    load = load_reward_model if config.objective == "reward" else load_causal_lm
    model, tokenizer = load(policy_dir, config.model, torch.float32, load_device,
                            attention_kernel(config.attn_implementation, config.packing, device),
                            weights=parallel.loads_weights(dist, config.parallelism))
    if config.disable_dropout:
        disable_dropout(model)  # before any adapter: --lora-dropout is the adapters' own, as asked
    peft_model = None
    if config.lora_r:
        if config.needs_reference and not _is_shards_reference(manifest, config, policy_fingerprint):
            name = manifest.reference.name_or_path if manifest.reference else "no model"
            raise UserError(f"--lora-r: the shards' reference is {name}, not the base model {config.model}; run "
                            f"prefdata precompute-ref {config.shards} --model {config.model} --force")
        from train.lora import add_adapter

        peft_model = add_adapter(model, config.lora_r, config.lora_alpha, config.lora_dropout,
                                 config.lora_target_modules, config.seed)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, peft_model, tokenizer


def _save_final(config: TrainConfig, scorer: Any, peft_model: Any, model: Any, tokenizer: Any, policy_dir: Path,
                out: Path, dist: Dist) -> None:
    """final/ (the model, or the adapter under LoRA) and final-merged/ (LoRA), from the weights
    gathered on rank 0; every process takes part in the gathering."""
    state = parallel.full_state_dict(scorer, trainable_only=peft_model is not None)
    if not dist.is_main:
        return
    with atomic_dir(out / "final") as tmp:
        if peft_model is not None:
            from train.lora import save_adapter

            save_adapter(peft_model, state, tmp)
        else:
            model.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
    if peft_model is not None:
        from train.lora import save_merged

        with atomic_dir(out / "final-merged") as tmp:
            # Unsharded, rank 0's base is whole and the run is over: merge into it, instead of a
            # second copy of the base (4 bytes per parameter more at the very end of the run).
            load = load_reward_model if config.objective == "reward" else load_causal_lm
            fresh_base = lambda: load(policy_dir, config.model, torch.float32, torch.device("cpu"))[0]  # noqa: E731
            save_merged(None if parallel.is_sharded(scorer) else peft_model, fresh_base, out / "final", tmp)
            tokenizer.save_pretrained(tmp)


# ---------------------------------------------------------------------------------------------
# The run


LOAD_TIMEOUT = timedelta(hours=2)  # rank 0 reading a large model for FSDP, the others waiting


def train(config: TrainConfig) -> dict[str, Any]:
    # --- set-up ------------------------------------------------------------------------------
    local_only("train", {"--shards": config.shards, "--out": config.out})
    check_apart(config.out, [config.shards, config.model, config.reference_model])
    dist = Dist.start(config.device, timedelta(minutes=30))
    device = dist.device
    if config.cpu_offload and device.type == "cpu":
        raise UserError("--cpu-offload moves FSDP shards from a GPU to host memory; on the CPU they are there already: drop it")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    compute_dtype = select_dtype(config.dtype, device)  # bf16 compute over float32 master weights
    autocast = _autocast(device, compute_dtype)
    # Opened before the model loads: a tracker whose package is missing stops the run at once.
    tracker = open_tracker(config.report_to, out, config.model_dump()) if dist.is_main else None

    needs_stored_ref = config.needs_reference and config.reference == "precomputed"
    check_objective_fits(config)
    manifest, train_data, eval_data = open_shards(config.shards, need_ref=needs_stored_ref)
    if config.margin_from_scores:
        train_data, eval_data = (None if split is None else dataclasses.replace(
            split, score_margins=config.margin_from_scores * score_margins(config.shards, split.ids))
            for split in (train_data, eval_data))
    policy_dir = model_dir(config.model)
    check_tokenizer(policy_dir, config.model, manifest.tokenizer)
    resume_from = parallel.latest_checkpoint(out) if config.resume else None
    if config.resume and resume_from is None:
        raise UserError(f"--resume: no checkpoint-*/{parallel.STATE_FILE} in {out}; start without --resume")
    if resume_from is not None:
        check_resumed_settings(config, out)
    # Hashed once (cached per file): the LoRA base check and the step-0 check both compare it.
    policy_fingerprint = model_fingerprint(policy_dir, config.model, torch.float32, device)
    model, peft_model, tokenizer = _load_policy(config, policy_dir, device, manifest, policy_fingerprint, dist)
    _check_fits_shards(model, config.model, train_data, eval_data)
    pad_id = padding_id(tokenizer)
    # Prefix sharing where it gives the padded layout's numbers (train/layouts.py), for every pair.
    longest = np.concatenate([d.columns.pair_lengths for d in (train_data, eval_data) if d is not None])
    shared = config.prefix_sharing == "auto" and prefix_sharing_exact(model, longest)
    check_packing(config.packing, shared, config.prefix_sharing, model, longest)
    # KTO's KL completions need no gradient: where prompts are short against them, they are scored
    # in a forward of their own without one, instead of trained through beside the completion.
    if config.kl_completions == "apart" and not shared:
        raise UserError(f"--kl-completions apart scores the KL completions beside prefix-shared rows, and this run has none "
                        f"(--prefix-sharing off, or {config.model} cannot share prefixes exactly); use auto or shared")
    kl_apart = config.objective == "kto" and shared and (
        config.kl_completions == "apart" or (config.kl_completions == "auto" and train_data.columns.second_apart_is_cheaper()))
    collate = Collator(pad_id, shared=shared, packed=config.packing,
                       bucketed=model.config._attn_implementation == "flex_attention", second_apart=kl_apart)

    ref_model = None
    if config.needs_reference and config.reference == "live":
        ref_name = config.reference_model or config.model
        ref_dir = model_dir(ref_name)
        check_tokenizer(ref_dir, ref_name, manifest.tokenizer)
        ref_model, _ = load_causal_lm(ref_dir, ref_name, torch.float32, device,
                                      attention_kernel(config.attn_implementation, config.packing, device))
        _check_fits_shards(ref_model, ref_name, train_data, eval_data)

    scorer: Any = RewardScorer(model) if config.objective == "reward" else SequenceScorer(model)
    if config.compile:
        scorer.compile()  # in place: the module stays a SequenceScorer, which sequence_logps and DDP expect
    if config.parallelism == "fsdp":
        # Rank 0 reads the whole model alone; the others would wait for it in wrap's first NCCL
        # collective, under the group's 30 minutes (a 70B model from a network disk can take
        # longer). A barrier on gloo with its own timeout holds them until rank 0 is there.
        dist.barrier(timeout=LOAD_TIMEOUT)
    scorer = parallel.wrap(scorer, model, config.parallelism, device, config.dtype, config.cpu_offload, dist)
    if needs_stored_ref and resume_from is None and _is_shards_reference(manifest, config, policy_fingerprint):
        check_stored_reference(config, scorer, train_data, collate, device, autocast, compute_dtype, manifest.reference.dtype)

    # The sampler yields global batches (all processes); each process takes every world-th pair,
    # so a run on W processes sees the same pairs per step as one process with W× the batch.
    # Grouped by the length of the rows the layout builds: prompt + longer answer for padded
    # rows, prompt + both answers for shared ones (the padded length groups shared rows badly:
    # 82% real tokens instead of 95% on the HH bench rows).
    sampler = LengthGroupedSampler(train_data.columns.batch_lengths(collate.shared)[0], config.batch_size * dist.world,
                                   seed=config.seed, window_batches=config.window_batches)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * sampler.steps_per_epoch(config.gradient_accumulation_steps)))
    trainable = [p for p in scorer.parameters() if p.requires_grad]
    optimizer = adamw(trainable, config)
    scheduler = lr_scheduler(config, optimizer, total_steps)
    position = load_run_checkpoint(config, resume_from, scorer, optimizer, scheduler, dist) if resume_from else Position()
    steps = sampler.steps_from(position.epoch, position.batch_index, config.gradient_accumulation_steps)
    log = MetricsLog(out / "metrics.jsonl", dist.is_main, position.step if resume_from else None, tracker)
    if dist.is_main:
        config.save(out)

    # --- steps -------------------------------------------------------------------------------
    window, epoch = MetricsWindow(), position.epoch
    with progress("train", total=total_steps) as bar:
        bar.advance(position.step)
        while position.step < total_steps:
            epoch, (position.epoch, position.batch_index), micro_batches = next(steps)
            denominators = step_denominators(train_data, micro_batches)
            for micro, global_rows in enumerate(micro_batches):
                rows = global_rows[dist.rank::dist.world]
                # A process with no pair here (an epoch's last batch can hold fewer pairs than there
                # are processes) still runs a forward and backward, of a stand-in row weighted 0:
                # DDP's gradient all-reduce and FSDP's weight gathers need every process.
                weight = 1.0 if len(rows) else 0.0
                batch = collate(train_data.columns, rows if len(rows) else global_rows[:1]).to(device)
                with parallel.gradient_sync(scorer, enabled=micro == len(micro_batches) - 1):
                    loss, metrics = batch_loss(config, scorer, batch, train_data, ref_model, autocast, denominators, dist, weight)
                    if weight and not torch.isfinite(loss):
                        knobs = "--learning-rate or --beta" if "beta" in config.options_used() else "--learning-rate"
                        raise TrainingDiverged(f"loss is {loss.item()} at step {position.step + 1}, rows {list(train_data.ids[rows])}; "
                                               f"lower {knobs}, or check these rows")
                    # DDP and FSDP average the processes' gradients; each loss is its rows' share
                    # of the step's mean, so world × the average is the whole step's gradient.
                    (loss * (weight * dist.world)).backward()
                window.add({"loss": loss, **metrics}, weight, batch if weight else None)
            grad_norm = parallel.clip_gradients(trainable, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            position.step += 1

            window.end_step()
            if position.step % config.log_every == 0 or position.step == total_steps:
                record = {"step": position.step, "epoch": epoch, **window.summary(dist), "grad_norm": grad_norm,
                          "learning_rate": scheduler.get_last_lr()[0], "prefix_sharing": collate.shared,
                          "packing": collate.packed, **({"kl_apart": kl_apart} if config.objective == "kto" else {})}
                log.write(record)
                bar.advance(0, loss=f"{record['loss']:.4f}", acc=f"{record.get('rewards/accuracies', float('nan')):.2f}",
                            tok_s=f"{record['tokens_per_s']:,.0f}")
                window = MetricsWindow()
            bar.advance(1)
            if eval_data is not None and config.eval_every and position.step % config.eval_every == 0:
                log.write({"step": position.step, **evaluate(config, scorer, eval_data, ref_model, collate, device, dist, autocast)})
            if config.save_every and position.step % config.save_every == 0:
                save_run_checkpoint(out, position, scorer, optimizer, scheduler, dist)

    # --- the end -----------------------------------------------------------------------------
    final_eval = evaluate(config, scorer, eval_data, ref_model, collate, device, dist, autocast) if eval_data is not None else {}
    # AdamW's m and v (8 bytes per trained parameter) are done with: rank 0 gathers the whole
    # model in their place instead of on top of them.
    optimizer.state.clear()
    _save_final(config, scorer, peft_model, model, tokenizer, policy_dir, out, dist)
    if dist.is_main:
        if final_eval:
            log.write({"step": position.step, **final_eval})
        log.close()
        from train.plots import plot_curves

        plot_curves(out / "metrics.jsonl", out / "curves.png")
        _write_train_manifest(config, manifest, train_data, position, epoch, final_eval, out)
    # Rank 0 alone has been saving the gathered model (and, under LoRA, a merged copy): a 70B model
    # on a network filesystem can take longer than the group's 30-minute timeout.
    dist.barrier(timeout=timedelta(hours=12))
    return {"steps": position.step, **final_eval}


def train_and_report(config: TrainConfig) -> None:
    """`prefdata train` and `python -m train`: the run, then one summary line from rank 0."""
    result = train(config)
    if os.environ.get("RANK", "0") == "0":
        print("train: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _write_train_manifest(config: TrainConfig, shards: Manifest, train_data: SplitData, position: Position, epoch: int,
                          final_eval: dict[str, Any], out: Path) -> None:
    import transformers

    from schemas.manifest import MANIFEST_NAME

    Manifest(
        stage="train",
        package_version=package_version(),
        config=config.model_dump(),
        inputs=[InputFile(path=str(Path(config.shards) / MANIFEST_NAME), rows=len(train_data))],
        counts=Counts(read=len(train_data), kept=len(train_data)),
        outputs=["final", *(["final-merged"] if config.lora_r else []), "metrics.jsonl", "curves.png", "config.yaml",
                 *([config.report_to] if config.report_to != "none" else [])],  # the tracker's directory
        tokenizer=shards.tokenizer,
        reference=shards.reference,
        stats={"steps": position.step, "epochs_started": epoch + 1, **final_eval,
               # rank 0's high-water mark of tensors on the GPU (what the memory model predicts)
               **({"peak_device_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20)} if torch.cuda.is_available() else {}),
               # graphs torch.compile built (FlexAttention's kernel, --compile): one per shape met, so
               # packed rows must meet few shapes (`packed_width`)
               "compiled_graphs": _compiled_graphs()},
        versions={"torch": torch.__version__, "transformers": transformers.__version__},
    ).write(out)

