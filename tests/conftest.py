"""Shared fixtures: tiny configs and tiny token corpora written with our .bin/.idx writer."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megamix.config import load_config
from megamix.data.indexed import IndexedDatasetWriter

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "model.vocab_size=512",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.num_layers=4",
    "model.max_seq_len=64",
    "data.seq_len=32",
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    "train.steps=20",
    "train.warmup_steps=2",
    "train.log_interval=1",
    "train.eval_interval=10",
    "train.eval_tokens=256",  # 2 batches of 4 × 32
    "data.split=90,10",  # ~20 validation documents: enough for those batches
    "data.num_workers=0",  # the loader on the main thread (tests/test_data_index.py runs workers)
    "train.tensorboard=false",
    "train.progress_bar=false",
]


def write_corpus(prefix, num_docs: int = 200, vocab: int = 512, seed: int = 0) -> list[np.ndarray]:
    """Documents with learnable structure: each continues an arithmetic pattern mod ``vocab``."""
    rng = np.random.default_rng(seed)
    docs = []
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for _ in range(num_docs):
            start, stride, n = rng.integers(0, vocab), rng.integers(1, 5), rng.integers(5, 60)
            doc = ((start + stride * np.arange(n)) % vocab).astype(np.uint16)
            docs.append(doc)
            w.add_document(doc)
    return docs


@pytest.fixture
def corpus(tmp_path):
    prefix = tmp_path / "corpus"
    docs = write_corpus(prefix)
    return str(prefix), docs


@pytest.fixture
def tiny_config(tmp_path, corpus):
    def make(*overrides):
        return load_config(None, TINY + [f"data.path={corpus[0]}", f"train.output_dir={tmp_path / 'run'}", *overrides])

    return make


# ----------------------------------------------------------------------------------------------
# Checkpoints saved by a parallel layout: one tiny run per norm scheme, trained two steps under
# TP2·PP2 (4 CPU processes, gloo) in a single torchrun launch, shared by every test module.

PARALLEL_SCHEMES = {
    "pre": ["norm.scheme=pre"],
    "post": ["norm.scheme=post"],
    "mix": ["norm.scheme=mix", "norm.alpha=0.5"],
    "lns": ["norm.scheme=lns"],
    "peri": ["norm.scheme=peri"],
    "deepnorm": ["norm.scheme=deepnorm"],
}
TP2_PP2 = ["parallel.tp=2", "parallel.pp=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc-per-node=NPROC ARGS`` on this checkout (CPU, gloo,
    one thread per rank); fails the test with the ranks' stderr if the launch does not exit 0."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", *map(str, args)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-6000:]
    return done


def final_losses(run: Path, step: int) -> tuple[float, float]:
    """The training and validation loss a run logged at ``step`` (its last lines for that step)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if r["step"] == step and "loss" in r]
    valid = [r["val_loss"] for r in records if r["step"] == step and "val_loss" in r]
    assert train and valid, f"{run}: no records of step {step}"
    return train[-1], valid[-1]


def run_overrides(root: Path, overrides: list[str], steps: int = 2) -> list[str]:
    """A tiny run on ``root/corpus`` into ``root/run``: ``steps`` steps, a checkpoint at the end."""
    return TINY + [f"data.path={root / 'corpus'}", f"train.output_dir={root / 'run'}", f"train.steps={steps}",
                   "train.eval_interval=0", *overrides]


@pytest.fixture(scope="session")
def tp2_pp2_runs(tmp_path_factory) -> dict[str, tuple[Path, list[str]]]:
    """``{scheme: (run directory saved under TP2·PP2, the same run's overrides for one process)}``."""
    runs, single = [], {}
    for scheme, norm in PARALLEL_SCHEMES.items():
        root = tmp_path_factory.mktemp(f"{scheme}_tp2pp2")
        write_corpus(root / "corpus")
        runs.append(run_overrides(root, norm + TP2_PP2))
        single[scheme] = (root / "run", run_overrides(root, norm))
    spec = tmp_path_factory.mktemp("tp2pp2_spec") / "runs.json"
    spec.write_text(json.dumps(runs))
    torchrun(4, ROOT / "tests" / "dist" / "train_runs.py", spec)
    return single


# ----------------------------------------------------------------------------------------------
# Test tiers (pytest.ini's markers): `pytest -m "not dist and not slow"` is the quick tier;
# .ci/run runs everything.  Files are marked here so a new test lands in its file's tier.

TIERS = {
    "test_parallel_training.py": "dist",
    "test_instruments_parallel.py": "dist",
    "test_deepspeed.py": "dist",
    "test_slurm.py": "slurm",
    "test_slurm_preprocess.py": "slurm",
    "test_fault_injection.py": "slow",
}


def pytest_collection_modifyitems(items):
    for item in items:
        path = Path(str(item.fspath))
        tier = TIERS.get(path.name)
        if tier:
            item.add_marker(tier)
        if tier == "slurm":
            item.add_marker("dist")
        if "gpu" in path.parts:
            item.add_marker("gpu")
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "tp2_pp2_runs" in getattr(item, "fixturenames", ()) or params.get("layout") == "tp2pp2":
            item.add_marker("dist")  # checkpoints trained under TP2·PP2 by one torchrun launch
