"""Kaggle delivery: environment discovery, kernel/dataset metadata, and kernel pushes.

``env`` and ``metadata`` use the standard library only (a kernel imports them right after
installing the wheel); ``push`` needs jupytext and the kaggle CLI, so it is not imported here.
"""

from .env import (
    default_cache_dir,
    default_prepared_root,
    find_files,
    find_folders,
    input_roots,
    internet_on,
    is_kaggle,
    walk_inputs,
    working_root,
)
from .metadata import (
    check_dataset_metadata,
    check_kernel_metadata,
    dataset_metadata,
    kernel_metadata,
    validate_dataset_metadata,
    validate_kernel_metadata,
)

__all__ = [
    "is_kaggle",
    "input_roots",
    "working_root",
    "default_cache_dir",
    "default_prepared_root",
    "internet_on",
    "walk_inputs",
    "find_folders",
    "find_files",
    "kernel_metadata",
    "dataset_metadata",
    "validate_kernel_metadata",
    "validate_dataset_metadata",
    "check_kernel_metadata",
    "check_dataset_metadata",
]
