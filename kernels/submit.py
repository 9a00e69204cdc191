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
# # jaguar_kit: submission
# Averages the similarities of every attached model's test embeddings (an ensemble), applies
# query expansion and k-reciprocal re-ranking, writes `submission.csv` and shows a retrieval
# grid.

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

# %% Settings: re-ranking and query expansion (fourth place used k1=20, lambda=0.3, QE top 3).
OVERRIDES = ["retrieval.rerank=true", "retrieval.k1=20", "retrieval.k2=6", "retrieval.lambda_value=0.3",
             "retrieval.query_expansion_k=3"]
OVERRIDES += [o for o in os.environ.get("JAGUAR_KIT_SET", "").split(";") if o]

# %% Similarities, re-ranking, submission.csv.
from jaguar_kit.config import Config, apply_overrides
from jaguar_kit.data.competition import find_competition_dir
from jaguar_kit.kaggle.env import input_root, working_root
from jaguar_kit.pipeline import Embeddings, find_outputs, submit

cfg = apply_overrides(Config(), OVERRIDES)
DATA = find_competition_dir(input_root())
FILES = find_outputs([working_root(), input_root()], "embeddings_test_*.npz")
if not FILES:
    raise SystemExit("no embeddings_test_*.npz found: attach the inference kernel's output as an input")
print("models:", *FILES, sep="\n  ")
OUT = working_root() / "submission.csv"
submit([Embeddings.load(f) for f in FILES], DATA, OUT, cfg.retrieval, grid_png=working_root() / "retrieval_grid.png")
print(f"wrote {OUT}\nsubmit with: kaggle competitions submit -c jaguar-re-id -f {OUT} -m \"jaguar_kit\"")

# %% Retrieval grid: each test query and its nearest gallery images.
try:
    from IPython.display import Image, display

    display(Image(filename=str(working_root() / "retrieval_grid.png")))
except ImportError:
    print(f"grid: {working_root() / 'retrieval_grid.png'}")
