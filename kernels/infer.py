# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # jaguar_kit: resumable inference
# Embeds the test images with every trained model attached as an input (the training notebook's
# output: its `run/best.pt`), in chunks cached under `cache/` of this version's output, and
# writes `embeddings_test_model<i>.npz` for the submission notebook.
#
# **A session timed out?** Attach this notebook's own output too and run it again: finished
# chunks are reused, not recomputed.
#
# **For the submission notebook's tuning** (`TUNE`, on by default there), `VALIDATION = True` also
# embeds each run's validation fold (the images it never trained on) with the same TTA into
# `embeddings_val_model<i>.npz`; `inference.json` records which checkpoint (by content digest) and
# TTA made each file. **For its pseudo-label round** (`PSEUDO_LABELS`), add `"train"` to `SPLITS`:
# each identity's mean training embedding is what test images are assigned to.
#
# **Test-time augmentation** is the package default (`embed.tta`; `none`, `hflip` = the image and
# its mirror, `flip4` = also the vertical flips). Jaguar flanks differ left to right, so a mirror
# is not the same animal's other side: measure before you trust a flip. Set `MEASURE_TTA = True`
# with a training run of fold 0 or more attached: this embeds that fold's validation images (the
# real ones) with each TTA and prints their identity-balanced mAP; then pick the best with
# `OVERRIDES = ["embed.tta=..."]`.

# %% [markdown]
# ## Install jaguar_kit
# From the attached `jaguar-kit-wheel` dataset (made by `build_dataset.py`), offline and without
# touching the image's torch, timm, numpy, pandas or OpenCV (`--no-deps`). This cell is the same in
# the three notebooks: it cannot import jaguar_kit to find the wheel, so it searches the inputs by
# the package's own rule (`jaguar_kit.kaggle.env.walk_inputs`): at most 7 folders deep, links
# followed, each real folder once, hidden entries skipped.

# %%
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path


def find_kit_wheels(roots, max_depth=7):
    seen, found, queue = set(), {}, [(Path(r.strip()).expanduser(), 0) for r in roots if r.strip()]
    while queue:
        folder, depth = queue.pop(0)
        try:
            real = os.path.realpath(folder)
            if real in seen or not folder.is_dir():
                continue
            seen.add(real)
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir():
                if depth < max_depth:
                    queue.append((Path(e.path), depth + 1))
            elif e.name.startswith("jaguar_kit-") and e.name.endswith(".whl"):
                found.setdefault(os.path.realpath(e.path), Path(e.path))
    return list(found.values())


def wheel_key(wheel):
    try:
        from packaging.version import Version
    except ImportError:  # a bare Python: pip carries its own copy
        from pip._vendor.packaging.version import Version
    return Version(wheel.name.split("-")[1]), wheel.stat().st_mtime


INPUTS = (os.environ.get("JAGUAR_KIT_INPUT") or "/kaggle/input").split(os.pathsep)
WHEELS = find_kit_wheels(INPUTS)
if WHEELS:
    WHEEL = max(WHEELS, key=wheel_key)
    # --force-reinstall: a re-uploaded wheel of the same version replaces an earlier install.
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                           "--force-reinstall", str(WHEEL)])
    importlib.invalidate_caches()
elif importlib.util.find_spec("jaguar_kit") is None:
    raise FileNotFoundError(f"no jaguar_kit-*.whl under {os.pathsep.join(INPUTS)}: attach the jaguar-kit-wheel "
                            "dataset (made by build_dataset.py) to this notebook")
import jaguar_kit

print(f"jaguar_kit {jaguar_kit.__version__} from {Path(jaguar_kit.__file__).parent}")

# %% [markdown]
# ## Settings
# Any other config value: add `"section.key=value"` to `OVERRIDES`, e.g. `"embed.tta=hflip"` (the
# sections and keys are those of `jaguar_kit/config.py`). The cell is tagged `parameters` for papermill.

# %% tags=["parameters"]
CHECKPOINT_NAME = "best.pt"  # which checkpoint of each attached training run
SPLITS = ["test"]  # what submission reads; add "train" for the submit notebook's PSEUDO_LABELS
# On by default: the submit notebook then chooses re-ranking and query expansion on real validation images
# (re-ranking gained on one leaderboard and lost on another validation set) at the cost of embedding about
# as many images again as the test set (the validation fold, ~380 real images), minutes on a T4.
VALIDATION = True  # also embed each run's validation fold for the submit notebook's TUNE (and PSEUDO_LABELS)
MEASURE_TTA = False  # True: score none / hflip / flip4 on the attached run's validation fold first
FROZEN_IF_BETTER = True  # a run whose fine-tuning did not beat its frozen backbone beyond the noise embeds with it
OVERRIDES = []  # more settings, written as described above (embed.tta, embed.chunk_size, ...)

# %% [markdown]
# ## Models and data

# %%
import copy

from jaguar_kit.config import Config, apply_overrides
from jaguar_kit.data.competition import find_competition_dir
from jaguar_kit.errors import JaguarKitError
from jaguar_kit.kaggle.env import default_cache_dir, input_roots, default_prepared_root, working_root
from jaguar_kit.pipeline import embed_split, find_outputs, read_labels, score

cfg = apply_overrides(Config(), list(OVERRIDES))
DATA = find_competition_dir()  # under every input root
CHECKPOINTS = find_outputs([working_root(), *input_roots()], CHECKPOINT_NAME)
if not CHECKPOINTS:
    raise JaguarKitError(f"no {CHECKPOINT_NAME} found under {', '.join(map(str, input_roots()))}: attach the "
                         "training notebook's output as an input")
print(f"data: {DATA}\nTTA: {cfg.embed.tta}\nprepared images: {default_prepared_root()}")
for i, checkpoint in enumerate(CHECKPOINTS):
    print(f"model {i}: {checkpoint}")

# %% [markdown]
# ## Measure TTA on the validation fold (optional)
# Each training run validates on one fold that it never trained on (`data.fold` of its
# `config.json`); its real validation images tell which augmentation helps this model.

# %%
if MEASURE_TTA:
    LABELS = read_labels(DATA / "train.csv")
    for tta in ("none", "hflip", "flip4"):
        c = apply_overrides(copy.deepcopy(cfg), [f"embed.tta={tta}"])
        emb = embed_split(CHECKPOINTS[0], DATA, "val", default_cache_dir(), default_prepared_root(), c,
                          seed_roots=input_roots())
        r = score([emb], LABELS, c.retrieval)["raw"]
        print(f"TTA {tta:5s}: validation mAP {r['map']:.4f}, rank-1 {r['rank1']:.4f} ({len(emb.names)} images)")

# %% [markdown]
# ## Embed
# Each model's test images (and, with `VALIDATION`, its run's validation fold; with `"train"` in `SPLITS`,
# every training image), then `inference.json`: the TTA and, per model, the checkpoint's content digest
# (how the submit notebook finds the run again), its fold and what it embedded with.

# %%
import json

from jaguar_kit.files import file_digest
from jaguar_kit.models.backbones import frozen_backbone
from jaguar_kit.pipeline import write_json
from jaguar_kit.train.checkpoint import model_source, read_checkpoint

MANIFEST = {"tta": cfg.embed.tta, "models": []}
for i, checkpoint in enumerate(CHECKPOINTS):
    source = model_source(checkpoint) if FROZEN_IF_BETTER else checkpoint
    run = read_checkpoint(checkpoint, verify=False).run_config
    model_cfg = cfg
    if frozen_backbone(source) is not None:  # the run's images, fold and input size, not this notebook's defaults
        model_cfg = copy.deepcopy(cfg)
        model_cfg.data = copy.deepcopy(run.data)
        model_cfg.data.workers = cfg.data.workers
        model_cfg.model.img_size = run.model.img_size  # the size its frozen baseline was validated at
    splits = list(SPLITS)
    if VALIDATION and run.data.fold >= 0:
        splits.append("val")
    elif VALIDATION:
        print(f"model {i}: trained on every image (data.fold -1): no validation fold to embed")
    for split in dict.fromkeys(splits):
        emb = embed_split(source, DATA, split, default_cache_dir(), default_prepared_root(), model_cfg,
                          seed_roots=input_roots())
        path = emb.save(working_root() / f"embeddings_{split}_model{i}.npz")
        print(f"model {i} {split}: {len(emb.names)} images -> {path}")
    MANIFEST["models"].append({"model": i, "checkpoint": str(checkpoint), "digest": file_digest(checkpoint, 16),
                               "source": str(source), "fold": run.data.fold, "splits": list(dict.fromkeys(splits))})
write_json(working_root() / "inference.json", MANIFEST)
print(json.dumps(MANIFEST, indent=1))
