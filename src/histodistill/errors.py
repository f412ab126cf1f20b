"""The one error type users see: a message that names the file and the fix.

Anything raised as `UserError` is printed by the CLI as ``error: <message>`` with exit code 2,
without a traceback. Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input or environment that the user can fix (unreadable slide, missing mpp, bad config)."""
