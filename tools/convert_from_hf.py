#!/usr/bin/env python3
"""Import a Hugging Face Llama, a megamix export, or a checkpoint of the papers' reference code
(pixeli99/MixLN, MixLN-Next, LayerNorm-Scaling) as a megamix run directory.

    python tools/convert_from_hf.py --hf path/to/llama --output runs/llama_ft \\
        [--set train.weight_decay=0.1 ...]
    python tools/convert_from_hf.py --hf 350m_res_post_pre_lr1e-3/model_60000 --output runs/ref_350m_mix \\
        --reference-norm-type post_pre --reference-post-num 6

writes ``OUTPUT/config.yaml`` and the checkpoint ``OUTPUT/checkpoints/step_0000000`` (fp32,
loadable on any parallel layout) plus the model's tokenizer under ``OUTPUT/tokenizer`` when it has
one.  Weights: safetensors or ``pytorch_model.bin`` (one file or shards with an index), the latter
read with ``torch.load(weights_only=True)``: a pickle holding anything but tensors is refused.

Where the norms go: a megamix export's ``config.json`` says it; a plain Llama is Pre-LN; the
reference code keeps it in environment variables, so give them: ``--reference-norm-type NORM_TYPE``
(pre, post, post_pre, deeppost, sandwich, LNS, ...; docs/reference_code.md lists which megamix
represents) and ``--reference-post-num POST_NUM`` for post_pre.  megamix's own flags work too,
applied last: ``--set norm.layers=[post,post,post,pre,...]`` (or ``--set norm.scheme=mix --set
norm.post_layers=K`` where this megamix has ``norm.post_layers``).

Before writing, the imported model's logits are checked against transformers' model of the same
directory and weights (stock Llama, or megamix's ``modeling_megamix`` with the placement); a
mismatch is an error and nothing is written.  ``--no-verify`` skips it (it holds both models in
memory).  Fine-tune with ``megamix train --config OUTPUT/config.yaml --set data.path=...``; the
checkpoint holds a fresh optimizer built from the ``train`` section, so give the fine-tuning
``train.adam_*`` and ``train.weight_decay`` here with ``--set``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "megamix").is_dir() and str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from megamix.errors import run_command  # noqa: E402
from megamix.hf.importer import (  # noqa: E402
    HFImportError,
    ReferencePlacement,
    read_hf_model,
    verify_import,
    write_import,
)
from megamix.schemes import describe_schemes, layer_schemes  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="model directory (config.json + safetensors or pytorch_model.bin)")
    p.add_argument("--output", required=True, help="the megamix run directory to create")
    p.add_argument("--reference-norm-type", metavar="NORM_TYPE",
                   help="the reference code's NORM_TYPE the checkpoint was trained with (e.g. post_pre, deeppost)")
    p.add_argument("--reference-post-num", type=int, metavar="POST_NUM",
                   help="the reference code's POST_NUM: how many leading layers are Post-LN (post_pre)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a value of the written config (e.g. train.weight_decay=0.1, norm.layers=[...]); "
                        "repeatable")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="check the imported model's logits against transformers' model of --hf (default: on)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error, not one line")
    args = p.parse_args(argv)
    if args.reference_post_num is not None and args.reference_norm_type is None:
        p.error("--reference-post-num needs --reference-norm-type")
    return run_command("convert_from_hf", lambda: run(args), debug=args.debug)


def run(args: argparse.Namespace) -> int:
    reference = None
    if args.reference_norm_type is not None:
        reference = ReferencePlacement(args.reference_norm_type, args.reference_post_num)
    output = Path(args.output)
    if (output / "checkpoints").exists():
        raise HFImportError(f"{output} already holds checkpoints; import into a new run directory")
    cfg, model = read_hf_model(args.hf, args.overrides, reference)
    print(f"placement: {describe_schemes(layer_schemes(cfg.norm, cfg.model.num_layers))}")
    if args.verify:
        check = verify_import(args.hf, cfg, model, reference)
        check.check(args.hf)
        print(f"verified: max |logits difference| {check.max_diff:.3g} against transformers' model of {args.hf} "
              f"(largest |logit| {check.max_logit:.3g})")
    path = write_import(cfg, model, args.hf, output)
    print(f"imported {args.hf} into {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
