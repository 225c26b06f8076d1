"""The one error type for a user's mistake (a bad option, record, file or model): the command
line prints its message on one line and exits with status 2. Any other exception is a bug of
ours or a library's and keeps its traceback (exit 1)."""


class UsageError(ValueError):
    """Input that cannot be used as given; the message names the option, file, line or field."""


def first_line(e: Exception) -> str:
    """The first non-empty line of an exception's message (its type's name if there is none)."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
