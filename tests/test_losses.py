"""ArcFace and batch-hard triplet against plain loop references."""

from __future__ import annotations

import math

import pytest
import torch

from jaguar_kit.config import LossConfig
from jaguar_kit.losses import ArcFaceLoss, BatchHardTripletLoss, ReIDCriterion


def arcface_reference(emb: torch.Tensor, weight: torch.Tensor, labels: list[int], s: float, m: float) -> torch.Tensor:
    """Textbook ArcFace, one sample and one class at a time (float64, acos/cos)."""
    total = emb.new_zeros(())
    for i, y in enumerate(labels):
        e = emb[i] / emb[i].norm()
        logits = []
        for j in range(weight.shape[0]):
            c = torch.dot(e, weight[j] / weight[j].norm())
            if j == y:
                theta = torch.acos(c)
                c = torch.cos(theta + m) if float(theta.detach()) + m <= math.pi else c - m * math.sin(m)
            logits.append(s * c)
        z = torch.stack(logits)
        total = total - (z[y] - torch.logsumexp(z, 0))
    return total / len(labels)


def triplet_reference(emb: torch.Tensor, labels: list[int], margin: float) -> torch.Tensor:
    """Batch-hard triplet with explicit loops; anchors lacking a positive or negative skipped."""
    losses = []
    n = len(labels)
    for a in range(n):
        pos = [(emb[a] - emb[p]).norm() for p in range(n) if p != a and labels[p] == labels[a]]
        neg = [(emb[a] - emb[q]).norm() for q in range(n) if labels[q] != labels[a]]
        if not pos or not neg:
            continue
        diff = torch.stack(pos).max() - torch.stack(neg).min()
        losses.append(torch.nn.functional.softplus(diff) if margin == 0 else torch.relu(diff + margin))
    return torch.stack(losses).mean()


def _arc_inputs():
    torch.manual_seed(0)
    loss = ArcFaceLoss(embedding_dim=8, num_classes=5, scale=30.0, margin=0.5).double()
    emb = torch.randn(7, 8, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 1, 2])
    # Sample 6 points almost opposite its class centre: theta + m > pi, the fallback branch.
    emb[6] = -loss.weight.detach()[2] + 0.05 * torch.randn(8, dtype=torch.float64)
    return loss, emb, labels


def test_arcface_matches_reference_loss_and_gradients() -> None:
    loss, emb, labels = _arc_inputs()
    w = loss.weight
    cos6 = torch.nn.functional.cosine_similarity(emb[6], w[2].detach(), dim=0)
    assert math.acos(float(cos6)) + 0.5 > math.pi  # the fallback branch is exercised

    e1 = emb.clone().requires_grad_(True)
    out = loss(e1, labels)
    out.backward()
    e2 = emb.clone().requires_grad_(True)
    w2 = w.detach().clone().requires_grad_(True)
    ref = arcface_reference(e2, w2, labels.tolist(), 30.0, 0.5)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(e1.grad, e2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


def test_arcface_gradcheck() -> None:
    loss, emb, labels = _arc_inputs()
    e = emb[:6].clone().requires_grad_(True)
    # gradcheck perturbs its inputs in place, so the module's own weight can be one of them.
    assert torch.autograd.gradcheck(lambda x, w: loss(x, labels[:6]), (e, loss.weight))


def test_arcface_is_float32_under_bf16_autocast() -> None:
    torch.manual_seed(1)
    loss = ArcFaceLoss(16, 6)
    emb = torch.randn(8, 16).to(torch.bfloat16)
    labels = torch.randint(0, 6, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = loss.logits(emb, labels)
        out = loss(emb, labels)
    assert logits.dtype == torch.float32 and out.dtype == torch.float32
    # Exactly the float32 computation on the (bf16-rounded) inputs, not a bf16 one.
    torch.testing.assert_close(out, loss(emb.float(), labels), rtol=0, atol=0)
    out.backward()
    assert loss.weight.grad.dtype == torch.float32


def test_arcface_margin_lowers_target_logit() -> None:
    torch.manual_seed(2)
    with_m, without = ArcFaceLoss(8, 4, margin=0.5), ArcFaceLoss(8, 4, margin=0.0)
    without.weight = with_m.weight
    emb, labels = torch.randn(5, 8), torch.tensor([0, 1, 2, 3, 0])
    a, b = with_m.logits(emb, labels), without.logits(emb, labels)
    rows = torch.arange(5)
    assert (a[rows, labels] < b[rows, labels]).all()
    other = torch.ones_like(a, dtype=torch.bool)
    other[rows, labels] = False
    torch.testing.assert_close(a[other], b[other])


@pytest.mark.parametrize("margin", [0.3, 0.0])
def test_triplet_matches_reference_and_ignores_anchors_without_positive(margin: float) -> None:
    torch.manual_seed(3)
    labels = [0, 0, 1, 1, 1, 2, 3]  # identities 2 and 3 have one image: no positive
    emb = torch.nn.functional.normalize(torch.randn(7, 6, dtype=torch.float64), dim=1)
    e1, e2 = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    out = BatchHardTripletLoss(margin)(e1, torch.tensor(labels))
    ref = triplet_reference(e2, labels, margin)
    torch.testing.assert_close(out, ref)
    out.backward()
    ref.backward()
    torch.testing.assert_close(e1.grad, e2.grad)
    # The lone identities still serve as negatives for the other anchors.
    assert out > 0


def test_triplet_with_no_valid_anchor_is_zero_with_grad() -> None:
    loss = BatchHardTripletLoss(0.3)
    for labels in ([0, 1, 2, 3], [5, 5, 5, 5]):  # no positives / no negatives
        emb = torch.randn(4, 3, requires_grad=True)
        out = loss(emb, torch.tensor(labels))
        assert out.item() == 0.0 and out.requires_grad
        out.backward()
        assert torch.equal(emb.grad, torch.zeros_like(emb))


def test_triplet_duplicates_give_finite_gradients() -> None:
    emb = torch.randn(4, 5)
    emb[1] = emb[0]  # an exact duplicate pair (zero distance)
    emb.requires_grad_(True)
    out = BatchHardTripletLoss(0.3)(emb, torch.tensor([0, 0, 1, 1]))
    out.backward()
    assert torch.isfinite(emb.grad).all()


def test_triplet_is_float32_under_autocast() -> None:
    emb = torch.randn(6, 8).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = BatchHardTripletLoss(0.3)(emb, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert out.dtype == torch.float32


def test_criterion_weights_and_parts() -> None:
    torch.manual_seed(4)
    cfg = LossConfig(arcface_weight=0.7, triplet_weight=2.0, triplet_margin=0.2)
    crit = ReIDCriterion(cfg, embedding_dim=8, num_classes=3)
    emb = torch.nn.functional.normalize(torch.randn(6, 8), dim=1).requires_grad_(True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    total, parts = crit(emb, labels)
    assert set(parts) == {"arcface", "triplet"}
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in parts.values())
    torch.testing.assert_close(parts["arcface"], crit.arcface(emb, labels).detach())
    torch.testing.assert_close(parts["triplet"], crit.triplet(emb, labels).detach())
    torch.testing.assert_close(total.detach(), 0.7 * parts["arcface"] + 2.0 * parts["triplet"])
    assert crit.triplet.margin == 0.2 and crit.arcface.weight.shape == (3, 8)
    total.backward()
    assert crit.arcface.weight.grad is not None
