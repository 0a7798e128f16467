"""The norm-placement study: one model trained under each scheme, analyzed layer by layer, compared.

    python benchmarks/norm_study.py                      # tiny model on the demo corpus, CPU, minutes
    python benchmarks/norm_study.py --config configs/llama_71m.yaml --steps 10000 \\
        --set data.path=data/c4/c4_train_text_document --output runs/study_71m   # on a GPU

Every scheme gets the same config, data order and seeds — only ``norm.scheme`` (and ``norm.alpha``
for Mix-LN) differ, so pre, post, mix, lns and peri even start from identical weights (DeepNorm
uses its own initialization).  Each run is trained with the ordinary trainer into
``OUTPUT/<scheme>/``, analyzed with ``tools/analyze_layers.py``'s code into
``OUTPUT/<scheme>/analysis/``, and compared with ``tools/compare_runs.py``'s code: the table is
printed and written, with the figures, to ``OUTPUT/comparison/``.  Re-running resumes finished or
interrupted runs instead of training them again.

Without ``--config`` the study uses ``configs/llama_tiny.yaml`` made 8 layers deep (depth is what
the papers' claims are about; the 32k-token embedding and head dominate the cost anyway) and
trained briefly; the demo corpus is built first if it is missing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megamix.analysis.compare import compare_runs  # noqa: E402
from megamix.analysis.report import analyze_checkpoint, write_report  # noqa: E402
from megamix.config import load_config  # noqa: E402
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="base config (default: the tiny CPU study on llama_tiny.yaml)")
    p.add_argument("--schemes", nargs="+", choices=model_schemes(), default=list(model_schemes()))
    p.add_argument("--alpha", type=float, default=0.25, help="Mix-LN's Post-LN fraction (default 0.25)")
    p.add_argument("--steps", type=int, help="training steps per scheme")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override applied to every scheme; repeatable")
    p.add_argument("--samples", type=int, default=64, help="validation sequences for the analysis")
    p.add_argument("--tokens", choices=("last", "all"), default="last", help="angular-distance token mode")
    p.add_argument("--output", default="runs/norm_study")
    args = p.parse_args(argv)

    base = [] if args.config else list(TINY_STUDY)
    base += args.overrides + ([f"train.steps={args.steps}"] if args.steps else [])
    config_file = args.config or TINY_CONFIG
    output = Path(args.output)
    if not args.config:
        cfg = load_config(config_file, base)
        ensure_demo_data(cfg)

    run_dirs = []
    for scheme in args.schemes:
        name, norm = scheme_overrides(scheme, args.alpha)
        run_dir = output / name
        cfg = load_config(config_file, base + norm + [f"train.output_dir={run_dir}"])
        print(f"== {name}: training into {run_dir}", file=sys.stderr)
        start = time.perf_counter()
        Trainer(cfg).run()
        trained = time.perf_counter()
        result = analyze_checkpoint(run_dir, samples=args.samples, tokens=args.tokens)
        write_report(result, run_dir / "analysis")
        print(f"== {name}: trained in {trained - start:.0f} s, analyzed in {time.perf_counter() - trained:.0f} s",
              file=sys.stderr)
        run_dirs.append(run_dir)

    header = (f"# Norm study\n\nconfig `{config_file}`, overrides `{' '.join(base) or 'none'}`; "
              f"analysis on {args.samples} validation sequences, angular distance on the "
              f"{'last token of each sequence' if args.tokens == 'last' else 'mean over all tokens'}.\n\n")
    markdown = header + compare_runs(run_dirs, output / "comparison")
    (output / "comparison" / "study.md").write_text(markdown)
    print(markdown)
    print(f"figures and tables: {output / 'comparison'}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
