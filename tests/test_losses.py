"""Every loss against a value worked out by hand.

Common case: β = 0.5, chosen log-ratio rw = +2, rejected log-ratio rl = −2, so Δ = rw − rl = 4 and
βΔ = 2. Constants used below: log(1+e^-2) = 0.126928, log(1+e^2) = 2.126928,
log(1+e^-1) = 0.313262, log(1+e) = 1.313262, σ(1) = 0.731059, σ(2) = 0.880797, e^-2 = 0.135335.
"""

import math

import pytest
import torch

from train.losses import PAIR_LOSSES, REFERENCE_FREE_LOSSES, LossParams, preference_loss, reference_free_loss, sft_loss

RW, RL = torch.tensor([2.0]), torch.tensor([-2.0])
LENGTHS = {"chosen_tokens": torch.tensor([4.0]), "rejected_tokens": torch.tensor([2.0])}

HAND_WORKED = [
    # name, params, value, how
    ("sigmoid", LossParams(beta=0.5), 0.126928, "-log σ(2)"),
    ("sigmoid", LossParams(beta=0.5, label_smoothing=0.1), 0.326928, "0.9·0.126928 + 0.1·2.126928"),
    ("hinge", LossParams(beta=0.125), 0.5, "max(0, 1 − 0.125·4)"),
    ("ipo", LossParams(beta=0.5), 0.25, "Δ̄ = 2/4 + 2/2 = 1.5; (1.5 − 1/(2·0.5))²"),
    ("robust", LossParams(beta=0.5, label_smoothing=0.1), -0.123072, "(0.9·0.126928 − 0.1·2.126928)/0.8"),
    ("bco_pair", LossParams(beta=0.5), 0.626523, "−log σ(1) − log σ(1)"),
    ("exo_pair", LossParams(beta=0.5, label_smoothing=0.1), 0.001943,
     "σ(2)(log σ(2) − log 0.9) + σ(−2)(log σ(−2) − log 0.1) = 0.880797·(−0.021567) + 0.119203·0.175657"),
    ("nca_pair", LossParams(beta=0.5), 1.126524, "−log σ(1) − ½ log σ(−1) − ½ log σ(1)"),
    ("sppo_hard", LossParams(beta=0.5), 2.0, "(2 − 1)² + (−2 + 1)²"),
    ("apo_zero", LossParams(beta=0.5), 0.537883, "1 − σ(1) + σ(−1)"),
    ("apo_down", LossParams(beta=0.5), 0.850262, "σ(1) + 1 − σ(2)"),
    ("sigmoid_norm", LossParams(beta=0.5), 0.386871, "Δ̄ = 1.5; −log σ(0.75) = log(1 + e^−0.75)"),
    ("discopop", LossParams(beta=0.5, discopop_tau=1.0), 0.134333, "0.126928·(1 − σ(2)) + e^−2·σ(2)"),
]


@pytest.mark.parametrize(("name", "params", "expected", "how"), HAND_WORKED, ids=[f"{h[0]}-{i}" for i, h in enumerate(HAND_WORKED)])
def test_loss_by_hand(name, params, expected, how):
    value = PAIR_LOSSES[name](RW, RL, params, **LENGTHS)
    assert value.shape == (1,)
    assert value.item() == pytest.approx(expected, abs=2e-6), how


def test_every_loss_has_a_hand_worked_case():
    assert {case[0] for case in HAND_WORKED} == set(PAIR_LOSSES)


def test_dpo_gradient_direction():
    # Lower loss when the policy prefers chosen more: the defining property of a preference loss.
    for name in ("sigmoid", "hinge", "ipo", "robust", "bco_pair", "nca_pair", "apo_zero", "sigmoid_norm", "discopop"):
        rw = torch.tensor([0.5], requires_grad=True)
        PAIR_LOSSES[name](rw, torch.tensor([0.0]), LossParams(beta=0.5, label_smoothing=0.1), **LENGTHS).sum().backward()
        assert rw.grad.item() < 0, name


def test_exo_pair_needs_label_smoothing():
    with pytest.raises(ValueError, match="label_smoothing > 0"):
        PAIR_LOSSES["exo_pair"](RW, RL, LossParams())


def test_sft_is_token_mean_nll():
    # chosen sums −6 over 4 tokens and −2 over 2 tokens: NLL = 8/6
    assert sft_loss(torch.tensor([-6.0, -2.0]), torch.tensor([4, 2])).item() == pytest.approx(8 / 6)


def test_combined_loss_and_metrics():
    chosen, rejected = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    ref_chosen, ref_rejected = torch.tensor([-11.0, -4.0]), torch.tensor([-11.0, -4.0])
    # logratios: chosen [1, 0], rejected [−1, 1]; β = 1: rewards chosen [1, 0], rejected [−1, 1]
    loss, metrics = preference_loss(chosen, rejected, ref_chosen, ref_rejected, torch.tensor([5, 2]), torch.tensor([6, 3]),
                                    {"sigmoid": 1.0, "hinge": 0.5}, LossParams(beta=1.0), sft_weight=0.2)
    sigmoid = (math.log1p(math.exp(-2)) + math.log1p(math.exp(1))) / 2  # Δ = [2, −1]
    hinge = (0 + 2) / 2  # max(0, 1 − Δ)
    sft = 14 / 7  # −(−10 − 4) / (5 + 2)
    assert loss.item() == pytest.approx(sigmoid + 0.5 * hinge + 0.2 * sft, abs=1e-6)
    assert metrics["rewards/accuracies"].item() == 0.5
    assert metrics["rewards/margins"].item() == pytest.approx(0.5)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.5) and metrics["rewards/rejected"].item() == pytest.approx(0.0)
    assert metrics["logps/chosen"].item() == pytest.approx(-7.0)


# ---------------------------------------------------------------------------------------------
# Reference-free objectives. Common case: log πθ(yw) = −4 over |yw| = 4 tokens (mean −1),
# log πθ(yl) = −4 over |yl| = 2 tokens (mean −2) for SimPO/ORPO; CPO uses sums −4 and −6.

FREE_LENGTHS = (torch.tensor([4.0]), torch.tensor([2.0]))
FREE_HAND_WORKED = [
    ("simpo", torch.tensor([-4.0]), torch.tensor([-4.0]), LossParams(beta=2.0, simpo_gamma=0.5), 0.201413,
     "β(−1 − (−2)) − γ = 1.5; −log σ(1.5) = log(1 + e^−1.5); no NLL term"),
    ("cpo", torch.tensor([-4.0]), torch.tensor([-6.0]), LossParams(beta=0.5, cpo_alpha=1.0), 1.313262,
     "−log σ(0.5·(−4 + 6)) = log(1 + e^−1) = 0.313262, + 1·NLL = 4/4"),
    ("orpo", torch.tensor([-4.0]), torch.tensor([-4.0]), LossParams(beta=0.1), 1.023818,
     "log odds: −1 − log(1 − e^−1) = −0.541325 and −2 − log(1 − e^−2) = −1.854587; Δ = 1.313262; "
     "0.1·log(1 + e^−Δ) = 0.023818, + NLL = 4/4"),
]


@pytest.mark.parametrize(("name", "chosen", "rejected", "params", "expected", "how"), FREE_HAND_WORKED,
                         ids=[h[0] for h in FREE_HAND_WORKED])
def test_reference_free_loss_by_hand(name, chosen, rejected, params, expected, how):
    loss, metrics = reference_free_loss(name, chosen, rejected, *FREE_LENGTHS, params)
    assert loss.item() == pytest.approx(expected, abs=1e-6), how
    assert metrics["rewards/accuracies"].item() == 1.0 and metrics["nll"].item() == pytest.approx(1.0)


def test_orpo_odds_stay_finite_for_answers_the_model_is_sure_of():
    """log(1 − P) as P → 1: the stable form keeps the loss and its gradient finite."""
    chosen = torch.tensor([-1e-7], requires_grad=True)
    loss, _ = reference_free_loss("orpo", chosen, torch.tensor([-3.0]), torch.tensor([1.0]), torch.tensor([1.0]), LossParams())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(chosen.grad)


@pytest.mark.parametrize("name", sorted(REFERENCE_FREE_LOSSES))
def test_reference_free_loss_equals_trl_experimental(name):
    """The preference term against TRL's own CPOTrainer.cpo_loss / ORPOTrainer.odds_ratio_loss on the
    same log-probs (TRL averages over tokens for simpo and ORPO before calling them)."""
    from types import SimpleNamespace

    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    generator = torch.Generator().manual_seed(0)
    chosen, rejected = -torch.rand(6, generator=generator) * 40, -torch.rand(6, generator=generator) * 40
    chosen_tokens, rejected_tokens = torch.randint(1, 30, (6,), generator=generator), torch.randint(1, 30, (6,), generator=generator)
    params = LossParams(beta=0.7, simpo_gamma=0.3, label_smoothing=0.0)
    trainer = SimpleNamespace(beta=params.beta, alpha=0.0, simpo_gamma=params.simpo_gamma, label_smoothing=0.0,
                              loss_type="simpo" if name == "simpo" else "sigmoid", accelerator=SimpleNamespace(device="cpu"))
    averaged = name in ("simpo", "orpo")
    trl_chosen = chosen / chosen_tokens if averaged else chosen
    trl_rejected = rejected / rejected_tokens if averaged else rejected
    if name == "orpo":
        expected = -ORPOTrainer.odds_ratio_loss(trainer, trl_chosen, trl_rejected)[0]
    else:
        expected = CPOTrainer.cpo_loss(trainer, trl_chosen, trl_rejected)[0]
    ours = REFERENCE_FREE_LOSSES[name](chosen, rejected, params, chosen_tokens=chosen_tokens.float(),
                                       rejected_tokens=rejected_tokens.float())
    torch.testing.assert_close(ours, expected.float(), atol=1e-6, rtol=1e-5)
