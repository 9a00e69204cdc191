"""A procedural synthetic jaguar re-ID competition: the built-in dataset of the demo,
the tests and the benchmarks.

:func:`generate_competition` writes a folder shaped like Kaggle's jaguar-re-id
(facts.md): ``train.csv``, ``train/train/*.png``, ``test.csv``, ``test/test/*.png`` and
``sample_submission.csv``, plus ``solution.csv`` (the test images' identities, for local
scoring) and ``synth.json`` (the parameters, so a finished folder is not made twice). The
coats are drawn in ``synth_coats``, each photo in ``synth_image``.

What makes it a fair re-ID task:

- Identity lives only in the spot *layout*. Every identity has two procedurally drawn
  coats, one per flank (left is not the mirrored right, as in real jaguars), in "coat
  coordinates" (body units: the torso is an ellipse with semi-axes about 1 x 0.42).
  Coat colour, animal size, pose, background, lighting and camera effects are drawn per
  image, independently of the identity, so global image statistics carry no identity.
- Each image is another view of one flank: the coat is warped onto a posed body (torso,
  head, legs, tail), seen through a window that moves by up to +-0.3 body units, so two
  views of one flank share most of the coat and the task is learnable.
- The animal faces the way its flank dictates (left flank: head to the left), as in a
  side-on camera-trap photo; a horizontal flip therefore shows a flank that never exists.

Every image comes from its own RNG, derived from ``(seed, identity, image index)`` with
:class:`numpy.random.SeedSequence`, so the bytes do not depend on ``workers`` or order.

Encounters (``images_per_encounter`` > 1, opt-in): a camera trap takes several photos per
pass. The photos of one encounter show one flank and share the background, the foliage in
front, the light, the coat's colour under it, the camera's info band and the placement
(position, scale, tilt up to a small jitter); pose, coat window, blur and noise vary per
photo. Their encounter is written to train.csv's ``encounter`` column; test photos come
from other encounters than the training photos, as on a real test set.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from ..errors import JaguarKitError
from ..files import atomic_write_bytes, atomic_write_text
from ..processes import run_tasks
from .synth_coats import _KEY_ENCOUNTER, _KEY_FLANKS, _KEY_NAMES, _KEY_SHUFFLE
from .synth_image import render_image

GENERATOR_VERSION = 1
MANIFEST = "synth.json"

_SYLLABLES = (
    "a ra wi ta ma ka na ju re lo pi su ti ba ce da go ha la mi no pa ri sa to ve ya ze "
    "bo cu fe li mo nu po ru se ji ko ne "
).split()
_ENDINGS = ("", "", "", "", "", "n", "r", "s", "l")


# ----------------------------------------------------------------------------- names


def identity_names(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct, pronounceable names (``Arawi``, ``Tumaka``); a prefix of the list
    for ``n + 1``, so adding identities never renames the existing ones."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_KEY_NAMES,)))
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        k = int(rng.choice([2, 3, 3, 4], p=[0.3, 0.35, 0.3, 0.05]))
        parts = [_SYLLABLES[int(i)] for i in rng.integers(0, len(_SYLLABLES), k)]
        name = ("".join(parts) + _ENDINGS[int(rng.integers(0, len(_ENDINGS)))]).capitalize()
        if len(name) >= 4 and "aa" not in name.lower() and name not in seen:
            seen.add(name)
            names.append(name)
    return names


# ----------------------------------------------------------------------------- the folder


def _check_args(
    identities: int, images_per_identity: int, test_per_identity: int, size: int, seed: int, workers: int
) -> None:
    for name, value, lo in (
        ("identities", identities, 2),
        ("images_per_identity", images_per_identity, 2),
        ("test_per_identity", test_per_identity, 1),
        ("size", size, 64),
        ("seed", seed, 0),
        ("workers", workers, 1),
    ):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lo:
            raise JaguarKitError(f"generate_competition: {name} must be an integer >= {lo}, got {value!r}")
    if size > 8192:
        raise JaguarKitError(f"generate_competition: size must be at most 8192, got {size}")
    if identities > 100_000:
        raise JaguarKitError(f"generate_competition: identities must be at most 100000, got {identities}")


def _flanks(seed: int, identity: int, n_train: int, n_test: int) -> list[int]:
    """Flank of each image of one identity: both flanks in train and in test, in random order."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_KEY_FLANKS, identity)))
    out = []
    for n in (n_train, n_test):
        start = int(rng.integers(0, 2))
        out += [int(f) for f in rng.permutation([(start + j) % 2 for j in range(n)])]
    return out


def _make_one(task: tuple[str, int, int, int, int, int, int | None]) -> str:
    path, seed, identity, flank, index, size, encounter = task
    ok, buf = cv2.imencode(".png", render_image(seed, identity, flank, index, size, encounter))
    if not ok:  # pragma: no cover - cv2 only fails here on a broken build
        raise JaguarKitError(f"{path}: cv2 could not encode the PNG")
    atomic_write_bytes(path, buf.tobytes())
    return path


def generate_competition(
    out: str | Path,
    identities: int = 30,
    images_per_identity: int = 10,
    test_per_identity: int = 3,
    size: int = 256,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    images_per_encounter: int = 1,
) -> Path:
    """Write a synthetic jaguar-re-id competition folder at ``out`` and return its path.

    Closed set like the real test: every identity has ``images_per_identity`` train and
    ``test_per_identity`` test images (RGBA PNG, ``size`` x ``2/3 size``). The same
    arguments give byte-identical files for any ``workers``. ``images_per_encounter`` > 1
    groups each identity's consecutive photos into encounters sharing a scene (module
    docstring), named in train.csv's ``encounter`` column. A folder this function
    already finished with the same arguments is returned as it is; a folder with another
    competition's ``train.csv`` in it is refused rather than overwritten.
    """
    _check_args(identities, images_per_identity, test_per_identity, size, seed, workers)
    if not isinstance(images_per_encounter, (int, np.integer)) or images_per_encounter < 1:
        raise JaguarKitError(f"generate_competition: images_per_encounter must be an integer >= 1, "
                             f"got {images_per_encounter!r}")
    m = int(images_per_encounter)
    out = Path(out)
    params = {
        "generator": "jaguar_kit.data.synth",
        "version": GENERATOR_VERSION,
        "identities": int(identities),
        "images_per_identity": int(images_per_identity),
        "test_per_identity": int(test_per_identity),
        "size": int(size),
        "seed": int(seed),
        **({"images_per_encounter": m} if m > 1 else {}),
    }
    manifest = out / MANIFEST
    old = None
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text())
        except ValueError:
            old = None
    if old == {**params, "complete": True}:
        return out
    if (out / "train.csv").exists() and not (isinstance(old, dict) and old.get("generator") == params["generator"]):
        raise JaguarKitError(f"{out}: holds a train.csv not written by generate_competition; choose another folder")
    if out.exists() and not out.is_dir():
        raise JaguarKitError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(manifest, json.dumps({**params, "complete": False}, indent=2) + "\n")

    names = identity_names(identities, seed)
    n_all = images_per_identity + test_per_identity
    n_train_enc = -(-images_per_identity // m)
    train_items, test_items = [], []  # (identity, image index, flank, encounter or None)
    for i in range(identities):
        if m == 1:
            fl, enc = _flanks(seed, i, images_per_identity, test_per_identity), [None] * n_all
        else:  # one flank per encounter; train and test photos never share an encounter
            enc = [j // m if j < images_per_identity else n_train_enc + (j - images_per_identity) // m
                   for j in range(n_all)]
            enc_flank = _flanks(seed, i, n_train_enc, -(-test_per_identity // m))
            fl = [enc_flank[e] for e in enc]
        for j in range(n_all):
            (train_items if j < images_per_identity else test_items).append((i, j, fl[j], enc[j]))
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_KEY_SHUFFLE,)))
    train_order = rng.permutation(len(train_items))
    test_order = rng.permutation(len(test_items))
    digits = max(4, len(str(max(len(train_items), len(test_items)))))

    tasks, train_rows, test_rows = [], [], []
    for prefix, items, order, rows, folder in (
        ("train", train_items, train_order, train_rows, out / "train" / "train"),
        ("test", test_items, test_order, test_rows, out / "test" / "test"),
    ):
        for number, pos in enumerate(order, start=1):
            i, j, flank, e = items[pos]
            fname = f"{prefix}_{number:0{digits}d}.png"
            rows.append((fname, names[i], "" if e is None else f"{names[i]}-{e:03d}"))
            tasks.append((i, j, (str(folder / fname), seed, i, flank, j, size, e)))
    tasks.sort(key=lambda t: (t[0], t[1]))  # by identity: each coat is drawn once per process
    jobs = [t[2] for t in tasks]

    from tqdm.auto import tqdm

    with tqdm(total=len(jobs), desc="synthetic jaguars", unit="img", disable=not progress) as bar:
        for _ in run_tasks(_make_one, jobs, workers, chunksize=n_all):
            bar.update()

    test_names = [f for f, _, _ in test_rows]
    if m == 1:
        atomic_write_text(out / "train.csv",
                          "filename,ground_truth\n" + "".join(f"{f},{g}\n" for f, g, _ in train_rows))
    else:
        atomic_write_text(out / "train.csv", "filename,ground_truth,encounter\n"
                          + "".join(f"{f},{g},{e}\n" for f, g, e in train_rows))
    atomic_write_text(out / "solution.csv", "filename,ground_truth\n" + "".join(f"{f},{g}\n" for f, g, _ in test_rows))
    pairs = [(q, g) for q in test_names for g in test_names if q != g]
    atomic_write_text(
        out / "test.csv",
        "row_id,query_image,gallery_image\n" + "".join(f"{r},{q},{g}\n" for r, (q, g) in enumerate(pairs)),
    )
    atomic_write_text(
        out / "sample_submission.csv", "row_id,similarity\n" + "".join(f"{r},0.5\n" for r in range(len(pairs)))
    )
    atomic_write_text(manifest, json.dumps({**params, "complete": True}, indent=2) + "\n")
    return out


def encounter_embeddings(
    identities: int = 20, encounters: int = 12, per_encounter: int = 2, dim: int = 128,
    identity_scale: float = 0.6, context: float = 1.0, noise: float = 0.6, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Simulated embeddings of photos taken in encounters: ``(vectors, identities, encounters)``.

    A photo's vector is its identity's direction (scale ``identity_scale``) plus its
    encounter's context (background, light: shared by the encounter's photos, sd
    ``context``) plus its own noise (sd ``noise``). Milliseconds to make, so tests and
    benchmarks of validation schemes can run many seeds; encounter ``e`` of identity ``i``
    is named ``"{i}-{e}"`` (identities ``"id{i}"``), so callers can hold whole encounters out.
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_KEY_ENCOUNTER,)))
    centre = rng.normal(size=(identities, dim)) * identity_scale
    n = identities * encounters
    ctx = rng.normal(size=(n, dim)) * context
    vectors = np.repeat(centre, encounters * per_encounter, axis=0) + np.repeat(ctx, per_encounter, axis=0)
    vectors += rng.normal(size=vectors.shape) * noise
    ids = np.repeat([f"id{i}" for i in range(identities)], encounters * per_encounter)
    enc = np.repeat([f"{i}-{e}" for i in range(identities) for e in range(encounters)], per_encounter)
    return vectors, ids, enc


__all__ = ["encounter_embeddings", "generate_competition", "identity_names"]
