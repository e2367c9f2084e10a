"""User-facing errors.

Anything the user can fix (a bad file, a bad option, a checkpoint that does not fit) raises
:class:`DetkdError`; the command line prints its message on one line and exits with status 2,
without a traceback. Bugs stay ordinary exceptions.
"""


class DetkdError(Exception):
    """An error caused by the user's input, reported without a traceback."""


class DataError(DetkdError):
    """A dataset file or entry is missing or malformed."""


class ConfigError(DetkdError):
    """A configuration key or value is unknown or invalid."""


class CheckpointError(DetkdError):
    """A checkpoint is missing, unreadable, unsafe, or does not fit the model."""


class BuildError(DetkdError):
    """A model or teacher/student pair cannot be built as asked."""
