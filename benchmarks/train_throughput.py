"""Training throughput of megamix against a plain loop over transformers' ``LlamaForCausalLM``.

Both train a model of the same size on the same batches (a synthetic token corpus written once), with
the same optimizer (AdamW, fp32 master weights) and precision (fp32, or bf16 autocast), in the same
process.  The two are interleaved in rounds (k megamix steps, k plain steps, repeat) so that clock
boosts, thermal throttling or a busy neighbour affect both alike; the table reports the median step
time of each.  MFU counts the model FLOPs of :func:`megamix.train.metrics.flops_per_token` against
the GPU's dense bf16 peak.

    python benchmarks/train_throughput.py --config configs/llama_1b.yaml --precision bf16
    python benchmarks/train_throughput.py --config configs/llama_tiny.yaml --set model.num_layers=2  # CPU

megamix is measured through ``Trainer.train_step`` itself: data loading, micro-batch accumulation,
the per-layer gradient norms and the optimizer step included.  ``benchmarks/gpu_train.py`` (what
scripts/gpu_check.sh runs) measures the variants: fused kernels on/off, ``train.compile`` on/off.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_train import PlainLoop, close_trainer, run_overrides  # noqa: E402
from megamix.config import load_config  # noqa: E402
from megamix.train.metrics import peak_flops  # noqa: E402
from megamix.train.trainer import Trainer  # noqa: E402


def timed(step, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs/llama_tiny.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None)
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each before the rounds")
    args = parser.parse_args(argv)

    overrides = list(args.overrides)
    if args.precision:
        overrides.append(f"train.precision={args.precision}")
    if args.micro_batch_size:
        size = args.micro_batch_size
        overrides += [f"train.micro_batch_size={size}", f"train.global_batch_size={size}"]
    if args.seq_len:
        overrides.append(f"data.seq_len={args.seq_len}")
    steps = args.warmup + args.rounds * args.steps_per_round
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.config, overrides)
        run = overrides + run_overrides(Path(tmp), steps, cfg, None) + [f"train.output_dir={Path(tmp) / 'run'}"]
        cfg = load_config(args.config, run)
        megamix = Trainer(cfg)
        device = megamix.device
        plain = PlainLoop(cfg, device)
        try:
            for _ in range(args.warmup):
                megamix.train_step()
                plain.train_step()
            times: dict[str, list[float]] = {"megamix": [], "transformers loop": []}
            for _ in range(args.rounds):
                for _ in range(args.steps_per_round):
                    times["megamix"].append(timed(megamix.train_step, device))
                for _ in range(args.steps_per_round):
                    times["transformers loop"].append(timed(plain.train_step, device))
        finally:
            close_trainer(megamix)

    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
    peak = peak_flops(device)
    m = cfg.model
    schemes = "/".join(sorted(set(getattr(megamix.engine.model, "schemes", []))))
    print(f"\n{megamix.engine.num_params / 1e6:.1f}M parameters ({m.num_layers} layers, hidden {m.hidden_size}, "
          f"{schemes}-LN), batch {cfg.train.global_batch_size} × "
          f"{cfg.data.seq_len} tokens, {cfg.train.precision}, {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"median of {args.rounds * args.steps_per_round} interleaved steps each\n")
    print(f"{'':<20} {'step ms':>10} {'tokens/s':>12} {'MFU':>7}")
    rate = {}
    for name, values in times.items():
        step_s = statistics.median(values)
        rate[name] = tokens_per_step / step_s
        mfu = f"{rate[name] * megamix.flops_per_token / peak:6.1%}" if peak else "    n/a"
        print(f"{name:<20} {step_s * 1e3:>10.1f} {rate[name]:>12,.0f} {mfu:>7}")
    print(f"\nmegamix / transformers loop: {rate['megamix'] / rate['transformers loop']:.2f}×")


if __name__ == "__main__":
    main()
