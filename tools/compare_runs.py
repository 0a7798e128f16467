#!/usr/bin/env python3
"""Compare several runs: loss and perplexity curves, a final-metric table, per-layer profiles.

    python tools/compare_runs.py runs/pre runs/post runs/mix runs/lns --output runs/comparison

Each argument is a run directory (``train.output_dir``).  Writes ``comparison.md`` and
``curves.png`` to ``--output``; runs that ``tools/analyze_layers.py`` has analyzed (their
``analysis/layers.json``) also get angular-distance, layer-removal and gradient-norm plots, and runs
trained with depth statistics (``train.stats_interval``) get depth × step heat maps
(``depth_rms.png``, ``depth_angular.png``, ``depth_update_ratio.png``, ``depth_grad_norm.png``,
``depth_attn_logit_max.png``, ``depth_attn_entropy.png``) and the norms' output scales
(``norm_scales.png``): docs/instruments.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "megamix").is_dir() and str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from megamix.analysis.compare import compare_runs  # noqa: E402
from megamix.errors import run_command  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--names", nargs="+", help="one label per run (default: the directory names)")
    p.add_argument("--output", default="comparison", help="output directory (default: ./comparison)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error, not one line")
    args = p.parse_args(argv)
    if args.names and len(args.names) != len(args.runs):
        p.error(f"--names has {len(args.names)} labels for {len(args.runs)} runs")
    return run_command("compare_runs", lambda: run(args), debug=args.debug)


def run(args: argparse.Namespace) -> int:
    print(compare_runs(args.runs, args.output, args.names))
    print(f"wrote {args.output}/comparison.md and its PNGs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
