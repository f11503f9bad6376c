"""--report-to: metrics.jsonl's records in the tracker's own files (TensorBoard), a resumed run's
tracker continuing where the killed one stopped (TensorBoard, W&B offline), and the one-line error
when a tracker's package is missing."""

from __future__ import annotations

import shutil
import sys

import pytest

from schemas.errors import UserError
from tests.test_train import _config, _metrics, shards  # noqa: F401  (shards is a fixture)
from train.loop import train


def _scalars(out, name: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(name)]


def _logged(out, name: str) -> list[tuple[int, float]]:
    return [(m["step"], pytest.approx(m[name], rel=1e-6)) for m in _metrics(out) if name in m]  # event files hold float32


def test_tensorboard_holds_the_records_of_metrics_jsonl(shards, tiny_model_dir, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    train(_config(shards, tiny_model_dir, out, max_steps=4, log_every=1, eval_every=2, report_to="tensorboard"))
    for name in ("loss", "rewards/accuracies", "learning_rate", "eval/loss"):
        assert _scalars(out, name) == _logged(out, name), name
    assert [step for step, _ in _scalars(out, "loss")] == [1, 2, 3, 4]


def test_a_resumed_run_replaces_what_the_killed_run_logged_after_its_checkpoint(shards, tiny_model_dir, tmp_path):  # noqa: F811
    full = tmp_path / "full"
    train(_config(shards, tiny_model_dir, full, max_steps=4, log_every=1, save_every=2, report_to="tensorboard"))
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)  # a run killed after step 4, before its final model
    shutil.rmtree(resumed / "checkpoint-0000004")
    shutil.rmtree(resumed / "final")
    train(_config(shards, tiny_model_dir, resumed, max_steps=4, log_every=1, save_every=2, report_to="tensorboard", resume=True))
    assert _scalars(resumed, "loss") == _logged(resumed, "loss") == _logged(full, "loss")


def test_a_resumed_run_continues_its_wandb_run(shards, tiny_model_dir, tmp_path, monkeypatch):  # noqa: F811
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # nothing leaves the machine, whatever the environment says
    monkeypatch.setenv("WANDB_SILENT", "true")
    inits = []
    init = wandb.init
    monkeypatch.setattr(wandb, "init", lambda **options: inits.append(options) or init(**options))
    full = tmp_path / "full"
    train(_config(shards, tiny_model_dir, full, max_steps=4, log_every=1, save_every=2, report_to="wandb"))
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed, symlinks=True)  # a run killed after step 4, before its final model
    shutil.rmtree(resumed / "checkpoint-0000004")
    shutil.rmtree(resumed / "final")
    train(_config(shards, tiny_model_dir, resumed, max_steps=4, log_every=1, save_every=2, report_to="wandb", resume=True))
    run_id = (resumed / "wandb" / "run-id").read_text()
    assert "id" not in inits[0] and inits[1]["id"] == run_id and inits[1]["resume"] == "allow"
    # Offline, each start writes its own directory, named by the run it belongs to: the same one.
    assert [p.name.rsplit("-", 1)[1] for p in sorted((resumed / "wandb").glob("offline-run-*"))] == [run_id, run_id]


@pytest.mark.parametrize(("tracker", "module"), [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_a_missing_tracker_package_is_one_line_before_any_model_loads(shards, tmp_path, monkeypatch, tracker, module):  # noqa: F811
    monkeypatch.setitem(sys.modules, module, None)  # `import` then raises ImportError
    with pytest.raises(UserError, match=rf"^--report-to {tracker} needs the {tracker} package: pip install 'prefdata\[{tracker}\]'$"):
        train(_config(shards, tmp_path / "no-such-model", tmp_path / "r", report_to=tracker))
