"""The one exception type users see: its message says what went wrong and what to do."""


class SecateurError(Exception):
    """Bad input or an unmet requirement; the CLI prints the message on one line and exits 2."""

    exit_code = 2


class DiskFullError(SecateurError):
    """The disk filled up (ENOSPC) or would: not the user's input, so the CLI exits 1."""

    exit_code = 1
