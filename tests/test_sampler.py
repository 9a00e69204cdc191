"""PK sampler: batch composition, determinism, exact mid-epoch resume, DDP ranks."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from jaguar_kit.data.sampler import PKSampler
from jaguar_kit.errors import JaguarKitError


def _labels() -> list[str]:
    sizes = {"a": 2, "b": 3, "c": 8, "d": 20, "e": 5, "f": 11, "g": 4, "h": 9, "i": 6, "j": 40}
    labels = [name for name, n in sizes.items() for _ in range(n)]
    return list(np.random.default_rng(0).permutation(labels))


def test_batch_composition() -> None:
    labels = _labels()
    s = PKSampler(labels, p=4, k=4, seed=1)
    batches = s.batches(0)
    assert len(batches) == len(s) == len(labels) // 16
    for batch in batches:
        assert len(batch) == 16
        counts = Counter(labels[i] for i in batch)
        assert len(counts) == 4 and set(counts.values()) == {4}
        for name in counts:  # no repeats when an identity has >= k images
            idx = [i for i in batch if labels[i] == name]
            if labels.count(name) >= 4:
                assert len(set(idx)) == 4


def test_small_identity_sampled_with_replacement() -> None:
    labels = ["a", "a", "b", "b", "b", "b", "b"]
    s = PKSampler(labels, p=2, k=4, seed=0, steps_per_epoch=3)
    for batch in s.batches(0):
        a_idx = [i for i in batch if labels[i] == "a"]
        assert len(a_idx) == 4 and set(a_idx) == {0, 1}  # both images, then repeats


def test_fewer_identities_than_p_uses_all() -> None:
    labels = ["a"] * 5 + ["b"] * 5
    for batch in PKSampler(labels, p=8, k=2, steps_per_epoch=4).batches(0):
        assert sorted(Counter(labels[i] for i in batch).values()) == [2, 2]


def test_identities_visited_evenly() -> None:
    labels = _labels()
    s = PKSampler(labels, p=3, k=2, seed=5, steps_per_epoch=23)
    visits = Counter(labels[i] for batch in s.batches(2) for i in batch[::2])
    assert len(visits) == 10 and max(visits.values()) - min(visits.values()) <= 1


def test_deterministic_per_seed_and_epoch() -> None:
    labels = _labels()
    a = PKSampler(labels, 4, 4, seed=3)
    b = PKSampler(labels, 4, 4, seed=3)
    assert a.batches(1) == b.batches(1)
    assert a.batches(1) != a.batches(2)
    assert a.batches(1) != PKSampler(labels, 4, 4, seed=4).batches(1)


@pytest.mark.parametrize("start", [0, 1, 3, 6])
def test_mid_epoch_resume_equals_uninterrupted(start: int) -> None:
    labels = _labels()
    uninterrupted = list(PKSampler(labels, 3, 4, seed=9, steps_per_epoch=6).iter_epoch(4))
    resumed_sampler = PKSampler(labels, 3, 4, seed=9, steps_per_epoch=6)  # a fresh process
    resumed = list(resumed_sampler.iter_epoch(4, start_batch=start))
    assert resumed == uninterrupted[start:]
    resumed_sampler.set_epoch(4, start)  # DataLoader(batch_sampler=...) path
    assert list(resumed_sampler) == uninterrupted[start:]


def test_ranks_differ_with_same_length() -> None:
    labels = _labels()
    r0 = PKSampler(labels, 4, 2, seed=1, rank=0, world_size=2)
    r1 = PKSampler(labels, 4, 2, seed=1, rank=1, world_size=2)
    assert len(r0) == len(r1) == len(labels) // (4 * 2 * 2)
    assert r0.batches(0) != r1.batches(0)
    assert len(PKSampler(labels, 4, 2)) == len(labels) // (4 * 2)  # one rank: twice the steps


def test_bad_arguments() -> None:
    with pytest.raises(JaguarKitError):
        PKSampler(["a"], p=0, k=2)
    with pytest.raises(JaguarKitError):
        PKSampler(["a"], p=1, k=2, rank=2, world_size=2)
    with pytest.raises(JaguarKitError):
        list(PKSampler(["a", "b"], 1, 1, steps_per_epoch=2).iter_epoch(0, start_batch=3))
