"""The errors that `gpo-trl` reports as a one-paragraph message instead of a traceback.

They live here, apart from the modules that raise them, so that the command line can catch them without importing
the training stack (torch, transformers, TRL): `gpo-trl --help` and `gpo-trl losses` answer in a few seconds. This
module imports nothing. The classes that used to live in the modules raising them are still importable from there
(e.g. `gpo_trl.config.CalibrationError`, `gpo_trl.merge.MergeError`): the same class objects.
"""

# --- The input is wrong ----------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A recipe or command-line problem, reported before any model or dataset is loaded."""


class DataError(ValueError):
    """A dataset problem found before training: names the dataset, the row and the column."""


class OutputExistsError(ConfigError):
    """An output would replace files gpo-trl did not write (or a file stands where a folder goes): names them."""


class MissingInputError(ConfigError):
    """A path or model named by the user does not exist (a prompts file, a model, a reward model, a base)."""


class HubAccessError(ConfigError):
    """A model or dataset id that is neither a local path nor reachable on the Hub (or in its cache)."""


class BaseMismatchError(ConfigError):
    """`gpo-trl merge`: the base model is not the one the adapter was trained on (shape or identity)."""


class CalibrationError(ValueError):
    """`beta_calibration` cannot be applied: the loss or the reference has c_f = 0 (hinge), so there is no
    curvature-based offline regulariser to match. A ValueError, so callers that catch those still do."""


class RewardError(ValueError):
    """A reward function that cannot be used: it raised, or returned a non-number, NaN or inf."""


# --- The work failed or stopped -------------------------------------------------------------------------------------


class JudgeError(RuntimeError):
    """A judge failed on a sample: names the prompt index and the sample."""


class NonFiniteError(FloatingPointError):
    """The loss or the gradients became NaN or inf; raised before the optimizer step that would apply them."""


class MergeError(RuntimeError):
    """The merged model failed its check, so nothing was written."""


class PushError(RuntimeError):
    """A push to the Hub failed; the local output is intact."""


class Interrupted(RuntimeError):
    """SIGTERM/SIGINT stopped training after saving a checkpoint; the run is resumable, not finished."""

    def __init__(self, signal: int, step: int, checkpoint: str | None):
        super().__init__(
            f"Training was interrupted by signal {signal} at step {step}; checkpoint saved: {checkpoint}. No final "
            f"model was written. Resume with the same command plus `--resume_from_checkpoint last`."
        )
