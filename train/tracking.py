"""`--report-to tensorboard|wandb`: the records of metrics.jsonl, also sent to an experiment tracker.

Each tracker is an optional extra (`pip install 'prefdata[tensorboard]'`). Its package is imported
when the run starts, so a missing one stops the run before any model is loaded. Only numbers are
sent, under metrics.jsonl's names (`loss`, `eval/loss`, `rewards/accuracies`, …) at the record's
step.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from schemas.errors import UserError
from schemas.io import write_text_atomic


def _missing(tracker: str) -> UserError:
    return UserError(f"--report-to {tracker} needs the {tracker} package: pip install 'prefdata[{tracker}]'")


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers, without its step (the x axis) and flags such as prefix_sharing."""
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardTracker:
    """Event files in OUT/tensorboard (`tensorboard --logdir OUT/tensorboard`)."""

    def __init__(self, out: Path, config: dict[str, Any]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard") from None
        self._summary_writer, self._log_dir = SummaryWriter, out / "tensorboard"
        self._writer: Any = None

    def start(self, resume_step: int | None) -> None:
        """On resume, TensorBoard hides what a killed run logged after the checkpoint, as
        metrics.jsonl drops those lines."""
        self._writer = self._summary_writer(str(self._log_dir), purge_step=None if resume_step is None else resume_step + 1)

    def log(self, record: dict[str, Any]) -> None:
        for name, value in _scalars(record).items():
            self._writer.add_scalar(name, value, record["step"])
        self._writer.flush()  # a record every --log-every steps: cheap, and a crash loses none

    def close(self) -> None:
        self._writer.close()


class WandbTracker:
    """A Weights & Biases run in OUT/wandb; offline unless WANDB_MODE says otherwise (the data may
    not leave the building; `wandb sync OUT/wandb/offline-run-*` uploads it where it may).

    The run's id is kept in OUT/wandb/run-id, so a resumed training run continues the same W&B run
    (offline, each start is its own offline-run-* directory under that id, and `wandb sync` puts
    them together) instead of opening a second one. The steps a killed run logged past its
    checkpoint stay in the W&B run, which drops any step below the last it holds: the resumed run's
    repeats of them go, and they are the same numbers (resume is exact), so nothing is lost or doubled."""

    def __init__(self, out: Path, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise _missing("wandb") from None
        self._wandb, self._out, self._config = wandb, out, config
        self._id_file = out / "wandb" / "run-id"
        self._run: Any = None

    def start(self, resume_step: int | None) -> None:
        # "allow", not "must": a run that was offline until now is not on the server yet, and an
        # online resume of it must create it there rather than fail.
        resumed = {"id": self._id_file.read_text().strip(), "resume": "allow"} \
            if resume_step is not None and self._id_file.is_file() else {}
        self._run = self._wandb.init(dir=str(self._out), name=self._out.name, config=self._config,
                                     project=os.environ.get("WANDB_PROJECT", "prefdata"),
                                     mode=os.environ.get("WANDB_MODE", "offline"), **resumed)
        write_text_atomic(self._id_file, self._run.id)

    def log(self, record: dict[str, Any]) -> None:
        self._run.log(_scalars(record), step=record["step"])

    def close(self) -> None:
        self._run.finish()


Tracker = TensorBoardTracker | WandbTracker
TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}


def open_tracker(report_to: str, out: Path, config: dict[str, Any]) -> Tracker | None:
    """The tracker `--report-to` names (None for `none`); its package must be installed."""
    return TRACKERS[report_to](out, config) if report_to != "none" else None
