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
the per-layer gradient norms and the optimizer step included.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megamix.config import load_config  # noqa: E402
from megamix.data.gpt_dataset import micro_batches  # noqa: E402
from megamix.data.indexed import IndexedDatasetWriter  # noqa: E402
from megamix.train.metrics import peak_flops  # noqa: E402
from megamix.train.optim import build_optimizer, lr_at  # noqa: E402
from megamix.train.trainer import Trainer  # noqa: E402


def write_random_corpus(prefix: Path, vocab: int, tokens: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    dtype = np.uint16 if vocab < 65535 else np.int32
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for _ in range(0, tokens, 4096):
            writer.add_document(rng.integers(0, vocab, 4096).astype(dtype))


def hf_llama(cfg, device: torch.device) -> torch.nn.Module:
    """transformers' Llama with megamix's sizes (untied unless the config ties, no biases)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    config = LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.kv_heads,
        max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta}, initializer_range=m.init_std,
        attn_implementation="sdpa",
    )
    torch.manual_seed(cfg.train.seed)
    return LlamaForCausalLM(config).to(device)


class PlainLoop:
    """The loop a user would write around ``LlamaForCausalLM``: forward, loss, backward, clip, step."""

    def __init__(self, cfg, trainer: Trainer):
        self.cfg, self.data, self.device = cfg, trainer.train_data, trainer.device
        self.model = hf_llama(cfg, trainer.device)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.autocast = trainer.autocast
        self.step = 0

    def train_step(self) -> float:
        t = self.cfg.train
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, t)
        batches = micro_batches(self.step, t.global_batch_size, t.micro_batch_size)
        total = 0.0
        for indices in batches:
            tokens = torch.stack([self.data[i] for i in indices]).to(self.device, non_blocking=True)
            with self.autocast():
                logits = self.model(input_ids=tokens[:, :-1]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()) / len(batches)
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total


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
        need = (steps + 1) * cfg.train.global_batch_size * (cfg.data.seq_len + 1) * 2 + 50 * 4096
        write_random_corpus(Path(tmp) / "tokens", cfg.model.vocab_size, need)
        cfg = load_config(args.config, overrides + [
            f"data.path={Path(tmp) / 'tokens'}", "data.valid_path=null", "data.split=98,2",
            f"train.output_dir={Path(tmp) / 'run'}", f"train.steps={steps}", "train.warmup_steps=0",
            "train.tensorboard=false", "train.progress_bar=false", "train.log_interval=1000000",
        ])
        megamix = Trainer(cfg)
        plain = PlainLoop(cfg, megamix)
        device = megamix.device
        for _ in range(args.warmup):
            megamix.train_step()
            plain.train_step()
        times: dict[str, list[float]] = {"megamix": [], "transformers loop": []}
        for _ in range(args.rounds):
            for _ in range(args.steps_per_round):
                times["megamix"].append(timed(megamix.train_step, device))
            for _ in range(args.steps_per_round):
                times["transformers loop"].append(timed(plain.train_step, device))

    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
    peak = peak_flops(device)
    m = cfg.model
    print(f"\n{megamix.num_params / 1e6:.1f}M parameters ({m.num_layers} layers, hidden {m.hidden_size}, "
          f"{'/'.join(sorted(set(megamix.model.placements)))}-LN), batch {cfg.train.global_batch_size} × "
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
