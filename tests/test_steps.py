"""Post-processing as steps: a step defined here, in this file only, runs in the pipeline and is tuned.

Nothing else in the kit knows about ``Centering``: the pipeline applies it, ``tune`` reads its
search space from the class and scores it through the same steps a submission runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest

from jaguar_kit.config import RetrievalConfig
from jaguar_kit.errors import JaguarKitError
from jaguar_kit.metrics import identity_balanced_map
from jaguar_kit.pipeline import Embeddings
from jaguar_kit.retrieval import STEPS, GlobalSimilarity, Pipeline, Step, cosine_similarity, final_similarity
from jaguar_kit.retrieval.step import State
from jaguar_kit.tune import TuneGrid, tune

SMALL = TuneGrid(query_expansion_k=(0, 2), k1=(4, 8), k2=(1, 3), lambda_value=(0.3,), rerank_blend=(0.5, 1.0))


@dataclass(frozen=True)
class Centering(Step):
    """Subtract each model's mean vector before the similarity (removes a direction all images share)."""

    center: bool = False

    name = "centering"
    space = {"center": (False, True)}

    @property
    def active(self) -> bool:
        return self.center

    def off(self) -> "Centering":
        return self.with_settings(center=False)

    def apply(self, state: State) -> State:
        return state.then(embeddings=[e - e.mean(0) for e in state.embeddings])


def offset_embeddings(n_ids=12, per_id=5, dim=16, seed=0):
    """Identity clusters riding on a large shared offset: cosine is blunted until it is removed."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_ids, dim))
    y = np.repeat([f"id{i:02d}" for i in range(n_ids)], per_id)
    vecs = 6.0 + centers[np.repeat(np.arange(n_ids), per_id)] + 0.8 * rng.normal(size=(len(y), dim))
    names = [f"img_{i:03d}.png" for i in range(len(y))]
    return names, vecs.astype(np.float32), dict(zip(names, y))


def steps_with_centering(cfg: RetrievalConfig) -> list[Step]:
    return [Centering(), *Pipeline.from_config(cfg).steps]


def test_a_new_step_runs_in_the_pipeline():
    names, vecs, labels = offset_embeddings()
    steps = steps_with_centering(RetrievalConfig(rerank=False))
    plain = Pipeline(tuple(steps)).run([vecs])
    centred = Pipeline((steps[0].with_settings(center=True), *steps[1:])).run([vecs])
    np.testing.assert_allclose(plain, cosine_similarity(vecs), atol=1e-6)  # off: skipped
    np.testing.assert_allclose(centred, cosine_similarity(vecs - vecs.mean(0)), atol=1e-6)
    y = [labels[n] for n in names]
    assert identity_balanced_map(centred, y).map > identity_balanced_map(plain, y).map + 0.03


def test_a_new_step_is_tuned_from_its_own_search_space_and_scored_through_the_pipeline():
    names, vecs, labels = offset_embeddings()
    base = RetrievalConfig(k1=7)
    # Centering alone before the similarity: with QE and re-ranking searched too, they recover most of what
    # it gives, and tune then keeps the simpler choice (its held-out gain does not clear the noise).
    result = tune({"none": [Embeddings(names, vecs)]}, labels, base, progress=False,
                  steps=[Centering(), GlobalSimilarity.from_config(base)])
    assert result.steps[0] == Centering(center=True)  # chosen: it helps on these embeddings, held out too
    assert result.decisions["centering"]["allowed"]
    assert set(result.table["center"]) == {False, True}  # both of its values were scored
    y = [labels[n] for n in names]
    again = identity_balanced_map(Pipeline(result.steps).run([vecs]), y).map
    assert again == pytest.approx(result.table["map"].max(), abs=1e-9)  # the pipeline sees what tune saw
    assert dataclasses.asdict(result.retrieval).keys() == dataclasses.asdict(base).keys()  # config keys stable
    # The grid can narrow the new step's space like any other's.
    fixed = tune({"none": [Embeddings(names, vecs)]}, labels, base, grid=TuneGrid(center=(False,), k1=(4,)),
                 progress=False, steps=steps_with_centering(base))
    assert fixed.steps[0] == Centering(center=False) and set(fixed.table["center"]) == {False}


def test_every_retrieval_setting_belongs_to_exactly_one_step_and_round_trips():
    owners = [f.name for t in STEPS for f in dataclasses.fields(t)]
    assert sorted(owners) == sorted(f.name for f in dataclasses.fields(RetrievalConfig))
    cfg = RetrievalConfig(query_expansion_k=2, k1=7, rerank_blend=0.5, local_verify=True, local_k=9, fusion_bias=-1.0)
    assert Pipeline.from_config(cfg).to_config(RetrievalConfig()) == cfg


def test_final_similarity_is_the_pipeline_without_image_steps():
    _, vecs, _ = offset_embeddings(seed=3)
    cfg = RetrievalConfig(query_expansion_k=2, k1=6, k2=3, rerank_blend=0.5, local_verify=True)
    np.testing.assert_array_equal(final_similarity([vecs], cfg),
                                  Pipeline.from_config(dataclasses.replace(cfg, local_verify=False)).run([vecs]))


def test_a_grid_naming_no_step_is_refused():
    names, vecs, labels = offset_embeddings()
    with pytest.raises(JaguarKitError, match="no retrieval step has a setting 'k3'"):
        tune({"none": [Embeddings(names, vecs)]}, labels, grid=TuneGrid(k3=(1, 2)), progress=False)
