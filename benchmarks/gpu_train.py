"""Training on one GPU, as scripts/gpu_check.sh measures it: throughput variants and 7B memory.

``throughput``: ``llama_1b`` (bf16) trained through ``Trainer.train_step`` with the fused kernels
on and off (``MEGAMIX_DISABLE_FUSED``) and ``train.compile`` on and off, and a plain loop over
transformers' ``LlamaForCausalLM`` of the same size, batch and precision, in one process.  Each
variant runs a few untimed warm-up steps (the first compiles), then timed steps with CUDA
synchronization around each; the JSON reports the median step time, tokens/s and MFU: model FLOPs
per token (:func:`megamix.train.metrics.flops_per_token`: 6·N plus the attention term) times
tokens/s over the GPU's dense bf16 peak (:func:`megamix.train.metrics.peak_flops`).  Variants run
in order (plain loop, fused, unfused, fused + compile, unfused + compile) and the JSON is
rewritten after each, so a time budget (``--budget-s``) or a timeout still reports those done.

``memory``: ``llama_7b``'s shapes with a few layers (``--layers 2 4``) on one GPU (tp = pp = 1,
no ZeRO, bf16, the config's micro batch and activation checkpointing): the peak of
``torch.cuda.max_memory_allocated`` over a few steps against ``megamix plan``'s estimate
(:func:`megamix.plan.make_plan`) of the same config, both extrapolated to 32 layers.  Rule: the
per-layer increment is (peak(L2) - peak(L1)) / (L2 - L1) for the two layer counts, and
peak(32) = peak(L2) + (32 - L2) × increment; the plan is evaluated at 32 layers directly.

    python benchmarks/gpu_train.py throughput --config configs/llama_1b.yaml --json out/train.json
    python benchmarks/gpu_train.py memory --config configs/llama_7b.yaml --json out/memory.json
    python benchmarks/gpu_train.py throughput --config configs/llama_tiny.yaml --steps 2 --json t.json  # CPU
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
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
from megamix.data.indexed import IndexedDatasetWriter  # noqa: E402
from megamix.train.metrics import peak_flops  # noqa: E402

GiB = 2**30


def write_random_corpus(prefix: Path, vocab: int, tokens: int, seed: int = 0) -> None:
    """A synthetic token corpus: documents of 4096 uniformly random ids."""
    rng = np.random.default_rng(seed)
    dtype = np.uint16 if vocab < 65535 else np.int32
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for _ in range(0, max(tokens, 4096), 4096):
            writer.add_document(rng.integers(0, vocab, 4096).astype(dtype))


def run_overrides(tmp: Path, steps: int, cfg, data_workers: int | None) -> list[str]:
    """What turns a recipe config into a short benchmark run over the synthetic corpus."""
    need = (steps + 2) * cfg.train.global_batch_size * (cfg.data.seq_len + 1) * 2 + 50 * 4096
    prefix = tmp / "tokens"
    if not prefix.with_suffix(".bin").exists():
        write_random_corpus(prefix, cfg.model.vocab_size, need)
    out = [f"data.path={prefix}", "data.valid_path=null", "data.split=98,2", f"data.cache_dir={tmp / 'index'}",
           f"train.steps={steps + 2}", "train.warmup_steps=0", "train.tensorboard=false",
           "train.progress_bar=false", "train.log_interval=1000000", "train.eval_interval=0",
           "train.save_interval=0", "train.eval_tokens=4096"]
    if data_workers is not None:
        out.append(f"data.num_workers={data_workers}")
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - start


@contextlib.contextmanager
def fused_kernels(enabled: bool):
    """MEGAMIX_DISABLE_FUSED for the duration (read by the dispatch at every call, and baked into
    graphs compiled meanwhile)."""
    old = os.environ.get("MEGAMIX_DISABLE_FUSED")
    if enabled:
        os.environ.pop("MEGAMIX_DISABLE_FUSED", None)
    else:
        os.environ["MEGAMIX_DISABLE_FUSED"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MEGAMIX_DISABLE_FUSED", None)
        else:
            os.environ["MEGAMIX_DISABLE_FUSED"] = old


def close_trainer(trainer) -> None:
    """What Trainer.run's ``finally`` does, for a trainer driven step by step."""
    for name in ("close_loader",):
        with contextlib.suppress(Exception):
            getattr(trainer, name)()
    with contextlib.suppress(Exception):
        trainer.metrics.close()
    with contextlib.suppress(Exception):
        if trainer.lock is not None:
            trainer.lock.release()


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with contextlib.suppress(Exception):
        torch.compiler.reset()


# ---------------------------------------------------------------------------------------------
# The plain transformers loop


def hf_llama(cfg, device: torch.device) -> torch.nn.Module:
    """transformers' Llama with megamix's sizes (untied unless the config ties, no biases)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    kwargs = dict(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.kv_heads,
        max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings,
        initializer_range=m.init_std, attn_implementation="sdpa",
    )
    try:  # transformers >= 4.57 spells RoPE as rope_parameters, older ones rope_theta
        config = LlamaConfig(rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta}, **kwargs)
    except TypeError:
        config = LlamaConfig(rope_theta=m.rope_theta, **kwargs)
    torch.manual_seed(cfg.train.seed)
    return LlamaForCausalLM(config).to(device)


class PlainLoop:
    """The loop a user would write around ``LlamaForCausalLM``: forward under autocast, loss,
    backward over the micro-batches, clip, AdamW step (megamix's optimizer settings)."""

    def __init__(self, cfg, device: torch.device):
        from megamix.train.optim import build_optimizer

        self.cfg, self.device = cfg, device
        self.model = hf_llama(cfg, device)
        self.optimizer = build_optimizer(self.model, cfg.train)
        t = cfg.train
        self.micro = t.global_batch_size // t.micro_batch_size
        g = torch.Generator().manual_seed(0)
        shape = (8, self.micro, t.micro_batch_size, cfg.data.seq_len + 1)  # 8 steps of batches, cycled
        self.batches = torch.randint(0, cfg.model.vocab_size, shape, generator=g)
        if device.type == "cuda":
            self.batches = self.batches.pin_memory()
        self.step = 0

    def autocast(self):
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> float:
        from megamix.train.optim import lr_at

        t = self.cfg.train
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, t)
        total = 0.0
        for tokens in self.batches[self.step % len(self.batches)]:
            tokens = tokens.to(self.device, non_blocking=True)
            with self.autocast():
                logits = self.model(input_ids=tokens[:, :-1]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()) / self.micro
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total


# ---------------------------------------------------------------------------------------------
# throughput

VARIANTS = (  # name, fused kernels, compile
    ("transformers loop", None, False),
    ("megamix fused", True, False),
    ("megamix unfused", False, False),
    ("megamix fused + compile", True, True),
    ("megamix unfused + compile", False, True),
)


def measure(step, device: torch.device, warmup: int, steps: int) -> tuple[list[float], float]:
    """(timed step seconds, seconds of warm-up)"""
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warm = time.perf_counter() - start
    return [timed(step, device) for _ in range(steps)], warm


def throughput(args) -> dict:
    begin = time.perf_counter()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    base = list(args.overrides)
    if args.precision:
        base.append(f"train.precision={args.precision}")
    if args.micro_batches:
        cfg0 = load_config(args.config, base)
        base.append(f"train.global_batch_size={cfg0.train.micro_batch_size * args.micro_batches}")
    peak = peak_flops(device)
    result: dict = {"config": str(args.config), "device": _device_name(device), "torch": torch.__version__,
                    "peak_bf16_flops": peak, "warmup_steps": args.warmup, "timed_steps": args.steps,
                    "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = load_config(args.config, base)
        overrides = base + run_overrides(tmp, args.warmup + args.steps, cfg, args.data_workers)
        cfg = load_config(args.config, overrides)
        t = cfg.train
        tokens_per_step = t.global_batch_size * cfg.data.seq_len
        result.update(tokens_per_step=tokens_per_step, precision=t.precision, layers=cfg.model.num_layers,
                      hidden=cfg.model.hidden_size, micro_batch_size=t.micro_batch_size,
                      global_batch_size=t.global_batch_size, seq_len=cfg.data.seq_len)
        flops_per_token = None
        for name, fused, compiled in VARIANTS:
            record: dict = {"fused": fused, "compile": compiled}
            result["variants"][name] = record
            elapsed = time.perf_counter() - begin
            if compiled and device.type != "cuda":
                record["status"] = "skipped (CPU: inductor's C++ build is too slow here)"
            elif name in args.skip:
                record["status"] = "skipped (--skip)"
            elif args.budget_s and elapsed > args.budget_s * (0.55 if compiled else 0.8):
                record["status"] = f"skipped (time budget: {elapsed:.0f} of {args.budget_s:.0f} s used)"
            else:
                record["status"] = "running"  # what a report shows if the step's timeout kills it here
                _write(args.json, _finish(result, flops_per_token, peak))
                try:
                    times, warm, extra = run_variant(cfg, overrides, args, device, tmp, name, fused, compiled)
                    step_s = statistics.median(times)
                    flops_per_token = extra.pop("flops_per_token", None) or flops_per_token
                    record.update(status="passed", step_s=step_s, step_times_s=times, warmup_s=warm,
                                  tokens_per_s=tokens_per_step / step_s, **extra)
                except Exception as exc:  # noqa: BLE001 - reported; the other variants still run
                    record.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:2000])
                finally:
                    release_memory()
            _write(args.json, _finish(result, flops_per_token, peak))
    return _finish(result, flops_per_token, peak)


def run_variant(cfg, overrides, args, device, tmp: Path, name: str, fused, compiled):
    from megamix.train.trainer import Trainer

    if fused is None:
        loop = PlainLoop(cfg, device)
        times, warm = measure(loop.train_step, device, args.warmup, args.steps)
        return times, warm, {"peak_mem_gib": _peak_gib(device)}
    run_dir = tmp / name.replace(" ", "_").replace("+", "c")
    variant = load_config(args.config, overrides + [f"train.compile={str(compiled).lower()}",
                                                    f"train.output_dir={run_dir}"])
    with fused_kernels(fused):
        trainer = Trainer(variant)
        try:
            losses = []

            def step():
                losses.append(trainer.train_step()["loss"])

            times, warm = measure(step, device, args.warmup, args.steps)
            from megamix.ops import fused_norm

            extra = {"peak_mem_gib": _peak_gib(device), "flops_per_token": trainer.flops_per_token,
                     "loss_first": losses[0], "loss_last": losses[-1],
                     "kernels": "cuda" if fused and fused_norm._cuda_kernels and fused_norm._cuda_kernels[0] else
                     "pytorch"}
            return times, warm, extra
        finally:
            close_trainer(trainer)


def _finish(result: dict, flops_per_token: float | None, peak: float | None) -> dict:
    result["flops_per_token"] = flops_per_token
    variants = result["variants"]
    for record in variants.values():
        rate = record.get("tokens_per_s")
        record["mfu"] = rate * flops_per_token / peak if rate and flops_per_token and peak else None
    plain = variants.get("transformers loop", {}).get("tokens_per_s")
    best = max((r.get("tokens_per_s") or 0 for n, r in variants.items() if n.startswith("megamix")), default=0)
    result["best_megamix"] = max((n for n, r in variants.items() if n.startswith("megamix") and r.get("tokens_per_s")),
                                 key=lambda n: variants[n]["tokens_per_s"], default=None)
    result["speedup_vs_plain"] = best / plain if best and plain else None
    result["best_mfu"] = max((r["mfu"] for r in variants.values() if r.get("mfu")), default=None)
    return result


# ---------------------------------------------------------------------------------------------
# memory


def memory(args) -> dict:
    from megamix.plan import make_plan
    from megamix.train.trainer import Trainer

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    measure_gpu = device.type == "cuda" and not args.plan_only
    layout = ["parallel.tp=1", "parallel.pp=1", "parallel.zero=0", "parallel.sequence_parallel=false",
              "parallel.engine=fsdp2"]
    base = list(args.overrides) + layout
    cfg0 = load_config(args.config, base)
    if args.micro_batches:
        base.append(f"train.global_batch_size={cfg0.train.micro_batch_size * args.micro_batches}")
    full_layers = args.full_layers or cfg0.model.num_layers
    result: dict = {"config": str(args.config), "device": _device_name(device), "layers": args.layers,
                    "full_layers": full_layers, "layout": layout, "per_layers": {},
                    "rule": "increment = (peak(L2) - peak(L1)) / (L2 - L1); "
                            "peak(full) = peak(L2) + (full - L2) * increment; plan evaluated at full directly"}

    def plan_gib(layers: int) -> float:
        cfg = load_config(args.config, base + [f"model.num_layers={layers}"])
        return make_plan(cfg)["ranks"][0]["memory_gib"]["total"]

    result["plan_full_gib"] = plan_gib(full_layers)  # before any trainer: plan builds a fake process group
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for layers in args.layers:
            entry: dict = {"plan_gib": plan_gib(layers)}
            result["per_layers"][str(layers)] = entry
            if not measure_gpu:
                entry["status"] = "skipped (no GPU)" if device.type != "cuda" else "skipped (--plan-only)"
                continue
            cfg = load_config(args.config, base + [f"model.num_layers={layers}"])
            overrides = base + [f"model.num_layers={layers}"] + run_overrides(tmp, args.steps, cfg, args.data_workers)
            overrides.append(f"train.output_dir={tmp / f'run_{layers}'}")
            release_memory()
            trainer = None
            try:
                trainer = Trainer(load_config(args.config, overrides))
                torch.cuda.reset_peak_memory_stats()
                for _ in range(args.steps):
                    trainer.train_step()
                sync(device)
                entry.update(status="passed", peak_gib=torch.cuda.max_memory_allocated() / GiB,
                             params=trainer.engine.num_params)
            except Exception as exc:  # noqa: BLE001
                entry.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:2000])
            finally:
                if trainer is not None:
                    close_trainer(trainer)
                del trainer
                release_memory()
            _write(args.json, result)
    peaks = [(int(k), v.get("peak_gib")) for k, v in result["per_layers"].items()]
    if len(peaks) >= 2 and all(p is not None for _, p in peaks):
        (l1, p1), (l2, p2) = sorted(peaks)[-2:]
        increment = (p2 - p1) / (l2 - l1)
        result["increment_gib_per_layer"] = increment
        result["measured_full_gib"] = p2 + (full_layers - l2) * increment
        result["measured_over_plan"] = result["measured_full_gib"] / result["plan_full_gib"]
    _write(args.json, result)
    return result


# ---------------------------------------------------------------------------------------------


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None


def _write(path: Path | None, result: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2, default=str))
        os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", required=True)
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    common.add_argument("--micro-batches", type=int, default=2,
                        help="micro-batches per step: global batch = this x the config's micro batch (0: the config's)")
    common.add_argument("--data-workers", type=int, default=None, help="data.num_workers (default: the config's)")
    common.add_argument("--json", type=Path, default=None)
    t = sub.add_parser("throughput", parents=[common])
    t.add_argument("--precision", choices=("fp32", "bf16"), default=None)
    t.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (the first compiles)")
    t.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    t.add_argument("--budget-s", type=float, default=0.0,
                   help="skip the variants that would start this late (0: no budget)")
    t.add_argument("--skip", action="append", default=[], choices=[v[0] for v in VARIANTS])
    m = sub.add_parser("memory", parents=[common])
    m.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    m.add_argument("--full-layers", type=int, default=None, help="extrapolate to this many layers (the config's)")
    m.add_argument("--steps", type=int, default=3)
    m.add_argument("--plan-only", action="store_true", help="no measurement, the plan only")
    args = parser.parse_args(argv)
    result = throughput(args) if args.what == "throughput" else memory(args)
    _write(args.json, result)
    print(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
