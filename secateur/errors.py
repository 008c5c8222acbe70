"""The one exception type users see: its message says what went wrong and what to do."""


class SecateurError(Exception):
    """Bad input or an unmet requirement; the CLI prints the message on one line and exits 2."""
