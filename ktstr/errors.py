"""The one exception type users see: a message that says what to do."""

from __future__ import annotations


class KtstrError(Exception):
    """A user-facing error: bad input or an unusable environment.

    The CLI prints the message on one line and exits with status 2; tests
    report it as a failure with the message. The text names what was wrong
    and how to fix it.
    """

    exit_code = 2
