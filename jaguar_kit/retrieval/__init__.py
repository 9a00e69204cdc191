"""Retrieval post-processing: the steps from embeddings to the similarity a submission is made of.

- :mod:`.step`: what a step is (parameters, search space, apply/fit) and the state it transforms;
- :mod:`.similarity`, :mod:`.query_expansion`, :mod:`.rerank`, :mod:`.verify`: the steps;
- :mod:`.fusion`: the calibrated fusion local verification uses (fitted by :mod:`jaguar_kit.logistic`);
- :mod:`.pipeline`: the steps in order, built from the config; :mod:`.search`: how ``tune``
  scores every setting of the steps' search spaces.
"""

from .fusion import Calibration, ShortlistScores, calibration_quality, fit_calibration, fuse_shortlist
from .pipeline import STEPS, Pipeline, final_similarity
from .query_expansion import QueryExpansion, query_expansion
from .rerank import SPARSE_THRESHOLD, KReciprocalRerank, k_reciprocal_rerank
from .similarity import GlobalSimilarity, cosine_similarity
from .step import Context, State, Step
from .verify import LocalVerification, shortlist, verify_shortlist

__all__ = [
    "Calibration", "ShortlistScores", "calibration_quality", "fit_calibration", "fuse_shortlist",
    "STEPS", "Pipeline", "final_similarity", "QueryExpansion", "query_expansion", "SPARSE_THRESHOLD",
    "KReciprocalRerank", "k_reciprocal_rerank", "GlobalSimilarity", "cosine_similarity", "Context", "State", "Step",
    "LocalVerification", "shortlist", "verify_shortlist",
]
