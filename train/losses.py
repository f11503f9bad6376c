"""Preference losses: pure functions of sequence log-probs, one per loss, same formulas as TRL 1.x.

Notation for every function (B = pairs in the batch, all tensors float32, shape [B]):
    chosen_logratios   = log πθ(yw|x) − log πref(yw|x)
    rejected_logratios = log πθ(yl|x) − log πref(yl|x)
    chosen_tokens / rejected_tokens = completion token counts (for length-normalised losses)
Each returns the per-pair loss, shape [B]; the trainer takes the mean (and the weighted sum when
several losses are combined, as TRL's `loss_type=[...]`, `loss_weights=[...]`). A mean divides by
the batch's own pairs (and chosen tokens, for token-mean terms), or by `Denominators` the caller
gives: the trainer passes its whole optimizer step's, so that a step's gradient and metrics are
the same however its pairs are split over micro-batches and processes.

Where we differ from TRL 1.x on purpose: `sigmoid` honours `label_smoothing` (conservative DPO,
as the original DPO code and OpenRLHF do); TRL 1.x ignores label_smoothing for `sigmoid`. With
label_smoothing = 0 (the default) the two agree exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class LossParams:
    beta: float = 0.1
    label_smoothing: float = 0.0  # sigmoid (cDPO), robust, exo_pair
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5  # SimPO's target margin γ
    cpo_alpha: float = 1.0  # weight of CPO's NLL term


@dataclass(frozen=True)
class Denominators:
    """What the means divide by instead of the batch's own counts (see the module docstring).
    For unpaired rows (KTO) `pairs` counts rows, and `desirable` / `undesirable` the rows of each
    label, which the per-label metrics average over."""

    pairs: float
    chosen_tokens: float
    desirable: float = 0.0
    undesirable: float = 0.0


def _mean(values: Tensor, denominators: Denominators | None) -> Tensor:
    """Mean over pairs of a [B] tensor: over the batch, or a share of a larger mean."""
    return values.mean() if denominators is None else values.sum() / denominators.pairs


def sigmoid(chosen_logratios: Tensor, rejected_logratios: Tensor, p: LossParams, **_: Tensor) -> Tensor:
    """DPO (Rafailov et al. 2023, eq. 7); with label_smoothing ε, conservative DPO:
    −(1−ε)·log σ(β·Δ) − ε·log σ(−β·Δ), Δ = chosen_logratios − rejected_logratios."""
    logits = p.beta * (chosen_logratios - rejected_logratios)
    return -(1 - p.label_smoothing) * F.logsigmoid(logits) - p.label_smoothing * F.logsigmoid(-logits)


def hinge(chosen_logratios: Tensor, rejected_logratios: Tensor, p: LossParams, **_: Tensor) -> Tensor:
    """SLiC: max(0, 1 − β·Δ)."""
    return torch.relu(1 - p.beta * (chosen_logratios - rejected_logratios))


def ipo(chosen_logratios: Tensor, rejected_logratios: Tensor, p: LossParams, *, chosen_tokens: Tensor,
        rejected_tokens: Tensor, **_: Tensor) -> Tensor:
    """IPO (Azar et al. 2023, eq. 17) on length-averaged log-ratios (TRL's normalisation):
    (Δ̄ − 1/(2β))², Δ̄ = chosen_logratios/|yw| − rejected_logratios/|yl|."""
    delta = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
    return (delta - 1 / (2 * p.beta)) ** 2


def robust(chosen_logratios: Tensor, rejected_logratios: Tensor, p: LossParams, **_: Tensor) -> Tensor:
    """rDPO (Chowdhury et al. 2024): unbiased under label-flip rate ε = label_smoothing < 0.5."""
    logits = p.beta * (chosen_logratios - rejected_logratios)
    eps = p.label_smoothing
    return (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)


def bco_pair(chosen_logratios: Tensor, rejected_logratios: Tensor, p: LossParams, **_: Tensor) -> Tensor:
    """BCO on pairs (TRL's form, no running reward shift): −log σ(β·rw) − log σ(−β·rl)."""
    return -F.logsigmoid(p.beta * chosen_logratios) - F.logsigmoid(-p.beta * rejected_logratios)


def exo_pair(chosen_logratios: Tensor, rejected_logratios: Tensor, p: LossParams, **_: Tensor) -> Tensor:
    """EXO-pref (Ji et al. 2024, eq. 16): KL(softmax(βΔ) ‖ [1−ε, ε]) over {chosen, rejected};
    needs label_smoothing ε > 0."""
    if p.label_smoothing <= 0:
        raise ValueError("exo_pair needs label_smoothing > 0 (the target distribution [1-ε, ε])")
    logits = p.beta * (chosen_logratios - rejected_logratios)
    eps = torch.tensor(p.label_smoothing, dtype=logits.dtype, device=logits.device)
    return (torch.sigmoid(logits) * (F.logsigmoid(logits) - torch.log1p(-eps))
            + torch.sigmoid(-logits) * (F.logsigmoid(-logits) - torch.log(eps)))


def nca_pair(chosen_logratios: Tensor, rejected_logratios: Tensor, p: LossParams, **_: Tensor) -> Tensor:
    """NCA (Chen et al. 2024): −log σ(rw) − ½log σ(−rw) − ½log σ(−rl), r = β·logratio."""
    chosen_rewards, rejected_rewards = p.beta * chosen_logratios, p.beta * rejected_logratios
    return -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)


def sppo_hard(chosen_logratios: Tensor, rejected_logratios: Tensor, p: LossParams, **_: Tensor) -> Tensor:
    """SPPO with hard win probabilities: (rw − 1/(2β))² + (rl + 1/(2β))², r = logratio."""
    return (chosen_logratios - 0.5 / p.beta) ** 2 + (rejected_logratios + 0.5 / p.beta) ** 2


def apo_zero(chosen_logratios: Tensor, rejected_logratios: Tensor, p: LossParams, **_: Tensor) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7): 1 − σ(β·rw) + σ(β·rl)."""
    return 1 - torch.sigmoid(p.beta * chosen_logratios) + torch.sigmoid(p.beta * rejected_logratios)


def apo_down(chosen_logratios: Tensor, rejected_logratios: Tensor, p: LossParams, **_: Tensor) -> Tensor:
    """APO-down (eq. 8): σ(β·rw) + 1 − σ(β·(rw − rl))."""
    return torch.sigmoid(p.beta * chosen_logratios) + 1 - torch.sigmoid(p.beta * (chosen_logratios - rejected_logratios))


def sigmoid_norm(chosen_logratios: Tensor, rejected_logratios: Tensor, p: LossParams, *, chosen_tokens: Tensor,
                 rejected_tokens: Tensor, **_: Tensor) -> Tensor:
    """DPO on length-averaged log-ratios: −log σ(β·Δ̄)."""
    delta = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
    return -F.logsigmoid(p.beta * delta)


def discopop(chosen_logratios: Tensor, rejected_logratios: Tensor, p: LossParams, **_: Tensor) -> Tensor:
    """DiscoPOP (Chris Lu et al. 2024, eq. 5): log-ratio-modulated mix of the logistic and the
    exponential loss, mixing weight σ(βΔ/τ)."""
    logits = p.beta * (chosen_logratios - rejected_logratios)
    mix = torch.sigmoid(logits / p.discopop_tau)
    return -F.logsigmoid(logits) * (1 - mix) + torch.exp(-logits) * mix


PAIR_LOSSES: dict[str, Callable[..., Tensor]] = {
    f.__name__: f
    for f in (sigmoid, hinge, ipo, robust, bco_pair, exo_pair, nca_pair, sppo_hard, apo_zero, apo_down, sigmoid_norm, discopop)
}


# ---------------------------------------------------------------------------------------------
# Reference-free objectives: functions of the policy's log-probs alone (no πref, no precompute).
# Inputs: chosen_logps / rejected_logps = log πθ(y|x) sums, shape [B]; token counts [B]. Each
# returns the per-pair preference term [B]; `reference_free_loss` adds the NLL term where the
# method has one. Same formulas as TRL's CPOTrainer (loss_type sigmoid / simpo) and ORPOTrainer.


def _mean_logps(logps: Tensor, tokens: Tensor) -> Tensor:
    return logps / tokens.clamp(min=1)


def simpo(chosen_logps: Tensor, rejected_logps: Tensor, p: LossParams, *, chosen_tokens: Tensor,
          rejected_tokens: Tensor) -> Tensor:
    """SimPO (Meng et al. 2024, eq. 6): −log σ(β·(log πθ(yw)/|yw| − log πθ(yl)/|yl|) − γ), with
    label smoothing as TRL's CPO applies it."""
    logits = p.beta * (_mean_logps(chosen_logps, chosen_tokens) - _mean_logps(rejected_logps, rejected_tokens)) - p.simpo_gamma
    return -(1 - p.label_smoothing) * F.logsigmoid(logits) - p.label_smoothing * F.logsigmoid(-logits)


def cpo(chosen_logps: Tensor, rejected_logps: Tensor, p: LossParams, **_: Tensor) -> Tensor:
    """CPO (Xu et al. 2024, eq. 3) preference term: −log σ(β·(log πθ(yw) − log πθ(yl)));
    `reference_free_loss` adds cpo_alpha · NLL(yw)."""
    logits = p.beta * (chosen_logps - rejected_logps)
    return -(1 - p.label_smoothing) * F.logsigmoid(logits) - p.label_smoothing * F.logsigmoid(-logits)


def orpo(chosen_logps: Tensor, rejected_logps: Tensor, p: LossParams, *, chosen_tokens: Tensor,
         rejected_tokens: Tensor) -> Tensor:
    """ORPO (Hong et al. 2024, eqs. 4–7) odds-ratio term: −β·log σ(log odds(yw) − log odds(yl)),
    odds(y) = P(y)/(1 − P(y)) with P the length-averaged probability; `reference_free_loss` adds
    the NLL of yw."""
    chosen, rejected = _mean_logps(chosen_logps, chosen_tokens), _mean_logps(rejected_logps, rejected_tokens)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    return -p.beta * F.logsigmoid(log_odds)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x < 0 without cancellation: log(−expm1 x) near 0, log1p(−eˣ) below −log 2
    (Mächler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


REFERENCE_FREE_LOSSES: dict[str, Callable[..., Tensor]] = {f.__name__: f for f in (simpo, cpo, orpo)}


def _nll_weight(name: str, params: LossParams) -> float:
    return {"simpo": 0.0, "cpo": params.cpo_alpha, "orpo": 1.0}[name]


def reference_free_loss(name: str, chosen_logps: Tensor, rejected_logps: Tensor, chosen_tokens: Tensor,
                        rejected_tokens: Tensor, params: LossParams,
                        denominators: Denominators | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """mean(preference term) + NLL weight · token-mean NLL(yw), and metrics. Rewards are TRL's for
    these methods: β·log πθ (length-averaged for SimPO and ORPO, which compare averages)."""
    lengths = {"chosen_tokens": chosen_tokens.to(chosen_logps.dtype), "rejected_tokens": rejected_tokens.to(chosen_logps.dtype)}
    loss = _mean(REFERENCE_FREE_LOSSES[name](chosen_logps, rejected_logps, params, **lengths), denominators)
    nll = sft_loss(chosen_logps, lengths["chosen_tokens"], denominators)
    loss = loss + _nll_weight(name, params) * nll
    with torch.no_grad():
        averaged = name in ("simpo", "orpo")
        chosen = _mean_logps(chosen_logps, lengths["chosen_tokens"]) if averaged else chosen_logps
        rejected = _mean_logps(rejected_logps, lengths["rejected_tokens"]) if averaged else rejected_logps
        chosen_rewards, rejected_rewards = params.beta * chosen.detach(), params.beta * rejected.detach()
        metrics = {**_reward_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, denominators),
                   "nll": nll.detach()}
    return loss, metrics


def _reward_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor, chosen_logps: Tensor, rejected_logps: Tensor,
                    denominators: Denominators | None) -> dict[str, Tensor]:
    return {
        "rewards/chosen": _mean(chosen_rewards, denominators),
        "rewards/rejected": _mean(rejected_rewards, denominators),
        "rewards/margins": _mean(chosen_rewards - rejected_rewards, denominators),
        "rewards/accuracies": _mean((chosen_rewards > rejected_rewards).float(), denominators),
        "logps/chosen": _mean(chosen_logps.detach(), denominators),
        "logps/rejected": _mean(rejected_logps.detach(), denominators),
    }


def sft_loss(chosen_logps: Tensor, chosen_tokens: Tensor, denominators: Denominators | None = None) -> Tensor:
    """Token-mean negative log-likelihood of the chosen completions over the batch (TRL's `sft`
    loss type and RPO's NLL term): −Σ log πθ(yw) / Σ |yw|. Scalar."""
    tokens = chosen_tokens.sum().clamp(min=1) if denominators is None else denominators.chosen_tokens
    return -chosen_logps.sum() / tokens


def preference_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    losses: dict[str, float],
    params: LossParams,
    sft_weight: float = 0.0,
    denominators: Denominators | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Σ_k weight_k · mean(loss_k) + sft_weight · NLL(chosen), and the usual DPO metrics.

    Shapes: every input [B] (float32 log-prob sums; token counts as float or int). Returns the
    scalar loss and metrics: rewards/chosen, rewards/rejected (β·logratio, mean), rewards/margins,
    rewards/accuracies (fraction with chosen reward > rejected reward), logps/chosen, logps/rejected.
    """
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    lengths = {"chosen_tokens": chosen_tokens.to(chosen_logps.dtype), "rejected_tokens": rejected_tokens.to(chosen_logps.dtype)}
    loss = chosen_logps.new_zeros(())
    for name, weight in losses.items():
        loss = loss + weight * _mean(PAIR_LOSSES[name](chosen_logratios, rejected_logratios, params, **lengths), denominators)
    if sft_weight:
        loss = loss + sft_weight * sft_loss(chosen_logps, lengths["chosen_tokens"], denominators)
    with torch.no_grad():
        chosen_rewards = params.beta * chosen_logratios.detach()
        rejected_rewards = params.beta * rejected_logratios.detach()
    return loss, _reward_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, denominators)


def reward_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, center_rewards_coefficient: float = 0.0,
                denominators: Denominators | None = None, margin: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Bradley–Terry: mean −log σ(r(x, yw) − r(x, yl) − m), with m a pair's required margin (0, or
    from its ratings: Llama 2's margin loss, TRL's `margin` column), plus
    `center_rewards_coefficient` · mean((r(x, yw) + r(x, yl))²), which keeps the rewards near 0
    (Eisenstein et al. 2023; TRL's `center_rewards_coefficient`). Same formulas as TRL's RewardTrainer.

    Shapes: chosen_rewards, rejected_rewards, margin [B] float32. Returns the scalar loss and
    metrics: rewards/chosen, rewards/rejected (means), rewards/margins, rewards/accuracies."""
    difference = chosen_rewards - rejected_rewards
    loss = _mean(-F.logsigmoid(difference if margin is None else difference - margin), denominators)
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * _mean((chosen_rewards + rejected_rewards) ** 2, denominators)
    with torch.no_grad():
        chosen, rejected = chosen_rewards.detach(), rejected_rewards.detach()
        metrics = {"rewards/chosen": _mean(chosen, denominators), "rewards/rejected": _mean(rejected, denominators),
                   "rewards/margins": _mean(chosen - rejected, denominators),
                   "rewards/accuracies": _mean((chosen > rejected).float(), denominators)}
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# Unpaired rows: KTO (Ethayarajh et al. 2024). Inputs per row, shape [B]: the completion's
# logratio = log πθ(y|x) − log πref(y|x), its label (True: desirable). The KL estimate z0 is a
# batch scalar from mismatched (prompt, completion) rows (`kto_kl`).


def kto_kl(kl_logratios: Tensor, weights: Tensor, total: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """z0 = max(0, mean of the KL rows' logratios log πθ(y'|x) − log πref(y'|x)), detached (KTO
    eq. 6; TRL's `kl`). `weights` [B] is 1 for the rows that count, 0 for a stand-in row; `total`
    sums a [2] tensor (sum, count) over processes, so the mean is over the whole micro-batch
    however its rows are split. Scalar."""
    sums = torch.stack([(kl_logratios.detach().float() * weights).sum(), weights.sum()])
    if total is not None:
        sums = total(sums)
    return (sums[0] / sums[1].clamp(min=1)).clamp(min=0)


def kto_loss(logratios: Tensor, desirable: Tensor, kl: Tensor, p: LossParams, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0, denominators: Denominators | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """KTO (Ethayarajh et al. 2024, eq. 7; TRL's `loss_type="kto"`): per row
    λD·(1 − σ(β·(r − z0))) where desirable, λU·(1 − σ(β·(z0 − r))) where not; r = logratio, z0 = kl.
    The mean is over all rows, as TRL's.

    Shapes: logratios [B] float32, desirable [B] bool, kl scalar. Returns the scalar loss and
    metrics: kl, rewards/accuracies (rows whose implicit reward β·r has the label's sign: > 0
    desirable, < 0 undesirable), rewards/chosen and rewards/rejected (β·r averaged over the
    desirable and the undesirable rows; each only where there are such rows) and rewards/margins
    (their difference, where both are)."""
    rewards = p.beta * logratios
    desirable_losses = desirable_weight * (1 - torch.sigmoid(rewards - p.beta * kl))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(p.beta * kl - rewards))
    loss = _mean(torch.where(desirable, desirable_losses, undesirable_losses), denominators)
    with torch.no_grad():
        rewards, undesirable = rewards.detach(), ~desirable
        counts = ((desirable.sum().item(), undesirable.sum().item()) if denominators is None
                  else (denominators.desirable, denominators.undesirable))
        metrics = {"kl": kl.detach() if denominators is None else kl.detach() * (len(logratios) / max(denominators.pairs, 1.0)),
                   "rewards/accuracies": _mean(torch.where(desirable, rewards > 0, rewards < 0).float(), denominators)}
        # A label's mean reward only where the batch (or step) has rows of it, as TRL logs them:
        # a 0 for a missing label would pull the logged average toward 0.
        if counts[0]:
            metrics["rewards/chosen"] = (rewards * desirable).sum() / counts[0]
        if counts[1]:
            metrics["rewards/rejected"] = (rewards * undesirable).sum() / counts[1]
        if counts[0] and counts[1]:
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return loss, metrics
