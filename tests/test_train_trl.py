"""Issue 7 evidence: our per-row policy log-probs and every loss equal TRL 1.x `DPOTrainer`'s.

One TRL trainer (precompute_ref_log_probs=True, float32, CPU) scores six rows with the tiny model
and stores its reference log-probs. Its policy and our copy of the same model are then perturbed
identically, so policy ≠ reference and every log-ratio is non-zero. TRL's loss comes from its own
`compute_loss` on a batch from its own collator; ours from `sequence_logps` + `preference_loss`
with TRL's stored reference log-probs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.test_logprobs import _columns, trl_precomputed_trainer
from train.batching import collate_pairs
from train.logprobs import sequence_logps
from train.losses import PAIR_LOSSES, LossParams, preference_loss

BETA = 0.3
# Losses whose formula needs a label-smoothing ε (robust: label-flip rate; exo_pair: target [1−ε, ε]).
LABEL_SMOOTHING = {"robust": 0.2, "exo_pair": 0.1}
TRL_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps"]


def _perturb(model: torch.nn.Module) -> None:
    """Move every weight by seeded noise, the same for any copy of the model (parameters in
    named order, one generator seed per parameter)."""
    with torch.no_grad():
        for seed, (_, param) in enumerate(model.named_parameters()):
            noise = torch.randn(param.shape, generator=torch.Generator().manual_seed(seed))
            param.add_(0.02 * noise)


def _trl_policy_logps(trainer, batch) -> torch.Tensor:
    """Per-row policy log-probs exactly as TRL 1.16 `_compute_loss` computes them: the fused-head
    forward with completion labels, summed over the shifted sequence. Rows: chosen, then rejected."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    outputs = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            labels=labels, use_cache=False, fused_lm_head=True)
    seq_len = batch["completion_mask"].shape[1] - 1
    return outputs.log_probs[:, -seq_len:].sum(dim=1)


def _trl_loss(trainer, batch, loss_types: list[str], weights: list[float], label_smoothing: float) -> float:
    """TRL's own loss: the attributes `_compute_loss` reads, set for this case."""
    trainer.loss_types, trainer.loss_weights = loss_types, weights
    trainer.beta, trainer.label_smoothing = BETA, label_smoothing
    return trainer.compute_loss(trainer.model, batch).item()


@pytest.fixture(scope="module")
def trl(tiny_model_dir, tmp_path_factory):
    """(TRL trainer, TRL batch of all rows, our SequenceLogps of the same rows, TRL's stored refs)."""
    from transformers import AutoModelForCausalLM

    trainer = trl_precomputed_trainer(tiny_model_dir, tmp_path_factory.mktemp("trl"))
    data = trainer.train_dataset.select_columns(TRL_COLUMNS)
    ours = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for model in (trainer.model, ours):
        _perturb(model)
        model.eval()
    batch = trainer.data_collator([data[i] for i in range(len(data))])
    columns = _columns(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"])
    with torch.no_grad():
        logps = sequence_logps(ours, collate_pairs(columns, np.arange(len(columns)), pad_id=0))
    refs = (torch.tensor(data["ref_chosen_logps"]), torch.tensor(data["ref_rejected_logps"]))
    return trainer, batch, logps, refs


def _our_loss(logps, refs, losses: dict[str, float], label_smoothing: float, sft_weight: float = 0.0) -> float:
    loss, _ = preference_loss(logps.chosen, logps.rejected, *refs, logps.chosen_tokens, logps.rejected_tokens,
                              losses, LossParams(beta=BETA, label_smoothing=label_smoothing), sft_weight)
    return loss.item()


def test_policy_logps_equal_trl_and_differ_from_reference(trl):
    trainer, batch, logps, refs = trl
    with torch.no_grad():
        trl_chosen, trl_rejected = _trl_policy_logps(trainer, batch).chunk(2)
    np.testing.assert_allclose(logps.chosen.numpy(), trl_chosen.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(logps.rejected.numpy(), trl_rejected.numpy(), atol=1e-4, rtol=0)
    # The perturbation made a policy that is not the reference: log-ratios far from 0 (a random
    # perturbation can leave one row's near 0, so the mean over the batch is what is asked of it).
    assert (logps.chosen - refs[0]).abs().mean() > 0.2
    assert (logps.rejected - refs[1]).abs().mean() > 0.2


@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
def test_each_loss_equals_trl(trl, name):
    trainer, batch, logps, refs = trl
    smoothing = LABEL_SMOOTHING.get(name, 0.0)
    with torch.no_grad():
        expected = _trl_loss(trainer, batch, [name], [1.0], smoothing)
    assert _our_loss(logps, refs, {name: 1.0}, smoothing) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize(("losses", "sft_weight"), [({}, 1.0), ({"sigmoid": 1.0}, 0.5), ({"ipo": 0.3, "hinge": 2.0}, 0.0)])
def test_sft_term_and_weighted_combinations_equal_trl(trl, losses, sft_weight):
    trainer, batch, logps, refs = trl
    names, weights = [*losses, "sft"], [*losses.values(), sft_weight]
    with torch.no_grad():
        expected = _trl_loss(trainer, batch, names, weights, 0.0)
    assert _our_loss(logps, refs, losses, 0.0, sft_weight) == pytest.approx(expected, abs=1e-4)


def test_sigmoid_with_label_smoothing_is_cdpo_where_trl_ignores_it(trl):
    """The documented difference: TRL's `sigmoid` is −log σ(z) whatever ε; ours is conservative
    DPO, mean(−(1−ε)·log σ(z) − ε·log σ(−z)) = (1−ε)·TRL + ε·mean(−log σ(−z)), z = β·Δ."""
    trainer, batch, logps, refs = trl
    eps = 0.25
    with torch.no_grad():
        trl_loss = _trl_loss(trainer, batch, ["sigmoid"], [1.0], eps)
        chosen, rejected = _trl_policy_logps(trainer, batch).chunk(2)
    z = BETA * ((chosen - refs[0]) - (rejected - refs[1]))
    cdpo = (1 - eps) * trl_loss + eps * (-F.logsigmoid(-z)).mean().item()
    ours = _our_loss(logps, refs, {"sigmoid": 1.0}, eps)
    assert ours == pytest.approx(cdpo, abs=1e-4)
    assert abs(ours - trl_loss) > 1e-2


def _seeded_adapter_values(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Non-zero values for every LoRA matrix (B too, so the adapter is not the identity), by name."""
    generator = torch.Generator().manual_seed(0)
    return {name.replace("base_model.model.", ""): 0.3 * torch.randn(param.shape, generator=generator)
            for name, param in sorted(model.named_parameters()) if "lora_" in name}


def test_lora_loss_and_adapter_gradients_equal_trl_with_peft_config(tiny_model_dir, tmp_path):
    """TRL 1.16 `DPOTrainer(peft_config=…)` and our adapter (train.lora) on the same rows, with the
    same adapter values: the same loss, and the same gradient on every adapter matrix."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from train.lora import add_adapter

    lora = dict(r=4, alpha=8.0, dropout=0.0)
    trainer = trl_precomputed_trainer(tiny_model_dir, tmp_path, peft_config=LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules="all-linear", task_type="CAUSAL_LM"))
    ours = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_ours = add_adapter(ours, lora["r"], lora["alpha"], lora["dropout"], None, seed=0)
    values = _seeded_adapter_values(trainer.model)
    assert values and values.keys() == _seeded_adapter_values(peft_ours).keys()
    for model in (trainer.model, peft_ours):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(values[name.replace("base_model.model.", "")])
    data = trainer.train_dataset.select_columns(TRL_COLUMNS)
    batch = trainer.data_collator([data[i] for i in range(len(data))])
    trainer.loss_types, trainer.loss_weights, trainer.beta = ["sigmoid"], [1.0], BETA
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    columns = _columns(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"])
    logps = sequence_logps(ours, collate_pairs(columns, np.arange(len(columns)), pad_id=0))
    refs = (torch.tensor(data["ref_chosen_logps"]), torch.tensor(data["ref_rejected_logps"]))
    our_loss, _ = preference_loss(logps.chosen, logps.rejected, *refs, logps.chosen_tokens, logps.rejected_tokens,
                                  {"sigmoid": 1.0}, LossParams(beta=BETA), 0.0)
    our_loss.backward()
    assert our_loss.item() == pytest.approx(trl_loss.item(), abs=1e-4)
    assert abs(our_loss.item() - np.log(2)) > 1e-2  # the adapter moved the policy off the base
    trl_grads = {n.replace("base_model.model.", ""): p.grad for n, p in trainer.model.named_parameters() if "lora_" in n}
    for name, param in peft_ours.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(param.grad, trl_grads[name.replace("base_model.model.", "")], atol=1e-5, rtol=1e-3)
