"""``megamix train|plan|evaluate``: the command line (also ``python -m megamix``)."""

from __future__ import annotations

import argparse
import json
import sys

from megamix.config import ConfigError, load_config, validate


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; repeatable")


def cmd_train(args: argparse.Namespace) -> int:
    cfg = validate(load_config(args.config, args.overrides), world_size=1, for_training=True)
    from megamix.train.trainer import Trainer

    Trainer(cfg).run()
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    validate(cfg)
    from megamix.plan import format_plan, make_plan

    plan = make_plan(cfg)
    print(json.dumps(plan, indent=1) if args.json else format_plan(plan))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from megamix import load_model
    from megamix.data.gpt_dataset import build_dataset
    from megamix.evaluate import evaluate_loss
    from megamix.train.checkpoint import resolve_checkpoint

    checkpoint = resolve_checkpoint(args.checkpoint)
    model = load_model(checkpoint)
    seq_len = args.seq_len or load_config(checkpoint / "config.yaml").data.seq_len
    data = build_dataset(args.data, "valid", "0,1", seq_len, 0, seed=0, use_split=False)
    torch.manual_seed(0)
    result = evaluate_loss(model, data, args.micro_batch_size, args.max_batches)
    summary = f"loss {result['val_loss']:.4f}, perplexity {result['val_ppl']:.2f} over {result['val_tokens']:,} tokens"
    print(json.dumps(result) if args.json else f"{args.data}: {summary}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megamix", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model (one process, or under torchrun/srun)")
    _add_config_args(train)
    train.set_defaults(func=cmd_train)
    plan = sub.add_parser("plan", help="per-layer placement, per-rank parameters and memory")
    _add_config_args(plan)
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.set_defaults(func=cmd_plan)
    evaluate = sub.add_parser("evaluate", help="validation loss and perplexity of a checkpoint on a .bin/.idx corpus")
    evaluate.add_argument("--checkpoint", required=True, help="checkpoint or run directory (latest checkpoint)")
    evaluate.add_argument("--data", required=True, help=".bin/.idx prefix")
    evaluate.add_argument("--seq-len", type=int, default=None, help="default: the sequence length it was trained with")
    evaluate.add_argument("--micro-batch-size", type=int, default=8)
    evaluate.add_argument("--max-batches", type=int, default=None)
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"megamix: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
