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


class OutputExistsError(ConfigError):
    """An output would replace files gpo-trl did not write (or a file stands where a folder goes): names them."""


class MissingInputError(ConfigError):
    """A path or model named by the user does not exist (a prompts file, a model, a reward model, a base)."""


class BaseMismatchError(ConfigError):
    """`gpo-trl merge`: the base model is not the one the adapter was trained on (shape or identity)."""
