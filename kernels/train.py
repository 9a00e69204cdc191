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
# Fine-tunes a re-ID model (GeM + 512-d head, ArcFace + batch-hard triplet over PK batches,
# layer-wise LR decay) on the jaguar-re-id training images. Checkpoints go to
# `/kaggle/working/run`. **Resuming:** when a session times out, add this notebook's own
# output as an input ("kernel source") and run it again: it continues from the newest
# matching `last.pt`, to the exact step.

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

# %% Settings: the few knobs to change. Any config value: add "section.key=value" to OVERRIDES.
BACKBONE = "megadescriptor-l-384"  # eva02-l-448, dinov2-l-reg4-518, megadescriptor-dinov2-518, efficientnet-lite0
WEIGHTS = "auto"  # auto: an attached copy of the hub repo; or hf-hub:ORG/NAME with internet on
FOLD = 0  # validation fold; -1 trains on every image (the final model for a submission)
EPOCHS = 20
OVERRIDES = [f"model.backbone={BACKBONE}", f"model.weights={WEIGHTS}", f"data.fold={FOLD}", f"train.epochs={EPOCHS}"]
OVERRIDES += [o for o in os.environ.get("JAGUAR_KIT_SET", "").split(";") if o]

# %% Train (two GPUs: DDP through torchrun; one GPU or CPU: in this process).
import torch

from jaguar_kit.config import Config, apply_overrides
from jaguar_kit.data.competition import find_competition_dir
from jaguar_kit.kaggle.env import input_root, working_root
from jaguar_kit.train.engine import launch_ddp, train

cfg = apply_overrides(Config(), OVERRIDES)
DATA = find_competition_dir(input_root())
RUN = working_root() / "run"
GPUS = torch.cuda.device_count()
print(f"data: {DATA}\nrun folder: {RUN}\nGPUs: {GPUS}")
if GPUS > 1:
    cfg.save(RUN / "config.json")  # every rank reads the run's config
    if launch_ddp(RUN / "config.json", DATA, RUN, nproc=GPUS) != 0:
        raise SystemExit("DDP training failed: see the log above")
else:
    result = train(cfg, DATA, RUN)
    print(f"{result.status} after {result.epochs_done} epochs; best val mAP {result.best_map}")

# %% Training curves.
print((RUN / "metrics.csv").read_text())
try:
    from IPython.display import Image, display

    display(Image(filename=str(RUN / "curves.png")))
except ImportError:
    print(f"curves: {RUN / 'curves.png'}")
