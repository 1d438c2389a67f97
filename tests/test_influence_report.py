"""`factlab report` on an influence run folder: the desiderata table with intervals and both
heatmaps in one self-contained HTML file (or Markdown with PNGs beside it)."""

import json

import numpy as np

from factlab.report.build import build_report
from factlab.report.influence import split_influence_runs

INTERVAL = {"n": 4, "value": -0.0123, "ci_low": -0.02, "ci_high": -0.004}


def _influence_run(folder):
    folder.mkdir()
    res = {"kind": "influence", "name": "toy", "model": "tiny", "n_rows": 3, "n_clean_rows": 3, "n_columns": 3,
           "seeds": [0], "schedule": {"steps": 1, "optimizer": "adamw", "lr": 1e-3},
           "peft": {"method": "lora", "targets": ["attention"]},
           "timing": {"finetune_seconds_per_row": 0.5, "finetune_seconds": 1.5, "in_context_seconds": 0.7},
           "desiderata": {"finetune": {"symmetry": INTERVAL, "transitive": None},
                          "in_context": {"symmetry": {"n": 4, "value": 0.5, "ci_low": 0.1, "ci_high": 0.9}}}}
    (folder / "results.json").write_text(json.dumps(res))
    M = np.arange(9.0).reshape(3, 3) - 4
    np.savez(folder / "eif.npz", eif_mean=M, eif_ctx=-M, row_ids=np.array(["a", "b", "c"]), col_ids=np.array(["a", "b", "c"]))
    return folder


def test_html_report_of_an_influence_run(tmp_path):
    run = _influence_run(tmp_path / "toy-influence")
    out = build_report([(run, "toy")], tmp_path / "r.html")
    text = out.read_text()
    assert "Influence desiderata: toy" in text and "symmetry: corr(EIF, EIFᵀ)" in text
    assert "-0.0123 [-0.02, -0.004] (4)" in text and "0.5 [0.1, 0.9] (4)" in text
    assert text.count("data:image/png;base64,") == 2  # fine-tuning and in-context heatmaps, embedded
    assert "http://" not in text and "https://" not in text


def test_markdown_report_and_split(tmp_path):
    run = _influence_run(tmp_path / "toy-influence")
    other = tmp_path / "plain"
    other.mkdir()
    (other / "results.json").write_text("{}")
    assert split_influence_runs([(other, "p"), (run, "t")]) == ([(other, "p")], [(run, "t")])
    out = build_report([(run, "toy")], tmp_path / "r.md", fmt="md")
    text = out.read_text()
    assert "| symmetry: corr(EIF, EIFᵀ) | -0.0123 [-0.02, -0.004] (4) | 0.5 [0.1, 0.9] (4) |" in text
    assert len(list((tmp_path / "r_files").glob("*.png"))) == 2
