"""`make demo` = `python -m demo [--quick] [--out DIR] [--config FILE] [any DemoConfig field]`."""

from demo.pipeline import DemoConfig, run_demo
from train.cli import command, run_command

SUMMARY = ("The DPO paper's sentiment experiment in miniature on generated data, every stage of the pipeline, "
           "then on-policy rounds.")


def main(argv: list[str] | None = None) -> None:
    run_command(command(DemoConfig, run_demo, "demo", SUMMARY), argv, "python -m demo")


if __name__ == "__main__":
    main()
