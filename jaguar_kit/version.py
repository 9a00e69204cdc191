"""The package's version, in a module of its own: modules that record it import nothing else."""

__version__ = "0.2.0"
