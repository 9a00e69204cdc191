#!/usr/bin/env bash
# Set up a local development environment in .venv: torch first (pinned: the build that
# matches this machine's torchvision), then jaguar_kit with its dev/demo extras.
# Override the torch pin with TORCH_SPEC="torch==X torchvision==Y" on other machines.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check $TORCH_SPEC
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
echo "jaguar_kit installed in .venv"
