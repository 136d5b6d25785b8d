#!/usr/bin/env bash
# Make the MONAI Label environment (default: .venv-monailabel at the repository root): monailabel 0.8.5 on
# MONAI 1.6.1, with the monai-elvis package of this checkout. It is kept apart from the project's own
# environment because monailabel needs torchvision (torch 2.14.1 + torchvision 0.29.1 here, not the 2.13.0
# CPU build) and pydicom<3. Usage: monailabel_app/setup_env.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-monailabel}"
if [ ! -x "$VENV/bin/python" ]; then
    python -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip install --progress-bar off"
$PIP torch==2.14.1 torchvision==0.29.1
$PIP -r monailabel_app/requirements.txt
$PIP -e .  # with its dependencies: the ranges of setup.py hold torch 2.14.1, numpy 1.26, pydicom 2
"$VENV/bin/python" -c "import monailabel, monai, monai_elvis, torchvision; print('monailabel', monailabel.__version__, 'monai', monai.__version__)"
