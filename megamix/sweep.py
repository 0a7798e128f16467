"""Sweeps: one study, many runs.  A grid of config values becomes one run per point, every point
validated before anything starts, then submitted to Slurm (or run here one after another), followed
to its end and compared.

    megamix sweep --out runs/study --config configs/llama_71m.yaml \\
        --grid norm.scheme=pre,post,mix,lns --grid train.seed=1,2 [--set section.key=value ...] \\
        [--world-size 8] [--submit [--sbatch-args="--time=12:00:00 -N 1"] | --run [--nproc N]]
    megamix sweep --out runs/lr --config ... --zip norm.scheme=pre,post --zip train.lr=1e-3,3e-4 ...
    megamix sweep --out runs/study --status [--compare]

A point's name is its grid values, ``scheme=mix_seed=1``.  ``--zip`` keys vary together (the i-th
value of each in the same point), as one axis of the grid: a scheme with its own learning rate.
The sweep directory holds:

- ``sweep.json``: the manifest — every point's name, its grid values, its config, its run directory
  and the Slurm jobs submitted for it (written atomically after each submission), and the calls
  that planned them;
- ``configs/NAME.yaml``: the point's resolved config, what ``megamix train --config`` runs;
- ``runs/NAME/``: the point's ``train.output_dir``;
- ``slurm/NAME-JOBID.out``: Slurm's log of each job;
- ``comparison/``: ``--compare``'s tables and figures (as ``tools/compare_runs.py``).

Running the same command again is safe: a point whose run has finished, or whose job is still
queued or running, is left alone; the others (failed, cancelled, never submitted) are submitted
again and resume from their latest checkpoint.  New grid values add points to the study, and so
does a second call with other fixed values (``--set train.lr=3e-4 --grid norm.scheme=post`` beside
``--set train.lr=1e-3 --grid norm.scheme=pre,mix``: a scheme's own learning rate); a point whose
config would change is refused (its run directory holds a run of the old config).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from megamix.config import Config, ConfigError, load_config, parse_blend, parse_override, validate
from megamix.errors import MegamixError
from megamix.schemes import describe_schemes, layer_schemes

MANIFEST = "sweep.json"
DEFAULT_SCRIPT = Path(__file__).resolve().parents[1] / "slurm" / "train.sbatch"
ALIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
         "SUSPENDED", "STAGE_OUT", "SIGNALING"}


class SweepError(MegamixError, RuntimeError):
    """A sweep that cannot go on: a missing manifest, a failed submission or run."""


@dataclass
class Point:
    name: str
    values: dict[str, str]  # grid key → the value as written on the command line
    config: str  # the resolved config file
    run_dir: str  # its train.output_dir
    jobs: list[str] = field(default_factory=list)  # Slurm job ids, oldest first


# ----------------------------------------------------------------------------------------------
# The grid


def parse_grid(spec: str) -> tuple[str, list[str]]:
    """``"norm.scheme=pre,post"`` → ``("norm.scheme", ["pre", "post"])``; a value that holds commas
    itself is written as a YAML list of strings: ``'norm.layers=["[post, pre]", "[pre, pre]"]'``."""
    if "=" not in spec:
        raise ConfigError(spec, "a grid must look like section.key=value1,value2,...")
    key, raw = (part.strip() for part in spec.split("=", 1))
    if "." not in key:
        raise ConfigError(key, "a grid key must look like section.key")
    if raw.startswith("["):
        try:
            values = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(key, f"the grid's values are not a valid YAML list: {e}") from None
        values = [v if isinstance(v, str) else json.dumps(v) for v in values]
    else:
        values = [v.strip() for v in raw.split(",")]
    if not values or any(v == "" for v in values):
        raise ConfigError(key, f"a grid needs one or more non-empty values; got {raw!r}")
    if len(set(values)) != len(values):
        raise ConfigError(key, f"the grid repeats a value: {values}")
    return key, values


def point_names(grid: list[tuple[str, list[str]]], zipped: list[tuple[str, list[str]]] = ()
                ) -> list[tuple[str, dict[str, str]]]:
    """Every combination of the grid's values, named by its values: a key's last part (``scheme``),
    or the whole key where two keys share it.  The ``zipped`` keys vary together, as one axis (their
    i-th values in the same point: a scheme with its own learning rate), the slowest; then the
    grid's keys in order, the last varying fastest."""
    axes = []
    if zipped:
        lengths = {len(values) for _, values in zipped}
        if len(lengths) > 1:
            raise ConfigError(zipped[0][0], "--zip keys vary together, so they need as many values each; got "
                              + ", ".join(f"{key}: {len(values)}" for key, values in zipped))
        axes.append([{key: values[i] for key, values in zipped} for i in range(lengths.pop())])
    axes += [[{key: value} for value in values] for key, values in grid]
    keys = [key for key, _ in zipped] + [key for key, _ in grid]
    lasts = [key.rsplit(".", 1)[1] for key in keys]
    labels = {key: last if lasts.count(last) == 1 else key for key, last in zip(keys, lasts)}
    points = []
    for combo in itertools.product(*axes):
        values = {key: value for part in combo for key, value in part.items()}
        name = "_".join(f"{labels[key]}={_safe(value)}" for key, value in values.items()) or "run"
        points.append((name, values))
    names = [name for name, _ in points]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(keys[0], f"two grid points would share the name {name!r}; write the values apart")
    return points


def _safe(value: str) -> str:
    """A value as part of a directory and job name: letters, digits and ``.+-`` kept."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", value).strip("-") or "empty"


# ----------------------------------------------------------------------------------------------
# Planning: every point's config, checked before anything is written or started


def plan(out: str | os.PathLike, config: str | None, sets: list[str], grids: list[str],
         world_size: int | None = None, zips: list[str] = ()) -> list[tuple[Point, Config]]:
    """The sweep's points with their resolved configs; a bad value in any of them is a
    :class:`ConfigError` naming the field and the point, raised before anything is written."""
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", f"{out} is a file; a sweep needs a directory")
    grid = [parse_grid(spec) for spec in grids]
    zipped = [parse_grid(spec) for spec in zips]
    keys = [key for key, _ in zipped + grid]
    if len(set(keys)) != len(keys):
        raise ConfigError(next(k for k in keys if keys.count(k) > 1), "appears in two --grid/--zip options")
    fixed = [parse_override(item)[0] for item in sets]
    for key in keys:
        if key in fixed:
            raise ConfigError(key, "is both swept (--grid/--zip) and set (--set)")
    if "train.output_dir" in keys + fixed:
        raise ConfigError("train.output_dir", f"a sweep gives each point its own run directory under {out}/runs")
    planned = []
    for name, values in point_names(grid, zipped):
        run_dir = out / "runs" / name
        overrides = [*sets, *(f"{key}={value}" for key, value in values.items()), f"train.output_dir={run_dir}"]
        try:
            cfg = load_config(config, overrides)
            # Checked on a copy: what a launch derives (parallel.dp from its world size) stays out of the file.
            validate(copy.deepcopy(cfg), world_size=world_size, for_training=True)
        except ConfigError as e:
            message = str(e).removeprefix(f"{e.field}: ")
            raise ConfigError(e.field, f"{message} (sweep point {name})") from None
        for _, prefix in parse_blend(cfg.data.path, "data.path"):
            missing = [s for s in (".bin", ".idx") if not Path(prefix + s).is_file()]
            if missing:
                raise ConfigError("data.path", f"{prefix}{missing[0]} does not exist (sweep point {name}); "
                                  "make the corpus with tools/preprocess_c4.py first")
        planned.append((Point(name, values, str(out / "configs" / f"{name}.yaml"), str(run_dir)), cfg))
    return planned


def write(out: str | os.PathLike, planned: list[tuple[Point, Config]], call: dict) -> list[Point]:
    """Write the points' configs and the manifest; points of an earlier call stay in it.  A point
    whose config file exists with other contents is refused: its run directory holds that run."""
    out = Path(out).resolve()
    existing = {p.name: p for p in read_manifest(out)} if (out / MANIFEST).exists() else {}
    for point, cfg in planned:
        path = Path(point.config)
        if path.exists() and path.read_text() != cfg.to_yaml():
            raise ConfigError("sweep", f"{path} holds another config for point {point.name} (its run directory "
                              f"{point.run_dir} trains that one); use another --out for a different study")
    for point, cfg in planned:
        cfg.save(point.config)
        if point.name in existing:
            point.jobs = existing[point.name].jobs
        existing[point.name] = point
    points = list(existing.values())
    save_manifest(out, points, call)
    return points


def save_manifest(out: Path, points: list[Point], call: dict | None = None) -> None:
    """Write ``sweep.json`` atomically: the points, and every planning call that made them
    (``{"config", "set", "grid"}``, the latest appended unless it repeats the one before)."""
    path = out / MANIFEST
    calls = json.loads(path.read_text()).get("calls", []) if path.exists() else []
    if call is not None and (not calls or calls[-1] != call):
        calls.append(call)
    tmp = path.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"calls": calls, "points": [asdict(p) for p in points]}, indent=1) + "\n")
    os.replace(tmp, path)


def read_manifest(out: str | os.PathLike) -> list[Point]:
    path = Path(out) / MANIFEST
    try:
        data = json.loads(path.read_text())
        return [Point(**p) for p in data["points"]]
    except FileNotFoundError:
        raise SweepError(f"{path} does not exist: {out} is not a sweep directory (megamix sweep --out DIR "
                         "--config ... --grid ... makes one)") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SweepError(f"{path} is not a sweep manifest ({e})") from None


# ----------------------------------------------------------------------------------------------
# Progress: what each point's run directory and Slurm say


@dataclass
class Progress:
    steps: int  # the config's train.steps
    checkpoint: int  # the latest complete checkpoint's step (0: none)
    step: int | None  # the last logged training step
    loss: float | None
    val_ppl: float | None
    state: str  # finished | JOB STATE (job N) | stopped at step N | not started

    @property
    def finished(self) -> bool:
        return self.checkpoint >= self.steps


def progress(point: Point, slurm: dict[str, str]) -> Progress:
    from megamix.checkpoint.files import complete_checkpoints

    steps = load_config(point.config).train.steps
    found = complete_checkpoints(point.run_dir)
    checkpoint = found[-1][0] if found else 0
    step = loss = val_ppl = None
    metrics = Path(point.run_dir) / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if "loss" in record:
                step, loss = record.get("step"), record["loss"]
            if "val_ppl" in record:
                val_ppl = record["val_ppl"]
    job = point.jobs[-1] if point.jobs else None
    if checkpoint >= steps:
        state = "finished"
    elif job and slurm.get(job) in ALIVE:
        state = f"{slurm[job].lower()} (job {job})"
    else:
        state = f"stopped at step {checkpoint}" if checkpoint or step else "not started"
        if job:
            state += f" (job {job}: {slurm[job].lower()})" if slurm.get(job) else f" (job {job})"
            reason = last_error(Path(point.config).parents[1] / "slurm" / f"{point.name}-{job}.out")
            if reason:
                state += f": {reason}"
    return Progress(steps, checkpoint, step, loss, val_ppl, state)


ERROR_LINES = (re.compile(r"(?:^|\] |: )(megamix: .*|\w*(?:Error|Exception): .*)$"),  # the error itself
               re.compile(r"(megamix-slurm: (?:not requeueing|config check failed|first rank to end|stop"
                          r"|stopped).*)$"))  # else the batch script's verdict
INFO_LINE = re.compile(r"megamix: (?:[\d.]+M params|config: |interrupted|\w+ during start-up|not building|JIT build"
                       r"|index cache|blend helper)")  # megamix's own lines that are not errors


def last_error(log: Path) -> str | None:
    """The last line of a job's Slurm log that reports the error (``megamix: …`` or a Python
    exception, else the batch script's ``megamix-slurm: …`` verdict), cut to 200 characters."""
    try:
        with open(log, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for pattern in ERROR_LINES:
        for line in reversed(lines):
            match = pattern.search(line.strip())
            if match and not INFO_LINE.match(match.group(1)):
                text = match.group(1)
                return text if len(text) <= 200 else text[:199] + "…"
    return None


def slurm_states(jobs: list[str]) -> dict[str, str]:
    """``{job id: state}`` of the jobs Slurm still knows (``squeue``, then ``scontrol`` for the
    recently ended); empty without Slurm."""
    if not jobs or shutil.which("squeue") is None:
        return {}
    states: dict[str, str] = {}
    out = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(jobs)], capture_output=True, text=True,
                         timeout=60)
    for line in out.stdout.splitlines():
        job, _, state = line.partition(" ")
        states[job.strip()] = state.strip()
    for job in jobs:
        if job not in states:
            info = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=60)
            match = re.search(r"\bJobState=(\S+)", info.stdout)
            if match:
                states[job] = match.group(1)
    return states


def status_table(points: list[Point]) -> str:
    """One Markdown row per point: its grid values, steps, loss, validation perplexity and state."""
    slurm = slurm_states([p.jobs[-1] for p in points if p.jobs])
    keys = list(dict.fromkeys(key for p in points for key in p.values))
    rows = ["| point | " + " | ".join(keys) + (" | " if keys else "") + "step | loss | val ppl | state |",
            "|---|" + "---|" * len(keys) + "---|---|---|---|"]
    for point in points:
        p = progress(point, slurm)
        step = f"{p.step if p.step is not None else p.checkpoint}/{p.steps}"
        loss = f"{p.loss:.4f}" if p.loss is not None else "–"
        ppl = f"{p.val_ppl:.2f}" if p.val_ppl is not None else "–"
        values = "".join(f"{point.values.get(key, '–')} | " for key in keys)
        rows.append(f"| {point.name} | {values}{step} | {loss} | {ppl} | {p.state} |")
    return "\n".join(rows)


SEED_KEYS = ("train.seed", "data.seed")


def seed_table(points: list[Point]) -> str | None:
    """Over the seeds (``train.seed``/``data.seed`` in the grid): per combination of the other grid
    values, how many runs finished, and the final validation perplexity and loss as mean ± sample
    standard deviation over them.  None when the grid has no seed key."""
    keys = list(dict.fromkeys(key for p in points for key in p.values))
    if not any(key in SEED_KEYS for key in keys):
        return None
    others = [key for key in keys if key not in SEED_KEYS]
    groups: dict[tuple, list[Progress]] = {}
    for point in points:
        groups.setdefault(tuple(point.values.get(k, "–") for k in others), []).append(progress(point, {}))
    rows = ["| " + " | ".join(others) + (" | " if others else "") + "finished | val ppl | final loss |",
            "|" + "---|" * len(others) + "---|---|---|"]
    for combo, runs in groups.items():
        done = [r for r in runs if r.finished]
        ppl = _mean_sd([r.val_ppl for r in done if r.val_ppl is not None], ".2f")
        loss = _mean_sd([r.loss for r in done if r.loss is not None], ".4f")
        rows.append("| " + "".join(f"{v} | " for v in combo) + f"{len(done)}/{len(runs)} | {ppl} | {loss} |")
    return "\n".join(rows)


def _mean_sd(values: list[float], fmt: str) -> str:
    if not values:
        return "–"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:{fmt}}"
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:{fmt}} ± {sd:{fmt}}"


def plan_table(planned: list[tuple[Point, Config]]) -> str:
    """One row per point: its grid values and the scheme of each layer (post×3 pre×9)."""
    keys = list(dict.fromkeys(key for p, _ in planned for key in p.values))
    rows = ["| point | " + " | ".join(keys) + (" | " if keys else "") + "layers |",
            "|---|" + "---|" * len(keys) + "---|"]
    for point, cfg in planned:
        layers = describe_schemes(layer_schemes(cfg.norm, cfg.model.num_layers))
        rows.append(f"| {point.name} | " + "".join(f"{point.values[k]} | " for k in keys) + f"{layers} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------
# Starting the points


def to_start(points: list[Point]) -> list[Point]:
    """The points neither finished nor queued or running."""
    slurm = slurm_states([p.jobs[-1] for p in points if p.jobs])
    waiting = []
    for point in points:
        p = progress(point, slurm)
        if not p.finished and not (point.jobs and slurm.get(point.jobs[-1]) in ALIVE):
            waiting.append(point)
    return waiting


def submission(sbatch_args: str = "", script: str | os.PathLike = DEFAULT_SCRIPT) -> list[str]:
    """Check what ``--submit`` needs before anything is written: the batch script, ``sbatch``, and
    the sbatch options as a list."""
    try:
        extra = shlex.split(sbatch_args)
    except ValueError as e:
        raise ConfigError("--sbatch-args", f"cannot split {sbatch_args!r} into options: {e}") from None
    if not Path(script).is_file():
        raise ConfigError("--script", f"{script} does not exist: give the path of megamix's slurm/train.sbatch")
    if shutil.which("sbatch") is None:
        raise SweepError("sbatch is not on PATH: submit from a Slurm login node, or use --run to train here")
    return extra


def submit(out: str | os.PathLike, points: list[Point], extra: list[str] = (),
           script: str | os.PathLike = DEFAULT_SCRIPT) -> list[str]:
    """``sbatch`` each point that is neither finished nor queued/running (``extra``: sbatch
    options, after the sweep's own so they win); returns the new job ids."""
    out = Path(out).resolve()
    (out / "slurm").mkdir(parents=True, exist_ok=True)
    submitted = []
    for point in to_start(points):
        cmd = ["sbatch", "--parsable", f"--job-name={point.name}", f"--output={out / 'slurm'}/%x-%j.out", *extra,
               str(script), "--config", point.config]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise SweepError(f"sbatch failed for point {point.name} (exit {result.returncode}): "
                             f"{result.stderr.strip()}; the points submitted before it are in {out / MANIFEST}")
        job = result.stdout.strip().split(";")[0]
        point.jobs.append(job)
        save_manifest(out, points)  # after each: a failure later leaves the jobs so far on record
        submitted.append(job)
        print(f"submitted {point.name}: job {job}")
    return submitted


def run_here(points: list[Point], nproc: int = 1) -> list[str]:
    """Train each point that is not finished, one after another, in this machine's processes
    (``nproc`` > 1: under torchrun); returns the names trained."""
    done = []
    for point in to_start(points):
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "-m", "megamix", "train", "--config", point.config]
        else:
            cmd = [sys.executable, "-m", "megamix", "train", "--config", point.config]
        print(f"== {point.name}: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
        proc = subprocess.Popen(cmd)
        try:
            code = proc.wait()
        except KeyboardInterrupt:  # the trainer got the Ctrl-C too: it checkpoints and exits; let it
            print(f"interrupted: waiting for point {point.name} to checkpoint and exit", file=sys.stderr, flush=True)
            code = proc.wait()
            raise SweepError(f"interrupted during point {point.name} (it exited with {code}); run the same command "
                             "again to go on (a point resumes from its latest checkpoint)") from None
        if code != 0:
            raise SweepError(f"point {point.name} exited with {code} (its run directory: {point.run_dir}); the "
                             "points after it did not run; run the same command again to go on (finished points "
                             "are skipped)")
        done.append(point.name)
    return done


def compare(out: str | os.PathLike, points: list[Point]) -> str:
    """``tools/compare_runs.py`` over the points that have logged anything, into ``OUT/comparison``."""
    from megamix.analysis.compare import compare_runs

    runs = [p for p in points if (Path(p.run_dir) / "metrics.jsonl").exists()]
    if not runs:
        raise SweepError(f"no point of {out} has logged a step yet: nothing to compare")
    return compare_runs([p.run_dir for p in runs], Path(out) / "comparison", [p.name for p in runs])
