"""The instruments on parallel layouts give the single-process numbers (CPU, gloo, fp32, tiny models):
the depth statistics under TP2·PP2 (pipeline stages gathered, tensor ranks counted once for the
stream, each for its own heads of the per-head QK-norm), under DP2·TP2 with sequence parallelism and
ZeRO-3 (each tensor rank's slice of the tokens added up, data replicas counted once; a QK-norm over
the whole projection, split over the tensor ranks, and a per-head V-norm) and under interleaved PP2
(two stages per rank) with DP2·ZeRO-2; the in-loop lm-eval of a TP2·PP2 model gathered to rank 0.
One torchrun launch trains all of them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import TINY, torchrun, write_corpus

from megamix.config import load_config
from megamix.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-4  # tensor parallelism changes the matmuls' summation order; the update ratio also goes through Adam


def lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def instrument_lines(run: Path) -> dict[int, dict]:
    """``{step: the step's stats/ and downstream/ values}``."""
    out: dict[int, dict] = {}
    for record in lines(run):
        values = {k: v for k, v in record.items() if k.startswith(("stats/", "downstream/"))}
        if values:
            out.setdefault(record["step"], {}).update(values)
    return out


CASES = {
    "tp2_pp2": (["norm.scheme=mix", "norm.alpha=0.5", "norm.qk_norm=per_head", "model.vocab_size=32000"],
                ["parallel.tp=2", "parallel.pp=2"], True),
    "dp2_tp2_sp_zero3": (["norm.scheme=lns", "norm.qk_norm=full", "norm.v_norm=per_head"],
                         ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero=3"], False),
    "pp2_interleaved_dp2_zero2": (["norm.scheme=post"],
                                  ["parallel.pp=2", "parallel.virtual_stages=2", "parallel.schedule=interleaved_1f1b",
                                   "parallel.zero=2"], False),
}


def test_instruments_on_parallel_layouts_equal_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # lm-eval reads the local text only; the ranks inherit this
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    sys.path.insert(0, str(ROOT / "tools"))
    downstream: list[str] = []
    try:
        import lm_eval  # noqa: F401
        from make_demo_corpus import documents, mistral_tokenizer_path

        text = tmp_path / "valid.jsonl"
        text.write_text("".join(json.dumps({"text": d["text"]}) + "\n" for d in documents(120)[:3]))
        downstream = ["train.downstream_interval=2", f"train.downstream.text={text}",
                      f"train.downstream.tokenizer={mistral_tokenizer_path()}", "train.downstream.max_length=16"]
    except ImportError:
        pass  # the statistics are still checked
    write_corpus(tmp_path / "corpus_32k", vocab=32000)
    write_corpus(tmp_path / "corpus", vocab=512)
    runs, single = [], {}
    for name, (model, layout, with_downstream) in CASES.items():
        corpus = tmp_path / ("corpus_32k" if "model.vocab_size=32000" in model else "corpus")
        common = TINY + [f"data.path={corpus}", "train.micro_batch_size=2", "train.steps=2",
                         "train.eval_interval=0", "train.save_interval=0", "train.stats_interval=1", *model,
                         *(downstream if with_downstream else [])]
        runs.append(common + layout + [f"train.output_dir={tmp_path / name}"])
        single[name] = common + [f"train.output_dir={tmp_path / (name + '_single')}"]
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps(runs))
    torchrun(4, ROOT / "tests" / "dist" / "train_runs.py", spec)
    for name, overrides in single.items():
        Trainer(load_config(None, overrides)).run()
        got, want = instrument_lines(tmp_path / name), instrument_lines(tmp_path / (name + "_single"))
        assert sorted(got) == sorted(want) == [1, 2], name
        for step in want:
            assert set(got[step]) == set(want[step]), (name, step)
            for key, value in want[step].items():
                assert got[step][key] == pytest.approx(value, rel=RTOL, abs=1e-9), (name, step, key)
        if CASES[name][2] and downstream:
            assert any(k.startswith("downstream/") for k in got[2]), name
