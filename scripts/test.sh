#!/usr/bin/env bash
# Installs megamix with its test references (transformers, megatron-core, ...) and runs the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
python -m pytest -q -p no:cacheprovider tests "$@"
