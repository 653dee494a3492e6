"""The errors that `gpo-trl` reports as a one-paragraph message instead of a traceback.

They live here, apart from the modules that raise them, so that the command line can catch them without importing
the training stack (torch, transformers, TRL): `gpo-trl --help` and `gpo-trl losses` answer in a few seconds.
"""


class ConfigError(ValueError):
    """A recipe or command-line problem, reported before any model or dataset is loaded."""


class DataError(ValueError):
    """A dataset problem found before training: names the dataset, the row and the column."""


class JudgeError(RuntimeError):
    """A judge failed on a sample: names the prompt index and the sample."""
