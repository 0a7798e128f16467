"""``megamix train|check|plan|sweep|val-loss|lm-eval``: the command line (also ``python -m megamix``).

``val-loss`` is the token-level validation loss of a checkpoint on a ``.bin/.idx`` corpus;
``lm-eval`` runs lm-evaluation-harness on a checkpoint or an export.  Their old names, ``evaluate``
and ``eval``, still work and say what they are now called.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megamix.config import load_config, validate
from megamix.errors import MegamixError, run_command
from megamix.sweep import DEFAULT_SCRIPT


def _positive_int(text: str) -> int:
    """An argparse type: a count of processes (argparse names the option in its error)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text!r}")
    return value


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; repeatable")


def cmd_train(args: argparse.Namespace) -> int:
    import os

    from megamix.train.preemption import StopSignals

    # Handle stop signals from the first moment: one that arrives while torch is still starting
    # (imports, rendezvous, index and model build) ends the process at once, with nothing to save.
    StopSignals.install()
    cfg = load_config(args.config, args.overrides)
    # The whole config is checked against the launch's world size before any process group starts.
    validate(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")), for_training=True)
    from megamix.parallel.mesh import init_distributed

    init_distributed(cfg.parallel.timeout_s)
    from megamix.train.trainer import Trainer

    Trainer(cfg).run()
    import torch.distributed as dist

    if dist.is_initialized():  # a failing rank exits without this; torchrun then stops the others
        dist.barrier()
        dist.destroy_process_group()
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a config for a launch of ``--world-size`` processes, without starting anything:
    launchers (``slurm/train.sbatch``) run it before ``srun`` so a bad layout fails in a second."""
    cfg = load_config(args.config, args.overrides)
    validate(cfg, world_size=args.world_size, for_training=True)
    p = cfg.parallel
    print(f"ok: {args.world_size} processes as tp={p.tp} pp={p.pp} dp={p.dp}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    validate(cfg)
    from megamix.plan import format_plan, format_survey, make_plan, survey_layouts

    if args.world_size:
        layouts = survey_layouts(cfg, args.world_size)
        print(json.dumps(layouts, indent=1) if args.json else format_survey(layouts, args.world_size))
        return 0
    plan = make_plan(cfg)
    print(json.dumps(plan, indent=1) if args.json else format_plan(plan))
    return 0


class EvaluateError(MegamixError, ValueError):
    """A bad ``megamix val-loss`` argument."""


# Old command names → (new name, what it does): they still work, with a one-line hint.
RENAMED = {
    "evaluate": ("val-loss", "validation loss of a checkpoint on a .bin/.idx corpus"),
    "eval": ("lm-eval", "lm-evaluation-harness on a checkpoint or an export"),
}


def cmd_sweep(args: argparse.Namespace) -> int:
    """Plan a sweep (every point validated first), then submit it, run it here, or report on it."""
    from megamix import sweep

    if args.status:
        given = [name for name, v in (("--config", args.config), ("--grid", args.grid), ("--zip", args.zip),
                                      ("--set", args.overrides)) if v]
        if given:
            raise sweep.SweepError(f"--status reads the sweep in {args.out}; {', '.join(given)} belong to planning it")
        points = sweep.read_manifest(args.out)
    else:
        world = args.nproc if args.run else args.world_size
        extra = sweep.submission(args.sbatch_args, args.script) if args.submit else []
        planned = sweep.plan(args.out, args.config, args.overrides, args.grid, world_size=world, zips=args.zip)
        call = {"config": str(Path(args.config).resolve()) if args.config else None, "set": args.overrides,
                "grid": args.grid, **({"zip": args.zip} if args.zip else {})}
        points = sweep.write(args.out, planned, call)
        print(f"sweep {args.out}: {len(planned)} point(s), configs in {Path(args.out) / 'configs'}")
        print(sweep.plan_table(planned))
        if args.submit:
            sweep.submit(args.out, points, extra, args.script)
        elif args.run:
            sweep.run_here(points, args.nproc)
        else:
            print("nothing started: --submit sends the points to Slurm (slurm/train.sbatch), --run trains them here")
    print(sweep.status_table(points))
    seeds = sweep.seed_table(points)
    if seeds:
        print("\nover the seeds (finished runs; mean ± sample standard deviation):\n" + seeds)
    if args.compare:
        sweep.compare(args.out, points)
        print(f"wrote {Path(args.out) / 'comparison'}/comparison.md and its PNGs")
    return 0


def resolve_device(device: str | None) -> str:
    """``--device``: as given, else CUDA when available, else the CPU."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Token-weighted validation loss of a checkpoint on a ``.bin/.idx`` corpus, in order."""
    for name in ("seq_len", "micro_batch_size", "max_batches"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise EvaluateError(f"--{name.replace('_', '-')} must be positive; got {value}")
    import torch

    from megamix.analysis.pruning import perplexity, validation_loss
    from megamix.checkpoint import checkpoint_config, load_model, resolve_checkpoint
    from megamix.data.gpt_dataset import build_dataset

    checkpoint = resolve_checkpoint(args.checkpoint)
    cfg = checkpoint_config(checkpoint)
    seq_len = args.seq_len or cfg.data.seq_len
    if seq_len > cfg.model.max_seq_len:
        raise EvaluateError(f"--seq-len {seq_len} exceeds the model's max_seq_len {cfg.model.max_seq_len}")
    data = build_dataset(args.data, "valid", "0,1", seq_len, 0, use_split=False)
    num_batches = len(data) // args.micro_batch_size
    if args.max_batches is not None:
        num_batches = min(num_batches, args.max_batches)
    if num_batches == 0:
        raise EvaluateError(f"{args.data}: {len(data)} samples of {seq_len + 1} tokens, not one batch of "
                            f"{args.micro_batch_size}; lower --micro-batch-size or --seq-len")
    device = torch.device(resolve_device(args.device))
    model = load_model(checkpoint).to(device)
    size = args.micro_batch_size
    batches = (torch.stack([data[i] for i in range(b * size, (b + 1) * size)]).to(device) for b in range(num_batches))
    loss = validation_loss(model, batches)
    result = {"val_loss": loss, "val_ppl": perplexity(loss), "val_tokens": num_batches * size * seq_len}
    summary = f"loss {loss:.4f}, perplexity {result['val_ppl']:.2f} over {result['val_tokens']:,} tokens"
    print(json.dumps(result) if args.json else f"{args.data}: {summary}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from megamix.hf.harness import evaluate

    report = evaluate(
        [t.strip() for t in args.tasks.split(",") if t.strip()], checkpoint=args.checkpoint, export=args.hf,
        tokenizer=args.tokenizer, text=args.text, compare=args.compare, batch_size=args.batch_size,
        max_length=args.max_length, limit=args.limit, device=resolve_device(args.device),
        trust_code=args.trust_remote_code,
    )
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    for task, metrics in report["lm_eval"].items():
        for key, value in metrics.items():
            if isinstance(value, float) and "stderr" not in key:
                print(f"lm-eval  {task}  {key.removesuffix(',none')}: {value:.6g}")
    for key, value in report.get("megamix", {}).items():
        print(f"megamix  {key}: {value:.6g}")
    return 0


def _help(name: str, text: str) -> str:
    return f"old name of `megamix {RENAMED[name][0]}`" if name in RENAMED else text


def _add_val_loss(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory (latest checkpoint)")
    p.add_argument("--data", required=True, help=".bin/.idx prefix")
    p.add_argument("--seq-len", type=int, default=None, help="default: the sequence length it was trained with")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)


def _add_lm_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks; megamix_text_perplexity "
                   "is the offline perplexity of --text")
    p.add_argument("--checkpoint", help="checkpoint or run directory (needs --tokenizer unless --hf is given)")
    p.add_argument("--tokenizer", help="the SentencePiece .model or HF tokenizer the model was trained with")
    p.add_argument("--hf", help="an existing export (tools/convert_to_hf.py) instead of exporting --checkpoint")
    p.add_argument("--text", help="JSON lines with a 'text' field (.gz too), or a .txt file as one document")
    p.add_argument("--compare", action="store_true", help="also compute the text task's perplexities with "
                   "megamix's own model and tokenizer (needs --checkpoint)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-length", type=int, default=None, help="window; default: model.max_seq_len")
    p.add_argument("--limit", type=int, default=None, help="documents per task")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run an export's own Python even when it is not megamix's modeling_megamix.py")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megamix", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not one line")
    common = argparse.ArgumentParser(add_help=False)  # --debug also after the command
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", parents=[common], help="train a model (one process, or under torchrun/srun)")
    _add_config_args(train)
    train.set_defaults(func=cmd_train)
    check = sub.add_parser("check", parents=[common],
                           help="validate a config for a launch of N processes (exit 2 if it cannot run)")
    _add_config_args(check)
    check.add_argument("--world-size", type=_positive_int, required=True, metavar="N",
                       help="processes the launch will start")
    check.set_defaults(func=cmd_check)
    plan = sub.add_parser("plan", parents=[common], help="per-layer placement, per-rank parameters and memory")
    _add_config_args(plan)
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.add_argument("--world-size", type=_positive_int, default=None, metavar="N",
                      help="list the valid tp/pp/dp layouts of N GPUs with their memory per GPU")
    plan.set_defaults(func=cmd_plan)
    sweep = sub.add_parser("sweep", parents=[common], help="a grid of configs: one run per point, validated up "
                           "front, submitted to Slurm or run here; --status follows it")
    sweep.add_argument("--out", required=True, metavar="DIR", help="the sweep's directory (manifest, configs, runs)")
    _add_config_args(sweep)
    sweep.add_argument("--grid", action="append", default=[], metavar="SECTION.KEY=V1,V2",
                       help="values to sweep (repeatable: every combination); a YAML list for values with commas")
    sweep.add_argument("--zip", action="append", default=[], metavar="SECTION.KEY=V1,V2",
                       help="values that vary together (repeatable, as many each): the i-th of every --zip key "
                       "in one point, e.g. a scheme with its own learning rate")
    sweep.add_argument("--world-size", type=_positive_int, default=None, metavar="N",
                       help="validate every point for a launch of N processes (the allocation's)")
    start = sweep.add_mutually_exclusive_group()
    start.add_argument("--submit", action="store_true", help="sbatch slurm/train.sbatch for each point not "
                       "finished, queued or running")
    start.add_argument("--run", action="store_true", help="train the unfinished points here, one after another")
    start.add_argument("--status", action="store_true", help="report each point's step, loss, perplexity and "
                       "state (no planning)")
    sweep.add_argument("--sbatch-args", default="", metavar="ARGS",
                       help='sbatch options, written with "=": --sbatch-args="--time=12:00:00 -N 2"')
    sweep.add_argument("--script", default=str(DEFAULT_SCRIPT), help="the batch script (default: %(default)s)")
    sweep.add_argument("--nproc", type=_positive_int, default=1, metavar="N",
                       help="with --run: processes per point (torchrun)")
    sweep.add_argument("--compare", action="store_true", help="also write OUT/comparison (tools/compare_runs.py)")
    sweep.set_defaults(func=cmd_sweep)
    for name in ("val-loss", "evaluate"):
        _add_val_loss(sub.add_parser(name, parents=[common], help=_help(name, "validation loss and perplexity of a "
                                                                           "checkpoint on a .bin/.idx corpus")))
    for name in ("lm-eval", "eval"):
        _add_lm_eval(sub.add_parser(name, parents=[common], help=_help(name, "lm-evaluation-harness on a checkpoint "
                                                                          "(exported on the fly) or an export")))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in RENAMED:
        new, what = RENAMED[args.command]
        print(f"megamix: `megamix {args.command}` is now `megamix {new}` ({what}); the old name still works",
              file=sys.stderr)
    return run_command("megamix", lambda: args.func(args), debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
