"""The learning-rate schedule: linear warmup from 0, then cosine / linear decay or constant, and
its position restored from a checkpoint's state."""

from __future__ import annotations

import io

import pytest
import torch

from train.config import TrainConfig
from train.loop import lr_scheduler

WARMUP, TOTAL = 2, 10
PEAK = 0.5

# lr after `step` optimizer steps, at: the start, mid-warmup, the end of warmup, halfway through
# the decay ((6 - 2) / (10 - 2) = 0.5: cosine 0.5·(1 + cos(π/2)) = 0.5), the end.
STEPS = [0, 1, 2, 6, 10]
EXPECTED_FACTORS = {
    "cosine": [0.0, 0.5, 1.0, 0.5, 0.0],
    "linear": [0.0, 0.5, 1.0, 0.5, 0.0],
    "constant": [0.0, 0.5, 1.0, 1.0, 1.0],
}


def _scheduler(kind: str):
    config = TrainConfig(shards="s", model="m", out="o", lr_schedule=kind, warmup_steps=WARMUP, learning_rate=PEAK)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
    return optimizer, lr_scheduler(config, optimizer, TOTAL)


def _lrs(optimizer, scheduler, steps: int) -> list[float]:
    """The lr of each of the next `steps` optimizer steps, stepping as the training loop does."""
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("kind", sorted(EXPECTED_FACTORS))
def test_warmup_then_decay_shape(kind):
    lrs = _lrs(*_scheduler(kind), TOTAL + 1)
    assert [lrs[step] for step in STEPS] == pytest.approx([PEAK * f for f in EXPECTED_FACTORS[kind]], abs=1e-12)


def test_cosine_decays_monotonically_after_warmup():
    lrs = _lrs(*_scheduler("cosine"), TOTAL + 1)
    assert all(a > b for a, b in zip(lrs[WARMUP:TOTAL], lrs[WARMUP + 1 : TOTAL + 1]))


def test_a_checkpointed_schedule_continues_where_it_stopped():
    optimizer, scheduler = _scheduler("cosine")
    _lrs(optimizer, scheduler, 4)
    saved = io.BytesIO()
    torch.save({"scheduler": scheduler.state_dict()}, saved)  # as train.loop.save_run_checkpoint keeps it
    expected = _lrs(optimizer, scheduler, 4)

    optimizer, resumed = _scheduler("cosine")
    saved.seek(0)
    resumed.load_state_dict(torch.load(saved, weights_only=False)["scheduler"])
    assert _lrs(optimizer, resumed, 4) == expected
