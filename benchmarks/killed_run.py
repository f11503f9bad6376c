"""`python benchmarks/killed_run.py STEP TRAIN-ARGS…`: `python -m train TRAIN-ARGS…` whose process
dies by SIGKILL (nothing flushed, nothing cleaned up) just as it would write checkpoint STEP's
trainer state: every process has written its model, optimizer and generator states, so the
checkpoint lacks only that last file and its rename into place. Under torchrun, rank 0 holds that
file, so rank 0 dies and torchrun stops the rest.

What a resume must survive: tests/test_resume.py on the CPU (gloo), and `make gpu-check`'s resume
stage on CUDA (NCCL, the GPU's generator states, the fused AdamW state on the device).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from train import parallel  # noqa: E402
from train.__main__ import main  # noqa: E402


def die_writing_checkpoint(step: int) -> None:
    """From now on, the torch.save of checkpoint `step`'s trainer state kills this process."""
    save = torch.save

    def save_or_die(obj, target, *args, **kwargs):  # target: a path, or a file DCP writes into
        if isinstance(target, (str, os.PathLike)) and Path(target).name == parallel.STATE_FILE \
                and Path(target).parent.name.endswith(f"checkpoint-{step:07d}"):
            os.kill(os.getpid(), signal.SIGKILL)
        save(obj, target, *args, **kwargs)

    torch.save = save_or_die


if __name__ == "__main__":
    die_writing_checkpoint(int(sys.argv[1]))
    main(sys.argv[2:])
