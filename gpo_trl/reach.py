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
import sys
from pathlib import Path

from .errors import HubAccessError
from .inputs import check_data_files

CHECKED_ENV = "GPO_TRL_SOURCES_CHECKED"  # set by `gpo-trl train` once checked, so the launched recipe skips it
_checked: set[tuple[str, str, str | None]] = set()  # (id, kind, revision) found loadable in this process


def check_recipe_sources(script_args, training_args, model_args, dataset_args):
    """Every model and dataset of a parsed recipe is a local path, cached, or reachable; else HubAccessError."""
    if script_args.prepare_demo_assets:  # the demo writes its model and data itself
        return
    models = [(model_args.model_name_or_path, model_args.model_revision)]
    if script_args.ref_model_name_or_path:
        models.append((script_args.ref_model_name_or_path, None))
    for repo_id, revision in models:
        if repo_id:  # no model at all is TRL's error to report
            check_source(repo_id, "model", revision)
    sources = dataset_args.datasets or []
    if not sources and script_args.dataset_name:
        check_source(script_args.dataset_name, "dataset")
    for source in sources:
        check_data_files(source.data_files)
        if source.path and not _is_builder(source.path):
            check_source(source.path, "dataset", source.revision)


def check_model_early(recipe_args: list[str]):
    """The recipe's model, read from `--config` and the overrides without the recipe parser (which imports TRL,
    seconds): an unreachable model then fails in about a second. The full check follows the parse."""
    import yaml

    overrides, position = {}, 0
    while position < len(recipe_args):
        token = recipe_args[position]
        position += 1
        if not token.startswith("--"):
            continue
        name, eq, value = token[2:].partition("=")
        if not eq:  # `--key value`, or a bare `--flag` (true, as HfArgumentParser reads it)
            if position < len(recipe_args) and not recipe_args[position].startswith("--"):
                value, position = recipe_args[position], position + 1
            else:
                value = "true"
        overrides[name.replace("-", "_")] = value
    values = {}
    if overrides.get("config"):
        try:
            values = yaml.safe_load(Path(overrides["config"]).read_text()) or {}
        except (OSError, yaml.YAMLError):
            return  # the recipe parser reports it
    if not isinstance(values, dict):
        return  # the recipe parser reports it
    values.update(overrides)
    if str(values.get("prepare_demo_assets", "")).lower() in ("true", "1", "yes"):
        return
    model = values.get("model_name_or_path")
    if isinstance(model, str) and model:
        revision = values.get("model_revision")
        check_source(model, "model", revision if isinstance(revision, str) else None)


def check_source(repo_id: str, kind: str, revision: str | None = None):
    """`kind` is "model" or "dataset". Returns quietly when `repo_id` can be loaded; raises HubAccessError when not."""
    revision = None if revision == "main" else revision
    if Path(repo_id).expanduser().exists() or (repo_id, kind, revision) in _checked:
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
    cached = _cached(repo_id, kind)
    _probe_or_raise(repo_id, kind, revision, offline, cached)
    _checked.add((repo_id, kind, revision))


def _probe_or_raise(repo_id: str, kind: str, revision: str | None, offline: bool, cached: bool):
    if offline:
        if not cached:
            raise HubAccessError(_message(repo_id, kind, "offline mode is on (HF_HUB_OFFLINE=1"
                                          + (" or HF_DATASETS_OFFLINE=1" if kind == "dataset" else "")
                                          + "), so nothing is downloaded"))
        return
    failure = _probe(repo_id, kind, revision)
    if failure is None:
        return
    no_network, cause = failure
    if not cached:
        raise HubAccessError(_message(repo_id, kind, cause))
    if no_network:
        # transformers and peft would ask the Hub about every cached file, retrying each for ~25 s (measured: a
        # 2-step run of a cached tiny model took 2 min 42 s). The cache is what they would fall back to anyway.
        go_offline()
        print(f"gpo-trl: {cause[0].upper()}{cause[1:]}; using the cached copy of {repo_id!r} (offline mode for "
              "this run; set HF_HUB_OFFLINE=1 to skip this check).", file=sys.stderr)


def go_offline():
    """Offline mode for the rest of this process and its children: what HF_HUB_OFFLINE=1 at start-up would do."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"  # children, and peft, read these
    constants.HF_HUB_OFFLINE = True  # huggingface_hub and transformers read this one
    if "datasets" in sys.modules:
        from datasets import config

        config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = True


def _probe(repo_id: str, kind: str, revision: str | None) -> tuple[bool, str] | None:
    """None when the Hub answers for this repository; else (no network?, the cause in words)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi().repo_info(repo_id, repo_type=kind, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except GatedRepoError:
        return None  # it exists; downloading it needs `hf auth login` and access, which transformers explains
    except RevisionNotFoundError:
        return False, f"the Hub has no revision {revision!r} of it"
    except RepositoryNotFoundError:
        return False, (f"the Hub ({constants.ENDPOINT}) has no {kind} with this id, or it is private (log in with "
                       "`hf auth login`)")
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else "an error"
        return False, f"the Hub ({constants.ENDPOINT}) answered {status}"
    except Exception as err:  # httpx connection errors and timeouts, OSError: no route to the Hub
        return True, (f"there is no network access to the Hub ({constants.ENDPOINT}: {type(err).__name__}: "
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
