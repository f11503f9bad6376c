"""The one exception a user can cause. The CLI (and `python -m train`) prints its message as one
line on stderr and exits with code 2; anything else is a bug and keeps its traceback."""


class UserError(Exception):
    """Bad input or a bad option: the message says what is wrong and what to do."""

    exit_code = 2
