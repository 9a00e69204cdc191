"""Kaggle delivery: environment discovery, kernel/dataset metadata, and kernel pushes.

``env`` and ``metadata`` use the standard library only (a kernel imports them right after
installing the wheel); ``push`` needs jupytext and the kaggle CLI, so it is not imported here.
The names below load their module on first use (as ``jaguar_kit`` and ``jaguar_kit.models``
do): importing ``kaggle.env`` (which ``files`` does for its advice) then never imports
``metadata``, which writes through ``files``, so the two never import each other.
"""

from ..lazy import lazy_exports

_HOME = {  # public name -> the module that defines it
    "is_kaggle": "env",
    "input_roots": "env",
    "working_root": "env",
    "default_cache_dir": "env",
    "default_prepared_root": "env",
    "internet_on": "env",
    "walk_inputs": "env",
    "find_folders": "env",
    "find_files": "env",
    "kernel_metadata": "metadata",
    "dataset_metadata": "metadata",
    "validate_kernel_metadata": "metadata",
    "validate_dataset_metadata": "metadata",
    "check_kernel_metadata": "metadata",
    "check_dataset_metadata": "metadata",
}

__all__ = list(_HOME)


__getattr__, __dir__ = lazy_exports(__name__, _HOME)
