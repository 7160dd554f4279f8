"""The one error type gradaudit raises for bad input: its message names the fix."""


class GradAuditError(ValueError):
    """Bad input or an unsupported setup; the message says what to change."""
