"""The training loop, top to bottom: set-up, then step after step, then the final model.

Each optimizer step: `gradient_accumulation_steps` micro-batches of `batch_size` pairs per process;
chosen and rejected of a micro-batch go through one forward (`train.logprobs.sequence_logps`); the
reference terms are read from the shards (`ref_chosen_logps` / `ref_rejected_logps`) — the
reference model is never run, unless `--reference live` asks for it.
"""

from __future__ import annotations

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

from schemas.errors import UserError
from schemas.io import atomic_dir
from schemas.manifest import Counts, InputFile, Manifest, ModelFingerprint, package_version
from schemas.progress import progress
from train import parallel
from train.batching import Collator, LengthGroupedSampler, PairBatch, token_budget_batches
from train.config import TrainConfig
from train.data import SplitData, open_shards
from train.device import select_device
from train.distributed import Dist
from train.logprobs import SequenceScorer, check_packing, prefix_sharing_exact, sequence_logps
from train.losses import REFERENCE_FREE_LOSSES, preference_loss, reference_free_loss, sft_loss
from train.models import attention_kernel, check_tokenizer, load_causal_lm, model_dir, model_fingerprint, same_weights
from train.tracking import Tracker, open_tracker


class TrainingDiverged(UserError):
    """NaN or inf loss: the run stops with the step and the rows that caused it."""


# ---------------------------------------------------------------------------------------------
# Processes and devices


def _compute_dtype(device: torch.device, dtype_name: str) -> torch.dtype:
    """bf16 compute over float32 master weights when asked, or on a GPU that has it (`auto`)."""
    use_bf16 = dtype_name == "bfloat16" or (dtype_name == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.bfloat16 if use_bf16 else torch.float32


def _autocast(device: torch.device, compute_dtype: torch.dtype) -> Any:
    if compute_dtype == torch.float32:
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=compute_dtype)


# ---------------------------------------------------------------------------------------------
# Schedule, checkpoints, metrics


# TrainConfig.lr_schedule → transformers' schedule; each warms up linearly from 0 first.
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


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


def load_run_checkpoint(checkpoint: Path, scorer: Any, optimizer: Any, scheduler: Any, dist: Dist) -> Position:
    state = parallel.load_checkpoint(checkpoint, scorer, optimizer, dist)
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


# ---------------------------------------------------------------------------------------------
# One batch: loss and metrics


def batch_loss(config: TrainConfig, scorer: Any, batch: PairBatch, data: SplitData, ref_model: Any,
               autocast: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    with autocast():
        logps = sequence_logps(scorer, batch)
    if config.objective == "sft":
        loss = sft_loss(logps.chosen, logps.chosen_tokens)
        return loss, {"logps/chosen": logps.chosen.detach().mean()}
    if config.objective in REFERENCE_FREE_LOSSES:
        return reference_free_loss(config.objective, logps.chosen, logps.rejected, logps.chosen_tokens,
                                   logps.rejected_tokens, config.loss_params)
    if ref_model is not None:
        with torch.inference_mode(), autocast():
            ref = sequence_logps(ref_model, batch)
        ref_chosen, ref_rejected = ref.chosen.clone(), ref.rejected.clone()
    else:
        ref_chosen, ref_rejected = (torch.from_numpy(x).to(logps.chosen.device) for x in data.ref_logps(batch.rows))
    return preference_loss(logps.chosen, logps.rejected, ref_chosen, ref_rejected, logps.chosen_tokens,
                           logps.rejected_tokens, config.loss, config.loss_params, config.sft_weight)


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
    batches = token_budget_batches(*data.columns.batch_lengths(collate.shared), config.eval_batch_tokens)
    names = ["loss"] + (["rewards/accuracies", "rewards/margins"] if config.objective != "sft" else [])
    totals = torch.zeros(len(names) + 1, dtype=torch.float64)  # each metric · pairs, then pairs
    for rows, counts in parallel.equal_shares(batches, dist, parallel.is_sharded(scorer)):
        batch = collate(data.columns, rows).to(device)
        loss, metrics = batch_loss(config, model, batch, data, ref_model, autocast)
        values = [loss.item()] + [metrics[name].item() for name in names[1:]]
        if counts:
            totals += torch.tensor([v * len(rows) for v in values] + [len(rows)], dtype=torch.float64)
    parallel.reshard(model)
    model.train()
    totals = dist.sum(totals)
    pairs = totals[-1].item()
    return {**{f"eval/{name}": totals[i].item() / max(pairs, 1) for i, name in enumerate(names)}, "eval/pairs": int(pairs)}


def check_stored_reference(config: TrainConfig, scorer: Any, data: SplitData, collate: Collator, device: torch.device,
                           autocast: Any, compute_dtype: torch.dtype, stored_dtype: str) -> None:
    """The policy starts from the reference model: its log-probs on a few rows must be the stored
    ones. If not, the shards were scored with another model (or an older copy of this one).

    The two sides may come from different numerics (reference stored in bf16, policy in fp32, or
    the reverse): the looser of the two dtypes' tolerances applies. A different model is off by
    far more than bf16 rounding."""
    from train.device import DTYPES
    from train.reference import VERIFY_TOLERANCE

    rows = np.arange(min(config.check_reference_rows, len(data)))
    if not len(rows):
        return
    model = _inference_view(scorer)
    # no_grad, not inference_mode: FSDP would keep the weights it gathers here as inference
    # tensors and refuse to gather into them again in the first training step.
    with torch.no_grad(), autocast():
        logps = sequence_logps(model, collate(data.columns, rows).to(device))
    parallel.reshard(model)
    stored_chosen, stored_rejected = data.ref_logps(rows)
    atol, rtol = max(VERIFY_TOLERANCE[DTYPES[stored_dtype]], VERIFY_TOLERANCE[compute_dtype])
    ok = np.allclose(logps.chosen.float().cpu().numpy(), stored_chosen, atol=atol, rtol=rtol) and \
        np.allclose(logps.rejected.float().cpu().numpy(), stored_rejected, atol=atol, rtol=rtol)
    if not ok:
        raise UserError(f"{config.shards}: stored reference log-probs do not match {config.model} on rows "
                        f"{list(data.ids[rows])}; the shards are stale: re-run prefdata precompute-ref --force")


def _load_policy(config: TrainConfig, policy_dir: Path, device: torch.device, manifest: Manifest,
                 policy_fingerprint: ModelFingerprint, dist: Dist) -> tuple[Any, Any, Any]:
    """(causal LM, its peft wrapper or None, tokenizer). Full fp32 master weights; under FSDP
    loaded on the CPU by rank 0 alone (`parallel.loads_weights`), since `fully_shard` moves only
    each process's shard to the device."""
    load_device = torch.device("cpu") if config.parallelism == "fsdp" else device
    model, tokenizer = load_causal_lm(policy_dir, config.model, torch.float32, load_device,
                                      attention_kernel(config.attn_implementation, config.packing, device),
                                      weights=parallel.loads_weights(dist, config.parallelism))
    peft_model = None
    if config.lora_r:
        if config.needs_reference and not same_weights(manifest.reference, policy_fingerprint):
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
            save_merged(None if parallel.is_sharded(scorer) else peft_model, policy_dir, out / "final", tmp)
            tokenizer.save_pretrained(tmp)


# ---------------------------------------------------------------------------------------------
# The run


def train(config: TrainConfig) -> dict[str, Any]:
    # --- set-up ------------------------------------------------------------------------------
    device = select_device(config.device)
    if config.cpu_offload and device.type == "cpu":
        raise UserError("--cpu-offload moves FSDP shards from a GPU to host memory; on the CPU they are there already: drop it")
    dist = Dist.start("nccl" if device.type == "cuda" else "gloo", timedelta(minutes=30))
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    compute_dtype = _compute_dtype(device, config.dtype)
    autocast = _autocast(device, compute_dtype)
    # Opened before the model loads: a tracker whose package is missing stops the run at once.
    tracker = open_tracker(config.report_to, out, config.model_dump()) if dist.is_main else None

    needs_stored_ref = config.needs_reference and config.reference == "precomputed"
    manifest, train_data, eval_data = open_shards(config.shards, need_ref=needs_stored_ref)
    policy_dir = model_dir(config.model)
    check_tokenizer(policy_dir, config.model, manifest.tokenizer)
    resume_from = parallel.latest_checkpoint(out) if config.resume else None
    if config.resume and resume_from is None:
        raise UserError(f"--resume: no checkpoint-*/{parallel.STATE_FILE} in {out}; start without --resume")
    # Hashed once (cached per file): the LoRA base check and the step-0 check both compare it.
    policy_fingerprint = model_fingerprint(policy_dir, config.model, torch.float32, device)
    model, peft_model, tokenizer = _load_policy(config, policy_dir, device, manifest, policy_fingerprint, dist)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Prefix sharing where it gives the padded layout's numbers (train/logprobs.py), for every pair.
    longest = np.concatenate([d.columns.pair_lengths for d in (train_data, eval_data) if d is not None])
    shared = config.prefix_sharing == "auto" and prefix_sharing_exact(model, longest)
    check_packing(config.packing, shared, config.prefix_sharing)
    collate = Collator(pad_id, shared=shared, packed=config.packing)

    ref_model = None
    if config.needs_reference and config.reference == "live":
        ref_dir = model_dir(config.reference_model or config.model)
        ref_model, _ = load_causal_lm(ref_dir, config.reference_model or config.model, torch.float32, device,
                                      attention_kernel(config.attn_implementation, config.packing, device))

    scorer: Any = SequenceScorer(model)
    if config.compile:
        scorer.compile()  # in place: the module stays a SequenceScorer, which sequence_logps and DDP expect
    scorer = parallel.wrap(scorer, model, config.parallelism, device, config.dtype, config.cpu_offload, dist)
    if needs_stored_ref and resume_from is None and same_weights(manifest.reference, policy_fingerprint):
        check_stored_reference(config, scorer, train_data, collate, device, autocast, compute_dtype, manifest.reference.dtype)

    # The sampler yields global batches (all processes); each process takes every world-th pair,
    # so a run on W processes sees the same pairs per step as one process with W× the batch.
    # Grouped by the length of the rows the layout builds: prompt + longer answer for padded
    # rows, prompt + both answers for shared ones (the padded length groups shared rows badly:
    # 82% real tokens instead of 95% on the HH bench rows).
    sampler = LengthGroupedSampler(train_data.columns.batch_lengths(collate.shared)[0], config.batch_size * dist.world,
                                   seed=config.seed, window_batches=config.window_batches)
    steps_per_epoch = max(1, len(sampler) // config.gradient_accumulation_steps)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    trainable = [p for p in scorer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay,
                                  betas=(config.adam_beta1, config.adam_beta2))
    scheduler = lr_scheduler(config, optimizer, total_steps)
    position = load_run_checkpoint(resume_from, scorer, optimizer, scheduler, dist) if resume_from else Position()
    batches = sampler.iter_from(position.epoch, position.batch_index)
    log = MetricsLog(out / "metrics.jsonl", dist.is_main, position.step if resume_from else None, tracker)
    if dist.is_main:
        config.save(out)

    # --- steps -------------------------------------------------------------------------------
    window: list[dict[str, float]] = []
    tokens = computed = padded = 0
    window_start = time.perf_counter()
    with progress("train", total=total_steps) as bar:
        bar.advance(position.step)
        while position.step < total_steps:
            for micro in range(config.gradient_accumulation_steps):
                epoch, index, global_rows = next(batches)
                rows = global_rows[dist.rank::dist.world]
                batch = collate(train_data.columns, rows).to(device)
                with parallel.gradient_sync(scorer, enabled=micro == config.gradient_accumulation_steps - 1):
                    loss, metrics = batch_loss(config, scorer, batch, train_data, ref_model, autocast)
                    if not torch.isfinite(loss):
                        raise TrainingDiverged(f"loss is {loss.item()} at step {position.step + 1}, rows {list(train_data.ids[rows])}; "
                                               "lower --learning-rate or --beta, or check these rows")
                    (loss / config.gradient_accumulation_steps).backward()
                window.append({"loss": loss.item(), **{k: v.item() for k, v in metrics.items()}})
                tokens += batch.real_tokens
                computed += batch.computed_tokens
                padded += batch.padded_tokens
                position.epoch, position.batch_index = (epoch, index + 1)
            grad_norm = parallel.clip_gradients(trainable, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            position.step += 1

            if position.step % config.log_every == 0 or position.step == total_steps:
                elapsed = time.perf_counter() - window_start
                means = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                means = dict(zip(means, dist.mean(torch.tensor(list(means.values()), dtype=torch.float64)).tolist()))
                record = {"step": position.step, "epoch": position.epoch, **means, "grad_norm": grad_norm,
                          "learning_rate": scheduler.get_last_lr()[0], "tokens": dist.world * tokens,
                          "tokens_per_s": dist.world * tokens / elapsed, "computed_tokens": dist.world * computed,
                          "padding_efficiency": computed / max(padded, 1), "prefix_sharing": collate.shared,
                          "packing": collate.packed}
                log.write(record)
                bar.advance(0, loss=f"{means['loss']:.4f}", acc=f"{means.get('rewards/accuracies', float('nan')):.2f}",
                            tok_s=f"{record['tokens_per_s']:,.0f}")
                window, tokens, computed, padded, window_start = [], 0, 0, 0, time.perf_counter()
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
        _write_train_manifest(config, manifest, train_data, position, final_eval, out)
    dist.barrier()
    return {"steps": position.step, **final_eval}


def train_and_report(config: TrainConfig) -> None:
    """`prefdata train` and `python -m train`: the run, then one summary line from rank 0."""
    result = train(config)
    if os.environ.get("RANK", "0") == "0":
        print("train: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))


def _write_train_manifest(config: TrainConfig, shards: Manifest, train_data: SplitData, position: Position,
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
        stats={"steps": position.step, "epochs_started": position.epoch + 1, **final_eval,
               # rank 0's high-water mark of tensors on the GPU (what the memory model predicts)
               **({"peak_device_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20)} if torch.cuda.is_available() else {})},
        versions={"torch": torch.__version__, "transformers": transformers.__version__},
    ).write(out)

