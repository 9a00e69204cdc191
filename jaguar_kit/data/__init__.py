"""Data stages: competition CSVs, image decoding with the alpha mask, the prepared-image
cache, folds, the PK sampler and a synthetic dataset.

Import the sub-modules directly (``from jaguar_kit.data.competition import load_competition``);
this package imports nothing, so ``import jaguar_kit`` stays cheap.
"""
