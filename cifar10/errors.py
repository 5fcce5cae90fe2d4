"""Errors the CLI reports as one line, without a traceback: the user can fix them."""


class UserError(Exception):
    """Something the user asked for or gave us is wrong; the message says what to do."""

    exit_code = 1


class Interrupted(UserError):
    """Ctrl-C: the work done so far was saved and can be resumed."""

    exit_code = 130  # the shell's convention for SIGINT
