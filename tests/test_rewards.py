"""Reward models (train/rewards.py): each answer scored at its last token, the same in the padded and
the prefix-shared layouts and the same as the model's own forward; the Bradley–Terry loss by hand
and equal to TRL's RewardTrainer on identical ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_logprobs import _columns, _random_columns
from tests.test_train import _config, _metrics, shards  # noqa: F401  (shards is a fixture)
from train import last_layer
from train.batching import collate_pairs
from train.loop import train
from train.losses import reward_loss
from train.rewards import RewardScorer, pair_rewards, reward_disagreement


def _tiny_reward_model(arch: str, vocab: int = 96):
    import transformers

    from train.last_layer import MODEL_TYPES

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, num_labels=1, pad_token_id=0,
                  initializer_range=0.2)  # positions matter enough for a wrong layout to show
    extra = {"gemma2": dict(head_dim=8, attn_logit_softcapping=5.0, sliding_window=64), "gemma": dict(head_dim=8),
             "gemma3_text": dict(head_dim=8), "mixtral": dict(num_local_experts=4),
             "qwen3_moe": dict(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)}.get(arch, {})
    config = transformers.AutoConfig.for_model(arch, **common, **extra)
    config._attn_implementation = "eager" if arch == "gemma2" else "sdpa"
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(config).eval()
    assert model.config.model_type == arch and (arch in MODEL_TYPES or arch == "gpt_neox")
    return model


def _own_forward_rewards(model, columns, rows):
    """The model's own forward on each answer alone (prompt + answer, no padding at all)."""
    rewards = []
    for answer in (columns.chosen, columns.rejected):
        for row in rows:
            ids = torch.as_tensor(np.concatenate([columns.prompt.row(row), answer.row(row)]), dtype=torch.long)[None]
            rewards.append(model(input_ids=ids).logits[0, 0].float())
    return torch.stack(rewards).chunk(2)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("layout", ["padded", "shared", "packed"])
def test_rewards_equal_the_models_own_forward_in_every_layout(arch, layout):
    model = _tiny_reward_model(arch)
    columns = _random_columns(7, vocab=96, seed=21)  # answers 1–8 tokens: uneven padding both ways
    rows = np.arange(7)
    batch = collate_pairs(columns, rows, pad_id=0, shared=layout != "padded", packed=layout == "packed")
    with torch.inference_mode():
        chosen, rejected = pair_rewards(RewardScorer(model), batch)
        expected_chosen, expected_rejected = _own_forward_rewards(model, columns, rows)
    torch.testing.assert_close(chosen, expected_chosen, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rejected, expected_rejected, atol=1e-5, rtol=1e-5)
    assert (chosen - rejected).abs().max() > 1e-3  # the two answers are told apart


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_shared_reward_gradients_equal_the_padded_layout(arch):
    columns = _random_columns(5, vocab=96, seed=22)
    grads = []
    for shared in (False, True):
        model = _tiny_reward_model(arch)
        chosen, rejected = pair_rewards(RewardScorer(model), collate_pairs(columns, np.arange(5), pad_id=0, shared=shared))
        loss, _ = reward_loss(chosen, rejected, center_rewards_coefficient=0.01)
        loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def _last_layer_tokens(model) -> list[int]:
    """A hook's record of how many tokens each call of the last layer's MLP computed."""
    seen: list[int] = []
    model.base_model.layers[-1].mlp.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].shape[:-1].numel()))
    return seen


def _gradients(model, rewards):
    """The Bradley–Terry loss's gradient of every parameter, the (chosen, rejected) rewards from `rewards()`."""
    model.zero_grad()
    chosen, rejected = rewards()
    reward_loss(chosen, rejected, center_rewards_coefficient=0.01)[0].backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _own_forward_gradients(model, columns, rows):
    """Through the model's own forward (every layer at every position)."""
    return _gradients(model, lambda: _own_forward_rewards(model, columns, rows))


def _our_gradients(model, batch):
    return _gradients(model, lambda: pair_rewards(RewardScorer(model), batch))


READ_AT_CASES = [*((arch, layout) for arch in ("llama", "qwen2", "gemma2") for layout in ("padded", "shared", "packed")),
                 *((arch, layout) for arch in sorted(set(last_layer.MODEL_TYPES) - {"llama", "qwen2", "gemma2"})
                   for layout in ("padded", "shared"))]


@pytest.mark.parametrize(("arch", "layout"), READ_AT_CASES, ids=[f"{a}-{lay}" for a, lay in READ_AT_CASES])
def test_the_last_layer_runs_at_the_answers_last_tokens_only_with_the_full_models_gradients(arch, layout):
    """train/last_layer.py, for every decoder in its MODEL_TYPES: the last layer's MLP computes 2
    tokens per pair (1 per padded row), every earlier layer all of them, and every parameter's
    gradient (the last layer's q/k/v and MLP, the head, the embeddings) equals the model's own
    forward's, every layer at every position."""
    model = _tiny_reward_model(arch)
    columns = _random_columns(7, vocab=96, seed=23)
    rows = np.arange(7)
    batch = collate_pairs(columns, rows, pad_id=0, shared=layout != "padded", packed=layout == "packed")
    seen = _last_layer_tokens(model)
    ours = _our_gradients(model, batch)
    assert seen == [2 * len(rows)] and seen[0] < batch.input_ids.numel()  # each answer's last token
    theirs = _own_forward_gradients(model, columns, rows)
    for name, grad in theirs.items():
        assert grad.abs().max() > 0, name  # every parameter takes part, so the comparison covers it
        torch.testing.assert_close(ours[name], grad, atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("why", ["gradient checkpointing", "no cache read", "another decoder"])
def test_a_last_layer_that_reads_no_cache_runs_whole_with_the_same_numbers(why):
    """Gradient checkpointing sets the layer's cache to None (transformers), and an attention that
    never calls `cache.update` has none: the layer runs whole once and is read at the positions.
    A decoder outside MODEL_TYPES (GPT-NeoX) is not touched at all."""
    model = _tiny_reward_model("gpt_neox" if why == "another decoder" else "llama").train()
    if why == "gradient checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif why == "no cache read":
        attention = model.base_model.layers[-1].self_attn
        forward = attention.forward
        attention.forward = lambda *args, cache=None, **kwargs: forward(*args, **kwargs)
    assert RewardScorer(model).reads_last_layer == (why != "another decoder")
    columns = _random_columns(5, vocab=96, seed=24)
    rows = np.arange(5)
    batch = collate_pairs(columns, rows, pad_id=0, shared=True)
    seen = _last_layer_tokens(model)
    ours = _our_gradients(model, batch)
    assert seen[0] == batch.input_ids.numel()  # whole (a recompute in backward calls it again)
    theirs = _own_forward_gradients(model, columns, rows)
    for name, grad in theirs.items():
        torch.testing.assert_close(ours[name], grad, atol=2e-5, rtol=1e-4, msg=name)


def test_a_last_layer_that_never_sees_the_read_positions_is_an_error_not_a_misread():
    """Were READ_AT lost on its way (a transformers release that stops passing keyword arguments to
    its layers; here a config that runs fewer layers than the model holds), the model's output
    would be [R, T, H], whose slots are not positions. And Gemma 3 set to attend both ways is not
    read this way at all (the read queries' mask would be causal)."""
    model = _tiny_reward_model("llama")
    model.config.num_hidden_layers = 1
    columns = _random_columns(3, vocab=96, seed=26)
    with pytest.raises(RuntimeError, match="did not receive"):
        pair_rewards(RewardScorer(model), collate_pairs(columns, np.arange(3), pad_id=0, shared=True))
    bidirectional = _tiny_reward_model("gemma3_text")
    bidirectional.config.use_bidirectional_attention = True
    assert not RewardScorer(bidirectional).reads_last_layer and RewardScorer(_tiny_reward_model("gemma3_text")).reads_last_layer


def test_padded_rows_past_a_sliding_window_run_the_last_layer_whole():
    """The model's own mask holds its window there; a causal mask for the read queries would not,
    so rows longer than the window keep the whole layer (and rows within it are read)."""
    from transformers import AutoModelForSequenceClassification, MistralConfig

    config = MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=128, num_labels=1, pad_token_id=0,
                           initializer_range=0.2, sliding_window=6)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    seen = _last_layer_tokens(model)
    short = _columns([[5, 6], [7, 8, 9]], [[10, 11], [12]], [[13], [14, 15]])  # rows of 3 to 5 tokens
    with torch.inference_mode():
        for columns in (_random_columns(5, vocab=96, seed=25), short):  # rows of 8 to 17 tokens, then the short ones
            seen.clear()
            rows = np.arange(len(columns))
            batch = collate_pairs(columns, rows, pad_id=0)
            chosen, rejected = pair_rewards(RewardScorer(model), batch)
            assert seen == [batch.input_ids.numel() if batch.input_ids.shape[1] > 6 else 2 * len(rows)]
            expected_chosen, expected_rejected = _own_forward_rewards(model, columns, rows)
            torch.testing.assert_close(chosen, expected_chosen, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(rejected, expected_rejected, atol=1e-5, rtol=1e-5)


def test_reward_loss_by_hand():
    """Rewards chosen (2, 0), rejected (1, 1): margins 1 and −1. Loss = mean(−log σ(1), −log σ(−1))
    = mean(0.31326, 1.31326) = 0.81326; centering 0.1 · mean((3)², (1)²) = 0.5 → 1.31326.
    Accuracy ½, margin 0."""
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    loss, metrics = reward_loss(chosen, rejected)
    assert loss.item() == pytest.approx(0.81326, abs=1e-5)
    loss, metrics = reward_loss(chosen, rejected, center_rewards_coefficient=0.1)
    assert loss.item() == pytest.approx(1.31326, abs=1e-5)
    assert metrics["rewards/accuracies"].item() == 0.5 and metrics["rewards/margins"].item() == 0.0
    assert metrics["rewards/chosen"].item() == 1.0 and metrics["rewards/rejected"].item() == 1.0


def test_the_guard_sees_a_head_we_do_not_reproduce():
    model = _tiny_reward_model("llama")
    diff, tolerance = reward_disagreement(model)
    assert diff <= tolerance
    original = model.forward

    def tempered(*args, **kwargs):  # a model whose own forward scales its reward
        out = original(*args, **kwargs)
        out.logits = out.logits * 2
        return out

    model.forward = tempered
    diff, tolerance = reward_disagreement(model)
    assert diff > tolerance


def test_reward_model_trains_on_the_dpo_shards_and_loads_as_a_classifier(shards, tiny_model_dir, tmp_path):  # noqa: F811
    """From the causal LM checkpoint, on shards without reference columns: held-out accuracy rises
    to the preference the data holds, and final/ is a sequence classifier the judge can load."""
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "rm"
    train(_config(shards.parent / "unscored", tiny_model_dir, out, objective="reward", max_steps=16, log_every=1,
                  eval_every=4, learning_rate=5e-3, center_rewards_coefficient=0.01))
    logged = _metrics(out)
    losses = [m["loss"] for m in logged if "loss" in m]
    evals = [m for m in logged if "eval/rewards/accuracies" in m]
    assert np.mean(losses[-4:]) < losses[0] - 0.1
    assert evals[-1]["eval/rewards/accuracies"] == 1.0
    assert evals[-1]["eval/rewards/margins"] > evals[0]["eval/rewards/margins"] + 0.5
    model = AutoModelForSequenceClassification.from_pretrained(out / "final")
    assert model.config.num_labels == 1 and model.config.reward_scored_at == "completion_end"

    # prefdata eval on it: the trainer's last held-out figures, and calibration by margin bucket.
    from train.eval import EvalConfig, evaluate_policy, summary_line

    result = evaluate_policy(EvalConfig(shards=str(shards.parent / "unscored"), policy=str(out / "final"),
                                        out=str(tmp_path / "eval")))
    final = logged[-1]
    assert result["kind"] == "reward_model" and result["pairs"] == final["eval/pairs"] == 16
    assert result["accuracy"] == pytest.approx(final["eval/rewards/accuracies"])
    assert result["margin"] == pytest.approx(final["eval/rewards/margins"], abs=1e-4)
    assert sum(b["pairs"] for b in result["calibration"]) == 16
    assert [b["low"] for b in result["calibration"]] == sorted(b["low"] for b in result["calibration"])
    assert "pairwise accuracy 1.000" in summary_line(result)


@pytest.mark.parametrize("shared", [False, True])
def test_loss_accuracy_and_rewards_equal_trl_reward_trainer_on_identical_ids(shards, tiny_model_dir, tmp_path, shared):  # noqa: F811
    """TRL 1.16's RewardTrainer.compute_loss on the shards' own rows (prompt + answer ids, its
    collator padding them) beside ours, the same classifier on both sides."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from train.data import open_shards
    from train.rewards import load_reward_model

    ours, tokenizer = load_reward_model(tiny_model_dir, str(tiny_model_dir), torch.float32, torch.device("cpu"))
    theirs, _ = load_reward_model(tiny_model_dir, str(tiny_model_dir), torch.float32, torch.device("cpu"))
    theirs.load_state_dict(ours.state_dict())  # the same new head on both sides
    placeholder = Dataset.from_list([{"chosen": "a good answer", "rejected": "a bad one"}])
    trainer = RewardTrainer(model=theirs.eval(), args=RewardConfig(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True,
                                                                   center_rewards_coefficient=0.01),
                            train_dataset=placeholder, processing_class=tokenizer)
    _, data, _ = open_shards(str(shards.parent / "unscored"), need_ref=False)
    rows = np.arange(12)
    columns = data.columns
    margins = np.linspace(-0.5, 1.0, len(rows), dtype=np.float32)  # TRL's `margin` column
    batch = trainer.data_collator([{"chosen_ids": np.concatenate([columns.prompt.row(i), columns.chosen.row(i)]).tolist(),
                                    "rejected_ids": np.concatenate([columns.prompt.row(i), columns.rejected.row(i)]).tolist(),
                                    "margin": float(m)} for i, m in zip(rows, margins)])
    with torch.no_grad():
        trl_loss, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
        chosen, rejected = pair_rewards(RewardScorer(ours.eval()), collate_pairs(columns, rows, pad_id=0, shared=shared))
        loss, metrics = reward_loss(chosen, rejected, center_rewards_coefficient=0.01, margin=torch.from_numpy(margins))
    trl_chosen, trl_rejected = outputs.logits.squeeze(-1).chunk(2)
    torch.testing.assert_close(chosen, trl_chosen, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rejected, trl_rejected, atol=1e-4, rtol=1e-4)
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-4)
    assert metrics["rewards/accuracies"].item() == pytest.approx(trainer._metrics["eval"]["accuracy"][-1], abs=1e-6)
    assert metrics["rewards/margins"].item() == pytest.approx(trainer._metrics["eval"]["margin"][-1], abs=1e-4)
    assert (chosen - rejected).abs().max() > 1e-4  # a new head already tells the answers apart


def test_judge_scores_an_answer_as_the_reward_model_read_it_in_training(shards, tiny_model_dir, tmp_path):  # noqa: F811
    """A reward model this trainer made (`reward_scored_at`): the judge renders each (prompt,
    answer) to the ids tokenize stored for that pair, so its score is the training-time reward."""
    import pyarrow.parquet as pq

    from train.data import open_shards
    from train.judge import JudgeOptions, build_judge
    from train.rewards import load_reward_model

    model, tokenizer = load_reward_model(tiny_model_dir, str(tiny_model_dir), torch.float32, torch.device("cpu"))
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    judge, info = build_judge(JudgeOptions(reward_model=str(tmp_path / "rm"), device="cpu", dtype="float32"))
    assert info["scored_at"] == "completion_end"

    _, data, _ = open_shards(str(shards.parent / "unscored"), need_ref=False)
    records = pq.read_table(shards.parent / "records" / "train.parquet").to_pylist()
    by_id = {r["id"]: r for r in records}
    rows = np.arange(6)
    wanted = [by_id[data.ids[i]] for i in rows]
    scores = judge([r["prompt"] for r in wanted], [r["chosen"][0]["content"] for r in wanted])
    with torch.inference_mode():
        expected, _ = pair_rewards(RewardScorer(model.eval()), collate_pairs(data.columns, rows, pad_id=0))
    np.testing.assert_allclose(scores, expected.numpy(), atol=1e-5)


def test_a_lora_reward_model_learns_and_its_adapter_and_merged_model_agree(shards, tiny_model_dir, tmp_path):  # noqa: F811
    """Adapters on the frozen backbone and the new head trained whole (peft's SEQ_CLS task):
    final/ is the adapter, final-merged/ a plain classifier giving the same rewards."""
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "lora-rm"
    train(_config(shards.parent / "unscored", tiny_model_dir, out, objective="reward", max_steps=16, log_every=1,
                  lora_r=8, lora_alpha=16, learning_rate=2e-2))
    losses = [m["loss"] for m in _metrics(out) if "loss" in m]
    assert np.mean(losses[-4:]) < losses[0] - 0.1
    assert not list((out / "final").glob("model*.safetensors"))  # the adapter (and head) alone
    adapter = AutoPeftModelForSequenceClassification.from_pretrained(out / "final", num_labels=1).eval()
    merged = AutoModelForSequenceClassification.from_pretrained(out / "final-merged").eval()
    ids = torch.tensor([[1, 5, 9, 30, 41, 7], [2, 8, 8, 19, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(adapter(ids).logits, merged(ids).logits, atol=1e-4, rtol=1e-4)


def test_reward_loss_with_a_margin_by_hand():
    """Differences 1 and −1, margins 0.5 and −1: mean(−log σ(0.5), −log σ(0)) = mean(0.474077, 0.693147)."""
    loss, _ = reward_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]), margin=torch.tensor([0.5, -1.0]))
    assert loss.item() == pytest.approx((0.474077 + 0.693147) / 2, abs=1e-5)


def test_margins_come_from_the_records_ratings_and_enter_the_loss(tiny_model_dir, tmp_path):
    """Records with scores (a rated source): each shard row's margin is its record's
    chosen_score − rejected_score (0 without scores), and a run with --margin-from-scores starts
    at the loss those margins give on the same model."""
    from prefdata.tokenize import TokenizeConfig, tokenize
    from tests.records_factory import make_record, write_records_dir
    from tests.test_train import _learnable
    from train.data import open_shards
    from train.rewards import score_margins

    records = _learnable(28)
    rated = [make_record(r.prompt[0].content, r.chosen[0].content, r.rejected[0].content, row=i,
                         chosen_score=float(i % 5), rejected_score=0.0) for i, r in enumerate(records[:24])]
    unrated = records[24:]
    write_records_dir(tmp_path / "records", {"train": rated + unrated, "eval": []})
    tokenize(TokenizeConfig(input_dir=str(tmp_path / "records"), tokenizer=str(tiny_model_dir), out=str(tmp_path / "shards")))
    _, data, _ = open_shards(str(tmp_path / "shards"), need_ref=False)
    expected = {r.id: r.chosen_score - r.rejected_score for r in rated} | {r.id: 0.0 for r in unrated}
    np.testing.assert_allclose(score_margins(str(tmp_path / "shards"), data.ids), [expected[i] for i in data.ids])

    starts = {}
    for weight in (0.0, 0.5):
        out = tmp_path / f"margin-{weight}"
        train(_config(tmp_path / "shards", tiny_model_dir, out, objective="reward", max_steps=1, batch_size=28, log_every=1,
                      margin_from_scores=weight))
        starts[weight] = _metrics(out)[0]["loss"]
    # The whole split in one batch at the starting model: the loss those margins give.
    from train.rewards import load_reward_model

    torch.manual_seed(0)  # the new head as the run drew it (train seeds torch with --seed 0 before loading)
    model, _ = load_reward_model(tiny_model_dir, str(tiny_model_dir), torch.float32, torch.device("cpu"))
    rows = np.arange(len(data))
    with torch.no_grad():
        chosen, rejected = pair_rewards(RewardScorer(model.eval()), collate_pairs(data.columns, rows, pad_id=0, shared=True))
        margins = torch.tensor([0.5 * expected[i] for i in data.ids], dtype=torch.float32)
        assert starts[0.5] == pytest.approx(reward_loss(chosen, rejected, margin=margins)[0].item(), abs=1e-5)
        assert starts[0.0] == pytest.approx(reward_loss(chosen, rejected)[0].item(), abs=1e-5)
    assert starts[0.5] > starts[0.0]  # margins of 0–2 to win by: a harder start


def test_a_reward_models_checkpoint_is_refused_where_a_causal_lm_is_loaded(tiny_model_dir, tmp_path):
    """transformers starts a missing LM head at random and goes on: the reference's log-probs of
    such a 'policy' came out different on every load. A reward model is refused by its
    architecture (tied or not), any other checkpoint that lacks weights by what it lacks."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, LlamaModel

    from schemas.errors import UserError
    from train.models import load_causal_lm

    def saved(model, name: str):
        model.save_pretrained(tmp_path / name)
        AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / name)
        return tmp_path / name

    tied = AutoConfig.from_pretrained(tiny_model_dir, num_labels=1)
    untied = AutoConfig.from_pretrained(tiny_model_dir, tie_word_embeddings=False)
    cases = [(saved(AutoModelForSequenceClassification.from_config(tied), "rm"), "a reward model .*where a causal LM is needed"),
             (saved(LlamaModel(untied), "backbone"), "the checkpoint has no lm_head.weight")]
    for directory, message in cases:
        with pytest.raises(UserError, match=message):
            load_causal_lm(directory, str(directory), torch.float32, torch.device("cpu"))
    model, _ = load_causal_lm(tiny_model_dir, str(tiny_model_dir), torch.float32, torch.device("cpu"))  # a causal LM loads
    assert model.lm_head.weight.shape[0] == model.config.vocab_size


def test_gpu_checks_last_layer_row_compares_read_and_whole_and_fails_past_its_tolerance(shards, tiny_model_dir, monkeypatch):  # noqa: F811
    """`make gpu-check`'s reward row (benchmarks/gpu_check.py), run here on the CPU as its rehearsal
    does: float32 and bf16-autocast rewards and gradients of the two ways, and a stage failure
    (not a pass) when they differ by more than its tolerance."""
    from benchmarks import gpu_check

    row = gpu_check._reward_last_layer(gpu_check.REHEARSAL, tiny_model_dir, shards.parent / "unscored")
    assert 0 < row["max_relative_diff_float32"] <= 1e-4 and 0 < row["max_relative_diff_bfloat16"] <= 5e-2
    monkeypatch.setitem(gpu_check.LAST_LAYER_TOLERANCE, "bfloat16", 0.0)
    with pytest.raises(gpu_check.StageFailed, match="bfloat16"):
        gpu_check._reward_last_layer(gpu_check.REHEARSAL, tiny_model_dir, shards.parent / "unscored")
