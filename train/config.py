"""TrainConfig: every knob of a training run, from a YAML file and command-line overrides.

`python -m train --config run.yaml --max-steps 100` reads run.yaml, then applies the flags; each
field below is a flag (`learning_rate` → `--learning-rate`). The resolved config is saved into the
output directory (config.yaml and manifest.json), so a run can be repeated from it alone.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from schemas.errors import UserError
from train.losses import PAIR_LOSSES, LossParams


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shards: str
    model: str
    out: str
    # sft: Preferred-FT on chosen only; simpo, cpo, orpo: reference-free preference objectives.
    # Only dpo reads a reference.
    objective: Literal["dpo", "sft", "simpo", "cpo", "orpo"] = "dpo"
    loss: dict[str, float] = {"sigmoid": 1.0}  # one or several pair losses with weights
    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    discopop_tau: float = Field(0.05, gt=0)
    simpo_gamma: float = Field(0.5, ge=0)  # objective simpo: target reward margin γ
    cpo_alpha: float = Field(1.0, ge=0)  # objective cpo: weight of the NLL term
    sft_weight: float = Field(0.0, ge=0)  # RPO: add NLL on chosen to the preference loss
    reference: Literal["precomputed", "live"] = "precomputed"
    reference_model: str | None = None  # live reference; default: the starting policy (--model)
    batch_size: int = Field(8, gt=0)  # pairs per micro-batch per process
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)  # optimizer steps; default: epochs over the data
    epochs: float = Field(1.0, gt=0)
    learning_rate: float = Field(1e-6, gt=0)
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 0
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # bf16 = autocast (DDP) or FSDP mixed precision over float32 master weights
    parallelism: Literal["ddp", "fsdp"] = "ddp"  # fsdp: FSDP2, weights/gradients/optimizer sharded over the processes
    cpu_offload: bool = False  # fsdp: keep the shards (and the optimizer step) in host memory
    lora_r: int = Field(0, ge=0)  # LoRA rank; 0 = full fine-tuning
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_target_modules: list[str] | None = None  # default: every Linear of the decoder (not the LM head)
    prefix_sharing: Literal["auto", "off"] = "auto"  # auto: each pair's prompt through the model once, where exact
    gradient_checkpointing: bool = False
    compile: bool = False
    window_batches: int = Field(64, gt=0)  # length grouping: sort within windows of this many batches
    eval_batch_tokens: int = Field(16_384, gt=0)
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(0, ge=0)  # 0: only at the end
    save_every: int = Field(0, ge=0)  # 0: only the final model
    resume: bool = False
    check_reference_rows: int = Field(4, ge=0)  # step-0 stale-shard check when policy == reference
    report_to: Literal["none", "tensorboard", "wandb"] = Field(
        "none", description="Also send metrics.jsonl's records to TensorBoard (OUT/tensorboard) or W&B (OUT/wandb, offline "
        "unless WANDB_MODE is set).")

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _parse_modules(cls, value: Any) -> Any:
        """`q_proj,v_proj` on the command line; a list in YAML."""
        return [m.strip() for m in value.split(",") if m.strip()] if isinstance(value, str) else value

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
        if "exo_pair" in self.loss and self.label_smoothing == 0:
            raise ValueError("loss exo_pair needs --label-smoothing > 0")
        if self.cpu_offload and self.parallelism != "fsdp":
            raise ValueError("--cpu-offload needs --parallelism fsdp")
        if self.parallelism == "fsdp" and self.reference == "live" and self.needs_reference:
            raise ValueError("--parallelism fsdp reads the stored reference; run prefdata precompute-ref "
                             "--parallelism fsdp instead of --reference live")
        if self.lora_r and self.reference == "live":
            raise ValueError("--lora-r: the reference is the base model; precompute it once instead of --reference live")
        return self

    @property
    def needs_reference(self) -> bool:
        return self.objective == "dpo"

    @property
    def loss_params(self) -> LossParams:
        return LossParams(beta=self.beta, label_smoothing=self.label_smoothing, discopop_tau=self.discopop_tau,
                          simpo_gamma=self.simpo_gamma, cpo_alpha=self.cpo_alpha)

    def save(self, directory: Path) -> None:
        from schemas.io import write_text_atomic

        write_text_atomic(directory / "config.yaml", yaml.safe_dump(self.model_dump(), sort_keys=False))


def _flag_type(annotation: Any) -> Any:
    """The argparse `type` for a field: the non-None member of an Optional, str for dicts/literals."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if annotation is bool:
        return "bool"
    return annotation if annotation in (int, float) else str


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """YAML (--config) first, then every flag given on the command line, validated as one config."""
    parser = argparse.ArgumentParser(prog="python -m train", description="Lean DPO trainer over prefdata shards.")
    parser.add_argument("--config", type=Path, help="YAML file with any of the fields below")
    for name, field in TrainConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kind = _flag_type(field.annotation)
        if kind == "bool":
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None)
        else:
            shown = "required" if field.is_required() else f"default: {json.dumps(field.default)}"
            parser.add_argument(flag, dest=name, type=kind, default=None, help=shown)
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        if not args.config.is_file():
            raise UserError(f"--config {args.config}: no such file")
        try:
            values = yaml.safe_load(args.config.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"--config {args.config}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise UserError(f"--config {args.config}: expected a mapping of field: value")
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "config"
        raise UserError(f"{where}: {first['msg']}") from None
