"""Downstream evals during training: lm-evaluation-harness on the in-memory model every
``train.downstream_interval`` steps (and at the last step), logged like the validation loss.

The model is gathered to global rank 0 one parameter at a time (:meth:`Engine.full_parameters`:
over FSDP shards and tensor-parallel slices, and under pipeline parallelism from the rank that holds
each stage) into a plain single-process :class:`~megamix.model.Transformer` there, which lm-eval
scores through :class:`megamix.train.lm_eval_model.MegamixLM` while the other ranks wait.  Tasks:
``megamix_text_perplexity``, the offline perplexity of a local text (``train.downstream.text``; the
task's YAML is ``megamix/hf/lm_eval_tasks``, the one ``megamix lm-eval`` runs on exports, with
the same numbers), and any lm-eval task installed or under ``train.downstream.include_path``, by name.

The training trajectory does not change: the copy is separate, nothing is written back, and the
RNG states lm-eval seeds (Python's, NumPy's, torch's) are restored afterwards.  Keep an eval well
under ``parallel.timeout_s``: the other ranks wait for it in a collective.

Metrics: ``downstream/<task>/<metric>`` (lm-eval's metric names without their ``,none`` filter),
e.g. ``downstream/megamix_text_perplexity/word_perplexity``.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from megamix.config import TEXT_TASK, Config, ConfigError
from megamix.model import Transformer
from megamix.train.engines import Engine

# The repository's lm-eval task YAMLs (data files shipped in the package; megamix.hf.harness reads
# the same directory for `megamix lm-eval`).
TASKS_DIR = Path(__file__).resolve().parents[1] / "hf" / "lm_eval_tasks"


@contextmanager
def preserved_rng():
    """Python's, NumPy's and torch's (CPU and CUDA) random states, restored on exit."""
    python, numpy, cpu = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def text_task(path: str | Path) -> dict:
    """The local-file perplexity task (its YAML) over ``path``: JSON lines, or a ``.txt`` file as one document."""
    task = yaml.safe_load((TASKS_DIR / f"{TEXT_TASK}.yaml").read_text())
    path = Path(path).resolve()
    if path.suffix == ".txt":
        task.update(dataset_path="text", dataset_kwargs={"data_files": {"test": str(path)}, "sample_by": "document"})
    else:
        task["dataset_kwargs"] = {"data_files": {"test": str(path)}}
    return task


def gather_model(engine: Engine, cfg: Config, device: torch.device) -> Transformer | None:
    """A plain copy of the model on global rank 0 (None elsewhere; a collective)."""
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    model = None
    if rank0:
        with torch.device("meta"):
            model = Transformer(cfg.model, cfg.norm)
        model.to_empty(device=device)
        model.init_weights()  # the rotary tables; the weights are overwritten below
        params = dict(model.named_parameters())
    for name, full in engine.full_parameters():
        if rank0:
            params[name].data.copy_(full)
    if model is not None:
        model.eval()
    return model


def flatten_results(results: dict) -> dict[str, float]:
    """lm-eval's ``{task: {"word_perplexity,none": v, "..._stderr,none": s, "alias": ...}}`` →
    ``{"downstream/task/word_perplexity": v}``."""
    out = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, comma, filt = key.partition(",")  # lm-eval's metrics are "name,filter"
            if not comma or not isinstance(value, (int, float)) or isinstance(value, bool) or "_stderr" in metric:
                continue
            out[f"downstream/{task}/{metric}" + (f"_{filt}" if filt and filt != "none" else "")] = float(value)
    return out


class DownstreamEvals:
    """The in-loop lm-eval runs of one training run; :meth:`run` is a collective.  lm-eval is
    imported, the tokenizer loaded and the task names checked on rank 0 at start-up, so a bad task
    name fails before the first step rather than at the first eval."""

    def __init__(self, cfg: Config, engine: Engine, device: torch.device):
        d = cfg.train.downstream
        self.cfg, self.engine = cfg, engine
        self.device = torch.device(d.device) if d.device else device
        self.rank0 = not dist.is_initialized() or dist.get_rank() == 0
        if d.text and not Path(d.text).is_file():
            raise ConfigError("train.downstream.text", f"{d.text}: no such file")
        self.tasks: list = [text_task(d.text) if name == TEXT_TASK else name for name in d.tasks]
        self.task_manager = self.tokenizer = None
        if self.rank0:
            self._prepare()

    def _prepare(self) -> None:
        d = self.cfg.train.downstream
        try:
            from lm_eval.tasks import TaskManager
        except ImportError:
            raise ConfigError("train.downstream_interval", "downstream evals need lm-evaluation-harness: "
                              "pip install 'megamix[eval]' (or set train.downstream_interval: 0)") from None
        from megamix.data.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(d.tokenizer or self.cfg.data.tokenizer)
        paths = [str(TASKS_DIR)] + ([d.include_path] if d.include_path else [])
        manager = TaskManager(include_path=paths, include_defaults=False)
        named = [t for t in self.tasks if isinstance(t, str)]
        if any(name not in manager.all_tasks for name in named):
            manager = TaskManager(include_path=paths, include_defaults=True)  # indexing lm-eval's own tasks: seconds
            unknown = [name for name in named if name not in manager.all_tasks]
            if unknown:
                raise ConfigError("train.downstream.tasks", f"lm-eval knows no task {', '.join(unknown)} "
                                  "(installed tasks: `lm_eval ls tasks`; local YAMLs: train.downstream.include_path)")
        self.task_manager = manager

    def run(self, step: int) -> dict | None:
        """Gather, evaluate on rank 0, and return the record (None on the other ranks)."""
        with preserved_rng():
            model = gather_model(self.engine, self.cfg, self.device)
            record = self._evaluate(model, step) if self.rank0 else None
            del model
        if dist.is_initialized():
            dist.barrier()
        return record

    def _evaluate(self, model: Transformer, step: int) -> dict:
        import lm_eval

        from megamix.train.lm_eval_model import MegamixLM

        d = self.cfg.train.downstream
        lm = MegamixLM(model, self.tokenizer, d.max_length or self.cfg.model.max_seq_len, d.batch_size, self.device)
        results = lm_eval.simple_evaluate(model=lm, tasks=self.tasks, num_fewshot=d.num_fewshot, limit=d.limit,
                                          bootstrap_iters=0, log_samples=False, task_manager=self.task_manager)
        return {"step": step, **flatten_results(results["results"])}
