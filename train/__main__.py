"""`python -m train …` (or `make train`, or under `torchrun`): `prefdata train` under another name;
the flags are TrainConfig's fields (train/config.py)."""

from train.cli import command, run_command


def main(argv: list[str] | None = None) -> None:
    from train.config import TrainConfig
    from train.loop import train_and_report

    run_command(command(TrainConfig, train_and_report, "train", "Lean DPO trainer over prefdata shards."), argv, "python -m train")


if __name__ == "__main__":
    main()
