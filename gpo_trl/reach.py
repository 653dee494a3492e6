"""Can the recipe's models and datasets be reached? Answered before anything heavy loads.

Without this, a Hub id on a machine without Hub access retried for 46 s and ended in a 91-line traceback (or, with
HF_HUB_OFFLINE=1, 104 lines that never named the model). `check_recipe_sources` looks at every model and dataset the
recipe names: a local path is used as is; a Hub id must be in the local cache when offline mode is on, and otherwise
answer one short request (`HF_HUB_ETAG_TIMEOUT`, 10 s by default). A failure is one HubAccessError naming the id,
the cause (offline mode, or no network, or no such repository) and how to use a local copy.

Relative paths (`model_name_or_path`, `dataset_name`, `data_files`, `path`) resolve against the working directory,
as in transformers and datasets; only the `base:` of a sweep or iterate file is relative to that file.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError, DataError

CHECKED_ENV = "GPO_TRL_SOURCES_CHECKED"  # set by `gpo-trl train` once checked, so the launched recipe skips it


class HubAccessError(ConfigError):
    """A model or dataset id that is neither a local path nor reachable on the Hub (or in its cache)."""


def check_recipe_sources(script_args, training_args, model_args, dataset_args):
    """Every model and dataset of a parsed recipe is a local path, cached, or reachable; else HubAccessError."""
    if script_args.prepare_demo_assets:  # the demo writes its model and data itself
        return
    models = [(model_args.model_name_or_path, model_args.model_revision)]
    if script_args.ref_model_name_or_path:
        models.append((script_args.ref_model_name_or_path, None))
    for repo_id, revision in models:
        check_source(repo_id, "model", revision)
    sources = dataset_args.datasets or []
    if not sources and script_args.dataset_name:
        check_source(script_args.dataset_name, "dataset")
    for source in sources:
        check_data_files(source.data_files)
        if source.path and not _is_builder(source.path):
            check_source(source.path, "dataset", source.revision)


def check_data_files(data_files):
    """A local `data_files` entry that does not exist is named, with the directory it was looked for in."""
    if data_files is None:
        return
    values = data_files.values() if isinstance(data_files, dict) else (
        [data_files] if isinstance(data_files, str) else data_files)
    for value in values:
        for name in [value] if isinstance(value, str) else value:
            if "://" in name or any(c in name for c in "*?[") or Path(name).exists():
                continue
            raise DataError(f"Data file {name!r} does not exist (relative `data_files` paths resolve against the "
                            f"working directory, {os.getcwd()}, not against the YAML file).")


def check_source(repo_id: str, kind: str, revision: str | None = None):
    """`kind` is "model" or "dataset". Returns quietly when `repo_id` can be loaded; raises HubAccessError when not."""
    if Path(repo_id).expanduser().exists():
        return
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise HubAccessError(f"{kind.capitalize()} {repo_id!r} is neither an existing path (relative paths resolve "
                             f"against the working directory, {os.getcwd()}) nor a valid Hub id.") from None
    offline = constants.HF_HUB_OFFLINE or (kind == "dataset" and _datasets_offline())
    if _cached(repo_id, kind):
        return
    if offline:
        raise HubAccessError(_message(repo_id, kind, "offline mode is on (HF_HUB_OFFLINE=1"
                                      + (" or HF_DATASETS_OFFLINE=1" if kind == "dataset" else "")
                                      + "), so nothing is downloaded"))
    cause = _probe(repo_id, kind, revision)
    if cause:
        raise HubAccessError(_message(repo_id, kind, cause))


def _probe(repo_id: str, kind: str, revision: str | None) -> str | None:
    """None when the Hub answers for this repository; else the cause, in words."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi().repo_info(repo_id, repo_type=kind, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except GatedRepoError:
        return None  # it exists; downloading it needs `hf auth login` and access, which transformers explains
    except RevisionNotFoundError:
        return f"the Hub has no revision {revision!r} of it"
    except RepositoryNotFoundError:
        return (f"the Hub ({constants.ENDPOINT}) has no {kind} with this id, or it is private (log in with "
                "`hf auth login`)")
    except HfHubHTTPError as err:
        return f"the Hub ({constants.ENDPOINT}) answered {err.response.status_code if err.response else 'an error'}"
    except Exception as err:  # httpx/requests connection errors and timeouts, OSError: no route to the Hub
        return (f"there is no network access to the Hub ({constants.ENDPOINT}: {type(err).__name__}: "
                f"{str(err)[:120] or 'no answer'})")
    return None


def _message(repo_id: str, kind: str, cause: str) -> str:
    key = "model_name_or_path" if kind == "model" else "dataset_name (or a `datasets:` source's path)"
    cache = "HF_HOME/hub, default ~/.cache/huggingface/hub" + (
        "; and the datasets cache, HF_DATASETS_CACHE, default ~/.cache/huggingface/datasets" if kind == "dataset"
        else "")
    flag = " --repo-type dataset" if kind == "dataset" else ""
    return (f"{kind.capitalize()} {repo_id!r} cannot be loaded: it is neither a local path nor in the local Hugging "
            f"Face cache, and {cause}.\n"
            f"To use a local copy: on a machine with Hub access run `hf download {repo_id}{flag} --local-dir DIR`, "
            f"copy DIR here and set `{key}: DIR`; or copy the Hugging Face cache ({cache}) here and run with "
            "HF_HUB_OFFLINE=1.")


def _cached(repo_id: str, kind: str) -> bool:
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"{kind}s--{repo_id.replace('/', '--')}" / "snapshots"
    if snapshots.is_dir() and any(snapshots.iterdir()):
        return True
    if kind == "dataset":  # prepared by datasets itself (org___name), usable offline
        from datasets import config

        return (Path(config.HF_DATASETS_CACHE) / repo_id.replace("/", "___")).is_dir()
    return False


def _datasets_offline() -> bool:
    from datasets import config

    return bool(config.HF_HUB_OFFLINE)


def _is_builder(path: str) -> bool:
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    return path in _PACKAGED_DATASETS_MODULES
