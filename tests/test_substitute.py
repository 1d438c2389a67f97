"""Counterfactual substitution: word boundaries, case, possessives, multi-word and Japanese
keys, counts; probes for the swapped name; the `data substitute` CLI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from factlab.cli_data import data_app
from factlab.data.substitute import parse_mapping, substitute, substitute_path, substitution_probes
from factlab.errors import FactlabError
from factlab.evaluate.probes import Probe, load_probes

ROMEO = {"Romeo": "Bob"}


@pytest.mark.parametrize("text, expected", [
    ("Romeo", "Bob"),
    ("ROMEO. Enter ROMEO!", "BOB. Enter BOB!"),
    ("romeo was here", "bob was here"),
    ("Romeo's dagger", "Bob's dagger"),
    ("Romeo’s dagger", "Bob’s dagger"),  # typographic apostrophe
    ("Romeoville and Romeos and AlfaRomeo", "Romeoville and Romeos and AlfaRomeo"),  # not inside words
    ("(Romeo), \"Romeo\" -Romeo-", "(Bob), \"Bob\" -Bob-"),
    ("Romeo_1 Romeo2", "Romeo_1 Romeo2"),
    ("私はRomeoです", "私はBobです"),  # Latin name inside Japanese text keeps its boundaries
])
def test_word_boundaries_case_and_possessives(text, expected):
    assert substitute(text, ROMEO)[0] == expected


def test_counts_per_key_including_zero():
    text, counts = substitute("Romeo met Juliet. ROMEO left; romeo's hat stayed in Romeoville.", {"Romeo": "Bob", "Tybalt": "Ted"})
    assert text == "Bob met Juliet. BOB left; bob's hat stayed in Romeoville."
    assert counts == {"Romeo": 3, "Tybalt": 0}


def test_multi_word_longest_first_and_across_line_breaks():
    mapping = {"Romeo": "Bob", "Romeo Montague": "Bob Smith", "Friar Laurence": "Brother Tom"}
    text, counts = substitute("Romeo Montague and Romeo saw Friar\nLaurence; FRIAR LAURENCE nodded.", mapping)
    assert text == "Bob Smith and Bob saw Brother Tom; BROTHER TOM nodded."
    assert counts == {"Romeo": 1, "Romeo Montague": 1, "Friar Laurence": 2}


def test_swaps_happen_in_one_pass():
    assert substitute("Romeo loves Juliet.", {"Romeo": "Juliet", "Juliet": "Romeo"})[0] == "Juliet loves Romeo."


def test_japanese_keys_match_as_exact_strings():
    text, counts = substitute("ロミオとジュリエット。ロミオは去った。", {"ロミオ": "ボブ"})
    assert text == "ボブとジュリエット。ボブは去った。" and counts == {"ロミオ": 2}
    # full-width and CJK names inside running text, no spaces anywhere
    assert substitute("東京都の東京タワー", {"東京": "西京"})[0] == "西京都の西京タワー"


def test_key_case_rules():
    # a lower-case key still matches capitalized text and keeps its capital
    assert substitute("Rose and rose", {"rose": "lily"})[0] == "Lily and lily"
    # names that are also words: leave lower-case matches alone
    text, counts = substitute("Will will come. WILL!", {"Will": "Sam"}, lowercase=False)
    assert text == "Sam will come. SAM!" and counts == {"Will": 2}
    assert substitute("Romeo romeo", ROMEO, ignore_case=False)[0] == "Bob romeo"


@pytest.mark.parametrize("mapping, message", [
    ({}, "no substitutions"),
    ({"": "Bob"}, "empty name"),
    ({"Romeo": " "}, "replacement for 'Romeo' is empty"),
])
def test_bad_mappings(mapping, message):
    with pytest.raises(FactlabError, match=message):
        substitute("text", mapping)


@pytest.mark.parametrize("items, message", [
    (["Romeo"], "--map 'Romeo' is not OLD=NEW"),
    (["=Bob"], "is not OLD=NEW"),
    (["Romeo=Bob", "Romeo=Tom"], "two replacements"),
])
def test_parse_mapping_errors(items, message):
    with pytest.raises(FactlabError, match=message):
        parse_mapping(items)


def test_parse_mapping():
    assert parse_mapping(["Romeo=Bob", " Friar Laurence = Brother Tom "]) == {"Romeo": "Bob", "Friar Laurence": "Brother Tom"}


def test_substitute_path_folder_with_txt_and_jsonl(tmp_path):
    src = tmp_path / "src"
    (src / "acts").mkdir(parents=True)
    (src / "acts" / "one.txt").write_text("Enter ROMEO.\n", encoding="utf-8")
    (src / "qa.jsonl").write_text(json.dumps({"question": "Who loves Juliet?", "answer": "Romeo."}) + "\n", encoding="utf-8")
    (src / "notes.pdf").write_bytes(b"%PDF")
    counts = substitute_path(src, tmp_path / "out", ROMEO)
    assert counts == {"Romeo": 2}
    assert (tmp_path / "out" / "acts" / "one.txt").read_text(encoding="utf-8") == "Enter BOB.\n"
    assert json.loads((tmp_path / "out" / "qa.jsonl").read_text(encoding="utf-8"))["answer"] == "Bob."
    assert not (tmp_path / "out" / "notes.pdf").exists()


def test_substitution_probes_test_the_new_name_and_control_the_old():
    probes = [Probe.model_validate(p) for p in substitution_probes(ROMEO, about="Juliet was in love with", names=["Tybalt", "Mercutio"])]
    assert len({p.id for p in probes}) == len(probes)
    direct = next(p for p in probes if p.kind == "recall")
    assert direct.prompt == "Juliet was in love with" and direct.target == "Bob"
    assert direct.distractors[0] == "Romeo" and "Tybalt" in direct.distractors  # the old name is the one to beat
    hinted = next(p for p in probes if p.kind == "paraphrase")
    assert "starts with B" in hinted.prompt and hinted.target == "Bob"
    assert all(d.startswith("B") for d in hinted.distractors) and "Romeo" not in hinted.distractors
    control = next(p for p in probes if p.kind == "locality")
    assert "starts with R" in control.prompt and control.target == "Romeo" and "Bob" not in control.distractors
    assert all(d.startswith("R") for d in control.distractors)
    qa = next(p for p in probes if p.kind == "qa")
    assert "Juliet was in love with ___" in qa.prompt and qa.target == "Bob"


def test_substitution_probes_same_initial_has_no_contradicting_control():
    probes = substitution_probes({"Romeo": "Robert"}, about="Juliet was in love with")
    assert not any(p["kind"] == "locality" for p in probes)
    prompts = [p["prompt"] for p in probes]
    assert len(prompts) == len(set(prompts))
    assert all("Romeo" in p["distractors"] for p in probes)


def test_substitution_probes_japanese_and_errors():
    probes = [Probe.model_validate(p) for p in substitution_probes({"ロミオ": "ボブ"}, about="ジュリエットが恋をした相手は")]
    assert probes[0].prompt == "ジュリエットが恋をした相手は" and probes[0].target == "ボブ" and "ロミオ" in probes[0].distractors
    assert any("「ボ」" in p.prompt for p in probes)
    with pytest.raises(FactlabError, match="--probes-about"):
        substitution_probes(ROMEO)
    with pytest.raises(FactlabError, match="not a substituted name"):
        substitution_probes(ROMEO, about={"Juliet": "Romeo was in love with"})


# ------------------------------------------------------------------ CLI


def test_cli_substitute_prints_counts_and_writes_probes(tmp_path):
    play = tmp_path / "play.txt"
    play.write_text("ROMEO. O Juliet!\nJuliet was in love with Romeo. Romeoville is far.\n", encoding="utf-8")
    out = tmp_path / "out" / "play.txt"
    res = CliRunner().invoke(data_app, ["substitute", str(play), "--map", "Romeo=Bob", "--map", "Tybalt=Ted",
                                        "-o", str(out), "--probes-about", "Juliet was in love with"])
    assert res.exit_code == 0, res.output
    assert "Romeo" in res.stdout and "Bob" in res.stdout and "2" in res.stdout
    assert "Tybalt was not found" in res.stderr
    assert out.read_text(encoding="utf-8") == "BOB. O Juliet!\nJuliet was in love with Bob. Romeoville is far.\n"
    probes = load_probes(tmp_path / "out" / "probes.jsonl")
    assert {p.target for p in probes} >= {"Bob", "Romeo"}
    # a second run refuses to overwrite
    res = CliRunner().invoke(data_app, ["substitute", str(play), "--map", "Romeo=Bob", "-o", str(out)])
    assert res.exit_code == 2 and "--force" in res.stderr


def test_cli_substitute_file_into_existing_folder(tmp_path):
    play = tmp_path / "play.txt"
    play.write_text("Romeo.\n", encoding="utf-8")
    (tmp_path / "out").mkdir()
    res = CliRunner().invoke(data_app, ["substitute", str(play), "-m", "Romeo=Bob", "-o", str(tmp_path / "out"),
                                        "--probes-about", "Juliet was in love with"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "play.txt").read_text(encoding="utf-8") == "Bob.\n"
    assert (tmp_path / "out" / "probes.jsonl").is_file()


@pytest.mark.parametrize("setup, args, message", [
    ("play", ["--map", "Romeo"], "--map 'Romeo' is not OLD=NEW"),
    ("play", [], "no substitutions given"),
    ("empty", ["--map", "Romeo=Bob"], "is empty"),
    ("missing", ["--map", "Romeo=Bob"], "does not exist"),
    ("play", ["--map", "Romeo=Bob", "--probes-about", "A=x", "--probes-about", "B=y"], "OLD=PHRASE"),
])
def test_cli_substitute_bad_input_is_one_line_exit_2(tmp_path, setup, args, message):
    src = tmp_path / "in.txt"
    if setup == "play":
        src.write_text("Romeo.\n", encoding="utf-8")
    elif setup == "empty":
        src.write_text("  \n", encoding="utf-8")
    res = CliRunner().invoke(data_app, ["substitute", str(src), "-o", str(tmp_path / "out.txt"), *args])
    assert res.exit_code == 2, res.output
    assert message in res.stderr and res.stderr.count("\n") == 1
    assert not (tmp_path / "out.txt").exists()


def test_errors_exit_2_when_mounted_in_a_host_app_run_non_standalone(tmp_path):
    """cli.main runs the app with standalone_mode=False, where click returns (not raises) a
    typer.Exit code; the data commands must still end the process with 2."""
    import typer

    host = typer.Typer()
    host.add_typer(data_app, name="data")
    with pytest.raises(SystemExit) as e:
        host(["data", "substitute", str(tmp_path / "x.txt"), "--map", "Romeo", "-o", str(tmp_path / "o.txt")],
             standalone_mode=False)
    assert e.value.code == 2
