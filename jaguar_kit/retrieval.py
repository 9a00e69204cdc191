"""All-vs-all retrieval over one set of embeddings: similarity, query expansion,
k-reciprocal re-ranking and model ensembles.

The competition scores every ordered pair of the 371 test images, so there is one set
of N images that are at once queries and gallery. Everything here takes that single set
(N rows) and returns N x N matrices; the diagonal is meaningless and never scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .config import RetrievalConfig
from .errors import JaguarKitError

# Above this many images k_reciprocal_rerank uses the sparse, chunked form by default.
SPARSE_THRESHOLD = 4096


def _check_embeddings(emb: np.ndarray, what: str = "embeddings") -> np.ndarray:
    e = np.asarray(emb)
    if e.ndim != 2 or e.shape[0] < 2 or e.shape[1] < 1:
        raise JaguarKitError(f"retrieval: {what} must be an (N, D) array with N >= 2, got shape {e.shape}")
    e = e.astype(np.float32, copy=False)
    bad = np.flatnonzero(~np.isfinite(e).all(axis=1))
    if len(bad):
        raise JaguarKitError(f"retrieval: {what} row {bad[0]} has NaN or inf")
    norms = np.linalg.norm(e, axis=1)
    if (norms == 0).any():
        raise JaguarKitError(f"retrieval: {what} row {int(np.argmax(norms == 0))} is all zeros")
    return e


def _normalise(e: np.ndarray) -> np.ndarray:
    return (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)


def cosine_similarity(emb: np.ndarray) -> np.ndarray:
    """(N, N) float32 cosine similarity of the rows of ``emb`` (re-normalised here).

    Exactly symmetric (computed as ``e @ e.T``, which BLAS evaluates as one symmetric
    product) and clipped to [-1, 1] against rounding.
    """
    e = _normalise(_check_embeddings(emb))
    return np.clip(e @ e.T, -1.0, 1.0)


def query_expansion(emb: np.ndarray, k: int, alpha: float = 3.0) -> np.ndarray:
    """alpha-QE / database-side augmentation on one set of embeddings.

    Each vector is replaced by the mean of itself and its ``k`` most similar other
    vectors, weighted by similarity**alpha (itself: weight 1), and re-normalised.
    Negative similarities are clipped to 0 before the power, so far vectors add nothing.
    ``k=0`` returns the (normalised) input unchanged.
    """
    e = _normalise(_check_embeddings(emb))
    if k < 0:
        raise JaguarKitError(f"retrieval: query expansion k must be >= 0, got {k}")
    n = e.shape[0]
    k = min(int(k), n - 1)
    if k == 0:
        return e
    import torch

    et = torch.from_numpy(e)
    out = torch.empty_like(et)
    block = max(1, 2_000_000 // n)
    for start in range(0, n, block):  # blocks keep memory at block x N
        rows = torch.arange(start, min(n, start + block))
        sim = et[rows] @ et.T
        sim[torch.arange(len(rows)), rows] = -float("inf")  # the vector itself is added below
        top_sim, top_idx = sim.topk(k, dim=1)
        w = top_sim.clamp(min=0).pow(alpha)  # (b, k)
        out[rows] = et[rows] + (w.unsqueeze(-1) * et[top_idx]).sum(1)
    return torch.nn.functional.normalize(out, dim=1).numpy()


# ----------------------------------------------------------------------------------
# k-reciprocal re-ranking (Zhong et al., CVPR 2017), single-set all-vs-all form.
#
# Notation as in the paper's code: O = original distance (squared Euclidean of unit
# vectors, 2 - 2 cos, each row divided by its maximum), R(i) = k1-reciprocal neighbours
# of i, R_h(c) = round(k1/2)-reciprocal neighbours of c. R(i) is expanded with R_h(c) for
# every c in R(i) sharing more than 2/3 of R_h(c) with R(i); V[i] = exp(-O[i, j]) over
# the expanded set, normalised to sum 1; V is averaged over each image's k2 nearest
# (local query expansion); Jaccard distance J[i, j] = 1 - s / (2 - s) with
# s = sum_k min(V[i, k], V[j, k]); result = (1 - lambda) J + lambda O, symmetrised.
#
# Both forms below use top-k neighbour lists for the reciprocal-set logic (N x k1 x k1
# work instead of the reference's per-image Python loops), build V in row blocks, and
# enumerate the pairs sharing a non-zero column of V for the Jaccard sum (what the
# reference's inverted index walks). The dense form holds O and V as N x N matrices;
# the sparse form holds V as (row, column, value) triples and recomputes O in row
# blocks, so besides the N x N result (and an N x N input similarity, if one is given)
# it needs O(N * (k1 + non-zeros per row of V)) memory plus a few (chunk, N) blocks.
# ----------------------------------------------------------------------------------


@dataclass
class _SimSource:
    """Gives blocks of the cosine similarity from embeddings or a given matrix."""

    emb: "object | None" = None  # torch (N, D), unit rows
    sim: "object | None" = None  # torch (N, N)

    @property
    def n(self) -> int:
        return int((self.emb if self.emb is not None else self.sim).shape[0])

    @property
    def device(self):
        return (self.emb if self.emb is not None else self.sim).device

    def columns(self, idx):
        """S[:, idx].T as a (len(idx), N) tensor."""
        if self.emb is not None:
            return self.emb[idx] @ self.emb.T
        return self.sim[:, idx].T


def _v_rows(o_rows, rows, nbr, nbr_h, recip_h_all, count_h):
    """Rows ``rows`` of V as a dense (b, N) block, each row summing to 1.

    ``o_rows``: O[rows] (b, N); ``nbr``/``nbr_h``: (N, k1+1) / (N, round(k1/2)+1)
    nearest lists (self included); ``recip_h_all``: which of ``nbr_h`` are reciprocal;
    ``count_h``: |R_h| per image.
    """
    import torch

    b, n = o_rows.shape
    fwd = nbr[rows]  # (b, K1)
    recip = (nbr[fwd] == rows.view(-1, 1, 1)).any(-1)  # fwd[a] is reciprocal: i in its K1 nearest
    # Hit counts per column: 1 + at most K1 additions, so uint8 unless k1 is huge.
    ctype = torch.uint8 if fwd.shape[1] < 250 else torch.int32
    member = torch.zeros((b, n), dtype=ctype, device=o_rows.device)  # > 0: in the expanded set
    member.scatter_(1, fwd, recip.to(ctype))
    cand = nbr_h[fwd].flatten(1)  # (b, K1 * Kh): R_h candidates of each neighbour
    cand_ok = recip_h_all[fwd].flatten(1)
    inter = (member.gather(1, cand).bool() & cand_ok).view(b, fwd.shape[1], -1).sum(-1)  # |R_h(c) & R(i)|
    # Same float comparison as the reference: len(intersection) > 2/3 * len(R_h(c)).
    grow = recip & (inter.double() > (2.0 / 3.0) * count_h[fwd].double())
    add = (cand_ok.view(b, fwd.shape[1], -1) & grow.unsqueeze(-1)).flatten(1)
    member.scatter_add_(1, cand, add.to(ctype))  # add R_h(c) of every c that passed
    w = torch.where(member > 0, torch.exp(-o_rows), torch.zeros((), dtype=o_rows.dtype, device=o_rows.device))
    return w / w.sum(1, keepdim=True)


def _nearest(o, k: int):
    """Indices of the k smallest entries of each row of ``o``, ascending, ties by index.

    topk then a stable sort of the kept values, much cheaper than a full sort; only
    ties straddling the k-th place may be picked differently from a full stable sort.
    """
    val, idx = o.topk(k, dim=1, largest=False, sorted=False)
    idx, perm = idx.sort(dim=1)
    val = val.gather(1, perm)
    _, perm = val.sort(dim=1, stable=True)
    return idx.gather(1, perm)


def _reciprocal_h(nbr_h, chunk):
    import torch

    n = nbr_h.shape[0]
    out = torch.empty(nbr_h.shape, dtype=torch.bool, device=nbr_h.device)
    for s in range(0, n, chunk):
        rows = torch.arange(s, min(n, s + chunk), device=nbr_h.device)
        out[rows] = (nbr_h[nbr_h[rows]] == rows.view(-1, 1, 1)).any(-1)
    return out


def _add_min_sums(rows, cols, vals, out, max_pairs: int = 1 << 23):
    """out[i, j] += sum_k min(V[i, k], V[j, k]) over V's non-zeros (rows, cols, vals).

    Every pair of entries sharing a column contributes once (the pairs the reference's
    inverted index walks). Columns are grouped by how many entries they hold and each
    group padded to a (columns, m) block, so a group's m x m pairs come from
    broadcasting rather than from per-pair gathers (which are memory-bound on CPU).
    Padding has value 0 and so adds nothing.
    """
    import torch

    n = out.shape[0]
    dev = cols.device
    # int32 flat indices while N * N fits: half the memory traffic of int64.
    itype = torch.int32 if n * n < 2**31 else torch.int64
    order = torch.argsort(cols, stable=True)
    rows, vals = rows[order].to(itype), vals[order]
    counts = torch.bincount(cols, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    by_count = torch.argsort(counts, stable=True)
    sorted_counts = counts[by_count].tolist()
    flat = out.view(-1)
    c = int((counts == 0).sum())  # sorted ascending: skip empty columns
    while c < n:
        lo = sorted_counts[c]
        e = c
        # Grow the group while padding stays under 25% and the pair budget holds.
        while e < n and sorted_counts[e] <= max(lo * 1.25, lo + 2) and (e - c + 1) * sorted_counts[e] ** 2 <= max_pairs:
            e += 1
        e = max(e, c + 1)
        m = sorted_counts[e - 1]
        group = by_count[c:e]
        pos = starts[group].unsqueeze(1) + torch.arange(m, device=dev)  # (g, m)
        used = torch.arange(m, device=dev) < counts[group].unsqueeze(1)
        pos = torch.where(used, pos, torch.zeros_like(pos))
        r = torch.where(used, rows[pos], torch.zeros((), dtype=itype, device=dev))
        v = torch.where(used, vals[pos], torch.zeros((), dtype=vals.dtype, device=dev))
        step = max(1, max_pairs // (len(group) * m))  # a very full column: its pairs in slices
        for a in range(0, m, step):
            idx = (r[:, a : a + step].unsqueeze(2) * n + r.unsqueeze(1)).flatten()
            flat.index_add_(0, idx, torch.minimum(v[:, a : a + step].unsqueeze(2), v.unsqueeze(1)).flatten())
        c = e


def _symmetrise_(d, chunk: int):
    """d <- (d + d.T) / 2 in place, block by block (no N x N temporary)."""
    n = d.shape[0]
    for a in range(0, n, chunk):
        for b in range(a, n, chunk):
            x = d[a : a + chunk, b : b + chunk]
            y = d[b : b + chunk, a : a + chunk]
            m = (x + y.T) * 0.5
            x.copy_(m)
            y.copy_(m.T)


def _rerank_dense(src: _SimSource, k1: int, k2: int, lam: float, chunk: int):
    import torch

    n = src.n
    dev = src.device
    # Reference: O = (d / d.max(axis=0)).T, d the distance of S; rows of O = columns of d.
    d = 2.0 - 2.0 * src.columns(torch.arange(n, device=dev))
    o = d / d.max(dim=1, keepdim=True).values.clamp(min=1e-12)
    del d
    k_h = int(np.around(k1 / 2.0)) + 1  # from k1 as given, like the reference
    rank = _nearest(o, min(n, max(k1 + 1, k2, k_h)))
    nbr, nbr_h = rank[:, : k1 + 1], rank[:, :k_h]  # slicing clamps to N, like the reference
    recip_h = _reciprocal_h(nbr_h, chunk)
    count_h = recip_h.sum(1)
    v = torch.empty((n, n), dtype=torch.float32, device=dev)
    for s in range(0, n, chunk):
        rows = torch.arange(s, min(n, s + chunk), device=dev)
        v[s : s + len(rows)] = _v_rows(o[s : s + len(rows)], rows, nbr, nbr_h, recip_h, count_h)
    if k2 != 1:
        v_qe = torch.zeros_like(v)
        for t in range(k2):  # local query expansion: mean of each image's k2 nearest rows
            v_qe += v.index_select(0, rank[:, t])
        v = v_qe / k2
    r, c = v.nonzero(as_tuple=True)
    vals = v[r, c]
    del v
    s_min = torch.zeros((n, n), dtype=torch.float32, device=dev)
    _add_min_sums(r, c, vals, s_min)
    final = (1.0 - s_min / (2.0 - s_min)) * (1.0 - lam) + o * lam
    _symmetrise_(final, 256)  # blocked: a plain final + final.T walks memory column-wise
    return final


def _rerank_sparse(src: _SimSource, k1: int, k2: int, lam: float, chunk: int):
    import torch

    n = src.n
    dev = src.device
    k_h = int(np.around(k1 / 2.0)) + 1  # from k1 as given, like the reference
    k_keep = min(n, max(k1 + 1, k2, k_h))
    rank = torch.empty((n, k_keep), dtype=torch.int64, device=dev)
    row_max = torch.empty(n, dtype=torch.float32, device=dev)

    def o_block(s: int, e: int):
        return (2.0 - 2.0 * src.columns(torch.arange(s, e, device=dev))) / row_max[s:e].unsqueeze(1)

    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        d = 2.0 - 2.0 * src.columns(torch.arange(s, e, device=dev))
        row_max[s:e] = d.max(dim=1).values.clamp(min=1e-12)
        d /= row_max[s:e].unsqueeze(1)  # = o_block(s, e): the same float values as later passes
        rank[s:e] = _nearest(d, k_keep)
        del d
    nbr, nbr_h = rank[:, : k1 + 1], rank[:, :k_h]
    recip_h = _reciprocal_h(nbr_h, chunk)
    count_h = recip_h.sum(1)
    # V as (row, column, value) triples in row order.
    vr, vc, vv = [], [], []
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        block = _v_rows(o_block(s, e), torch.arange(s, e, device=dev), nbr, nbr_h, recip_h, count_h)
        r, c = block.nonzero(as_tuple=True)
        vr.append(r + s)
        vc.append(c)
        vv.append(block[r, c])
        del block
    vr, vc, vv = torch.cat(vr), torch.cat(vc), torch.cat(vv)
    if k2 != 1:  # local query expansion: row i <- mean of the rows of its k2 nearest
        counts = torch.bincount(vr, minlength=n)
        starts = torch.cumsum(counts, 0) - counts
        qr, qc, qv = [], [], []
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            src_rows = rank[s:e, :k2].flatten()  # (b * k2,)
            lengths = counts[src_rows]
            total = int(lengths.sum())
            seg_start = torch.cumsum(lengths, 0) - lengths
            pos = torch.repeat_interleave(starts[src_rows] - seg_start, lengths) + torch.arange(total, device=dev)
            target = torch.repeat_interleave(torch.arange(len(src_rows), device=dev) // k2, lengths)
            # Sum in a (b, N) buffer: bounded by the chunk, cheaper than sorting triples.
            buf = torch.zeros((e - s, n), dtype=torch.float32, device=dev)
            buf.view(-1).index_add_(0, target * n + vc[pos], vv[pos] / k2)
            r, c = buf.nonzero(as_tuple=True)
            qr.append(r + s)
            qc.append(c)
            qv.append(buf[r, c])
            del buf
        vr, vc, vv = torch.cat(qr), torch.cat(qc), torch.cat(qv)
        del qr, qc, qv
    out = torch.zeros((n, n), dtype=torch.float32, device=dev)
    _add_min_sums(vr, vc, vv, out)
    del vr, vc, vv
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        smin = out[s:e]  # a view: updated in place
        smin.copy_((1.0 - smin / (2.0 - smin)) * (1.0 - lam) + o_block(s, e) * lam)
    _symmetrise_(out, 256)
    return out


def k_reciprocal_rerank(
    emb_or_sim: np.ndarray,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    device: "str | object | None" = None,
    *,
    sparse: bool | None = None,
    is_similarity: bool | None = None,
    chunk_size: int = 1024,
) -> np.ndarray:
    """k-reciprocal re-ranked (N, N) distance of one set of images (lower = closer).

    ``emb_or_sim``: (N, D) embeddings, or an (N, N) cosine similarity (a square input is
    taken as a similarity when it is symmetric; pass ``is_similarity`` to say so).
    ``lambda_value`` weights the original distance, as in the paper. The result lies in
    [0, 1] and is symmetrised ((D + D.T) / 2) so it can score unordered pairs.
    ``sparse``: keep only top-k lists and a sparse V (bounded memory, for large N);
    default: sparse above ``SPARSE_THRESHOLD`` images. ``device``: torch device
    ("cuda" runs it on the GPU); default CPU. Ties in distance go to the lower index.
    """
    import torch

    if k1 < 1 or k2 < 1:
        raise JaguarKitError(f"retrieval: re-ranking needs k1 >= 1 and k2 >= 1, got k1={k1}, k2={k2}")
    if not 0.0 <= lambda_value <= 1.0:
        raise JaguarKitError(f"retrieval: re-ranking lambda must be in [0, 1], got {lambda_value}")
    x = np.asarray(emb_or_sim)
    if is_similarity is None:
        # A symmetric strip is enough to tell a similarity from an (N, N) embedding matrix.
        is_similarity = x.ndim == 2 and x.shape[0] == x.shape[1] and np.allclose(x[:16], x[:, :16].T, atol=1e-6)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if is_similarity:
        if x.ndim != 2 or x.shape[0] != x.shape[1] or x.shape[0] < 2:
            raise JaguarKitError(f"retrieval: similarity must be a square (N, N) matrix, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise JaguarKitError(f"retrieval: similarity row {np.argwhere(~np.isfinite(x))[0][0]} has NaN or inf")
        src = _SimSource(sim=torch.as_tensor(x, dtype=torch.float32).to(dev))
    else:
        src = _SimSource(emb=torch.from_numpy(_normalise(_check_embeddings(x))).to(dev))
    n = src.n
    k2 = min(int(k2), n)  # the reference's V[rank[i, :k2]] mean covers at most N rows
    if sparse is None:
        sparse = n > SPARSE_THRESHOLD
    with torch.no_grad():
        fn = _rerank_sparse if sparse else _rerank_dense
        out = fn(src, int(k1), int(k2), float(lambda_value), int(chunk_size))
    return out.cpu().numpy()


def final_similarity(
    embeddings: Sequence[np.ndarray], cfg: RetrievalConfig, device: "str | object | None" = None
) -> np.ndarray:
    """The (N, N) similarity a submission or a validation score is made from.

    Per model: optional query expansion (``cfg.query_expansion_k`` > 0), then cosine
    similarity; models are ensembled by averaging their similarity matrices. With
    ``cfg.rerank``, the k-reciprocal distance D (in [0, 1]) is turned into the
    similarity 1 - D and blended: (1 - b) * cosine + b * (1 - D), b = ``cfg.rerank_blend``.
    Symmetric; higher means more alike.
    """
    if len(embeddings) == 0:
        raise JaguarKitError("retrieval: final_similarity needs at least one model's embeddings")
    b = float(cfg.rerank_blend)
    if not 0.0 <= b <= 1.0:
        raise JaguarKitError(f"retrieval: rerank_blend must be in [0, 1], got {b}")
    n = None
    total = None
    for m, emb in enumerate(embeddings):
        e = _check_embeddings(emb, what=f"model {m} embeddings")
        if n is None:
            n = e.shape[0]
        elif e.shape[0] != n:
            raise JaguarKitError(f"retrieval: model {m} has {e.shape[0]} embeddings but model 0 has {n}")
        if cfg.query_expansion_k > 0:
            e = query_expansion(e, cfg.query_expansion_k, cfg.query_expansion_alpha)
        s = cosine_similarity(e)
        total = s if total is None else total + s
    sim = (total / len(embeddings)).astype(np.float32)
    if cfg.rerank and b > 0:
        dist = k_reciprocal_rerank(sim, cfg.k1, cfg.k2, cfg.lambda_value, device=device, is_similarity=True)
        sim = ((1.0 - b) * sim + b * (1.0 - dist)).astype(np.float32)
    return sim


__all__ = [
    "cosine_similarity",
    "query_expansion",
    "k_reciprocal_rerank",
    "final_similarity",
    "SPARSE_THRESHOLD",
]
