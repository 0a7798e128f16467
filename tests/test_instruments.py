"""Instruments in the loop (docs/instruments.md): depth statistics that leave the losses bit-identical
and agree with the checkpoint analysis, instability flags on an injected spike, W&B offline across a
requeue, the profiler's trace, downstream evals that equal megamix's own perplexity and leave the
trajectory alone, the figures of ``compare_runs``, the renamed evaluation commands.  (TP2·PP2 and
sequence parallelism against one process: tests/test_instruments_parallel.py.)"""

from __future__ import annotations

import json
import math
import os
import signal
import struct
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import TINY, write_corpus  # noqa: E402

import megamix.train.trainer as trainer_module  # noqa: E402
from megamix import load_model  # noqa: E402
from megamix.analysis.angular import angular_distance  # noqa: E402
from megamix.analysis.compare import compare_runs  # noqa: E402
from megamix.analysis.hidden_states import hidden_states  # noqa: E402
from megamix.checkpoint import latest_checkpoint  # noqa: E402
from megamix.cli import main  # noqa: E402
from megamix.config import ConfigError, load_config, validate  # noqa: E402
from megamix.train.monitors import SpikeMonitor  # noqa: E402
from megamix.train.preemption import Preempted  # noqa: E402
from megamix.train.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in lines(run) if "loss" in r}


def stats_lines(run: Path) -> list[dict]:
    return [r for r in lines(run) if any(k.startswith("stats/") for k in r)]


# ----------------------------------------------------------------------------------------------
# Depth statistics


def test_depth_statistics_leave_the_losses_bit_identical_and_match_the_checkpoint_analysis(tiny_config, tmp_path):
    model = ["norm.scheme=mix", "norm.alpha=0.5", "train.steps=6", "train.eval_interval=0"]
    off = Trainer(tiny_config(*model, f"train.output_dir={tmp_path / 'off'}"))
    off.run()
    on = Trainer(tiny_config(*model, "train.stats_interval=3", "train.stats_probe_sequences=3",
                             "train.save_interval=1", f"train.output_dir={tmp_path / 'on'}"))
    probe = on.instruments.stats.tokens.clone()
    on.run()
    assert losses(tmp_path / "on") == losses(tmp_path / "off")  # bit-identical, every step

    records = stats_lines(tmp_path / "on")
    assert [r["step"] for r in records] == [3, 6]
    last = records[-1]
    layers = range(4)
    for stat in ("rms", "var", "angular", "update_ratio"):
        assert all(math.isfinite(last[f"stats/{stat}/layer_{i:02d}"]) for i in layers), stat
    # Layers 0-1 are Post-LN (a norm after each residual add), 2-3 Pre-LN (a norm before each sublayer).
    assert {k.rsplit("/", 1)[1] for k in last if k.startswith("stats/norm_out/layer_00/")} == {"attention_after",
                                                                                               "mlp_after"}
    assert {k.rsplit("/", 1)[1] for k in last if k.startswith("stats/norm_out/layer_03/")} == {"attention_before",
                                                                                               "mlp_before"}

    # The final weights, analyzed offline on the same probe, give the step-6 statistics.
    final = load_model(tmp_path / "on")
    with torch.no_grad():
        states = hidden_states(final, probe)
    for i in layers:
        x_in, x_out = states[i].double(), states[i + 1].double()
        assert last[f"stats/rms/layer_{i:02d}"] == pytest.approx(x_out.square().mean().sqrt().item(), rel=1e-5)
        assert last[f"stats/var/layer_{i:02d}"] == pytest.approx(x_out.var(-1, unbiased=False).mean().item(), rel=1e-5)
        distance = angular_distance(x_in.flatten(0, 1), x_out.flatten(0, 1)).mean().item()
        assert last[f"stats/angular/layer_{i:02d}"] == pytest.approx(distance, rel=1e-5, abs=1e-7)
    # A Post-LN layer's last norm *is* its output stream; a Pre-LN layer's first norm sees its input.
    assert last["stats/norm_out/layer_01/mlp_after"] == pytest.approx(last["stats/rms/layer_01"], rel=1e-6)
    with torch.no_grad():
        normed = final.layers["2"].attention_norm(states[2]).double()
    assert last["stats/norm_out/layer_02/attention_before"] == pytest.approx(
        normed.square().mean().sqrt().item(), rel=1e-5)

    # Attention: q and k as scaled_dot_product_attention receives them on the final weights; the
    # largest causal logit and the mean entropy of the attention rows, written out here.
    import megamix.model.llama as llama

    seen, sdpa = [], llama.F.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        seen.append((q.double(), k.double()))
        return sdpa(q, k, v, **kwargs)

    llama.F.scaled_dot_product_attention = recording
    try:
        with torch.no_grad():
            final(probe)
    finally:
        llama.F.scaled_dot_product_attention = sdpa
    for i, (q, k) in enumerate(seen):
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # GQA: query head h reads kv head h // group
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        causal = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril()
        p = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
        entropy = -torch.where(causal, p * torch.log(p), torch.zeros_like(p)).sum(-1).mean().item()
        assert last[f"stats/attn_logit_max/layer_{i:02d}"] == pytest.approx(logits[..., causal].max().item(), rel=1e-5)
        assert last[f"stats/attn_entropy/layer_{i:02d}"] == pytest.approx(entropy, rel=1e-5)
    assert len(seen) == 4

    # The update ratio of step 6: the checkpoints before and after it.
    before = load_model(tmp_path / "on" / "checkpoints" / "step_0000005")
    for i in layers:
        now = dict(final.layers[str(i)].named_parameters())
        old = dict(before.layers[str(i)].named_parameters())
        delta = math.sqrt(sum((now[n] - old[n]).double().square().sum().item() for n in now))
        weight = math.sqrt(sum(old[n].double().square().sum().item() for n in now))
        assert last[f"stats/update_ratio/layer_{i:02d}"] == pytest.approx(delta / weight, rel=1e-4)

    # compare_runs draws the depth × step heat maps and the norms' scales, and tabulates them.
    markdown = compare_runs([tmp_path / "on", tmp_path / "off"], tmp_path / "cmp")
    for stem in ("depth_rms", "depth_angular", "depth_update_ratio", "depth_grad_norm", "depth_attn_logit_max",
                 "depth_attn_entropy", "norm_scales"):
        assert (tmp_path / "cmp" / f"{stem}.png").stat().st_size > 1000, stem
    assert "## Depth statistics while training" in markdown


@pytest.mark.parametrize("logits_per_chunk", [1, 150, 1 << 22], ids=["row_by_row", "two_rows", "whole"])
def test_attention_logit_statistics_match_the_formulas_however_the_rows_are_chunked(monkeypatch, logits_per_chunk):
    import megamix.train.stats as stats

    monkeypatch.setattr(stats, "LOGITS_PER_CHUNK", logits_per_chunk)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 9, 8, generator=gen) * 3, torch.randn(2, 2, 9, 8, generator=gen) * 3  # GQA: 2 groups
    largest, entropy, rows = stats.attention_logit_stats(q, k)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the probe runs in a bf16 run: still fp32
        assert stats.attention_logit_stats(q, k) == (largest, entropy, rows)
    expected_max, expected_entropy = -math.inf, 0.0
    for b in range(2):
        for h in range(4):
            for i in range(9):
                logits = [float(q[b, h, i] @ k[b, h // 2, j]) / math.sqrt(8) for j in range(i + 1)]
                expected_max = max(expected_max, *logits)
                z = sum(math.exp(x - max(logits)) for x in logits)
                p = [math.exp(x - max(logits)) / z for x in logits]
                expected_entropy -= sum(pi * math.log(pi) for pi in p if pi > 0)
    assert rows == 2 * 4 * 9
    assert largest == pytest.approx(expected_max, rel=1e-5)
    assert entropy == pytest.approx(expected_entropy, rel=1e-5)


@pytest.mark.parametrize("overrides", [
    ["norm.scheme=olmo2"], ["norm.scheme=hybrid_star"], ["norm.scheme=peri", "norm.embedding_norm=true"],
    ["norm.scheme=deepnorm", "norm.type=layernorm"], ["norm.scheme=pre", "norm.type=dyt", "norm.qk_norm=full"],
], ids=["olmo2", "hybrid_star", "peri", "deepnorm", "pre_dyt_qk"])
def test_depth_statistics_report_each_norm_the_scheme_table_gives_a_layer(tiny_config, tmp_path, overrides):
    """Every scheme and norm type: the losses stay bit-identical, and the norm scales reported per
    layer are exactly the slots the scheme's row has, with its norms on q, k and v (written here
    from the table and the config, not the model)."""
    from megamix.schemes import SCHEMES, layer_schemes

    base = [*overrides, "train.steps=2", "train.eval_interval=0", "train.save_interval=0"]
    Trainer(tiny_config(*base, f"train.output_dir={tmp_path / 'off'}")).run()
    on = Trainer(tiny_config(*base, "train.stats_interval=1", "train.save_interval=2",
                             f"train.output_dir={tmp_path / 'on'}"))
    probe = on.instruments.stats.tokens.clone()
    on.run()
    assert losses(tmp_path / "on") == losses(tmp_path / "off")
    last = stats_lines(tmp_path / "on")[-1]
    # The norms on q, k and v, read here through module hooks on the final weights (the statistics
    # shadow ``add_norm`` instead): their outputs' RMS over every head and token of the probe.
    final, seen = load_model(tmp_path / "on"), {}
    for layer, block in final.layers.items():
        for name in ("q_norm", "k_norm", "v_norm"):
            if hasattr(block.attention, name):
                getattr(block.attention, name).register_forward_hook(
                    lambda m, a, out, key=f"{int(layer):02d}/attention_{name[0]}": seen.__setitem__(key, out))
    with torch.no_grad():
        final(probe)
    assert seen or overrides[0] in ("norm.scheme=peri", "norm.scheme=deepnorm")
    for key, out in seen.items():
        rms = out.double().square().mean().sqrt().item()
        assert last[f"stats/norm_out/layer_{key}"] == pytest.approx(rms, rel=1e-5)
    for layer, scheme in enumerate(layer_schemes(on.cfg.norm, 4)):
        row = SCHEMES[scheme]
        expected = {f"{sub}_{slot}" for sub in ("attention", "mlp") for slot in getattr(row, sub).slots()}
        qk = row.qk_norm if on.cfg.norm.qk_norm is None else on.cfg.norm.qk_norm
        v = row.v_norm if on.cfg.norm.v_norm is None else on.cfg.norm.v_norm
        expected |= {f"attention_{n}" for n, form in (("q", qk), ("k", qk), ("v", v)) if form != "none"}
        got = {k.rsplit("/", 1)[1] for k in last if k.startswith(f"stats/norm_out/layer_{layer:02d}/")}
        assert got == expected, (layer, scheme)
        assert all(math.isfinite(last[f"stats/{s}/layer_{layer:02d}"]) for s in ("rms", "angular", "update_ratio"))


# ----------------------------------------------------------------------------------------------
# Instability flags


def test_spike_monitor_flags_jumps_over_the_running_statistics():
    cfg = load_config(None, ["train.spikes.window=20", "train.spikes.warmup=5"]).train.spikes
    monitor = SpikeMonitor(cfg)
    flagged = []
    for step in range(1, 31):
        loss = 3.0 - 0.01 * step + (0.002 if step % 2 else -0.002)
        flagged += monitor.observe(step, 9.0 if step == 25 else loss, 1.0, {0: 0.5, 1: 40.0 if step == 27 else 0.5})
    assert [(s.step, s.series) for s in flagged] == [(25, "loss"), (27, "grad_norm/layer_01")]
    assert flagged[0].record()["event"] == "loss_spike" and "loss" not in flagged[0].record()
    assert not SpikeMonitor(load_config(None, ["train.spikes.enabled=false"]).train.spikes).observe(1, 1.0, 1.0, {})


def test_an_injected_loss_spike_and_a_layer_gradient_spike_are_logged(tiny_config, tmp_path, monkeypatch):
    settings = ["train.steps=12", "train.eval_interval=0", "train.spikes.warmup=4"]
    clean = tmp_path / "clean"
    Trainer(tiny_config(*settings, f"train.output_dir={clean}")).run()
    assert not [r for r in lines(clean) if "event" in r]  # nothing to flag in an ordinary run

    # A learning rate of 3 for step 9's update makes step 10's loss jump.
    real_lr = trainer_module.lr_at
    monkeypatch.setattr(trainer_module, "lr_at", lambda step, t: 3.0 if step == 8 else real_lr(step, t))
    trainer = Trainer(tiny_config(*settings, f"train.output_dir={tmp_path / 'spiky'}"))

    def scale_layer_two(engine):  # layer 2's gradient of step 7, ×100
        if trainer.step == 6:
            for name, param in engine.model.named_parameters():
                if name.startswith("layers.2."):
                    param.grad.mul_(100.0)

    trainer.engine.before_optimizer_step.append(scale_layer_two)
    trainer.run()
    events = [r for r in lines(tmp_path / "spiky") if "event" in r]
    loss_spikes = [e for e in events if e["event"] == "loss_spike"]
    assert loss_spikes[0]["step"] == 10 and loss_spikes[0]["value"] > loss_spikes[0]["limit"]
    assert {(e["step"], e["series"]) for e in events if e["step"] < 10} == {(7, "grad_norm/layer_02"),
                                                                            (7, "grad_norm")}


# ----------------------------------------------------------------------------------------------
# Everything on, with a requeue: W&B offline, the profiler, statistics, flags, downstream evals


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline run's ``.wandb`` file (its LevelDB-style log: 32 KiB
    blocks of checksum, length, type and a chunk of a record)."""
    from wandb.proto import wandb_internal_pb2

    data, records, pending, pos = path.read_bytes(), [], b"", 7
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # the rest of the block is padding
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history_steps(run_dir: Path) -> list[int]:
    steps = []
    for record in wandb_records(next(run_dir.glob("run-*.wandb"))):
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            if "train/loss" in items:
                steps.append(int(items["_step"]))
    return steps


@pytest.fixture(scope="module")
def bible():
    sys.path.insert(0, str(ROOT / "tools"))
    from make_demo_corpus import documents

    return [doc["text"] for doc in documents(120)[:6]]


def test_a_run_with_every_instrument_on_and_a_requeue(tmp_path, bible):
    pytest.importorskip("wandb")
    pytest.importorskip("lm_eval")
    from make_demo_corpus import mistral_tokenizer_path

    from megamix.data.tokenizer import load_tokenizer
    from megamix.hf.harness import text_perplexity

    write_corpus(tmp_path / "corpus", vocab=32000)
    text = tmp_path / "valid.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in bible))
    tokenizer = mistral_tokenizer_path()
    base = TINY + ["model.vocab_size=32000", f"data.path={tmp_path / 'corpus'}", "train.eval_interval=4",
                   "train.save_interval=4"]
    instruments = ["train.stats_interval=2", "train.wandb.mode=offline", "train.wandb.project=megamix-tests",
                   "train.profile.start=2", "train.profile.steps=2", "train.downstream_interval=4",
                   f"train.downstream.text={text}", f"train.downstream.tokenizer={tokenizer}",
                   "train.downstream.max_length=16", "train.downstream.limit=4", "train.spikes.warmup=2"]
    run = tmp_path / "run"
    cfg = load_config(None, base + instruments + ["train.steps=8", f"train.output_dir={run}"])
    real_lr = trainer_module.lr_at
    trainer_module.lr_at = lambda step, t: 5.0 if step == 5 else real_lr(step, t)  # step 6's update: step 7 spikes
    handlers = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    try:
        trainer = Trainer(cfg)
        train_step = trainer.train_step

        def preempted_at_4():
            record = train_step()
            if trainer.step == 4:
                signal.raise_signal(signal.SIGUSR1)  # Slurm's warning before the time limit
            return record

        trainer.train_step = preempted_at_4
        with pytest.raises(Preempted):
            trainer.run()
        first_id = (run / "wandb_id").read_text().strip()
        Trainer(cfg).run()  # the requeued job: the same command, resumed from step 4
        Trainer(load_config(None, base + ["train.steps=8", f"train.output_dir={tmp_path / 'plain'}"])).run()
    finally:
        trainer_module.lr_at = real_lr
        for s, handler in handlers.items():
            signal.signal(s, handler)
    assert losses(run) == losses(tmp_path / "plain")  # the instruments changed nothing the run computed

    records = lines(run)
    assert [r["step"] for r in stats_lines(run)] == [2, 4, 6, 8]
    assert any(r.get("event") == "loss_spike" and r["step"] == 7 for r in records)
    downstream = [r for r in records if "downstream/megamix_text_perplexity/word_perplexity" in r]
    assert [r["step"] for r in downstream] == [4, 8]
    ours = text_perplexity(load_model(run), load_tokenizer(tokenizer), bible[:4], load_tokenizer(tokenizer).eos_id,
                           max_length=16)
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert downstream[-1][f"downstream/megamix_text_perplexity/{metric}"] == pytest.approx(ours[metric], rel=1e-6)

    trace = run / "profile" / "rank0_steps_2-3.pt.trace.json"
    assert any("ProfilerStep#" in e.get("name", "") for e in json.loads(trace.read_text())["traceEvents"])

    # Both launches logged into one W&B run: the id kept in the run directory.
    assert (run / "wandb_id").read_text().strip() == first_id
    launches = sorted((run / "wandb").glob(f"offline-run-*-{first_id}"))
    assert len(launches) == 2
    assert [wandb_history_steps(d) for d in launches] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    configs = [r.run.config for r in wandb_records(next(launches[0].glob("run-*.wandb")))
               if r.WhichOneof("record_type") == "run"]
    placement = json.loads(next(item.value_json for item in configs[0].update if item.key == "placement"))
    assert placement["layer_schemes"] == ["pre"] * 4 and placement["summary"] == "pre×4"


def test_a_tampered_wandb_id_is_refused_naming_the_file(tmp_path):
    from megamix.errors import MegamixError
    from megamix.train.loggers import run_id

    first = run_id(tmp_path)
    assert run_id(tmp_path) == first and len(first) == 8  # kept across restarts
    (tmp_path / "wandb_id").write_text("../../elsewhere\n")
    with pytest.raises(MegamixError, match="wandb_id: not a W&B run id"):
        run_id(tmp_path)


# ----------------------------------------------------------------------------------------------
# Config, commands


@pytest.mark.parametrize("override, field", [
    ("train.stats_interval=-1", "train.stats_interval"),
    ("train.spikes.warmup=1", "train.spikes.warmup"),
    ("train.wandb.mode=sometimes", "train.wandb.mode"),
    ("train.profile.start=0", "train.profile.start"),
    ("train.profile.steps=2 train.steps=100 train.profile.start=101", "train.profile.start"),  # never reached
    ("train.downstream_interval=10", "train.downstream.text"),
])
def test_instrument_settings_are_checked(override, field):
    with pytest.raises(ConfigError) as err:
        validate(load_config(None, override.split()))
    assert err.value.field == field


def test_the_evaluation_commands_have_names_that_cannot_be_mixed_up(tiny_config, tmp_path, capsys):
    Trainer(tiny_config("train.steps=2", "train.eval_interval=0")).run()
    args = ["--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "corpus"), "--max-batches", "2",
            "--json"]
    assert main(["val-loss", *args, "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    new = json.loads(captured.out)
    assert "now" not in captured.err and new["val_tokens"] == 2 * 8 * 32
    assert main(["evaluate", *args]) == 0  # the old name, the default device: the same numbers
    captured = capsys.readouterr()
    assert json.loads(captured.out) == new
    assert "`megamix evaluate` is now `megamix val-loss`" in captured.err
    assert main(["eval", "--tasks", "x"]) == 1  # neither an export nor a checkpoint: a one-line error
    assert "`megamix eval` is now `megamix lm-eval`" in capsys.readouterr().err
    assert latest_checkpoint(tmp_path / "run") is not None
