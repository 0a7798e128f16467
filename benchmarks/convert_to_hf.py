#!/usr/bin/env python3
"""Time and peak memory of ``tools/convert_to_hf.py`` on a randomly initialized checkpoint.

    python benchmarks/convert_to_hf.py                                   # llama_1b, fp32 checkpoint
    python benchmarks/convert_to_hf.py --config configs/llama_7b.yaml --checkpoint-dtype bf16

The checkpoint is written here with the trainer's own ``save_checkpoint`` (DCP, as a training run
writes it; weights only), then converted in a child process.  The export streams one module at a
time, so its peak RSS should stay within a small margin of the largest tensor, whatever the model
size: the table shows the peak, the largest tensor, the difference, and the RSS of a child that only
imports the converter (the Python + torch floor).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megamix.train.checkpoint import save_checkpoint  # noqa: E402

from megamix.config import load_config  # noqa: E402
from megamix.model import Transformer, num_parameters  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GB = 1e9


def write_random_checkpoint(config: str, dtype: torch.dtype, run_dir: Path) -> tuple[int, int]:
    """A random checkpoint of ``config`` in ``run_dir``; returns (parameters, largest tensor bytes)."""
    cfg = load_config(config)
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.norm)
    model = model.to_empty(device="cpu").to(dtype)
    if cfg.model.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    torch.manual_seed(0)
    model.init_weights()
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    params = num_parameters(model)
    save_checkpoint(run_dir, 0, model, None, {"step": 0, "consumed_samples": 0},
                    extra_files={"config.yaml": cfg.to_yaml()})
    return params, largest


def child_peak_rss(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in bytes) of one child process run to completion.

    ``RUSAGE_CHILDREN`` reports the largest of all waited-for children, so each measurement runs
    in a fresh process of this script (see :func:`main`'s ``--measure``)."""
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux


def measure(command: list[str]) -> tuple[float, float]:
    """Run ``command`` from a fresh copy of this script, so no earlier child's RSS counts."""
    out = subprocess.run([sys.executable, __file__, "--measure", "--", *command], check=True,
                         capture_output=True, text=True).stdout.split()
    return float(out[0]), float(out[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "llama_1b.yaml"))
    p.add_argument("--checkpoint-dtype", choices=list(DTYPES), default="fp32",
                   help="dtype the random checkpoint is saved in (training saves fp32 master weights)")
    p.add_argument("--export-dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--workdir", help="where to write the checkpoint and export (default: a temp dir, removed)")
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("command", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        wall, rss = child_peak_rss(args.command)
        print(wall, rss)
        return 0

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="megamix_convert_"))
    try:
        run_dir, export_dir = workdir / "run", workdir / "hf"
        print(f"writing a random {Path(args.config).stem} checkpoint ({args.checkpoint_dtype}) to {run_dir}",
              file=sys.stderr)
        params, largest = write_random_checkpoint(args.config, DTYPES[args.checkpoint_dtype], run_dir)
        on_disk = sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file())
        floor_wall, floor_rss = measure([sys.executable, "-c", "import megamix.hf.export"])
        convert = [sys.executable, str(ROOT / "tools" / "convert_to_hf.py"), "--checkpoint", str(run_dir),
                   "--output", str(export_dir), "--dtype", args.export_dtype]
        wall, rss = measure(convert)
        exported = sum(f.stat().st_size for f in export_dir.rglob("*") if f.is_file())
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    rows = [
        ("model", f"{Path(args.config).stem}, {params / 1e9:.3f}B params"),
        ("checkpoint", f"{args.checkpoint_dtype}, {on_disk / GB:.2f} GB on disk"),
        ("export", f"{args.export_dtype}, {exported / GB:.2f} GB"),
        ("convert wall time", f"{wall:.1f} s ({on_disk / GB / wall:.2f} GB/s read)"),
        ("peak RSS", f"{rss / GB:.2f} GB"),
        ("largest tensor", f"{largest / GB:.2f} GB"),
        ("peak RSS - largest tensor", f"{(rss - largest) / GB:.2f} GB (target < 2 GB)"),
        ("import-only floor (python+torch)", f"{floor_rss / GB:.2f} GB, {floor_wall:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
