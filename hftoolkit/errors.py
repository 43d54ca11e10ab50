"""The one exception type users see as a one-line `error: ...` (the CLI prints it; no traceback unless --debug)."""


class UserError(Exception):
    """Bad input from the user: the message names the key/file/row and the fix, on one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
