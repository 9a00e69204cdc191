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
# Embeds the test and training images with every trained model attached as an input (the training
# kernel's output), four flips as test-time augmentation, in 100-image chunks cached under
# `/kaggle/working/cache`. Run it again after a timeout: finished chunks are reused (attach
# this notebook's previous output too when the session changed).

# %% Install jaguar_kit: the wheel from the attached dataset (offline), or the local source tree.
# This bootstrap cannot call jaguar_kit to find its own wheel, so it searches by itself.
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

if os.environ.get("JAGUAR_KIT_SRC"):
    sys.path.insert(0, os.environ["JAGUAR_KIT_SRC"])
elif importlib.util.find_spec("jaguar_kit") is None:
    root = Path(os.environ.get("JAGUAR_KIT_INPUT", "/kaggle/input"))
    wheels = [w for depth in range(1, 5) for w in root.glob("*/" * depth + "jaguar_kit-*.whl")]
    if not wheels:
        raise SystemExit("attach the jaguar-kit-wheel dataset (made by build_dataset.py) to this notebook")
    newest = max(wheels, key=lambda w: [int(x) for x in w.name.split("-")[1].split(".") if x.isdigit()])
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", str(newest)])

# %% Settings.
CHECKPOINT_NAME = "best.pt"  # which checkpoint of each attached training run
SPLITS = ["test", "train"]  # test first: the submission needs it; train embeddings serve validation and QE
OVERRIDES = ["embed.tta=flip4", "embed.chunk_size=100"]
OVERRIDES += [o for o in os.environ.get("JAGUAR_KIT_SET", "").split(";") if o]

# %% Embed with every attached model.
from jaguar_kit.config import Config, apply_overrides
from jaguar_kit.data.competition import find_competition_dir
from jaguar_kit.kaggle.env import default_cache_dir, input_root, working_root
from jaguar_kit.pipeline import embed_split, find_outputs

cfg = apply_overrides(Config(), OVERRIDES)
DATA = find_competition_dir(input_root())
CHECKPOINTS = find_outputs([working_root(), input_root()], CHECKPOINT_NAME)
if not CHECKPOINTS:
    raise SystemExit(f"no {CHECKPOINT_NAME} found: attach the training kernel's output as an input")
for i, checkpoint in enumerate(CHECKPOINTS):
    print(f"model {i}: {checkpoint}")
    for split in SPLITS:
        emb = embed_split(checkpoint, DATA, split, default_cache_dir(), working_root() / "prepared", cfg,
                          seed_roots=[input_root()])
        print(" ", emb.save(working_root() / f"embeddings_{split}_model{i}.npz"))
