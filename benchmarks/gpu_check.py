"""Everything a GPU must confirm, in one command: the steps behind ``scripts/gpu_check.sh``.

    python benchmarks/gpu_check.py OUT_DIR [--dry-run] [--timeout STEP=SECONDS ...] [--only STEP ...]

Steps, each a subprocess under coreutils ``timeout`` (its own limit, so one failure or hang still
lets the others report), its output in ``OUT_DIR/logs/STEP.log`` and its results in
``OUT_DIR/STEP.json``; ``OUT_DIR/gpu_check.json`` and ``gpu_check.md`` are rewritten after every
step, so even an interrupted run leaves a report:

1. ``build``: build the extension for the local GPU and assert the kernels load and agree with the
   CPU operator (``python -m megamix.ops.build``);
2. ``tests``: ``pytest tests/gpu``;
3. ``kernel_bench``: the reduced kernel benchmark (``benchmarks/fused_norm.py --reduced``): GB/s vs
   measured copy bandwidth, ratios vs torch eager, torch.compile and Liger;
4. ``train``: ``llama_1b`` bf16 training steps, tokens/s and MFU with fused kernels on/off and
   compile on/off, and the plain transformers loop (``benchmarks/gpu_train.py throughput``);
5. ``memory_7b``: ``llama_7b`` shapes with 2 and 4 layers on one GPU, measured peak vs
   ``megamix plan``, extrapolated to 32 layers (``benchmarks/gpu_train.py memory``).

``--dry-run`` (no GPU needed): prints every step's command line and runs what a CPU can in reduced
form (the build step's toolchain report, ``pytest tests/gpu`` collecting and skipping, the kernel
benchmark's ``--cpu-smoke``, the training benchmark on ``llama_tiny`` for 2 steps, the memory step
as the plan only), and marks the steps that need a GPU ``skipped (no GPU)``.

The steps share a 230 s budget (``--budget-s``), under the 4 minutes of one run on an H100/H200
(cold CUDA start and compilation included): each step's timeout is its maximum, or less where the
steps after it would be left less than their minimum (``LIMITS``); ``--timeout STEP=SECONDS`` fixes
one.  A missing optional peer (Liger, DeepSpeed) is reported as
skipped, not failed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# One run's budget (under the 4 minutes of an H100/H200 slot's run, cold start included) and each
# step's (least, most) seconds: a step's timeout is min(most, what is left of the budget minus the
# least of the steps after it), so time a warm build does not need goes to the training step.
BUDGET_S = 230
LIMITS = {"build": (20, 90), "tests": (15, 45), "kernel_bench": (20, 45), "train": (40, 150), "memory_7b": (20, 40)}
OPTIONAL_PEERS = ("liger_kernel", "triton", "transformers", "numba", "deepspeed", "ninja")

TARGETS = {
    "fwd_copy": 0.85, "fwd_bwd_copy": 0.70, "vs_best_baseline": 1.0, "mfu": 0.50, "vs_plain": 1.3,
    "plan_error": 0.10,
}


@dataclass
class Step:
    name: str
    title: str
    command: list[str]  # the real command (on a GPU)
    dry_command: list[str] | None  # what a CPU dry run executes (None: nothing)
    needs_gpu: bool = True
    timeout: int = 60


def steps(out: Path) -> list[Step]:
    j = lambda name: str(out / f"{name}.json")  # noqa: E731
    return [
        Step("build", "Build the extension for the local GPU; the kernels load and match the CPU operator",
             [PY, "-m", "megamix.ops.build", "--json", j("build")],
             [PY, "-m", "megamix.ops.build", "--json", j("build")]),
        Step("tests", "pytest tests/gpu",
             [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu", f"--junitxml={out / 'tests.xml'}"],
             [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu", f"--junitxml={out / 'tests.xml'}"]),
        Step("kernel_bench", "Fused add + norm kernels: GB/s vs copy bandwidth; vs eager, torch.compile, Liger",
             [PY, "benchmarks/fused_norm.py", "--reduced", "--json", j("kernel_bench")],
             [PY, "benchmarks/fused_norm.py", "--cpu-smoke", "--kind", "rms", "--residual", "none", "same", "fp32",
              "--json", j("kernel_bench")]),
        Step("train", "llama_1b bf16 training: tokens/s and MFU, fused on/off, compile on/off, plain transformers",
             [PY, "benchmarks/gpu_train.py", "throughput", "--config", "configs/llama_1b.yaml", "--precision", "bf16",
              "--warmup", "2", "--steps", "3", "--budget-s", "{train_budget}", "--json", j("train")],
             [PY, "benchmarks/gpu_train.py", "throughput", "--config", "configs/llama_tiny.yaml", "--set",
              "data.seq_len=64", "--micro-batches", "1", "--warmup", "1", "--steps", "1", "--data-workers", "0",
              "--json", j("train")]),
        Step("memory_7b", "llama_7b memory on one GPU (2 and 4 layers) vs megamix plan, extrapolated to 32",
             [PY, "benchmarks/gpu_train.py", "memory", "--config", "configs/llama_7b.yaml", "--layers", "2", "4",
              "--steps", "2", "--json", j("memory_7b")],
             [PY, "benchmarks/gpu_train.py", "memory", "--config", "configs/llama_7b.yaml", "--layers", "2", "4",
              "--plan-only", "--json", j("memory_7b")]),
    ]


def gpu_available() -> tuple[bool, str | None]:
    try:
        import torch
    except ImportError:
        return False, None
    if not torch.cuda.is_available():
        return False, None
    return True, torch.cuda.get_device_name()


def timed_command(command: list[str], timeout: int) -> list[str]:
    if shutil.which("timeout"):  # coreutils: TERM at the limit, KILL 10 s later
        return ["timeout", "--kill-after=10", str(timeout)] + command
    return command


def run_step(step: Step, out: Path, dry_run: bool, have_gpu: bool) -> dict:
    command = step.command if (have_gpu and not dry_run) else step.dry_command
    real = shlex.join(timed_command(step.command, step.timeout))
    record: dict = {"name": step.name, "title": step.title, "command": real, "timeout_s": step.timeout}
    if dry_run or not have_gpu:
        record["dry_command"] = shlex.join(timed_command(step.dry_command, step.timeout)) if step.dry_command else None
    print(f"\n== {step.name}: {step.title}\n   $ {real}", flush=True)
    if command is None:
        record["status"] = "skipped (no GPU)"
        return record
    if command is not step.command:
        print(f"   (dry run) $ {record['dry_command']}", flush=True)
    log = out / "logs" / f"{step.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    result_path = out / f"{step.name}.json"
    result_path.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    with open(log, "w") as f:
        try:
            proc = subprocess.run(timed_command(command, step.timeout), cwd=ROOT, env=env, stdout=f,
                                  stderr=subprocess.STDOUT, timeout=step.timeout + 30, check=False)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = 124
    seconds = time.perf_counter() - start
    record.update(rc=rc, seconds=round(seconds, 1), log=str(log.relative_to(out)))
    if result_path.exists():
        try:
            record["result"] = json.loads(result_path.read_text())
        except json.JSONDecodeError:
            record["result"] = None
    if step.name == "tests":
        record["result"] = junit_counts(out / "tests.xml")
    if rc in (124, 137):
        record["status"] = f"timeout ({step.timeout} s)"
    elif rc != 0:
        record["status"] = f"failed (exit {rc})"
    elif step.needs_gpu and not have_gpu:
        record["status"] = "skipped (no GPU)"
        record["dry_run_status"] = "passed"
    else:
        record["status"] = step_status(step.name, record.get("result"))
    if not record["status"].startswith(("passed", "skipped")):
        tail = log.read_text(errors="replace").splitlines()[-25:]
        record["log_tail"] = tail
        print("\n".join("   | " + line for line in tail), flush=True)
    print(f"   -> {record['status']} ({seconds:.1f} s)", flush=True)
    return record


def step_status(name: str, result) -> str:
    """A step that exited 0 passed, unless its own report says otherwise."""
    if not isinstance(result, dict):
        return "passed"
    status = result.get("status")
    if isinstance(status, str) and not status.startswith("passed"):
        return status
    if name == "train":
        failed = [n for n, v in result.get("variants", {}).items() if str(v.get("status", "")).startswith("failed")]
        if failed:
            return f"failed ({', '.join(failed)})"
    if name == "memory_7b":
        failed = [n for n, v in result.get("per_layers", {}).items() if str(v.get("status", "")).startswith("failed")]
        if failed:
            return f"failed (layers {', '.join(failed)})"
    return "passed"


def junit_counts(path: Path) -> dict | None:
    if not path.exists():
        return None
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


# ---------------------------------------------------------------------------------------------
# targets


def targets(records: dict[str, dict], dry_run: bool) -> list[dict]:
    rows = []

    def add(name, target, value, met, detail=""):
        rows.append({"name": name, "target": target, "value": value,
                     "met": None if value is None else bool(met), "detail": detail})

    bench = (records.get("kernel_bench") or {}).get("result") or {}
    cases = [c for c in bench.get("cases", []) if c.get("hidden") == 4096 and c.get("dtype") == "bf16"]
    real_bench = bench and not dry_run and bench.get("device") not in (None, "CPU")
    for pass_name, key, label in (("fwd", "fwd_copy", "forward"), ("fwd+bwd", "fwd_bwd_copy", "forward+backward")):
        sel = [c for c in cases if c["pass"] == pass_name and c.get("copy_fraction")]
        value = min(c["copy_fraction"] for c in sel) if sel and real_bench else None
        add(f"{label} bandwidth, hidden 4096 bf16 (worst residual mode)", f">= {TARGETS[key]:.0%} of copy",
            value, value is not None and value >= TARGETS[key],
            ", ".join(f"{c['residual']} {c['kind']}: {c['copy_fraction']:.0%}" for c in sel))
    ratios = []
    for c in cases:
        best = [r for r in (c.get("x_compile"), c.get("x_liger")) if r]
        if best:
            ratios.append((min(best), c))
    value = min(r for r, _ in ratios) if ratios and real_bench else None
    add("vs the best of torch.compile and Liger (worst case)", f">= {TARGETS['vs_best_baseline']:.1f}x", value,
        value is not None and value >= TARGETS["vs_best_baseline"],
        f"Liger {bench.get('liger', 'n/a')}, torch.compile {bench.get('compile', 'n/a')}")
    train = (records.get("train") or {}).get("result") or {}
    real_train = train and not dry_run and train.get("device") not in (None, "CPU")
    value = train.get("best_mfu") if real_train else None
    add("llama_1b MFU (best megamix variant)", f">= {TARGETS['mfu']:.0%}", value,
        value is not None and value >= TARGETS["mfu"], str(train.get("best_megamix") or ""))
    value = train.get("speedup_vs_plain") if real_train else None
    add("llama_1b vs the plain transformers loop", f">= {TARGETS['vs_plain']:.1f}x", value,
        value is not None and value >= TARGETS["vs_plain"])
    mem = (records.get("memory_7b") or {}).get("result") or {}
    value = mem.get("measured_over_plan") if not dry_run else None
    if mem.get("measured_full_gib"):
        detail = f"measured {mem['measured_full_gib']:.1f} GiB vs plan {mem.get('plan_full_gib', float('nan')):.1f} GiB"
    else:
        detail = f"plan {mem['plan_full_gib']:.1f} GiB" if mem.get("plan_full_gib") else ""
    add("7B peak memory (extrapolated to 32 layers) vs plan", f"within {TARGETS['plan_error']:.0%}", value,
        value is not None and abs(value - 1) <= TARGETS["plan_error"], detail)
    return rows


# ---------------------------------------------------------------------------------------------
# report


def fmt(v, pct=False, digits=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1%}" if pct else f"{v:.{digits}g}"
    return str(v)


def markdown(report: dict) -> str:
    lines = [f"# GPU check{' (dry run)' if report['dry_run'] else ''}", "",
             f"{report['started']} on {report['host']}: GPU {report['gpu'] or 'none'}, torch {report['torch']}, "
             f"Python {report['python']}; total {report.get('total_s', 0):.0f} s.", "",
             "Optional peers: " + ", ".join(f"{k} {v}" for k, v in report["peers"].items())
             + (f"; wheels from .wheels/: {', '.join(report['wheels'])}" if report["wheels"] else "") + ".", "",
             "| step | status | seconds | command |", "|---|---|---|---|"]
    for r in report["steps"]:
        lines.append(f"| {r['name']} | {r['status']} | {fmt(r.get('seconds'))} | `{r['command']}` |")
    if report["dry_run"] or not report["gpu"]:
        lines += ["", "Dry run: what ran on the CPU instead.", "", "| step | command | exit |", "|---|---|---|"]
        for r in report["steps"]:
            lines.append(f"| {r['name']} | `{r.get('dry_command') or '-'}` | {fmt(r.get('rc'))} |")
    lines += ["", "## Targets", "", "| target | wanted | measured | met | detail |", "|---|---|---|---|---|"]
    for t in report["targets"]:
        pct = "%" in t["target"] and "of copy" in t["target"] or "MFU" in t["name"]
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['name']} | {t['target']} | {fmt(t['value'], pct=pct)} | {met} | {t['detail']} |")
    by_name = {r["name"]: r for r in report["steps"]}
    bench = (by_name.get("kernel_bench") or {}).get("result")
    if bench:
        lines += ["", "## Kernel benchmark", "",
                  f"{bench.get('device')}, copy bandwidth {fmt(bench.get('copy_gb_s'))} GB/s; Liger "
                  f"{bench.get('liger')}, torch.compile {bench.get('compile')}.", "",
                  "| kind | dtype | residual | hidden | rows | pass | us | GB/s | % copy | x eager | x compile "
                  "| x liger |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in bench.get("cases", []):
            lines.append(f"| {c['kind']} | {c['dtype']} | {c['residual']} | {c['hidden']} | {c['rows']} "
                         f"| {c['pass']} | {fmt(c.get('megamix_us'))} | {fmt(c.get('gb_s'))} "
                         f"| {fmt(c.get('copy_fraction'), True)} | {fmt(c.get('x_eager'))} "
                         f"| {fmt(c.get('x_compile'))} | {fmt(c.get('x_liger'))} |")
    train = (by_name.get("train") or {}).get("result")
    if train:
        lines += ["", "## Training throughput", "",
                  f"{train.get('config')}: {train.get('layers')} layers, hidden {train.get('hidden')}, "
                  f"{train.get('precision')}, batch {train.get('global_batch_size')} x {train.get('seq_len')} tokens "
                  f"(micro {train.get('micro_batch_size')}), {train.get('device')}; "
                  f"{train.get('warmup_steps')} warm-up + {train.get('timed_steps')} timed steps, median.", "",
                  "| variant | status | step s | tokens/s | MFU | peak GiB |", "|---|---|---|---|---|---|"]
        for name, v in train.get("variants", {}).items():
            lines.append(f"| {name} | {v.get('status')} | {fmt(v.get('step_s'))} | {fmt(v.get('tokens_per_s'))} | "
                         f"{fmt(v.get('mfu'), True)} | {fmt(v.get('peak_mem_gib'))} |")
    mem = (by_name.get("memory_7b") or {}).get("result")
    if mem:
        lines += ["", "## 7B memory vs plan", "", f"Layout {', '.join(mem.get('layout', []))}. {mem.get('rule')}.", "",
                  "| layers | status | measured GiB | plan GiB |", "|---|---|---|---|"]
        for n, v in mem.get("per_layers", {}).items():
            lines.append(f"| {n} | {v.get('status')} | {fmt(v.get('peak_gib'))} | {fmt(v.get('plan_gib'))} |")
        lines.append(f"| {mem.get('full_layers')} (extrapolated) | | {fmt(mem.get('measured_full_gib'))} | "
                     f"{fmt(mem.get('plan_full_gib'))} |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict) -> None:
    report["targets"] = targets({r["name"]: r for r in report["steps"]}, report["dry_run"])
    texts = {"gpu_check.json": json.dumps(report, indent=2, default=str), "gpu_check.md": markdown(report)}
    for name, text in texts.items():
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run the CPU-sized steps")
    parser.add_argument("--budget-s", type=int, default=BUDGET_S, help="the whole run's time budget")
    parser.add_argument("--timeout", action="append", default=[], metavar="STEP=SECONDS",
                        help="a fixed timeout for one step (outside the shared budget)")
    parser.add_argument("--only", action="append", default=[], choices=list(LIMITS))
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    fixed: dict[str, int] = {}
    for item in args.timeout:
        name, _, seconds = item.partition("=")
        if name not in LIMITS or not seconds.isdigit():
            parser.error(f"--timeout {item!r}: expected STEP=SECONDS with STEP in {sorted(LIMITS)}")
        fixed[name] = int(seconds)
    have_gpu, gpu = gpu_available()
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    site = os.environ.get("GPU_CHECK_SITE")
    report = {
        "started": dt.datetime.now().isoformat(timespec="seconds"), "host": platform.node(), "gpu": gpu,
        "dry_run": args.dry_run, "torch": torch_version, "python": platform.python_version(),
        "peers": {name: "found" if importlib.util.find_spec(name) else "missing (skipped)" for name in OPTIONAL_PEERS},
        "wheels": os.environ.get("GPU_CHECK_WHEELS", "").split(),
        "wheels_site_packages": sorted(p.name for p in Path(site).iterdir() if p.is_dir() and not p.name.endswith(
            ("-info", "__pycache__", "bin"))) if site and Path(site).is_dir() else [],
        "budget_s": args.budget_s, "limits_s": LIMITS, "fixed_timeouts_s": fixed, "steps": [],
    }
    print(f"gpu_check{' --dry-run' if args.dry_run else ''}: GPU {gpu or 'none'}, torch {torch_version}; "
          f"writing {out}/gpu_check.json and gpu_check.md", flush=True)
    if args.dry_run and have_gpu:
        print("   (--dry-run on a GPU machine: the CPU-sized commands run anyway)", flush=True)
        have_gpu = False
    start = time.perf_counter()
    selected = [s for s in steps(out) if not args.only or s.name in args.only]
    for i, step in enumerate(selected):
        later = sum(LIMITS[s.name][0] for s in selected[i + 1:] if s.name not in fixed)
        left = args.budget_s - (time.perf_counter() - start) - later
        step.timeout = fixed.get(step.name) or int(max(LIMITS[step.name][0], min(LIMITS[step.name][1], left)))
        # the training benchmark stops starting variants a little before its timeout
        step.command = [a.replace("{train_budget}", str(max(10, step.timeout - 12))) for a in step.command]
        report["steps"].append(run_step(step, out, args.dry_run, have_gpu))
        report["total_s"] = time.perf_counter() - start
        write_report(out, report)
    report["total_s"] = time.perf_counter() - start
    write_report(out, report)
    failed = [r["name"] for r in report["steps"] if not r["status"].startswith(("passed", "skipped"))]
    print(f"\ngpu_check: {len(report['steps'])} steps in {report['total_s']:.0f} s; "
          + (f"not passed: {', '.join(failed)}" if failed else "no step failed") + f"\n   {out / 'gpu_check.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
