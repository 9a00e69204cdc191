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
# # jaguar_kit: training
# Fine-tunes a re-identification model (GeM + 512-d head, ArcFace + batch-hard triplet over PK
# batches, layer-wise LR decay) on the jaguar-re-id training images.
#
# **Inputs:** the competition, the `jaguar-kit-wheel` dataset, and the backbone's pretrained
# weights. With *Internet on* (the default) they download from the Hugging Face hub; with it off,
# attach a copy: a Kaggle Model or a dataset holding the hub repository's `config.json` and
# `model.safetensors` (`jaguar-kit kaggle push train --model OWNER/MODEL/FRAMEWORK/VARIATION/VERSION`).
# The notebook prints where the weights come from before it prepares any image, and stops there
# if it finds none, its first line saying what to do (attach a copy, or turn Internet on).
#
# **A session timed out or failed?** Attach this notebook's own output (*Add Input* > *Your Work*, or
# `jaguar-kit kaggle push train --resume`) and run it again: it continues from `last.pt` to the
# exact step, and the new version's output holds the whole run. A finished run attached again is
# reported and published unchanged; raise `EPOCHS` to train it longer.

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
# The only cell to edit. Any other config value: add `"section.key=value"` to `OVERRIDES` (the
# sections and keys are those of `jaguar_kit/config.py`). The cell is tagged `parameters`, so a
# papermill run can set these too (`papermill train.ipynb out.ipynb -p EPOCHS 30`).

# %% tags=["parameters"]
BACKBONE = "megadescriptor-l-384"  # eva02-l-448, dinov2-l-reg4-518, megadescriptor-dinov2-518, efficientnet-lite0
WEIGHTS = "auto"  # auto: an attached copy, else the Hugging Face hub when Internet is on; none; hf-hub:ORG/NAME
FOLD = 0  # validation fold; -1 trains on every image (the final model for a submission)
EPOCHS = 20  # raise it and run again with this notebook's output attached to train a finished run longer
OVERRIDES = []  # more settings, written as described above

# %% [markdown]
# ## Train
# Everything the run writes is in `run/` of this version's output: `best.pt`, `last.pt`,
# `metrics.csv`, `config.json`, `curves.png`. The prepared-image cache goes to a scratch folder
# outside the output, so it does not bloat each version.
#
# Two GPUs (T4 x2) train with DDP through `torchrun`; one GPU or the CPU train in this process.

# %%
import torch

from jaguar_kit.config import Config, apply_overrides
from jaguar_kit.data.competition import find_competition_dir
from jaguar_kit.kaggle.env import default_prepared_root, working_root
from jaguar_kit.train.engine import train
from jaguar_kit.train.launch import launch_ddp

cfg = apply_overrides(Config(), [f"model.backbone={BACKBONE}", f"model.weights={WEIGHTS}", f"data.fold={FOLD}",
                                 f"train.epochs={EPOCHS}", *OVERRIDES])
DATA = find_competition_dir()  # under every input root
RUN = working_root() / "run"
GPUS = torch.cuda.device_count()
print(f"data: {DATA}\nrun folder: {RUN}\nprepared images: {default_prepared_root()}\nGPUs: {GPUS}")
if GPUS > 1:
    CONFIG = default_prepared_root().parent / "train-config.json"  # scratch: the run folder holds the run's own
    cfg.save(CONFIG)
    if launch_ddp(CONFIG, DATA, RUN, nproc=GPUS, extra=["--prepared", str(default_prepared_root())]) != 0:
        raise RuntimeError("DDP training failed: see the log above")
else:
    result = train(cfg, DATA, RUN, prepared_root=default_prepared_root())
    print(result.summary())  # status, epochs, best validation mAP against the frozen backbone's (epoch 0)

# %% [markdown]
# ## Training curves

# %%
print((RUN / "metrics.csv").read_text())
try:
    from IPython.display import Image, display

    display(Image(filename=str(RUN / "curves.png")))
except ImportError:
    print(f"curves: {RUN / 'curves.png'}")
