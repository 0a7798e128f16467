"""The training loop: data → forward/backward over micro-batches → clip → AdamW step → log,
evaluate and checkpoint, with automatic resume from the latest complete checkpoint."""

from __future__ import annotations

import contextlib
import math
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from megamix.config import Config, validate
from megamix.data.gpt_dataset import build_dataset, micro_batches
from megamix.evaluate import evaluate_loss
from megamix.model import Transformer, num_parameters
from megamix.model.placement import describe_placements
from megamix.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from megamix.train.metrics import MetricsLogger, flops_per_token, layer_grad_norms, peak_flops
from megamix.train.optim import build_optimizer, lr_at


def language_model_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; ``tokens`` holds ``seq_len + 1`` ids per sample."""
    targets = tokens[:, 1:]
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


class Trainer:
    def __init__(self, cfg: Config, device: torch.device | str | None = None):
        self.cfg = validate(cfg, world_size=1, for_training=True)
        t = cfg.train
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.output_dir = Path(t.output_dir)
        torch.manual_seed(t.seed)
        self.model = Transformer(cfg.model, cfg.norm).to(self.device)
        self.optimizer = build_optimizer(self.model, t)
        self.num_params = num_parameters(self.model)
        self.micro_batches_per_step = t.global_batch_size // t.micro_batch_size
        self.train_data = build_dataset(
            cfg.data.path, "train", cfg.data.split, cfg.data.seq_len, t.steps * t.global_batch_size, cfg.data.seed
        )
        valid_path = cfg.data.valid_path or cfg.data.path
        self.valid_data = build_dataset(
            valid_path, "valid", cfg.data.split, cfg.data.seq_len, t.eval_steps * t.micro_batch_size,
            cfg.data.seed, use_split=cfg.data.valid_path is None,
        )
        self.step = 0
        self.resumed_from = None
        latest = latest_checkpoint(self.output_dir)
        if latest is not None:
            state = load_checkpoint(latest, self.model, self.optimizer)
            self.step = state["step"]
            set_rng_state(state["rng"])
            self.resumed_from = latest
        cfg.save(self.output_dir / "config.yaml")
        self.metrics = MetricsLogger(
            self.output_dir, tensorboard=t.tensorboard, resume_step=self.step if self.resumed_from else None
        )
        embedding = cfg.model.vocab_size * cfg.model.hidden_size
        self.flops_per_token = flops_per_token(
            self.num_params, cfg.model.num_layers, cfg.model.hidden_size, cfg.data.seq_len, embedding
        )

    # ------------------------------------------------------------------------------------------
    def autocast(self):
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def batch(self, dataset, indices: list[int]) -> torch.Tensor:
        return torch.stack([dataset[i] for i in indices]).to(self.device, non_blocking=True)

    def train_step(self) -> dict:
        """One optimizer step over the global batch of ``self.step``."""
        t = self.cfg.train
        lr = lr_at(self.step, t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        total_loss = torch.zeros((), device=self.device)
        for indices in micro_batches(self.step, t.global_batch_size, t.micro_batch_size):
            tokens = self.batch(self.train_data, indices)
            with self.autocast():
                logits = self.model(tokens[:, :-1])
            loss = language_model_loss(logits, tokens) / self.micro_batches_per_step
            loss.backward()
            total_loss += loss.detach()
        layer_norms = layer_grad_norms(self.model) if self.should_log(self.step + 1) else {}
        max_norm = t.grad_clip if t.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        record = {"step": self.step, "loss": float(total_loss), "lr": lr, "grad_norm": float(grad_norm)}
        record.update({f"grad_norm/layer_{i:02d}": v for i, v in sorted(layer_norms.items())})
        return record

    def evaluate(self) -> dict:
        t = self.cfg.train
        result = evaluate_loss(
            self.model, self.valid_data, t.micro_batch_size, t.eval_steps, self.device, self.autocast()
        )
        return {"step": self.step, **result}

    def save(self) -> Path:
        t = self.cfg.train
        consumed = self.step * t.global_batch_size
        path = save_checkpoint(
            self.output_dir, self.step, self.model, self.optimizer, {"step": self.step, "consumed_samples": consumed}
        )
        self.cfg.save(path / "config.yaml")
        return path

    def should_log(self, step: int) -> bool:
        return step % self.cfg.train.log_interval == 0 or step == self.cfg.train.steps

    # ------------------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        """Train to ``train.steps``; returns the training records (one per logged step)."""
        t = self.cfg.train
        tokens_per_step = t.global_batch_size * self.cfg.data.seq_len
        if self.resumed_from:
            print(f"resumed from {self.resumed_from} at step {self.step}", file=sys.stderr)
        print(
            f"megamix: {self.num_params / 1e6:.1f}M params, {self.cfg.model.num_layers} layers "
            f"({describe_placements(self.model.placements)}), "
            f"device {self.device}, {t.steps} steps × {tokens_per_step} tokens",
            file=sys.stderr,
        )
        peak = peak_flops(self.device)
        history = []
        show_bar = t.progress_bar and sys.stderr.isatty()
        bar = tqdm(total=t.steps, initial=self.step, disable=not show_bar, desc="train", mininterval=1, file=sys.stderr)
        window_start, window_steps = time.perf_counter(), 0
        while self.step < t.steps:
            record = self.train_step()
            window_steps += 1
            bar.update(1)
            if self.should_log(self.step):
                elapsed = time.perf_counter() - window_start
                record["tokens_per_s"] = window_steps * tokens_per_step / elapsed
                record["steps_per_s"] = window_steps / elapsed
                record["consumed_samples"] = self.step * t.global_batch_size
                if peak:
                    record["mfu"] = record["tokens_per_s"] * self.flops_per_token / peak
                record["peak_mem_gb"] = self.peak_memory_gb()
                self.metrics.log(record)
                history.append(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
                tqdm.write(
                    f"step {self.step:>6} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                    f"grad norm {record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tok/s",
                    file=sys.stderr,
                )
                window_start, window_steps = time.perf_counter(), 0
            if t.eval_interval and self.step % t.eval_interval == 0 or self.step == t.steps:
                ev = self.evaluate()
                self.metrics.log(ev)
                line = f"step {self.step:>6} | val loss {ev['val_loss']:.4f} | val ppl {ev['val_ppl']:.2f}"
                tqdm.write(line, file=sys.stderr)
            if t.save_interval and self.step % t.save_interval == 0 or self.step == t.steps:
                self.save()
        bar.close()
        self.metrics.close()
        return history

    def peak_memory_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB
