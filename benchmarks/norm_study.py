"""The norm-placement study: one model trained under each scheme, analyzed layer by layer, compared.

    python benchmarks/norm_study.py                      # tiny model on the demo corpus, CPU, minutes
    python benchmarks/norm_study.py --config configs/llama_71m.yaml --schemes pre post mix lns deepnorm \\
        --set data.path=data/c4/c4_train_text_document --output runs/study_71m   # on a GPU (docs/norm_study.md)

What it is depends on its size, and the output says so.  Without ``--config`` it is a **smoke test
of early optimization**: a 4M-parameter model (``configs/llama_tiny.yaml`` made 8 layers deep;
depth is what the papers' claims are about) trained 150 steps on the demo corpus with one seed.  It
shows that every placement trains and how its loss and per-layer profiles start out; it cannot say
which placement wins at the papers' scale (70M-7B parameters, 1-20B tokens).  With a paper config
(``docs/norm_study.md`` has the 71M command) it is the papers' experiment.

Every scheme ``norm.scheme`` accepts (``megamix.schemes.model_schemes()``, so new placements join by
themselves) gets the same config, data order and seeds — only the norm (and ``norm.alpha`` for
Mix-LN, and a learning rate given per scheme) differ, so pre, post, mix, lns and peri start from
identical weights (DeepNorm uses its own initialization).  ``--seeds N`` trains each scheme N times,
seed k setting ``train.seed`` and ``data.seed`` to the config's + k (the same k is the same
initialization and data order for every scheme); the table gives mean ± standard deviation over
seeds.  ``--lr post=3e-4 pre=1e-3`` sets a scheme's peak learning rate (``train.min_lr`` keeps the
config's ratio to it; the Peri-LN paper finds Post-LN competitive at a lower learning rate); a bare
value sets every scheme's.

Each run is trained with the ordinary trainer into ``OUTPUT/<run>/`` (``<run>`` is the scheme, with
``_lr<lr>`` where its learning rate was set per scheme and ``_s<k>`` with several seeds), analyzed
with ``tools/analyze_layers.py``'s code into ``OUTPUT/<run>/analysis/``, and compared with
``tools/compare_runs.py``'s code: the table is printed and written, with the figures, to
``OUTPUT/comparison/``.  Re-running resumes finished or interrupted runs instead of training them again.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from megamix.analysis.compare import compare_runs, seeds_table  # noqa: E402
from megamix.analysis.report import analyze_checkpoint, write_report  # noqa: E402
from megamix.analysis.runs import load_run  # noqa: E402
from megamix.config import Config, load_config  # noqa: E402
from megamix.model import Transformer, num_parameters  # noqa: E402
from megamix.schemes import model_schemes  # noqa: E402
from megamix.train.trainer import Trainer  # noqa: E402

TINY_CONFIG = ROOT / "configs" / "llama_tiny.yaml"
TINY_STUDY = [  # a few minutes per scheme on two CPU cores
    "model.num_layers=8",
    "train.steps=150",
    "train.warmup_steps=15",
    "train.micro_batch_size=8",
    "train.global_batch_size=8",
    "train.log_interval=5",
    "train.eval_interval=50",
    "train.eval_tokens=8192",
    "train.save_interval=0",
    "train.progress_bar=false",
    "train.stats_interval=5",  # depth statistics while training: the heat maps of docs/instruments.md
    "train.stats_probe_sequences=8",
]


def scheme_overrides(scheme: str, alpha: float) -> tuple[str, list[str]]:
    """(run name, overrides) of one scheme; only the norm differs between runs."""
    if scheme == "mix":
        return f"mix_a{alpha:g}", ["norm.scheme=mix", f"norm.alpha={alpha}", "norm.layers=null"]
    return scheme, [f"norm.scheme={scheme}", "norm.layers=null"]


def ensure_demo_data(cfg) -> None:
    """Build the demo corpus the tiny config points at (paths relative to the current directory, as
    the trainer reads them), with the demo's own two tools."""
    prefixes = [cfg.data.path, cfg.data.valid_path]
    if all(Path(f"{p}.idx").is_file() for p in prefixes):
        return
    corpus = Path(cfg.data.path).parent.parent / "c4"
    print(f"building the demo corpus in {corpus} and {Path(cfg.data.path).parent}", file=sys.stderr)
    tools = ROOT / "tools"
    subprocess.run([sys.executable, tools / "make_demo_corpus.py", "--output", corpus], check=True)
    for split, prefix in (("train", cfg.data.path), ("validation", cfg.data.valid_path)):
        subprocess.run([sys.executable, tools / "preprocess_c4.py", "--input", corpus / f"c4-{split}.*.json.gz",
                        "--output-prefix", prefix, "--tokenizer", corpus / "tokenizer.model"], check=True)


def parse_lrs(values: list[str], schemes: list[str]) -> dict[str, float]:
    """``["post=3e-4", "1e-3"]`` → ``{scheme: lr}``; a bare value applies to every scheme, a
    ``scheme=value`` pair overrides it for that scheme."""
    lrs: dict[str, float] = {}
    for item in values:
        scheme, sep, value = item.rpartition("=")
        try:
            lr = float(value)
        except ValueError:
            raise SystemExit(f"norm_study: --lr {item!r}: {value!r} is not a number") from None
        if not lr > 0:
            raise SystemExit(f"norm_study: --lr {item!r}: the learning rate must be positive")
        if not sep:
            lrs.update(dict.fromkeys(schemes, lr))
        elif scheme not in model_schemes():
            raise SystemExit(f"norm_study: --lr {item!r}: {scheme!r} is not a scheme ({', '.join(model_schemes())})")
        else:
            lrs[scheme] = lr
    return lrs


def lr_overrides(cfg: Config, lr: float | None) -> tuple[str, list[str]]:
    """(run-name suffix, overrides) for a scheme's own peak learning rate, ``min_lr`` scaled with it."""
    if lr is None or lr == cfg.train.lr:
        return "", []
    return f"_lr{lr:g}", [f"train.lr={lr}", f"train.min_lr={lr * cfg.train.min_lr / cfg.train.lr}"]


def what_this_is(cfg: Config, tiny: bool, seeds: int, num_schemes: int) -> str:
    """One paragraph saying plainly what the study measures at its size."""
    with torch.device("meta"):
        params = num_parameters(Transformer(cfg.model, cfg.norm))
    t = cfg.train
    tokens = t.steps * t.global_batch_size * cfg.data.seq_len
    size = (f"{params / 1e6:.1f}M parameters, {cfg.model.num_layers} layers, {t.steps:,} steps × "
            f"{t.global_batch_size} sequences × {cfg.data.seq_len} tokens = {tokens:,} tokens, "
            f"{seeds} seed{'s' if seeds > 1 else ''} for each of {num_schemes} configurations")
    if tiny:
        what = ("**What this is: a smoke test of early optimization** — " + size + ", on the demo corpus. "
                "It shows that every placement trains and how its loss and per-layer profiles start out; "
                "it cannot say which placement wins at the papers' scale (70M-7B parameters, 1-20B tokens).")
    else:
        what = f"**What this is:** {size}."
    if seeds == 1:
        what += (" With one seed there is no spread to judge a difference by: a gap between two schemes may "
                 "be the seed's (use `--seeds N`).")
    else:
        what += " A difference smaller than the spread across seeds is not evidence."
    return what


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="base config (default: the tiny CPU study on llama_tiny.yaml)")
    p.add_argument("--schemes", nargs="+", choices=model_schemes(), default=list(model_schemes()),
                   help="norm.scheme values to train (default: every one megamix has)")
    p.add_argument("--alpha", type=float, default=0.25, help="Mix-LN's Post-LN fraction (default 0.25)")
    p.add_argument("--lr", nargs="+", default=[], metavar="[SCHEME=]LR",
                   help="peak learning rate per scheme (post=3e-4 ...), or for all (default: the config's)")
    p.add_argument("--seeds", type=int, default=1, help="runs per scheme, seeds config+0 ... config+N-1 (default 1)")
    p.add_argument("--steps", type=int, help="training steps per scheme")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override applied to every scheme; repeatable")
    p.add_argument("--samples", type=int, default=64, help="validation sequences for the analysis")
    p.add_argument("--tokens", choices=("last", "all"), default="last", help="angular-distance token mode")
    p.add_argument("--output", default="runs/norm_study")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be at least 1")
    lrs = parse_lrs(args.lr, args.schemes)

    base = [] if args.config else list(TINY_STUDY)
    base += args.overrides + ([f"train.steps={args.steps}"] if args.steps else [])
    config_file = args.config or TINY_CONFIG
    output = Path(args.output)
    base_cfg = load_config(config_file, base)
    if not args.config:
        ensure_demo_data(base_cfg)

    groups: dict[str, list[Path]] = {}
    for scheme in args.schemes:
        name, norm = scheme_overrides(scheme, args.alpha)
        suffix, lr = lr_overrides(base_cfg, lrs.get(scheme))
        name += suffix
        for k in range(args.seeds):
            run_name = name if args.seeds == 1 else f"{name}_s{k}"
            run_dir = output / run_name
            seeds = [f"train.seed={base_cfg.train.seed + k}", f"data.seed={base_cfg.data.seed + k}"]
            cfg = load_config(config_file, base + norm + lr + seeds + [f"train.output_dir={run_dir}"])
            print(f"== {run_name}: training into {run_dir}", file=sys.stderr)
            start = time.perf_counter()
            Trainer(cfg).run()
            trained = time.perf_counter()
            result = analyze_checkpoint(run_dir, samples=args.samples, tokens=args.tokens)
            write_report(result, run_dir / "analysis")
            analyzed = time.perf_counter() - trained
            print(f"== {run_name}: trained in {trained - start:.0f} s, analyzed in {analyzed:.0f} s", file=sys.stderr)
            groups.setdefault(name, []).append(run_dir)

    header = (f"# Norm study\n\n{what_this_is(base_cfg, not args.config, args.seeds, len(groups))}\n\n"
              f"config `{config_file}`, overrides `{' '.join(base) or 'none'}`"
              f"{'; learning rates ' + ', '.join(f'{k}={v:g}' for k, v in lrs.items()) if lrs else ''}; "
              f"analysis on {args.samples} validation sequences, angular distance on the "
              f"{'last token of each sequence' if args.tokens == 'last' else 'mean over all tokens'}.\n\n")
    over_seeds = seeds_table({name: [load_run(d) for d in dirs] for name, dirs in groups.items()})
    runs = [d for dirs in groups.values() for d in dirs]
    markdown = (header + f"## Over seeds (mean ± standard deviation)\n\n{over_seeds}\n\n"
                + compare_runs(runs, output / "comparison"))
    (output / "comparison" / "study.md").write_text(markdown)
    print(markdown)
    print(f"figures and tables: {output / 'comparison'}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
