#!/usr/bin/env bash
# Everything a GPU must confirm, in one command (docs/gpu_check.md):
#
#   scripts/gpu_check.sh OUT_DIR [--dry-run] [--timeout STEP=SECONDS ...] [--only STEP ...]
#
# Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md (plus each step's JSON and log).  Each
# step runs under its own `timeout`, so one failure still reports the rest; the default limits add
# up to under 4 minutes on one H100/H200.  --dry-run prints every step's command line and runs the
# CPU-sized version of what can run without a GPU.
#
# The machine's own torch is used as it is: this script never installs torch.  megamix comes from
# this checkout (PYTHONPATH), not from an install.  Optional wheels found in the checkout's ignored
# .wheels/ folder (e.g. liger-kernel, ninja; see docs/gpu_check.md for downloading them for Python
# 3.12) are installed without dependencies into a temporary directory put on PYTHONPATH; a peer
# that is missing is reported as skipped.
set -uo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: $0 OUT_DIR [--dry-run] [--timeout STEP=SECONDS ...] [--only STEP ...]" >&2
  exit 2
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$1
shift
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
WHEELS_DIR=${GPU_CHECK_WHEELS_DIR:-$ROOT/.wheels}

SITE=""
cleanup() { [[ -n "$SITE" ]] && rm -rf "$SITE"; }
trap cleanup EXIT

wheels=()
if [[ -d "$WHEELS_DIR" ]]; then
  for whl in "$WHEELS_DIR"/*.whl; do
    [[ -e "$whl" ]] || continue
    case "$(basename "$whl")" in
      torch-* | torch_* | nvidia_* | triton-*)  # the machine's own torch stack is never replaced
        echo "gpu_check: not installing $(basename "$whl") (the machine's torch stack is used as it is)" >&2 ;;
      *) wheels+=("$whl") ;;
    esac
  done
fi
if [[ ${#wheels[@]} -gt 0 ]]; then
  SITE=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_site.XXXXXX")
  echo "gpu_check: installing ${#wheels[@]} wheel(s) from $WHEELS_DIR into $SITE (no index, no dependencies)"
  if timeout 120 "$PY" -m pip install --quiet --no-index --no-deps --disable-pip-version-check \
      --target "$SITE" "${wheels[@]}"; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$SITE/bin:$PATH"
    export GPU_CHECK_SITE="$SITE"
    names=()
    for whl in "${wheels[@]}"; do names+=("$(basename "$whl")"); done
    export GPU_CHECK_WHEELS="${names[*]}"
  else
    echo "gpu_check: installing the wheels failed; the optional peers they hold count as missing" >&2
  fi
fi

# This checkout's megamix first, whatever else is installed.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
"$PY" "$ROOT/benchmarks/gpu_check.py" "$OUT" "$@"
