"""Kaggle delivery: environment discovery, kernel/dataset metadata, and kernel pushes.

``env`` and ``metadata`` use the standard library only (a kernel imports them before
anything else is installed); ``push`` needs jupytext and the kaggle CLI, so it is not
imported here.
"""

from .env import default_cache_dir, find_wheel, input_root, install_command, is_kaggle, working_root
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
    "input_root",
    "working_root",
    "default_cache_dir",
    "find_wheel",
    "install_command",
    "kernel_metadata",
    "dataset_metadata",
    "validate_kernel_metadata",
    "validate_dataset_metadata",
    "check_kernel_metadata",
    "check_dataset_metadata",
]
