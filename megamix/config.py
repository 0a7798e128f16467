"""The one config schema: typed dataclasses, loaded from YAML, overridden with ``--set``.

Every run is described by one YAML file with the sections below; ``--set section.key=value``
overrides any key (the value is parsed as YAML, so ``--set norm.layers=[post,pre]`` works).
:func:`validate` checks the whole config before any process group or tensor exists, and every
problem is a :class:`ConfigError` that names the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from megamix.errors import MegamixError
from megamix.schemes import ATTENTION_NORMS, MIX, SCHEMES, model_schemes

NORM_TYPES = ("rmsnorm", "layernorm", "dyt")
ENGINES = ("fsdp2", "deepspeed")
OFFLOADS = ("none", "cpu", "nvme")
# DeepSpeed keys the trainer derives from train.* and must own: the batch arithmetic decides which
# samples each rank reads, and the optimizer and schedule are megamix's (train.lr, lr_schedule, ...).
DEEPSPEED_RESERVED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                           "optimizer", "scheduler")
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble")
ACTIVATION_CHECKPOINT = ("none", "full", "selective")
PRECISIONS = ("fp32", "bf16", "bf16_pure")  # bf16: mixed (fp32 master weights); bf16_pure: the reference's
NONFINITE = ("stop", "skip")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")  # aot_eager/eager: tracing without code generation (debugging)
LR_SCHEDULES = ("cosine", "constant", "wsd")
DECAY_SHAPES = ("linear", "1-sqrt")
WANDB_MODES = ("disabled", "offline", "online")
TEXT_TASK = "megamix_text_perplexity"  # lm-eval's perplexity of a local text (megamix/hf/lm_eval_tasks)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` as a string; configs mean a number, so resolve it as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)


class ConfigError(MegamixError, ValueError):
    """A config problem; ``field`` is the dotted name of the offending key."""

    exit_code = 2

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1368
    num_layers: int = 12
    num_heads: int = 8
    num_kv_heads: int | None = None  # None: same as num_heads (no GQA)
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02
    embed_init_std: float | None = None  # None: init_std (the MixLN reference used sqrt(2/5))
    scaled_init: bool = False  # output projections get init_std / sqrt(2 L)
    embedding_scale: bool = False  # the embedding times a learned scalar initialized to sqrt(hidden) (DyT's LLaMA)

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class NormConfig:
    type: str = "rmsnorm"  # rmsnorm | layernorm | dyt (Dynamic Tanh: γ·tanh(α·x) + β, α a learned scalar)
    scheme: str = "pre"
    alpha: float | None = None  # Mix-LN: the first floor(alpha * L) layers are Post-LN
    post_layers: int | None = None  # Mix-LN: the first K layers are Post-LN (the reference's POST_NUM); or alpha
    layers: list[str] | None = None  # explicit per-layer kinds; overrides scheme
    deepnorm_alpha: float | None = None  # None: DeepNet's (2L)^(1/4)
    deepnorm_beta: float | None = None  # None: DeepNet's init gain (8L)^(-1/4)
    qk_norm: str | None = None  # none | full | per_head on q and k before RoPE; None: as the scheme's paper
    v_norm: str | None = None  # none | full | per_head on v; None: as the scheme's paper (HybridNorm: per_head)
    embedding_norm: bool = False  # Peri-LN's y0 = N(E[x]): a norm on the embedding's output
    dyt_alpha_attention: float = 0.8  # DyT's α0 for the attention sublayer's norms (the paper's LLaMA 7B value)
    dyt_alpha_other: float = 0.2  # ...and for the MLP's, the final, the embedding norm


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    dp: int | None = None  # None: world_size / (tp * pp)
    zero: int = 0
    engine: str = "fsdp2"
    schedule: str = "1f1b"
    virtual_stages: int = 1
    stage_layers: list[int] | None = None  # layers per pipeline stage; None: balanced
    sequence_parallel: bool = False
    activation_checkpoint: str = "none"
    timeout_s: float = 1800.0  # how long a collective may wait before the run fails
    # DeepSpeed only (engine: deepspeed): where ZeRO keeps optimizer states (and, under ZeRO-3,
    # parameters) between steps, and extra DeepSpeed config keys merged last over the generated ones.
    offload: str = "none"  # none | cpu | nvme
    offload_path: str | None = None  # the NVMe directory, for offload: nvme
    deepspeed: dict | None = None


@dataclass
class DataConfig:
    # A .bin/.idx prefix, or a weighted blend: [weight, prefix, weight, prefix, ...].
    path: str | list | None = None
    valid_path: str | list | None = None  # None: validation comes from `split`
    seq_len: int = 256
    split: str = "98,2"  # train,validation shares of the documents of `path`; unused with valid_path
    seed: int = 1234
    tokenizer: str | None = None  # the tokenizer the corpus must have been made with (checked by its PREFIX.json)
    cache_dir: str | None = None  # where the sample index is cached; None: OUTPUT_DIR/data_index
    num_workers: int = 2  # loader worker processes per rank (0: load on the main thread)


@dataclass
class SpikeConfig:
    """Loss-spike and instability flags (``train.spikes``): a step whose loss, global gradient norm
    or one layer's gradient norm jumps more than ``sigmas`` standard deviations of its log over the
    last ``window`` steps, and at least ``min_rise`` (relative) above their geometric mean, is
    logged as an event."""

    enabled: bool = True
    window: int = 50  # steps of running statistics per series
    warmup: int = 10  # steps a series must have seen before it can flag
    sigmas: float = 6.0
    min_rise: float = 0.1  # 0.1: at least 10% above the running (geometric) mean
    layers: bool = True  # also watch each layer's gradient norm


@dataclass
class WandbConfig:
    """Weights & Biases (``pip install megamix[wandb]``); the run id is kept in
    ``OUTPUT_DIR/wandb_id``, so a resumed (requeued) run continues the same W&B run."""

    mode: str = "disabled"  # disabled | offline (no network; `wandb sync` later) | online
    project: str = "megamix"
    entity: str | None = None
    name: str | None = None  # None: the run directory's name
    group: str | None = None
    tags: list[str] | None = None


@dataclass
class ProfileConfig:
    """``torch.profiler`` over steps ``start`` … ``start + steps - 1`` (as numbered in the logs),
    into ``OUTPUT_DIR/profile/``: a trace per rank, and on CUDA a memory snapshot."""

    start: int = 5
    steps: int = 0  # 0: off
    record_shapes: bool = False
    with_stack: bool = False
    memory: bool = True  # on CUDA: record allocations and write a memory snapshot


@dataclass
class DownstreamConfig:
    """lm-evaluation-harness on the in-memory model every ``train.downstream_interval`` steps."""

    tasks: list[str] = field(default_factory=lambda: [TEXT_TASK])  # any installed lm-eval task by name too
    text: str | None = None  # the documents of megamix_text_perplexity: JSON lines with "text" (.gz too) or .txt
    tokenizer: str | None = None  # None: data.tokenizer
    limit: int | None = None  # documents (examples) per task
    batch_size: int = 8
    max_length: int | None = None  # window; None: model.max_seq_len (as `megamix lm-eval`)
    num_fewshot: int | None = None
    include_path: str | None = None  # a directory of extra lm-eval task YAMLs
    device: str | None = None  # where rank 0 evaluates its gathered copy; None: the training device


@dataclass
class TrainConfig:
    steps: int = 100
    micro_batch_size: int = 8
    global_batch_size: int = 8
    lr: float = 1e-3
    min_lr: float = 1e-4
    lr_schedule: str = "cosine"
    warmup_steps: int = 0
    decay_steps: int | None = None  # wsd: the last steps, decaying to min_lr (None: the last 20% of steps)
    decay_shape: str = "linear"  # wsd: linear | 1-sqrt
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 0.0  # 0: no clipping (the Mix-LN recipe); the norm is still logged
    z_loss: float = 0.0  # coefficient of PaLM's auxiliary z-loss, z · mean log²Z (OLMo 2: 1e-5); 0: off
    precision: str = "fp32"
    compile: bool = False  # torch.compile each transformer block
    compile_backend: str = "inductor"  # torch.compile's backend: inductor | aot_eager | eager
    seed: int = 42
    log_interval: int = 10
    eval_interval: int = 100
    eval_tokens: int = 1_048_576  # validation tokens per evaluation, the same samples every time and on every layout
    save_interval: int = 1000  # steps between checkpoints (0: only at the end and when stopped)
    keep_last: int = 0  # keep the N most recent checkpoints (0: keep all)
    keep_every: int = 0  # ...and keep every checkpoint whose step is a multiple of this for good (0: none)
    async_save: bool = False  # write checkpoints in the background (committed before the next one)
    nonfinite: str = "stop"  # a step with a non-finite loss or gradient norm: stop (named error) | skip it
    accept_changes: list[str] | None = None  # config fields a resumed run may change from its checkpoint's
    output_dir: str = "runs/default"
    tensorboard: bool = True
    progress_bar: bool = True
    # Instruments (docs/instruments.md): depth statistics, instability flags, W&B, profiler, evals.
    stats_interval: int = 0  # depth statistics on a fixed validation probe every N steps (0: off)
    stats_probe_sequences: int = 4  # validation sequences in the probe batch
    spikes: SpikeConfig = field(default_factory=SpikeConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    downstream_interval: int = 0  # lm-eval on the in-memory model every N steps (0: off)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config atomically (temp file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_yaml())
        os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Loading: YAML mapping → dataclasses, with type checks and unknown-key suggestions.


def _check_type(name: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        errors = []
        for option in typing.get_args(hint):
            if option is type(None):
                continue
            try:
                return _check_type(name, value, option)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else ConfigError(name, f"unexpected value {value!r}")
    if hint is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(name, f"expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return [_check_type(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(name, f"expected a mapping, got {type(value).__name__} {value!r}")
        return value
    if hint is list:
        if not isinstance(value, list):
            raise ConfigError(name, f"expected a list, got {type(value).__name__} {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, f"expected an integer, got {type(value).__name__} {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(name, f"expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ConfigError(name, f"expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(name, f"expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint} for {name}")


def _deprecated_eval_steps(train: dict, tree: dict) -> None:
    """``train.eval_steps`` (batches of ``micro_batch_size`` sequences) became ``train.eval_tokens``."""
    steps = train.pop("eval_steps")
    if "eval_tokens" in train:
        return
    micro = train.get("micro_batch_size", TrainConfig.micro_batch_size)
    seq_len = (tree.get("data") or {}).get("seq_len", DataConfig.seq_len)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in (steps, micro, seq_len)):
        train["eval_tokens"] = steps * micro * seq_len
        _deprecation("train.eval_steps", f"use train.eval_tokens (here {train['eval_tokens']:,} = eval_steps × "
                     "micro_batch_size × seq_len)")


# Keys a config may still hold from an older megamix, each turned into its replacement (with a
# one-line notice) before the schema is built.
DEPRECATED = {("train", "eval_steps"): _deprecated_eval_steps}


def _deprecation(key: str, advice: str) -> None:
    print(f"megamix: config: {key} is deprecated; {advice}", file=sys.stderr)


def _upgrade(tree: dict) -> dict:
    tree = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    for (section, key), upgrade in DEPRECATED.items():
        if isinstance(tree.get(section), dict) and key in tree[section]:
            upgrade(tree[section], tree)
    return tree


def _build(cls, data: Any, prefix: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix, f"expected a mapping of keys, got {data!r}")
    if cls is Config:
        data = _upgrade(data)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
            raise ConfigError(dotted, f"unknown key{hint} (known: {', '.join(names)})")
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _build(hints[key], value, dotted)
        else:
            kwargs[key] = _check_type(dotted, value, hints[key])
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(dotted, f"'{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.lr=3e-4"`` → ``("train.lr", 0.0003)``; values are parsed as YAML."""
    if "=" not in item:
        raise ConfigError(item, "an override must look like section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = _yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Read a YAML config (or start from defaults), apply ``--set`` overrides, build the schema."""
    tree: dict = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError("config", f"cannot read {path}: {e.strerror}") from None
        try:
            tree = _yaml(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError("config", f"{path} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError("config", f"{path} must hold a mapping of sections")
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    return _build(Config, tree, "")


def config_from_dict(tree: dict) -> Config:
    return _build(Config, tree, "")


# ----------------------------------------------------------------------------------------------
# Validation: everything that can be known before a process group starts.


def _choice(name: str, value: str, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(name, f"must be one of {', '.join(allowed)}; got {value!r}")


def _positive(name: str, value: int | float) -> None:
    if value <= 0:
        raise ConfigError(name, f"must be positive; got {value}")


def parse_blend(path: str | list | None, name: str) -> list[tuple[float, str]]:
    """A data path as ``[(weight, prefix), ...]`` with weights summing to 1."""
    if path is None:
        return []
    if isinstance(path, str):
        return [(1.0, path)]
    if len(path) == 1 and isinstance(path[0], str):
        return [(1.0, path[0])]
    if len(path) % 2:
        raise ConfigError(name, "a blend is a list of weight, prefix pairs: [0.7, a, 0.3, b]")
    pairs = []
    for i in range(0, len(path), 2):
        weight, prefix = path[i], path[i + 1]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise ConfigError(f"{name}[{i}]", f"blend weights must be positive numbers; got {weight!r}")
        if not isinstance(prefix, str):
            raise ConfigError(f"{name}[{i + 1}]", f"expected a .bin/.idx prefix, got {prefix!r}")
        pairs.append((float(weight), prefix))
    total = sum(w for w, _ in pairs)
    return [(w / total, p) for w, p in pairs]


def parse_split(split: str) -> tuple[float, float]:
    try:
        parts = [float(p) for p in split.replace("/", ",").split(",")]
    except ValueError:
        raise ConfigError("data.split", f"expected 'train,valid' shares such as '98,2'; got {split!r}") from None
    if len(parts) not in (1, 2) or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ConfigError("data.split", f"expected two non-negative shares such as '98,2'; got {split!r}")
    if len(parts) == 1:
        parts.append(0.0)
    total = sum(parts)
    return parts[0] / total, parts[1] / total


def _validate_deepspeed(p: ParallelConfig, t: TrainConfig) -> None:
    """The DeepSpeed engine's fields, and the layouts it cannot run: it shards plain parameters over
    data-parallel ranks only (no DTensor, so no tp; its ZeRO does not compose with our pipeline
    schedules), so everything else stays with FSDP2."""
    _choice("parallel.offload", p.offload, OFFLOADS)
    if p.engine != "deepspeed":
        if p.offload != "none":
            raise ConfigError("parallel.offload", "offloading to cpu or nvme needs parallel.engine: deepspeed")
        if p.deepspeed:
            raise ConfigError("parallel.deepspeed", "DeepSpeed keys need parallel.engine: deepspeed")
        return
    if p.zero not in (1, 2, 3):
        raise ConfigError("parallel.zero", "parallel.engine: deepspeed runs ZeRO stages 1, 2 and 3 (1: optimizer "
                          "states sharded, 2: and gradients, 3: and parameters); for zero 0 use fsdp2")
    if p.tp > 1:
        raise ConfigError("parallel.tp", "DeepSpeed cannot shard tensor-parallel (DTensor) parameters; "
                          "use parallel.engine: fsdp2 for tp > 1")
    if p.pp > 1:
        raise ConfigError("parallel.pp", "DeepSpeed's ZeRO does not compose with megamix's pipeline schedules; "
                          "use parallel.engine: fsdp2 for pp > 1")
    if p.offload == "nvme":
        if p.zero != 3:
            raise ConfigError("parallel.offload", "NVMe offload (ZeRO-Infinity) needs parallel.zero: 3; "
                              "ZeRO-1/2 offload to cpu")
        if not p.offload_path:
            raise ConfigError("parallel.offload_path", "offload: nvme needs a directory on the NVMe drive")
    if t.async_save:
        raise ConfigError("train.async_save", "DeepSpeed writes its checkpoints synchronously; "
                          "set train.async_save: false (or use parallel.engine: fsdp2)")
    if t.compile:
        raise ConfigError("train.compile", "megamix compiles blocks under parallel.engine: fsdp2 only "
                          "(DeepSpeed's ZeRO hooks are not traced); set train.compile: false")
    for key in p.deepspeed or {}:
        if key in DEEPSPEED_RESERVED_KEYS:
            raise ConfigError(f"parallel.deepspeed.{key}", "set by megamix from train.* (batch sizes, AdamW, "
                              "learning-rate schedule); change those instead")


def _validate_layout(cfg: Config) -> None:
    """What only the parallel layout can break (the micro-batch rule once ``parallel.dp`` is known)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if m.vocab_size % p.tp:
        raise ConfigError("parallel.tp", f"tp={p.tp} does not divide vocab_size {m.vocab_size} (vocab-parallel head)")
    if p.sequence_parallel and cfg.data.seq_len % p.tp:
        raise ConfigError("parallel.sequence_parallel", f"tp={p.tp} does not divide data.seq_len {cfg.data.seq_len}")
    if p.pp > 1 and m.tie_embeddings:
        raise ConfigError("model.tie_embeddings", "a tied embedding cannot span pipeline stages; untie it or use pp=1")
    if p.schedule == "zero_bubble" and p.pp > 1 and p.activation_checkpoint != "none":
        raise ConfigError("parallel.activation_checkpoint",
                          "the zero_bubble schedule splits backward into input and weight passes, "
                          "which activation checkpointing cannot replay; use activation_checkpoint: none")
    if p.dp is None or t.micro_batch_size <= 0:
        return
    micro_batches = t.global_batch_size // (t.micro_batch_size * p.dp)
    if p.pp > 1 and p.schedule in ("interleaved_1f1b", "zero_bubble") and micro_batches % p.pp:
        raise ConfigError(
            "train.global_batch_size",
            f"the {p.schedule} schedule needs the micro-batches per step ({micro_batches} = global batch / "
            f"(micro batch × dp)) to be a multiple of pp={p.pp}",
        )


def _validate_instruments(cfg: Config) -> None:
    """``train.stats_*``, ``spikes``, ``wandb``, ``profile`` and ``downstream``."""
    t = cfg.train
    for name in ("stats_interval", "downstream_interval"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name}", f"must not be negative (0: off); got {getattr(t, name)}")
    _positive("train.stats_probe_sequences", t.stats_probe_sequences)
    s = t.spikes
    if s.window < 2:
        raise ConfigError("train.spikes.window", f"needs at least 2 steps; got {s.window}")
    if not 2 <= s.warmup <= s.window:
        raise ConfigError("train.spikes.warmup", f"must lie in [2, window={s.window}]; got {s.warmup}")
    _positive("train.spikes.sigmas", s.sigmas)
    if s.min_rise < 0:
        raise ConfigError("train.spikes.min_rise", f"must not be negative; got {s.min_rise}")
    _choice("train.wandb.mode", t.wandb.mode, WANDB_MODES)
    if t.profile.steps < 0:
        raise ConfigError("train.profile.steps", f"must not be negative (0: off); got {t.profile.steps}")
    _positive("train.profile.start", t.profile.start)
    if t.profile.steps and t.profile.start > t.steps:
        raise ConfigError("train.profile.start", f"step {t.profile.start} is beyond train.steps={t.steps}: "
                          "no trace would be written")
    d = t.downstream
    _positive("train.downstream.batch_size", d.batch_size)
    for name in ("limit", "max_length"):
        if getattr(d, name) is not None:
            _positive(f"train.downstream.{name}", getattr(d, name))
    if d.max_length is not None and d.max_length > cfg.model.max_seq_len:
        raise ConfigError("train.downstream.max_length", f"{d.max_length} exceeds model.max_seq_len "
                          f"{cfg.model.max_seq_len}")
    if not t.downstream_interval:
        return
    if not d.tasks:
        raise ConfigError("train.downstream.tasks", "name at least one lm-eval task (e.g. megamix_text_perplexity)")
    if TEXT_TASK in d.tasks and not d.text:
        raise ConfigError("train.downstream.text", f"the {TEXT_TASK} task needs a text file: JSON lines with a "
                          "'text' field (.gz too), or a .txt file as one document")
    if not (d.tokenizer or cfg.data.tokenizer):
        raise ConfigError("train.downstream.tokenizer", "lm-eval scores text: set data.tokenizer (or "
                          "train.downstream.tokenizer) to the tokenizer the corpus was made with")


def validate(cfg: Config, world_size: int | None = None, for_training: bool = False) -> Config:
    """Check the whole config; fill in derived values (``parallel.dp``) when the world size is known."""
    m, n, p, d, t = cfg.model, cfg.norm, cfg.parallel, cfg.data, cfg.train

    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "max_seq_len"):
        _positive(f"model.{name}", getattr(m, name))
    if m.num_kv_heads is not None:
        _positive("model.num_kv_heads", m.num_kv_heads)
    if m.hidden_size % m.num_heads:
        raise ConfigError("model.num_heads", f"{m.num_heads} heads do not divide hidden_size {m.hidden_size}")
    if m.num_heads % m.kv_heads:
        raise ConfigError("model.num_kv_heads", f"{m.kv_heads} kv heads do not divide num_heads {m.num_heads}")
    if m.head_dim % 2:
        raise ConfigError("model.num_heads", f"head dim {m.head_dim} must be even for rotary embeddings")
    _positive("model.norm_eps", m.norm_eps)
    _positive("model.init_std", m.init_std)
    _positive("model.rope_theta", m.rope_theta)

    _choice("norm.type", n.type, NORM_TYPES)
    _choice("norm.scheme", n.scheme, model_schemes())
    if n.alpha is not None and not 0.0 <= n.alpha <= 1.0:  # also catches NaN
        raise ConfigError("norm.alpha", f"the Post-LN fraction must lie in [0, 1]; got {n.alpha}")
    if n.alpha is not None and n.post_layers is not None:
        raise ConfigError("norm.post_layers", "give Mix-LN's Post-LN layers either as a count (post_layers) "
                          f"or as a fraction (alpha), not both; got post_layers={n.post_layers}, alpha={n.alpha}")
    if n.post_layers is not None:
        if n.layers is None and n.scheme != MIX:
            raise ConfigError("norm.post_layers", f"is Mix-LN's count of Post-LN layers; it needs scheme: mix "
                              f"(got scheme: {n.scheme})")
        if not 0 <= n.post_layers <= m.num_layers:
            raise ConfigError("norm.post_layers", f"must lie in [0, num_layers={m.num_layers}]; got {n.post_layers}")
    if n.layers is not None:
        if len(n.layers) != m.num_layers:
            raise ConfigError("norm.layers", f"has {len(n.layers)} entries for {m.num_layers} layers")
        for i, scheme in enumerate(n.layers):
            _choice(f"norm.layers[{i}]", scheme, tuple(SCHEMES))
    elif n.scheme == MIX and n.alpha is None and n.post_layers is None:
        raise ConfigError("norm.alpha", "scheme 'mix' needs alpha, the fraction of Post-LN layers (0.25 in the "
                          "paper), or norm.post_layers, their number")
    for name in ("qk_norm", "v_norm"):
        if getattr(n, name) is not None:
            _choice(f"norm.{name}", getattr(n, name), ATTENTION_NORMS)
    for name in ("dyt_alpha_attention", "dyt_alpha_other"):
        _positive(f"norm.{name}", getattr(n, name))
    if n.deepnorm_alpha is not None:
        _positive("norm.deepnorm_alpha", n.deepnorm_alpha)
    if n.deepnorm_beta is not None:
        _positive("norm.deepnorm_beta", n.deepnorm_beta)

    for name in ("tp", "pp", "virtual_stages"):
        _positive(f"parallel.{name}", getattr(p, name))
    _positive("parallel.timeout_s", p.timeout_s)
    if p.dp is not None:
        _positive("parallel.dp", p.dp)
    _choice("parallel.engine", p.engine, ENGINES)
    _choice("parallel.schedule", p.schedule, SCHEDULES)
    _choice("parallel.activation_checkpoint", p.activation_checkpoint, ACTIVATION_CHECKPOINT)
    if p.zero not in (0, 1, 2, 3):
        raise ConfigError("parallel.zero", f"must be 0, 1, 2 or 3; got {p.zero}")
    if p.engine == "fsdp2" and p.zero == 1:
        raise ConfigError("parallel.zero", "ZeRO-1 (optimizer sharding only) needs parallel.engine: deepspeed; "
                          "with fsdp2 use zero 0, 2 or 3")
    _validate_deepspeed(p, t)
    if m.num_heads % p.tp:
        raise ConfigError("parallel.tp", f"tp={p.tp} does not divide num_heads {m.num_heads}")
    if m.kv_heads % p.tp:
        raise ConfigError("parallel.tp", f"tp={p.tp} does not divide num_kv_heads {m.kv_heads}")
    if p.schedule not in ("interleaved_1f1b", "zero_bubble") and p.virtual_stages != 1:
        raise ConfigError("parallel.virtual_stages",
                          "only the interleaved_1f1b and zero_bubble schedules use virtual stages")
    num_stages = p.pp * p.virtual_stages
    if p.stage_layers is not None:
        if len(p.stage_layers) != num_stages or any(k <= 0 for k in p.stage_layers):
            raise ConfigError("parallel.stage_layers", f"needs {num_stages} positive counts (pp × virtual_stages)")
        if sum(p.stage_layers) != m.num_layers:
            raise ConfigError("parallel.stage_layers", f"sums to {sum(p.stage_layers)}, not num_layers {m.num_layers}")
    elif m.num_layers < num_stages:
        raise ConfigError("parallel.pp", f"{num_stages} pipeline stages for only {m.num_layers} layers")
    if world_size is not None:
        if world_size < 1:
            raise ConfigError("world_size", f"a launch needs at least one process; got {world_size}")
        if world_size % (p.tp * p.pp):
            raise ConfigError("parallel.tp", f"tp×pp = {p.tp * p.pp} does not divide the world size {world_size}")
        dp = world_size // (p.tp * p.pp)
        if p.dp is not None and p.dp != dp:
            raise ConfigError("parallel.dp", f"tp×pp×dp = {p.tp * p.pp * p.dp}, but the world size is {world_size}")
        p.dp = dp

    _validate_layout(cfg)

    _positive("data.seq_len", d.seq_len)
    if d.seq_len > m.max_seq_len:
        raise ConfigError("data.seq_len", f"{d.seq_len} exceeds model.max_seq_len {m.max_seq_len}")
    parse_split(d.split)
    parse_blend(d.path, "data.path")
    parse_blend(d.valid_path, "data.valid_path")
    if for_training and d.path is None:
        raise ConfigError("data.path", "training needs a .bin/.idx prefix (see tools/preprocess_c4.py)")

    for name in ("steps", "micro_batch_size", "global_batch_size", "log_interval", "eval_tokens"):
        _positive(f"train.{name}", getattr(t, name))
    _positive("train.lr", t.lr)
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(t, name) < 1.0:
            raise ConfigError(f"train.{name}", f"must lie in [0, 1); got {getattr(t, name)}")
    _positive("train.adam_eps", t.adam_eps)
    if not 0 <= t.min_lr <= t.lr:
        raise ConfigError("train.min_lr", f"must lie in [0, lr={t.lr}]; got {t.min_lr}")
    if not 0 <= t.warmup_steps <= t.steps:
        raise ConfigError("train.warmup_steps", f"must lie in [0, steps={t.steps}]; got {t.warmup_steps}")
    for name in ("weight_decay", "grad_clip", "eval_interval", "save_interval", "keep_last", "keep_every"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name}", f"must not be negative; got {getattr(t, name)}")
    _choice("train.precision", t.precision, PRECISIONS)
    if t.precision == "bf16_pure" and p.engine == "deepspeed":
        raise ConfigError("train.precision", "bf16_pure (bf16 weights and Adam states, as the reference code keeps "
                          "them) runs in one process or with parallel.engine: fsdp2; megamix's DeepSpeed engine "
                          "keeps fp32 parameters under the trainer's autocast")
    _choice("train.nonfinite", t.nonfinite, NONFINITE)
    _choice("train.compile_backend", t.compile_backend, COMPILE_BACKENDS)
    if t.nonfinite == "skip" and p.engine == "deepspeed":
        raise ConfigError("train.nonfinite", "DeepSpeed steps inside its engine and cannot skip a step; use stop")
    for i, key in enumerate(t.accept_changes or []):
        section, _, name = key.partition(".")
        if section not in {f.name for f in dataclasses.fields(Config)} or not hasattr(getattr(cfg, section), name):
            raise ConfigError(f"train.accept_changes[{i}]", f"{key!r} is not a config field (section.key)")
    if d.num_workers < 0:
        raise ConfigError("data.num_workers", f"must not be negative; got {d.num_workers}")
    _choice("train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    if t.z_loss < 0:
        raise ConfigError("train.z_loss", f"must not be negative (0: off); got {t.z_loss}")
    _choice("train.decay_shape", t.decay_shape, DECAY_SHAPES)
    if t.lr_schedule != "wsd":
        for name, default in (("decay_steps", None), ("decay_shape", "linear")):
            if getattr(t, name) != default:
                raise ConfigError(f"train.{name}", f"only lr_schedule: wsd has a decay phase; this run's schedule is "
                                  f"{t.lr_schedule}")
    elif t.decay_steps is not None and not 1 <= t.decay_steps <= t.steps - t.warmup_steps:
        raise ConfigError("train.decay_steps", f"must lie in [1, steps - warmup_steps = {t.steps - t.warmup_steps}]; "
                          f"got {t.decay_steps}")
    _validate_instruments(cfg)
    dp = p.dp or 1
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            "train.global_batch_size",
            f"{t.global_batch_size} is not a multiple of micro_batch_size × dp = {t.micro_batch_size} × {dp}",
        )
    return cfg
