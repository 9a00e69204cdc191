"""Retrieval: re-ranking equals the paper's loop code, QE and ensembles behave as documented."""

from __future__ import annotations

import numpy as np
import pytest

from jaguar_kit.config import RetrievalConfig
from jaguar_kit.errors import JaguarKitError
from jaguar_kit.metrics import identity_balanced_map
from jaguar_kit.retrieval import cosine_similarity, final_similarity, k_reciprocal_rerank, query_expansion


def loop_rerank(sim: np.ndarray, k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> np.ndarray:
    """Zhong et al.'s public re_ranking code, single-set (query = gallery = all N images).

    Line for line the common implementation with all_num = query_num = N, on the
    squared Euclidean distance of unit vectors (2 - 2 cos); argsort made stable so ties
    are well defined; the result symmetrised.
    """
    original_dist = (2.0 - 2.0 * sim).astype(np.float32)
    original_dist = np.transpose(1.0 * original_dist / np.max(original_dist, axis=0))
    V = np.zeros_like(original_dist).astype(np.float32)
    initial_rank = np.argsort(original_dist, kind="stable").astype(np.int32)
    all_num = original_dist.shape[0]
    for i in range(all_num):
        forward_k_neigh_index = initial_rank[i, : k1 + 1]
        backward_k_neigh_index = initial_rank[forward_k_neigh_index, : k1 + 1]
        fi = np.where(backward_k_neigh_index == i)[0]
        k_reciprocal_index = forward_k_neigh_index[fi]
        k_reciprocal_expansion_index = k_reciprocal_index
        for j in range(len(k_reciprocal_index)):
            candidate = k_reciprocal_index[j]
            half = int(np.around(k1 / 2.0)) + 1
            candidate_forward_k_neigh_index = initial_rank[candidate, :half]
            candidate_backward_k_neigh_index = initial_rank[candidate_forward_k_neigh_index, :half]
            fi_candidate = np.where(candidate_backward_k_neigh_index == candidate)[0]
            candidate_k_reciprocal_index = candidate_forward_k_neigh_index[fi_candidate]
            if len(np.intersect1d(candidate_k_reciprocal_index, k_reciprocal_index)) > 2.0 / 3 * len(
                candidate_k_reciprocal_index
            ):
                k_reciprocal_expansion_index = np.append(k_reciprocal_expansion_index, candidate_k_reciprocal_index)
        k_reciprocal_expansion_index = np.unique(k_reciprocal_expansion_index)
        weight = np.exp(-original_dist[i, k_reciprocal_expansion_index])
        V[i, k_reciprocal_expansion_index] = 1.0 * weight / np.sum(weight)
    if k2 != 1:
        V_qe = np.zeros_like(V, dtype=np.float32)
        for i in range(all_num):
            V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe
    invIndex = [np.where(V[:, i] != 0)[0] for i in range(all_num)]
    jaccard_dist = np.zeros_like(original_dist, dtype=np.float32)
    for i in range(all_num):
        temp_min = np.zeros(shape=[1, all_num], dtype=np.float32)
        indNonZero = np.where(V[i, :] != 0)[0]
        indImages = [invIndex[ind] for ind in indNonZero]
        for j in range(len(indNonZero)):
            temp_min[0, indImages[j]] = temp_min[0, indImages[j]] + np.minimum(
                V[i, indNonZero[j]], V[indImages[j], indNonZero[j]]
            )
        jaccard_dist[i] = 1 - temp_min / (2.0 - temp_min)
    final_dist = jaccard_dist * (1 - lambda_value) + original_dist * lambda_value
    return (final_dist + final_dist.T) / 2


def clustered(n: int, n_ids: int, dim: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, dim))
    labels = rng.integers(0, n_ids, n)
    emb = centres[labels] + noise * rng.normal(size=(n, dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb.astype(np.float32), labels


@pytest.mark.parametrize(
    "seed, n, k1, k2, lam",
    [(0, 20, 20, 6, 0.3), (1, 37, 20, 6, 0.3), (2, 60, 20, 6, 0.3), (3, 45, 7, 3, 0.5), (4, 50, 5, 1, 0.0),
     (5, 30, 10, 6, 1.0), (6, 60, 13, 2, 0.2), (7, 25, 4, 4, 0.3), (8, 12, 21, 15, 0.3)],
)
def test_rerank_equals_loop_reference(seed, n, k1, k2, lam):
    emb, _ = clustered(n, max(2, n // 8), 16, 0.6, seed)
    sim = cosine_similarity(emb)
    want = loop_rerank(sim, k1=k1, k2=k2, lambda_value=lam)
    for sparse in (False, True):
        got = k_reciprocal_rerank(sim, k1=k1, k2=k2, lambda_value=lam, sparse=sparse, chunk_size=7)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # From embeddings rather than the similarity matrix: same answer.
    got = k_reciprocal_rerank(emb, k1=k1, k2=k2, lambda_value=lam, is_similarity=False)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_rerank_is_symmetric_and_in_unit_range():
    emb, _ = clustered(50, 6, 8, 0.8, 11)
    d = k_reciprocal_rerank(emb)
    np.testing.assert_array_equal(d, d.T)
    assert d.min() >= -1e-6 and d.max() <= 1 + 1e-6


def test_sparse_form_equals_dense_form_on_moderate_n():
    emb, _ = clustered(900, 40, 32, 0.9, 3)
    dense = k_reciprocal_rerank(emb, sparse=False)
    sparse = k_reciprocal_rerank(emb, sparse=True, chunk_size=200)
    np.testing.assert_allclose(sparse, dense, atol=1e-5, rtol=0)


def test_rerank_raises_map_with_reciprocal_structure():
    # Tight identities in an anisotropic space plus "hub" images near everything: the
    # raw cosine ranking is polluted by hubs, reciprocal neighbourhoods are not.
    rng = np.random.default_rng(5)
    n_ids, per, dim = 12, 10, 24
    centres = rng.normal(size=(n_ids, dim))
    labels = np.repeat(np.arange(n_ids), per)
    emb = centres[labels] + 1.3 * rng.normal(size=(n_ids * per, dim))
    hub_dir = rng.normal(size=dim)
    hubs = rng.choice(len(emb), 25, replace=False)
    emb[hubs] = emb[hubs] * 0.3 + 3.0 * hub_dir  # pulled toward one common direction
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    before = identity_balanced_map(cosine_similarity(emb), labels).map
    after = identity_balanced_map(1 - k_reciprocal_rerank(emb), labels).map
    assert after > before + 0.02, (before, after)


def test_query_expansion_unit_norm_and_k0_identity():
    emb, _ = clustered(40, 5, 16, 0.5, 2)
    np.testing.assert_allclose(query_expansion(emb, k=0, alpha=3.0), emb, atol=1e-6)
    qe = query_expansion(emb, k=3, alpha=3.0)
    np.testing.assert_allclose(np.linalg.norm(qe, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(qe, emb)


def test_query_expansion_matches_definition():
    emb, _ = clustered(30, 4, 8, 0.7, 9)
    k, alpha = 3, 2.5
    got = query_expansion(emb, k=k, alpha=alpha)
    sim = emb @ emb.T
    for i in range(len(emb)):
        others = sorted((j for j in range(len(emb)) if j != i), key=lambda j: -sim[i, j])[:k]
        v = emb[i] + sum(max(sim[i, j], 0) ** alpha * emb[j] for j in others)
        np.testing.assert_allclose(got[i], v / np.linalg.norm(v), atol=1e-5)


def test_query_expansion_reduces_within_identity_spread():
    emb, labels = clustered(120, 6, 16, 1.0, 4)
    before = identity_balanced_map(cosine_similarity(emb), labels).map
    after = identity_balanced_map(cosine_similarity(query_expansion(emb, 3, 3.0)), labels).map
    assert after >= before


def test_cosine_similarity_symmetric_and_diagonal_one():
    emb, _ = clustered(30, 3, 8, 0.5, 1)
    s = cosine_similarity(emb * 3.0)  # scale does not matter
    np.testing.assert_array_equal(s, s.T)
    np.testing.assert_allclose(np.diag(s), 1.0, atol=1e-6)


def test_ensemble_of_identical_models_equals_one_model():
    emb, _ = clustered(40, 5, 16, 0.6, 6)
    for cfg in (RetrievalConfig(rerank=False), RetrievalConfig(rerank=True, query_expansion_k=2, rerank_blend=0.5)):
        one = final_similarity([emb], cfg)
        three = final_similarity([emb, emb.copy(), emb.copy()], cfg)
        np.testing.assert_allclose(three, one, atol=1e-6)


def test_final_similarity_pipeline_matches_parts():
    emb_a, _ = clustered(40, 5, 16, 0.6, 7)
    emb_b, _ = clustered(40, 5, 16, 0.6, 8)
    cfg = RetrievalConfig(rerank=True, k1=10, k2=3, lambda_value=0.3, rerank_blend=0.4)
    avg = (cosine_similarity(emb_a) + cosine_similarity(emb_b)) / 2
    want = 0.6 * avg + 0.4 * (1 - loop_rerank(avg, 10, 3, 0.3))
    got = final_similarity([emb_a, emb_b], cfg)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(got, got.T, atol=1e-7)
    plain = final_similarity([emb_a, emb_b], RetrievalConfig(rerank=False))
    np.testing.assert_allclose(plain, avg, atol=1e-6)


def test_bad_inputs_are_one_line_errors():
    emb, _ = clustered(10, 2, 4, 0.5, 0)
    bad = emb.copy()
    bad[3, 1] = np.nan
    with pytest.raises(JaguarKitError, match="row 3"):
        cosine_similarity(bad)
    with pytest.raises(JaguarKitError, match="model 1 has 9"):
        final_similarity([emb, emb[:9]], RetrievalConfig())
    with pytest.raises(JaguarKitError, match="lambda"):
        k_reciprocal_rerank(emb, lambda_value=2.0)


@pytest.mark.parametrize("max_pairs", [1, 7, 1 << 23])
def test_jaccard_min_sums_equal_brute_force_in_any_batching(max_pairs):
    import torch

    from jaguar_kit.retrieval.rerank import _add_min_sums

    rng = np.random.default_rng(max_pairs)
    v = rng.random((30, 30)).astype(np.float32) * (rng.random((30, 30)) < 0.2)
    v[:, 4] = rng.random(30) + 0.1  # one full column: its pairs get sliced when the budget is small
    want = np.minimum(v[:, None, :], v[None, :, :]).sum(-1)
    r, c = np.nonzero(v)
    out = torch.zeros((30, 30))
    _add_min_sums(torch.from_numpy(r), torch.from_numpy(c), torch.from_numpy(v[r, c]), out, max_pairs=max_pairs)
    np.testing.assert_allclose(out.numpy(), want, atol=1e-5)
