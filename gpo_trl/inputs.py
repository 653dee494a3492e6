"""Checks of what a user names (models, data files), made before any model loads: one line naming the path or key.

Kept free of torch/transformers imports, so the checks cost nothing before the expensive work they guard.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import MissingInputError


def looks_like_a_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.endswith("/") or name.count("/") > 1 or (
        os.sep != "/" and os.sep in name)


def check_model_source(name: str, key: str, adapter_ok: bool = False, files: tuple[str, ...] = ("config.json",)):
    """`name` must be a model folder (holding one of `files`; with `adapter_ok` also adapter_config.json) or a Hub id
    that can be loaded (offline: one in the local Hub cache). `key` names the setting, e.g. "`model:` in
    generate.yaml"."""
    path = Path(str(name)).expanduser()
    files = files + (("adapter_config.json",) if adapter_ok else ())
    if path.is_dir():
        if any((path / f).is_file() for f in files):
            return
        raise MissingInputError(f"{key}: {name} holds no {' or '.join(files)}: it is not a model folder.")
    if path.exists():
        raise MissingInputError(f"{key}: {name} is a file; a model is a folder or a Hub id (ORG/NAME).")
    if looks_like_a_path(str(name)):
        raise MissingInputError(f"{key}: {name} does not exist.")
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(str(name))
    except HFValidationError:
        raise MissingInputError(f"{key}: {name} is neither an existing folder nor a Hub id (ORG/NAME).") from None
    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(str(name), "config.json"), str):
        raise MissingInputError(f"{key}: {name} is not a local folder, and not in the Hub cache (HF_HUB_OFFLINE is "
                                "set, so it cannot be downloaded). Check the path, or download it first.")


def check_data_files(data_files, key: str = "`data_files`"):
    """Every local file a `data_files` entry names (a string, a list, or {split: either}; URLs and globs are left to
    datasets) must exist and hold something: one line naming it, not datasets' traceback."""
    for name in local_data_files(data_files):
        path = Path(name).expanduser()
        if not path.exists():
            raise MissingInputError(f"{key}: the data file {name} does not exist (relative `data_files` paths "
                                    f"resolve against the working directory, {os.getcwd()}, not against the YAML file).")
        if path.is_file() and _blank(path):
            raise MissingInputError(f"{key}: the data file {name} is empty.")


def local_data_files(data_files) -> list[str]:
    """The paths named in `data_files` that are not URLs or patterns."""
    if data_files is None:
        return []
    values = data_files.values() if isinstance(data_files, dict) else [data_files]
    names = [str(f) for value in values for f in ([value] if isinstance(value, (str, os.PathLike)) else value)]
    return [n for n in names if "://" not in n and not any(c in n for c in "*?[")]


def _blank(path: Path) -> bool:
    """Empty, or only whitespace (read up to 64 KiB: a larger file holds something)."""
    with open(path, "rb") as f:
        head = f.read(65536)
    return len(head) < 65536 and not head.strip()
