#!/usr/bin/env python3
"""Import a Hugging Face Llama (or a megamix export) as a megamix run directory.

    python tools/convert_from_hf.py --hf path/to/llama --output runs/llama_ft \\
        [--set train.weight_decay=0.1 ...]

writes ``runs/llama_ft/config.yaml`` and the checkpoint ``runs/llama_ft/checkpoints/step_0000000``
(fp32, loadable on any parallel layout) plus the model's tokenizer under ``runs/llama_ft/tokenizer``
when it has one.  Fine-tune with ``megamix train --config runs/llama_ft/config.yaml --set
data.path=...``: the config's output directory is the import's, so training starts from it.
The checkpoint holds a fresh optimizer built from the ``train`` section, and resuming restores
it: give the fine-tuning ``train.adam_*`` and ``train.weight_decay`` here with ``--set``.
Only safetensors weights are read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "megamix").is_dir() and str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from megamix.errors import run_command  # noqa: E402
from megamix.hf.importer import import_hf  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--output", required=True, help="the megamix run directory to create")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a value of the written config (e.g. train.weight_decay=0.1); repeatable")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error, not one line")
    args = p.parse_args(argv)
    return run_command("convert_from_hf", lambda: run(args), debug=args.debug)


def run(args: argparse.Namespace) -> int:
    path = import_hf(args.hf, args.output, args.overrides)
    print(f"imported {args.hf} into {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
