#!/usr/bin/env bash
# The DRESS experiment on ShapeWorld, from nothing: a thin wrapper of the Python command
#   python -m dress_lightning experiment [--seeds 0 1 2] [--arms ...] [--split val|test] [--dry-run]
# which runs the experiment's stage graph (dress_lightning/experiment.py), resumable stage by stage.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m dress_lightning experiment "$@"
