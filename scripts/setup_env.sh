#!/usr/bin/env bash
# Installs megamix and what it needs into the current Python, CPU torch first so pip never pulls
# a CUDA build.  Usage: bash scripts/setup_env.sh [EXTRA]   (EXTRA: test, demo, ...)
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -c constraints.txt -e ".${extra:+[$extra]}"
