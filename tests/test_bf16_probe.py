"""`train.bf16: auto` on the CPU (factlab.train.bf16_probe): the model's Linear shapes, the
decision from measured timings (faked here: no timing is asserted), the cache of the probe per
CPU and shapes, and a stage that prints and records what it chose and why."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console

from factlab.testing import tiny_model
from factlab.train import bf16_probe as probe
from factlab.train.precision import cpu_precision


def fake_records(shapes, ratio: float) -> list[dict]:
    """What `measure` returns, with bf16 `ratio` times faster than fp32 at every shape."""
    return [{"names": s.names, "fan_in": s.fan_in, "fan_out": s.fan_out, "rows": m, "m": m, "pass": p,
             "weight": s.count, "fp32": 1e-3 * ratio, "bf16": 1e-3}
            for m in probe.ROWS for s in shapes for p in ("forward", "backward")]


@pytest.fixture()
def native(monkeypatch, tmp_path):
    """A CPU with native bf16, a fresh cache folder, nothing chosen yet in this process, and a
    fake probe that counts its calls; `native.ratio` is what it measures."""
    monkeypatch.setattr(probe, "cpu_has_bf16", lambda: True)
    monkeypatch.setenv("FACTLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(probe, "_chosen", {})
    monkeypatch.setattr(probe, "MIN_WEIGHTS", 0)  # the tiny models here are measured too

    class Fake:
        calls = 0
        ratio = 3.0

        def __call__(self, shapes):
            self.calls += 1
            return fake_records(shapes, self.ratio)

    fake = Fake()
    monkeypatch.setattr(probe, "measure", fake)
    return fake


def test_linear_shapes_of_a_tiny_llama():
    model = tiny_model("llama", vocab_size=400, hidden_size=16, intermediate_size=40, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2)
    assert probe.linear_shapes(model) == [
        ("q_proj, o_proj", 16, 16, 6, False), ("k_proj, v_proj", 16, 8, 6, False),
        ("gate_proj, up_proj", 16, 40, 6, False), ("down_proj", 40, 16, 3, False), ("lm_head", 16, 400, 1, True)]


def test_decision_from_timings_is_flop_weighted_with_a_margin():
    shapes = probe.linear_shapes(tiny_model("llama"))
    assert probe.decide(fake_records(shapes, 6.2)) == (True, pytest.approx(6.2))
    assert probe.decide(fake_records(shapes, 0.8)) == (False, pytest.approx(0.8))
    assert probe.decide(fake_records(shapes, 1.1))[0] is False  # faster, but not by the margin
    assert probe.decide(fake_records(shapes, 1.1), margin=1.05)[0] is True
    # Each record counts by its calls per pass: bf16 twice as fast on a matmul run 100 times
    # beats it losing 2x on one run once, and the other way round.
    fast = {"m": 512, "weight": 100, "fp32": 2.0, "bf16": 1.0}
    slow = {"m": 512, "weight": 1, "fp32": 1.0, "bf16": 2.0}
    assert probe.decide([fast, slow])[0] is True
    assert probe.decide([{**fast, "weight": 1}, {**slow, "weight": 100}])[0] is False
    assert probe.speedup([fast, {**slow, "m": 2048}], m=512) == 2.0


def test_the_probe_is_measured_once_then_read_from_the_cache(native):
    shapes = probe.linear_shapes(tiny_model("llama"))
    first = probe.cpu_bf16_choice(shapes)
    assert (first.bf16, first.source, native.calls) == (True, "measured", 1)
    saved = json.loads(open(first.cache_file).read())
    assert saved["key"]["cpu"] == probe.cpu_model() and saved["key"]["torch"] == torch.__version__
    assert "bf16 measured 3.00x fp32" in first.reason and probe.cpu_model() in first.reason

    probe._chosen.clear()  # a new process: reads the file, does not measure
    again = probe.cpu_bf16_choice(shapes)
    assert (again.bf16, again.source, again.cache_file, native.calls) == (True, "cached", first.cache_file, 1)
    assert again.reason.endswith("; cached")
    # Other shapes (another model) are another entry.
    other = probe.cpu_bf16_choice(probe.linear_shapes(tiny_model("llama", vocab_size=500)))
    assert other.cache_file != first.cache_file and native.calls == 2


def test_a_probe_on_a_busy_machine_is_used_but_not_cached(native, monkeypatch):
    """A probe that waited (slept: no CPU time) longer than it computed ran while other
    processes had the cores: its timings may say anything, so they are not kept."""
    import time

    shapes = probe.linear_shapes(tiny_model("llama"))
    monkeypatch.setattr(probe, "BUSY_AFTER_SECONDS", 0.05)
    measured = probe.measure

    def busy(shapes):
        time.sleep(0.1)
        return measured(shapes)

    monkeypatch.setattr(probe, "measure", busy)
    choice = probe.cpu_bf16_choice(shapes)
    assert choice.bf16 is True and "while the machine was busy" in choice.reason and "not cached" in choice.reason
    assert not probe.cache_file(shapes)[0].exists()
    probe._chosen.clear()
    assert probe.cpu_bf16_choice(shapes).source == "measured" and native.calls == 2


def test_a_slower_bf16_is_fp32_and_says_why(native):
    native.ratio = 0.8
    choice = cpu_precision("auto", tiny_model("llama"))
    assert choice.bf16 is False and "bf16 measured 0.80x fp32, under the 1.2x it needs" in choice.reason


def test_a_corrupt_cache_file_is_ignored_and_rewritten(native):
    shapes = probe.linear_shapes(tiny_model("llama"))
    path, key = probe.cache_file(shapes)
    for junk in ("{not json", json.dumps({"key": key, "records": [{"m": 512}]}), json.dumps([1, 2])):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(junk)
        probe._chosen.clear()
        calls = native.calls
        choice = probe.cpu_bf16_choice(shapes)
        assert choice.source == "measured" and native.calls == calls + 1
        assert json.loads(path.read_text())["key"] == key  # rewritten whole
    assert not list(path.parent.glob("*.tmp"))


def test_a_cpu_without_the_flag_never_measures(native, monkeypatch):
    monkeypatch.setattr(probe, "cpu_has_bf16", lambda: False)
    choice = cpu_precision("auto", tiny_model("llama"))
    assert (choice.bf16, choice.source, native.calls) == (False, "flag", 0)
    assert "no native bf16" in choice.reason
    assert not (probe.cache_file([])[0].parent).exists()


def test_a_tiny_model_goes_by_the_flag(native, monkeypatch):
    monkeypatch.setattr(probe, "MIN_WEIGHTS", 1_000_000)
    choice = cpu_precision("auto", tiny_model("llama"))
    assert (choice.bf16, choice.source, native.calls) == (True, "flag", 0)


def test_true_and_false_are_obeyed_without_measuring(native):
    native.ratio = 0.5
    assert cpu_precision(True, tiny_model("llama")).bf16 is True
    assert cpu_precision(False, tiny_model("llama")).bf16 is False
    assert native.calls == 0


def test_measure_times_every_shape_rows_and_pass(monkeypatch):
    """The real probe, on a tiny model with no minimum time: one record per (rows, shape, pass),
    lm_head at the rows of one fused-loss chunk, weighted by the chunks of M rows."""
    shapes = probe.linear_shapes(tiny_model("llama", vocab_size=400))
    monkeypatch.setattr("factlab.train.loss.CHUNK_ELEMENTS", 400 * 64)  # 64 head rows per chunk
    records = probe.measure(shapes, rows=(128,), min_seconds=0.0)
    assert len(records) == 2 * len(shapes)
    head = [r for r in records if r["names"] == "lm_head"]
    assert [(r["rows"], r["weight"], r["pass"]) for r in head] == [(64, 2.0, "forward"), (64, 2.0, "backward")]
    assert all(r["fp32"] > 0 and r["bf16"] > 0 for r in records)


def test_a_stage_prints_its_precision_once_and_records_why(native, tmp_path, tok):
    from factlab.config import StageSpec
    from factlab.data.corpus import pack_documents
    from factlab.train.stage import train_stage

    native.ratio = 0.5  # bf16 measured slower: fp32, though the CPU has the flag
    st = StageSpec.model_validate({"kind": "cpt", "merge": False, "peft": {"targets": ["mlp"], "r": 2},
                                   "train": {"max_steps": 1, "batch_size": 2, "seq_len": 8}})
    ex = pack_documents(tok, ["Marta Ilvane runs the press line. Jonas Perl leads the night shift."], 8)
    out = io.StringIO()
    console = Console(file=out, width=400)
    for name in ("a", "b"):
        _, res = train_stage(tiny_model("llama", vocab_size=len(tok)), tok, st, name, tmp_path / name, ex, seed=0,
                             console=console)
        saved = json.loads((tmp_path / name / "train.json").read_text())
        assert (saved["precision"], saved["bf16"]) == ("fp32", False)
        assert "bf16 measured 0.50x fp32" in saved["precision_note"]
    assert out.getvalue().count("precision: fp32 (bf16 measured 0.50x fp32") == 1
    assert native.calls == 1
