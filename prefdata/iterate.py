"""`prefdata iterate`: iterative (on-policy) DPO, round after round.

    round r, policy π_r (π_1 = --policy):
      generate   K answers from π_r to prompts no earlier round drew      OUT/round-r/generate
      judge      a score for every answer                                  OUT/round-r/judge
      ingest     pairs by score (--pairs, --min-margin)                    OUT/round-r/ingest
      curate     duplicates and near-duplicates removed, split             OUT/round-r/curate
      tokenize   with π_r's tokenizer                                      OUT/round-r/shards
      ref        π_r's log-probs: π_r is this round's reference            OUT/round-r/shards
      train      π_{r+1} from π_r                                          OUT/round-r/train/final
                 (under --lora-r: a new adapter on π_r, merged into it)      OUT/round-r/train/final-merged
      eval       π_{r+1} against π_r on the held-out prompts: judged       OUT/round-r/eval.json
                 win rate and mean reward

The held-out prompts (`--eval-prompts` of the pool, those with the smallest prompt ids: a stable
choice) are never trained on. Each round draws `--prompts-per-round` prompts that no earlier round
drew (by prompt id), so no prompt — and hence no pair — is trained on twice.

Every stage writes its own manifest, and a stage whose manifest is there is not run again: a
killed iterate resumes at the stage where it stopped (generation by chunk, precompute-ref by
shard, training from its last checkpoint). OUT/manifest.json chains the rounds: for each, the
policy it started from with the sha256 of its weights, and the sha256 of every stage's manifest.

This module drives both packages, so it reaches `train` lazily, inside functions, like the CLI.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.errors import UserError
from schemas.io import sha256_file, write_text_atomic
from schemas.location import local_only
from schemas.manifest import MANIFEST_NAME, Counts, Manifest, package_version
from schemas.records import prompt_hash
from schemas.render import CHAT_TEMPLATE_KWARGS_HELP, ChatTemplateKwargs

EVAL_PROMPTS_FILE = "eval-prompts.jsonl"
ROUND_STAGES = ("generate", "judge", "ingest", "curate", "tokenize", "ref", "train", "eval")


class IterateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts: str = Field(description="The prompt pool: a record set, a .jsonl of {\"prompt\": …}, or a .txt.")
    policy: str = Field(description="π_1, the model the first round samples from and starts training from (an SFT model).")
    out: str = Field(description="Directory for the rounds (round-1/, round-2/, …) and manifest.json.")
    rounds: int = Field(2, gt=0, description="Rounds to run.")
    prompts_per_round: int | None = Field(None, gt=0, description="Prompts each round draws (default: the pool, "
                                          "less the held-out prompts, split evenly over the rounds).")
    eval_prompts: int = Field(50, gt=0, description="Pool prompts held out to judge each round's policy against the last.")
    reward: str | None = Field(None, description="Judge: a reward function, module:function.")
    reward_model: str | None = Field(None, description="Judge: a sequence-classification reward model.")
    n: int = Field(4, gt=1, description="Answers sampled per prompt.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling (1 = off).")
    max_new_tokens: int = Field(256, gt=0, description="Longest answer.")
    pairs: str = Field("best-vs-worst", description="How judged answers become pairs: best-vs-worst, best-vs-rest, all, adjacent.")
    min_margin: float = Field(0.0, ge=0, description="Keep pairs whose scores differ by at least this.")
    keep_truncated: bool = Field(False, description="Also pair answers cut at --max-new-tokens.")
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="Curate: share of each round's pairs held out as its eval split.")
    max_length: int = Field(1024, gt=1, description="Tokenize: prompt + answer tokens.")
    max_prompt_length: int | None = Field(None, gt=0, description="Tokenize: prompt tokens (default: half of --max-length).")
    chat_template_kwargs: ChatTemplateKwargs = Field({}, description=CHAT_TEMPLATE_KWARGS_HELP)
    train: dict[str, Any] = Field({}, description="Training options for every round (TrainConfig fields, e.g. "
                                  "{learning_rate: 5e-7, beta: 0.1, max_steps: 200}).")
    seed: int = Field(0, description="Seed of sampling (each round its own), the split and training.")
    device: str = Field("auto", description="auto, cuda, mps or cpu.")

    @field_validator("train", mode="before")
    @classmethod
    def _parse_train(cls, value: Any) -> Any:
        """`--train '{max_steps: 200, beta: 0.1}'` on the command line; a mapping in YAML."""
        return yaml.safe_load(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_judge(self) -> IterateConfig:
        if (self.reward is None) == (self.reward_model is None):
            raise UserError("iterate: give exactly one judge, --reward module:function or --reward-model PATH")
        return self

    @model_validator(mode="after")
    def _prompt_length(self) -> IterateConfig:
        from prefdata.tokenize import prompt_length_limit

        self.max_prompt_length = prompt_length_limit(self.max_length, self.max_prompt_length)
        return self


# ---------------------------------------------------------------------------------------------
# Prompts


def hold_out(config: IterateConfig, out: Path) -> tuple[list[list[dict]], int]:
    """The held-out eval prompts (written to OUT/eval-prompts.jsonl, which every round's
    generate excludes), and the prompts each round draws."""
    from train.generate import distinct_prompts, raw_prompts

    pool, _ = distinct_prompts(raw_prompts(config.prompts, "train")[0], set(), None)
    held = sorted(pool, key=prompt_hash)[:config.eval_prompts]
    if len(pool) - len(held) < config.rounds:
        raise UserError(f"{config.prompts}: {len(pool)} distinct prompts, {len(held)} held out: too few for "
                        f"{config.rounds} rounds; lower --eval-prompts or --rounds")
    path = out / EVAL_PROMPTS_FILE
    if not path.is_file():
        write_text_atomic(path, "".join(json.dumps({"prompt_id": prompt_hash(p), "prompt": p}) + "\n" for p in held))
    per_round = config.prompts_per_round or (len(pool) - len(held)) // config.rounds
    return held, per_round


# ---------------------------------------------------------------------------------------------
# One round


def trained_model(train_dir: Path, lora: bool) -> Path:
    """The model a round's training leaves, loadable as a causal LM: under LoRA final/ holds the
    adapter alone, so the base with the adapter merged in (final-merged/)."""
    return train_dir / ("final-merged" if lora else "final")


class Round:
    """Where round r's stages write, and which policy it starts from: π_1, or the model round r-1
    trained (which is also round r's reference, so LoRA's new adapter starts at its reference)."""

    def __init__(self, out: Path, number: int, first_policy: str, lora: bool) -> None:
        self.number = number
        self.dir = out / f"round-{number}"
        self.trained = trained_model(self.stage_dir("train"), lora)
        self.policy = first_policy if number == 1 else str(trained_model(out / f"round-{number - 1}" / "train", lora))

    def stage_dir(self, stage: str) -> Path:
        return self.dir / {"tokenize": "shards", "ref": "shards"}.get(stage, stage)

    def done(self, stage: str) -> bool:
        if stage == "eval":
            return (self.dir / "eval.json").is_file()
        path = self.stage_dir(stage) / MANIFEST_NAME
        if not path.is_file():
            return False
        # tokenize and ref share a directory: the shards are scored once precompute-ref's manifest replaced tokenize's
        return stage != "ref" or json.loads(path.read_text())["stage"] == "precompute-ref"


def _stage_runners(config: IterateConfig, r: Round, earlier: list[Round], per_round: int,
                   held: list[list[dict]]) -> dict[str, Callable[[], Any]]:
    from prefdata.curate import CurateConfig, curate
    from prefdata.formats.base import FormatOptions
    from prefdata.ingest import IngestConfig, ingest
    from prefdata.tokenize import TokenizeConfig, tokenize
    from train.config import TrainConfig
    from train.generate import GENERATIONS_FILE, GenerateConfig, generate
    from train.judge import JUDGED_FILE, JudgeConfig, judge
    from train.loop import train
    from train.parallel import latest_checkpoint
    from train.reference import PrecomputeRefConfig, precompute_ref

    out = r.dir.parent
    judge_options = {"reward": config.reward, "reward_model": config.reward_model, "device": config.device}
    exclude = [str(out / EVAL_PROMPTS_FILE)] + [str(e.stage_dir("generate") / GENERATIONS_FILE) for e in earlier]
    train_dir = r.stage_dir("train")
    return {
        "generate": lambda: generate(GenerateConfig(
            prompts=config.prompts, policy=r.policy, out=str(r.stage_dir("generate")), n=config.n,
            temperature=config.temperature, top_p=config.top_p, max_new_tokens=config.max_new_tokens,
            seed=config.seed + r.number, max_prompts=per_round, exclude_prompts=exclude, device=config.device,
            chat_template_kwargs=config.chat_template_kwargs)),
        "judge": lambda: judge(JudgeConfig(generations=str(r.stage_dir("generate")), out=str(r.stage_dir("judge")),
                                           **judge_options)),
        "ingest": lambda: ingest(IngestConfig(
            inputs=[str(r.stage_dir("judge") / JUDGED_FILE)], out=str(r.stage_dir("ingest")), format="judged",
            options=FormatOptions(pairs=config.pairs, min_margin=config.min_margin, keep_truncated=config.keep_truncated))),
        "curate": lambda: _has_pairs(r, curate(CurateConfig(inputs=[str(r.stage_dir("ingest"))], out=str(r.stage_dir("curate")),
                                                            eval_fraction=config.eval_fraction, seed=config.seed))),
        "tokenize": lambda: tokenize(TokenizeConfig(
            input_dir=str(r.stage_dir("curate")), tokenizer=r.policy, out=str(r.stage_dir("tokenize")),
            max_length=config.max_length, max_prompt_length=config.max_prompt_length,
            chat_template_kwargs=config.chat_template_kwargs)),
        "ref": lambda: precompute_ref(PrecomputeRefConfig(shards=str(r.stage_dir("ref")), model=r.policy,
                                                          device=config.device)),
        "train": lambda: train(TrainConfig(**{
            "seed": config.seed, "device": config.device, **config.train, "shards": str(r.stage_dir("ref")),
            "model": r.policy, "out": str(train_dir), "resume": latest_checkpoint(train_dir) is not None})),
        "eval": lambda: _evaluate_round(config, r, held),
    }


def _has_pairs(r: Round, curated: Manifest) -> None:
    if curated.counts.kept == 0:
        raise UserError(f"round {r.number}: no pairs left to train on; see why in {r.stage_dir('ingest')}/manifest.json and "
                        f"{r.stage_dir('curate')}/manifest.json (ties, truncated answers: try --keep-truncated, more --n)")


def _evaluate_round(config: IterateConfig, r: Round, held: list[list[dict]]) -> None:
    """π_{r+1} against π_r on the held-out prompts, by the round's judge."""
    from train.eval import compare_policies, eval_json
    from train.judge import JudgeOptions

    result = compare_policies(str(r.trained), r.policy, held,
                              JudgeOptions(reward=config.reward, reward_model=config.reward_model, device=config.device),
                              n=config.n, temperature=config.temperature, top_p=config.top_p,
                              max_new_tokens=config.max_new_tokens, seed=config.seed, device=config.device,
                              chat_template_kwargs=config.chat_template_kwargs)
    write_text_atomic(r.dir / "eval.json", eval_json({"round": r.number, **result}))


# ---------------------------------------------------------------------------------------------
# The rounds


def iterate(config: IterateConfig, after_stage: Callable[[int, str], None] | None = None) -> Manifest:
    """Every round in turn, skipping the stages already done. `after_stage(round, stage)` is
    called after each stage that ran (progress lines; the tests kill a run there)."""
    local_only("iterate", {"--prompts": config.prompts, "--out": config.out})
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    held, per_round = hold_out(config, out)
    lora = bool(config.train.get("lora_r"))
    rounds = [Round(out, number, config.policy, lora) for number in range(1, config.rounds + 1)]
    for r in rounds:
        runners = _stage_runners(config, r, rounds[:r.number - 1], per_round, held)
        for stage in ROUND_STAGES:
            if not r.done(stage):
                runners[stage]()
                if after_stage is not None:
                    after_stage(r.number, stage)
        _write_manifest(config, out, rounds[:r.number])
    return Manifest.read(out, stages=("iterate",))


def _manifest_sha(directory: Path) -> str:
    return sha256_file(directory / MANIFEST_NAME)


def round_record(r: Round) -> dict[str, Any]:
    """What chains round r to its inputs and outputs: the policy it sampled from (with the weight
    hash generate recorded) and the sha256 of each stage's manifest."""
    generate = Manifest.read(r.stage_dir("generate"))
    stages = {stage: _manifest_sha(r.stage_dir(stage)) for stage in ("generate", "judge", "ingest", "curate", "ref", "train")}
    return {"round": r.number, "policy": r.policy, "policy_weights_sha256": generate.stats["policy"]["weights_sha256"],
            "manifests_sha256": stages, "eval": json.loads((r.dir / "eval.json").read_text()),
            "pairs": Manifest.read(r.stage_dir("curate")).counts.kept}


def _write_manifest(config: IterateConfig, out: Path, finished: list[Round]) -> None:
    records = [round_record(r) for r in finished]
    pairs = sum(r["pairs"] for r in records)
    Manifest(stage="iterate", package_version=package_version(), config=config.model_dump(),
             counts=Counts(read=len(records), kept=len(records)),
             outputs=[f"round-{r.number}" for r in finished] + [EVAL_PROMPTS_FILE],
             stats={"rounds": records, "pairs": pairs}).write(out)


def summary_lines(manifest: Manifest) -> list[str]:
    lines = []
    for record in manifest.stats["rounds"]:
        win, result = record["eval"]["win_rate"], record["eval"]
        lines.append(f"round {record['round']}: {record['pairs']} pairs; π_{record['round'] + 1} vs π_{record['round']}: "
                     f"win rate {_figure(win['rate'])} [{_figure(win['low'])}, {_figure(win['high'])}], reward "
                     f"{_figure(result['reward'])} vs {_figure(result['baseline_reward'])}")
    return lines


def _figure(value: float | None) -> str:
    """eval.json holds null where nothing was judged."""
    return "n/a" if value is None else f"{value:.3f}"
