"""The one exception a user can cause. The CLI (and `python -m train`) prints its message as one
line on stderr and exits with code 2; anything else is a bug and keeps its traceback."""


class UserError(Exception):
    """Bad input or a bad option: the message says what is wrong and what to do."""

    exit_code = 2


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none), for a
    UserError that quotes a library's error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
