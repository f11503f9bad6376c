"""TrainConfig: every knob of a training run, from a YAML file and command-line overrides.

`python -m train --config run.yaml --max-steps 100` reads run.yaml, then applies the flags; each
field below is a flag (`learning_rate` → `--learning-rate`). The resolved config is saved into the
output directory (config.yaml and manifest.json), so a run can be repeated from it alone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from train.losses import PAIR_LOSSES, LossParams

# Options only some runs read (TrainConfig.options_used): set in a run that does not, refused.
OBJECTIVE_OPTIONS = ("beta", "loss", "label_smoothing", "discopop_tau", "simpo_gamma", "cpo_alpha", "sft_weight",
                     "center_rewards_coefficient", "reference_model", "lora_alpha", "lora_dropout", "lora_target_modules")
READ_ONLY_WITH = {"reference_model": "read with --reference live only",
                  **{name: "read with --lora-r only" for name in ("lora_alpha", "lora_dropout", "lora_target_modules")}}


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shards: str = Field(description="Shards from prefdata precompute-ref (or tokenize, for objectives without a reference).")
    model: str = Field(description="The starting policy: a directory (save_pretrained) or Hub name.")
    out: str = Field(description="Directory for checkpoints, final/, metrics.jsonl, curves.png, manifest.json.")
    objective: Literal["dpo", "sft", "simpo", "cpo", "orpo", "reward", "kto"] = Field(
        "dpo", description="sft: Preferred-FT on chosen only; simpo, cpo, orpo: reference-free; reward: a Bradley–Terry reward "
        "model (a one-output sequence classifier started from --model); kto: KTO on unpaired shards (one completion and a "
        "desirable/undesirable label per row); dpo and kto read a reference.")
    loss: dict[str, float] = Field({"sigmoid": 1.0}, description="Pair losses with weights: sigmoid, or sigmoid:1,sft:0.5.")
    beta: float = Field(0.1, gt=0, description="β: how far the policy may move from the reference.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Conservative DPO / EXO: assumed share of flipped labels.")
    discopop_tau: float = Field(0.05, gt=0, description="Loss discopop: its temperature.")
    simpo_gamma: float = Field(0.5, ge=0, description="Objective simpo: target reward margin γ.")
    cpo_alpha: float = Field(1.0, ge=0, description="Objective cpo: weight of the NLL term.")
    sft_weight: float = Field(0.0, ge=0, description="RPO: add this weight × NLL on chosen to the preference loss.")
    center_rewards_coefficient: float = Field(
        0.0, ge=0, description="Objective reward: add this weight × mean((r_chosen + r_rejected)²), keeping rewards near 0.")
    margin_from_scores: float = Field(
        0.0, ge=0, description="Objective reward: each pair must win by this weight × (chosen_score − rejected_score) of its "
        "record (its source's ratings; 0 where it has none), inside the sigmoid; 0 = no margin.")
    desirable_weight: float = Field(1.0, gt=0, description="Objective kto: λD, the weight of desirable rows' losses.")
    undesirable_weight: float = Field(
        1.0, gt=0, description="Objective kto: λU, the weight of undesirable rows' losses (KTO advises λD·nD/(λU·nU) in "
        "[1, 4/3]; curate's summary gives the ranges for your data).")
    kl_completions: Literal["auto", "shared", "apart"] = Field(
        "auto", description="Objective kto, prefix-shared rows: score each row's KL completion in its completion's forward "
        "(shared: the prompt runs once, the KL tokens are trained through) or in a forward of its own without gradients "
        "(apart); auto: whichever costs fewer FLOPs on the training split (apart when prompts are shorter than twice the KL "
        "completions). The numbers are the same either way.")
    reference: Literal["precomputed", "live"] = Field("precomputed", description="Where π_ref comes from.")
    reference_model: str | None = Field(None, description="Live reference model (default: --model).")
    batch_size: int = Field(8, gt=0, description="Pairs per micro-batch per process.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps (default: --epochs over the data).")
    epochs: float = Field(1.0, gt=0, description="Passes over the training pairs, when --max-steps is not given.")
    learning_rate: float = Field(1e-6, gt=0, description="Peak learning rate (AdamW).")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW β1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW β2.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm to this.")
    seed: int = Field(0, description="Seed of the data order, dropout and LoRA init.")
    device: Literal["auto", "cuda", "mps", "cpu"] = Field("auto", description="auto: CUDA if present, else MPS, else CPU.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="bfloat16: autocast (DDP) or FSDP mixed precision over float32 master weights; "
        "auto: bf16 on a GPU that has it.")
    parallelism: Literal["ddp", "fsdp"] = Field(
        "ddp", description="Under torchrun: ddp (each process a whole model) or fsdp (FSDP2: weights, gradients and optimizer sharded).")
    cpu_offload: bool = Field(False, description="fsdp on a GPU: keep the shards and the optimizer step in host memory.")
    lora_r: int = Field(0, ge=0, description="LoRA rank; 0 = full fine-tuning.")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA α (the adapter's scale is α / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input.")
    lora_target_modules: list[str] | None = Field(
        None, description="Modules that get adapters, e.g. q_proj,v_proj (default: every Linear of the decoder, not the LM head).")
    prefix_sharing: Literal["auto", "off"] = Field(
        "auto", description="auto: each pair's prompt through the model once, where that gives the same numbers.")
    packing: bool = Field(False, description="Padding-free: each micro-batch is one row, its prefix-shared pairs back to "
                          "back, each attending only to itself (pays on CUDA, where it runs FlexAttention, not with a dense mask: see "
                          "README); needs --prefix-sharing auto.")
    attn_implementation: str | None = Field(
        None, description="Passed to from_pretrained: sdpa, eager, flex_attention, … (default: flex_attention for --packing "
        "on CUDA, else transformers' default, sdpa).")
    disable_dropout: bool = Field(
        True, description="Train with the model's dropout off (TRL's default): the stored reference was scored without "
        "it, so dropout would make the policy's log-probs noisy against a noise-free reference. --no-disable-dropout "
        "keeps the model's own rates in the training forward (held-out scoring is always without dropout).")
    gradient_checkpointing: bool = Field(False, description="Recompute each layer's activations in the backward pass.")
    compile: bool = Field(False, description="torch.compile the model.")
    window_batches: int = Field(64, gt=0, description="Length grouping: pairs are sorted within windows of this many batches.")
    eval_batch_tokens: int = Field(16_384, gt=0, description="Padded tokens per eval forward pass.")
    log_every: int = Field(10, gt=0, description="Steps between metrics.jsonl records.")
    eval_every: int = Field(0, ge=0, description="Steps between evals (0: only at the end).")
    save_every: int = Field(0, ge=0, description="Steps between checkpoints (0: only the final model).")
    resume: bool = Field(False, description="Continue from the last checkpoint in --out.")
    check_reference_rows: int = Field(4, ge=0, description="Step-0 check: rows re-scored to prove the stored reference is this model's.")
    report_to: Literal["none", "tensorboard", "wandb"] = Field(
        "none", description="Also send metrics.jsonl's records to TensorBoard (OUT/tensorboard) or W&B (OUT/wandb, offline "
        "unless WANDB_MODE is set).")

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _parse_modules(cls, value: Any) -> Any:
        """`q_proj,v_proj` (or the flag repeated) on the command line; a list in YAML."""
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, (list, tuple)) and all(isinstance(m, str) for m in items):
            return [part.strip() for m in items for part in m.split(",") if part.strip()] or None
        return value

    @field_validator("loss", mode="before")
    @classmethod
    def _parse_loss(cls, value: Any) -> Any:
        """`sigmoid`, `sigmoid,hinge` or `sigmoid:1,sft:0.5` on the command line; a mapping in YAML."""
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",") if p.strip()]
            return {name: float(weight or 1.0) for name, _, weight in (p.partition(":") for p in parts)}
        if isinstance(value, list):
            return {name: 1.0 for name in value}
        return value

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        unknown = set(self.loss) - set(PAIR_LOSSES)
        if unknown:
            raise ValueError(f"unknown loss {', '.join(sorted(unknown))}; choose from {', '.join(PAIR_LOSSES)}")
        if self.objective == "dpo" and not self.loss:
            raise ValueError("objective dpo needs at least one loss")
        if bad := {name: weight for name, weight in self.loss.items() if not (math.isfinite(weight) and weight > 0)}:
            # a negative weight learns the opposite preference, 0 or NaN nothing
            raise ValueError(f"loss weights must be positive numbers, got {bad}")
        if "exo_pair" in self.loss and self.label_smoothing == 0:
            raise ValueError("loss exo_pair needs --label-smoothing > 0")
        if self.cpu_offload and self.parallelism != "fsdp":
            raise ValueError("--cpu-offload needs --parallelism fsdp")
        if self.parallelism == "fsdp" and self.reference == "live" and self.needs_reference:
            raise ValueError("--parallelism fsdp reads the stored reference; run prefdata precompute-ref "
                             "--parallelism fsdp instead of --reference live")
        if (self.desirable_weight != 1 or self.undesirable_weight != 1) and self.objective != "kto":
            raise ValueError("--desirable-weight / --undesirable-weight are for --objective kto")
        if self.kl_completions != "auto" and self.objective != "kto":
            raise ValueError("--kl-completions is for --objective kto")
        if self.margin_from_scores and self.objective != "reward":
            raise ValueError("--margin-from-scores is for --objective reward")
        if self.lora_r and self.reference == "live":
            raise ValueError("--lora-r: the reference is the base model; precompute it once instead of --reference live")
        if self.reference == "live" and not self.needs_reference:
            raise ValueError(f"--reference live: --objective {self.objective} has no reference model")
        defaults = self.defaults()
        ignored = sorted(name for name in OBJECTIVE_OPTIONS if getattr(self, name) != defaults[name] and name not in self.options_used())
        if ignored:  # the run would go on without them while its config.yaml says they were set
            run = f"--objective {self.objective}" + (f" with --loss {','.join(self.loss)}" if self.objective == "dpo" else "")
            reasons = [f"--{name.replace('_', '-')} is {READ_ONLY_WITH.get(name, 'not read by ' + run)}" for name in ignored]
            raise ValueError("; ".join(reasons) + ": leave it out")
        return self

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Each field's default: what a setting left out is (in an older config.yaml too)."""
        return {name: field.default for name, field in cls.model_fields.items()}

    def options_used(self) -> set[str]:
        """The options of OBJECTIVE_OPTIONS this run's objective, losses and adapters read."""
        used = {"simpo": {"simpo_gamma", "label_smoothing"}, "cpo": {"cpo_alpha", "label_smoothing"},
                "reward": {"center_rewards_coefficient"}}.get(self.objective, set())
        if self.objective not in ("sft", "reward"):  # neither has a β: no reference, no implicit reward
            used.add("beta")
        if self.objective == "dpo":
            used |= {"loss", "sft_weight"}
            used |= {"label_smoothing"} if set(self.loss) & {"sigmoid", "robust", "exo_pair"} else set()
            used |= {"discopop_tau"} if "discopop" in self.loss else set()
        if self.needs_reference and self.reference == "live":
            used.add("reference_model")
        if self.lora_r:
            used |= {"lora_alpha", "lora_dropout", "lora_target_modules"}
        return used

    @property
    def needs_reference(self) -> bool:
        return self.objective in ("dpo", "kto")

    @property
    def loss_params(self) -> LossParams:
        return LossParams(beta=self.beta, label_smoothing=self.label_smoothing, discopop_tau=self.discopop_tau,
                          simpo_gamma=self.simpo_gamma, cpo_alpha=self.cpo_alpha)

    def save(self, directory: Path) -> None:
        from schemas.io import write_text_atomic

        write_text_atomic(directory / "config.yaml", yaml.safe_dump(self.model_dump(), sort_keys=False))
