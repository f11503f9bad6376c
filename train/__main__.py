"""`python -m train …` (or `make train`, or under `torchrun`): see train/config.py for the flags."""

import sys

from schemas.errors import UserError
from train.config import parse_args
from train.loop import train


def main() -> None:
    try:
        result = train(parse_args())
    except UserError as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    print("train: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
