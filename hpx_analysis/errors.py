"""User-facing errors: each carries a one-line message that the CLI prints without a traceback."""


class HpxError(Exception):
    """An error caused by the user's input (model name, checkpoint, options, data)."""

    exit_code = 2
