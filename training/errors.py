"""Errors the CLI reports as one line, without a traceback: the user can fix them."""


class UserError(Exception):
    """Something the user asked for or gave us is wrong; the message says what to do."""

    exit_code = 1
