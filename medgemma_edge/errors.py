"""The one exception type users see: a message that names the file, the problem and the fix."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""

    exit_code = 2


class IntegrityError(UserError):
    """An artifact's bytes differ from what the bundle manifest recorded."""

    exit_code = 3


class PromptTooLong(UserError):
    """The prompt (text and image tokens) does not fit the context: refused before any prefill."""


class AuditError(UserError):
    """The answer was produced but its audit line could not be written: the run is unaudited."""

    exit_code = 5
