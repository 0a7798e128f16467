"""What the depth statistics cost: training step time with ``train.stats_interval: 10`` and without.

    python benchmarks/stats_overhead.py                     # the tiny config and llama_71m, CPU, minutes
    python benchmarks/stats_overhead.py --models 71m --micro-batch-size 32 --device cuda

Two trainers of the same model and data, one with statistics every 10 steps and one without, train
side by side, one step each in turn (the order swapped every step), so that a slow phase of a shared
machine hits both alike; each block of 10 steps holds exactly one statistics step.  The table gives
the mean time per step of each (the statistics steps are the cost, so a mean, not a median), the
overhead (on / off − 1) with its spread over the blocks, and the median wall time of one statistics
measurement itself (probe forward, the all-reduce and the log line), and the median time of what the
statistics add inside a statistics step (the copy of the weights before the update and the
update-to-weight ratios after it, timed around the engine's optimizer hooks; counted in the step
times too).

The data is a synthetic corpus written into a temporary directory (token statistics do not matter
for timing).  ``llama_71m`` runs with a reduced batch and in fp32 on the CPU (its config says bf16,
which CPUs emulate slowly): the probe's fixed cost weighs more against a small batch than against
the paper's 512 × 256 tokens, so the reduced batch is the harder case.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megamix.config import load_config  # noqa: E402
from megamix.data.indexed import IndexedDatasetWriter  # noqa: E402
from megamix.train.trainer import Trainer  # noqa: E402

MODELS = {
    # name: (config file, overrides)
    "tiny": (ROOT / "configs" / "llama_tiny.yaml", []),
    "71m": (ROOT / "configs" / "llama_71m.yaml", ["train.precision=fp32"]),
}
INTERVAL = 10


def synthetic_corpus(prefix: Path, vocab: int, tokens: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        written = 0
        while written < tokens:
            doc = rng.integers(0, vocab, size=int(rng.integers(50, 1000)), dtype=np.uint16)
            writer.add_document(doc)
            written += len(doc)


def make_trainer(config: Path, overrides: list[str], output: Path, stats: bool, device: str) -> Trainer:
    on = [f"train.stats_interval={INTERVAL}"] if stats else ["train.stats_interval=0"]
    cfg = load_config(config, overrides + on + [f"train.output_dir={output}"])
    return Trainer(cfg, device=device)


def timed_step(trainer: Trainer, probe_times: list[float]) -> float:
    """Seconds for one step as the loop runs it (without logging or saving), statistics included."""
    start = time.perf_counter()
    trainer.train_step()
    t0 = time.perf_counter()
    trainer.instruments.after_step(trainer.step)
    if trainer.device.type == "cuda":
        import torch

        torch.cuda.synchronize()
    end = time.perf_counter()
    if trainer.instruments.stats is not None and trainer.step % INTERVAL == 0:
        probe_times.append(end - t0)
    return end - start


def timed_hook(hook, stats, times: list[float]):
    """``hook`` (one of the depth statistics' optimizer hooks), adding its wall time to the last
    entry of ``times`` on statistics steps (a new entry at each step's snapshot)."""
    def timed(*args):
        armed = stats.armed
        start = time.perf_counter()
        hook(*args)
        if armed:
            if hook.__name__ == "_snapshot":
                times.append(0.0)
            times[-1] += time.perf_counter() - start
    return timed


def measure(name: str, micro: int, accumulation: int, repeats: int, device: str, scratch: Path) -> dict:
    config, extra = MODELS[name]
    cfg = load_config(config, extra)
    seq_len, vocab = cfg.data.seq_len, cfg.model.vocab_size
    prefix = scratch / f"corpus_{name}"
    synthetic_corpus(prefix, vocab, tokens=(repeats * 2 + 1) * INTERVAL * micro * accumulation * (seq_len + 1) * 3)
    overrides = extra + [
        f"data.path={prefix}", "data.valid_path=null", "data.split=95,5", "data.num_workers=0",
        f"train.micro_batch_size={micro}", f"train.global_batch_size={micro * accumulation}",
        "train.steps=100000", "train.warmup_steps=10", "train.log_interval=100000", "train.eval_interval=0",
        "train.save_interval=0", "train.tensorboard=false", "train.progress_bar=false",
        f"train.eval_tokens={seq_len * 8}",
    ]
    off = make_trainer(config, overrides, scratch / f"{name}_off", stats=False, device=device)
    on = make_trainer(config, overrides, scratch / f"{name}_on", stats=True, device=device)
    probe_times: list[float] = []
    in_step: list[float] = []  # per statistics step: the weight snapshot and the update ratios
    stats = on.instruments.stats
    for hooks in (on.engine.before_optimizer_step, on.engine.after_optimizer_step):
        for i, hook in enumerate(hooks):
            if getattr(hook, "__self__", None) is stats:
                hooks[i] = timed_hook(hook, stats, in_step)
    for trainer in (off, on):  # warm-up: first-step allocations, the loader's first read
        for _ in range(2):
            timed_step(trainer, [])
    while on.step % INTERVAL:  # align: the statistics steps are the last of each block
        timed_step(on, [])
    ratios, total = [], {"off": 0.0, "on": 0.0}
    for _ in range(repeats):
        block = {"off": 0.0, "on": 0.0}
        for i in range(INTERVAL):
            for key in (("off", "on") if i % 2 == 0 else ("on", "off")):
                block[key] += timed_step(off if key == "off" else on, probe_times)
        ratios.append(block["on"] / block["off"] - 1)
        for key in total:
            total[key] += block[key]
    for trainer in (off, on):
        trainer.close_loader()
        trainer.metrics.close()
        trainer.lock.release()
    steps = repeats * INTERVAL
    return {"model": name, "params": off.engine.num_params, "batch": f"{micro * accumulation} × {seq_len}",
            "off": total["off"] / steps, "on": total["on"] / steps, "overhead": total["on"] / total["off"] - 1,
            "spread": statistics.stdev(ratios) if len(ratios) > 1 else float("nan"),
            "probe": statistics.median(probe_times), "in_step": statistics.median(in_step), "blocks": repeats}


def table(rows: list[dict], device: str) -> str:
    lines = [f"| model | parameters | batch (sequences × tokens) | step, statistics off | step, statistics every "
             f"{INTERVAL} | overhead | one statistics measurement | inside a statistics step |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['batch']} | {r['off'] * 1e3:.1f} ms "
                     f"| {r['on'] * 1e3:.1f} ms | {r['overhead'] * 100:+.1f}% ± {r['spread'] * 100:.1f} "
                     f"| {r['probe'] * 1e3:.1f} ms | {r['in_step'] * 1e3:.1f} ms |")
    return "\n".join(lines) + f"\n\n(device: {device}; means over {rows[0]['blocks']} blocks of " \
                              f"{INTERVAL} steps per setting, one step of each in turn; ± is the standard " \
                              "deviation of the overhead over the blocks)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="default: the tiny config's 8; 4 for llama_71m (the reduced batch)")
    p.add_argument("--accumulation", type=int, default=1, help="micro-batches per step")
    p.add_argument("--repeats", type=int, default=4, help="blocks of 10 steps per setting")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="megamix-stats-overhead-") as scratch:
        for name in args.models:
            micro = args.micro_batch_size or (8 if name == "tiny" else 4)
            rows.append(measure(name, micro, args.accumulation, args.repeats, args.device, Path(scratch)))
            print(f"{name}: done", file=sys.stderr)
    print(table(rows, args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
