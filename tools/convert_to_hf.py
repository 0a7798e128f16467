#!/usr/bin/env python3
"""Export a megamix checkpoint (any parallel layout) as a Hugging Face model directory.

    python tools/convert_to_hf.py --checkpoint runs/71m_mix --output hf/71m_mix \\
        --tokenizer data/c4/tokenizer.model [--dtype bf16|fp16|fp32] [--verify]

An all-Pre-LN RMSNorm model becomes a stock ``LlamaForCausalLM``; any other placement ships
``modeling_megamix.py`` (load with ``trust_remote_code=True``).  ``--verify`` then loads both
models and compares their logits (needs memory for both; the export itself streams one layer at
a time).  DeepSpeed checkpoints (``parallel.engine: deepspeed``, ZeRO 1-3) convert too, with
DeepSpeed installed: their fp32 master partitions are reassembled in memory, read with
``torch.load(weights_only=True)`` and an allow-list of DeepSpeed's own record types.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "megamix").is_dir() and str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from megamix.errors import run_command  # noqa: E402
from megamix.hf.export import DEFAULT_MAX_SHARD_SIZE, DTYPES, export_checkpoint, verify_export  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory, or a run directory (its latest)")
    p.add_argument("--output", required=True, help="the export directory to create")
    p.add_argument("--tokenizer", help="SentencePiece .model or Hugging Face tokenizer directory to ship with it")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="weight dtype of the export (default bf16)")
    p.add_argument("--max-shard-size", type=float, default=DEFAULT_MAX_SHARD_SIZE / 1e9,
                   help="GB per safetensors file before sharding (default 5)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--verify", action="store_true", help="compare the export's logits with megamix's")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error, not one line")
    args = p.parse_args(argv)
    return run_command("convert_to_hf", lambda: run(args), debug=args.debug)


def run(args: argparse.Namespace) -> int:
    out = export_checkpoint(args.checkpoint, args.output, tokenizer=args.tokenizer, dtype=args.dtype,
                            max_shard_size=int(args.max_shard_size * 1e9), overwrite=args.overwrite)
    config = json.loads((out / "config.json").read_text())
    kind = "stock LlamaForCausalLM" if "auto_map" not in config else "MegamixForCausalLM (trust_remote_code=True)"
    print(f"exported {kind} to {out}: {', '.join(sorted(f.name for f in out.iterdir()))}")
    reference = config.get("reference")
    if reference:
        post_num = f" POST_NUM={reference['POST_NUM']}" if reference["POST_NUM"] is not None else ""
        print(f"in the papers' reference code ({', '.join(reference['code'])}): NORM_TYPE={reference['NORM_TYPE']}"
              f"{post_num}" + (f" ({reference['note']})" if reference.get("note") else ""))
    else:
        print(f"the papers' reference code cannot compute this model: {config.get('reference_note')}")
    if args.tokenizer is None:
        print("note: no --tokenizer, so the export has none (AutoTokenizer will not load it)", file=sys.stderr)
    if args.verify:
        diff = verify_export(args.checkpoint, out)
        print(f"verified: max |logits difference| {diff:.3g} against megamix on random tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
