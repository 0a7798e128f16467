#!/usr/bin/env python3
"""Layer-effectiveness figures for one checkpoint: angular distance, performance drop, gradient norms.

    python tools/analyze_layers.py --checkpoint runs/71m_mix --data data/c4/c4_validation_text_document

Works on a checkpoint of any norm scheme saved under any parallel layout (it goes through
``megamix.load_model``).  Writes ``layers.json``, ``layer_table.md`` and PNGs to ``--output``
(default ``RUN/analysis``, where ``tools/compare_runs.py`` finds them) and logs the figures to
``OUTPUT/tensorboard``.  Angular distances use the last token of each sequence unless ``--tokens all``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "megamix").is_dir() and str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from megamix.analysis.angular import TOKEN_MODES  # noqa: E402
from megamix.analysis.report import analyze_checkpoint, default_output_dir, layer_table, write_report  # noqa: E402
from megamix.errors import run_command  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (its latest)")
    p.add_argument("--data", help=".bin/.idx prefix to measure on (default: the run's validation data)")
    p.add_argument("--samples", type=int, default=64, help="sequences to use (default 64)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-batches", type=int, default=4, help="batches for the gradient norms (default 4)")
    p.add_argument("--seq-len", type=int, help="default: the length the model was trained with")
    p.add_argument("--tokens", choices=TOKEN_MODES, default="last",
                   help="angular distance on the last token of each sequence (the papers') or all tokens")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--output", help="output directory (default: RUN/analysis)")
    p.add_argument("--no-tensorboard", action="store_true")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error, not one line")
    args = p.parse_args(argv)
    return run_command("analyze_layers", lambda: run(args), debug=args.debug)


def run(args: argparse.Namespace) -> int:

    result = analyze_checkpoint(args.checkpoint, args.data, args.samples, args.batch_size, args.grad_batches,
                                args.tokens, args.seq_len, args.device)
    output = Path(args.output) if args.output else default_output_dir(args.checkpoint)
    write_report(result, output, tensorboard=not args.no_tensorboard)
    print(f"{result['checkpoint']} ({result['scheme']}, step {result['step']})")
    print(layer_table(result))
    print(f"wrote {output}/layers.json, layer_table.md, *.png, tensorboard/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
