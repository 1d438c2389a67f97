"""`factlab influence`: the run folder on a tiny model and a synth chain / containment world,
the structure columns, the desiderata assembly on hand-built matrices, noise, and bad input
through the CLI (one line, exit 2, nothing written)."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from factlab.config import experiment_from_dict
from factlab.data.synth import synth_chain, synth_containment, write_world
from factlab.influence.noise import noised_copies
from factlab.influence.samples import Sample
from factlab.influence.sources import load_sample_set, select_rows
from factlab.influence.study import desiderata, prepare
from cli_helpers import run_cli


def _exp(tmp_path, tiny_dir, samples, **influence):
    raw = {"name": "inf", "model": str(tiny_dir), "output_dir": str(tmp_path / "runs"),
           "influence": {"samples": samples, "lr": 1e-2, "peft": {"targets": ["attention", "mlp"], "r": 4, "alpha": 8},
                         "bootstrap": 50, **influence}}
    return raw


def test_chain_world_run_folder(tmp_path, tiny_dir, monkeypatch, capsys):
    """`factlab influence` end to end: the run folder, the desiderata table printed by the CLI
    (run_influence hands it the results), and the run in the store, listed by `factlab runs`."""
    write_world(synth_chain(4, seed=1), tmp_path / "chain")
    raw = _exp(tmp_path, tiny_dir, {"world": str(tmp_path / "chain"), "kinds": ["recall", "reverse"]},
               train=["kind:recall"], noise={"levels": [0.1, 0.5], "kind": "char"})
    code, out, err = _cli(tmp_path, raw, monkeypatch, capsys)
    assert code == 0, err
    (run,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    assert "influence-" in run.name and not run.name.endswith(".partial")
    assert "influence desiderata" in out and "symmetry" in out and "s per row" in err
    monkeypatch.setenv("COLUMNS", "250")
    code, out, err = run_cli(monkeypatch, capsys, "runs")  # the default store, runs/factlab.db
    (line,) = [x for x in out.splitlines() if run.name in x]
    assert code == 0 and "│ influence │" in line and "│ done " in line
    names = {p.name for p in run.iterdir()}
    assert {"config.yaml", "samples.jsonl", "eif.npz", "eif.csv", "eif.jsonl", "eif_ctx.csv", "eif_ctx.jsonl",
            "heatmap.png", "heatmap_ctx.png", "results.json"} <= names
    res = json.loads((run / "results.json").read_text())
    z = np.load(run / "eif.npz")
    # 4 recall rows + 2 noised copies each; columns: 8 samples + 2 * (number of pairs 2+ apart = 6)
    assert z["eif"].shape == (1, 12, 8 + 12) and z["eif_ctx"].shape == (12, 20)
    assert list(z["row_ids"][:4]) == [f"f0000{i}-recall" for i in range(1, 5)]
    header = (run / "eif.csv").read_text().splitlines()[0].split(",")
    assert header[0] == "row" and header[1:] == list(z["col_ids"])
    ft = res["desiderata"]["finetune"]
    for key in ("symmetry", "sparsity", "transitive", "noise_0.1", "noise_0.5"):
        assert ft[key] is not None and ft[key]["value"] is not None, key
    assert set(res["desiderata"]["in_context"]) == set(ft)
    assert res["timing"]["finetune_seconds_per_row"] > 0


def test_chain_structure_columns(tmp_path):
    write_world(synth_chain(3, seed=0), tmp_path / "c")
    sset = load_sample_set(experiment_from_dict(
        {"name": "x", "model": "m", "influence": {"samples": {"world": str(tmp_path / "c")}}}).influence.samples)
    facts = [json.loads(x) for x in (tmp_path / "c" / "facts.jsonl").read_text().splitlines()]
    nodes = [facts[0]["subject"]] + [f["object"] for f in facts]
    by_id = {s.id: s for s in sset.structure}
    assert set(by_id) == {"chain:0>2", "chain:2>0", "chain:0>3", "chain:3>0", "chain:1>3", "chain:3>1"}
    assert (by_id["chain:0>3"].prompt, by_id["chain:0>3"].target) == (f"{nodes[0]} causes", f" {nodes[3]}")
    assert (by_id["chain:3>0"].prompt, by_id["chain:3>0"].target) == (f"{nodes[3]} causes", f" {nodes[0]}")
    assert by_id["chain:0>3"].meta["path"] == [f["id"] for f in facts]


def test_containment_structure_columns(tmp_path):
    write_world(synth_containment(2, seed=0), tmp_path / "k")
    sset = load_sample_set(experiment_from_dict(
        {"name": "x", "model": "m", "influence": {"samples": {"world": str(tmp_path / "k")}}}).influence.samples)
    f = json.loads((tmp_path / "k" / "facts.jsonl").read_text().splitlines()[0])
    a, b, fid = f["subject"], f["object"], f["id"]
    got = {s.id: (s.prompt, s.target) for s in sset.structure}
    assert got[f"{fid}:contains"] == (f"{b} contains", f" {a}")
    assert got[f"{fid}:is_in-swapped"] == (f"{b} is in", f" {a}")
    assert got[f"{fid}:is_in"] == (f"{a} is in", f" {b}")
    assert got[f"{fid}:contains-swapped"] == (f"{a} contains", f" {b}")


def _s(i, group=None, **meta):
    return Sample(f"s{i}", "p", " t", group=group, meta=meta)


def test_distance_and_noise_on_a_hand_built_matrix():
    # rows/cols s0..s3; s0,s1 one fact, s2 same relation other fact, s3 other relation.
    cols = [_s(0, "a", relation="r"), _s(1, "a", relation="r"), _s(2, "b", relation="r"), _s(3, "c", relation="q")]
    rows = cols + [Sample("s0~char0.1", "p", " t", meta={"clean_id": "s0", "noise": 0.1})]
    M = np.array([[-5, -3, -1, 0.0], [-3, -5, -1, 0], [-1, -1, -5, 0], [0, 0, 0, -5],
                  [-10, -6, -2, 0]])  # the noised row is 2x the clean one: correlation 1
    d = desiderata(M, rows, cols, 4, "pairs", top_k=1, n_boot=50)
    assert d["distance_same_fact"]["value"] == pytest.approx(-3.0)  # rows s0, s1 each see -3
    assert d["distance_same_relation"]["value"] == pytest.approx(-1.0)  # s0, s1 see s2; s2 sees s0, s1
    assert d["distance_other_relation"]["value"] == pytest.approx(0.0)
    assert d["distance_same_fact"]["n"] == 2 and d["distance_other_relation"]["n"] == 4
    assert d["noise_0.1"]["value"] == pytest.approx(1.0)
    assert d["symmetry"]["value"] == pytest.approx(1.0)


def test_transitive_sign_on_a_hand_built_matrix():
    # a chain of 3 links (rows, groups f1..f3) and the pair 0>2 / 2>0 over links f1, f2
    rows = [Sample(f"r{k}", "p", " t", group=f"f{k}") for k in (1, 2, 3)]
    cols = [Sample("chain:0>2", "p", " t", meta={"structure": True, "direction": "forward", "path": ["f1", "f2"], "u": 0, "v": 2}),
            Sample("chain:2>0", "p", " t", meta={"structure": True, "direction": "backward", "path": ["f1", "f2"], "u": 0, "v": 2})]
    M = np.array([[-2.0, -0.5], [-1.0, 0.0], [0.0, 0.0]])
    d = desiderata(M, rows, cols, 3, "chain", n_boot=20)
    assert d["transitive"]["value"] == pytest.approx((-2 + 0.5) + (-1 - 0))
    assert d["transitive_negative"]["value"] == 1.0


def test_noise_copies_are_seeded_and_keep_scoring():
    s = [Sample("a", "Marta Ilvane runs the", " press line"), Sample("b", "", "The quick brown fox.")]
    one, two = noised_copies(s, [0.2, 1.0], "char", 0), noised_copies(s, [0.2, 1.0], "char", 0)
    assert [x.text for x in one] == [x.text for x in two]
    full = [x for x in one if x.meta["noise"] == 1.0 and x.meta["clean_id"] == "a"][0]
    assert len(full.text) == len(s[0].text) and full.text != s[0].text and full.target.strip()
    words = noised_copies(s, [1.0], "word", 0)
    assert len(words[0].text.split()) == len(s[0].text.split())


def test_pairs_targets_are_joined_like_probe_targets(tmp_path):
    from factlab.influence.sources import joined_target

    assert joined_target("Mebikel is in", "Krosund") == " Krosund"
    assert joined_target("Mebikel is in ", "Krosund") == "Krosund"  # split_pair moves the space over
    assert joined_target("Mebikel is in", " Krosund") == " Krosund"
    assert joined_target("日本の首都は", "東京") == "東京"
    assert joined_target("", "A whole document.") == "A whole document."


def test_select_rows():
    s = [Sample("a", "", "x", meta={"kind": "recall"}), Sample("b", "", "y", meta={"kind": "reverse"})]
    assert select_rows(s, "all") == s and select_rows(s, 1) == s[:1]
    assert select_rows(s, ["kind:reverse"]) == s[1:] and select_rows(s, ["b", "a"]) == [s[1], s[0]]


# --- bad input, through the CLI --------------------------------------------------------


def _cli(tmp_path, raw, monkeypatch, capsys):
    """`factlab influence exp.yaml` through the entry point in this process, from tmp_path."""
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    return run_cli(monkeypatch, capsys, "influence", path)


@pytest.mark.parametrize("case", ["one_sample", "missing_probes", "empty_target"])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, tiny_dir, case, monkeypatch, capsys):
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"id": "a", "prompt": "Marta runs the", "target": " press"}, {"id": "b", "prompt": "Jonas leads the", "target": " shift"}]
    extra = {}
    if case == "one_sample":
        rows = rows[:1]
    elif case == "missing_probes":
        extra = {"probes": [str(tmp_path / "nope.jsonl")]}
    else:
        rows[1]["target"] = "  "
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = _cli(tmp_path, _exp(tmp_path, tiny_dir, {"pairs": str(pairs)}, **extra), monkeypatch, capsys)
    assert code == 2, err
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err
    assert {"one_sample": "at least 2", "missing_probes": "nope.jsonl", "empty_target": "nothing to score"}[case] in lines[0]
    assert not (tmp_path / "runs").exists()


def test_prepare_needs_an_influence_section(tmp_path):
    from factlab.errors import FactlabError

    with pytest.raises(FactlabError, match="no influence: section"):
        prepare(experiment_from_dict({"name": "x", "model": "m"}))


@pytest.mark.parametrize("name,rows,cols", [("influence-chains", 12, 36 + 132), ("influence-containment", 36, 36 + 48)])
def test_examples_load_with_the_sizes_their_estimates_assume(name, rows, cols):
    from factlab.config import load_experiment

    exp = load_experiment(Path(__file__).parent.parent / "examples" / f"{name}.yaml")
    _, r, c, n_clean = prepare(exp)
    assert (len(r), len(c), n_clean) == (rows, cols, 12)
