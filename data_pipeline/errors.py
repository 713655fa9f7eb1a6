"""The one error type of the data pipeline, kept apart so every backend module can raise it."""


class DataError(ValueError):
    """The configured data cannot be used; the message names the path or key and what is wrong."""
