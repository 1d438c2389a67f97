"""`replay: {source: general}` mixes factlab's shipped general English into a stage."""

from factlab.config import StageSpec
from factlab.data.corpus import builtin_replay_documents
from factlab.testing import tiny_tokenizer
from factlab.train.data import build_stage_examples, load_stage_data


def test_general_replay_text_ships_and_is_not_the_perplexity_text():
    from factlab.evaluate.perplexity import builtin_general_text

    docs = builtin_replay_documents()
    assert len(docs) >= 200 and sum(len(d.split()) for d in docs) > 30_000
    assert not any(d.startswith("#") for d in docs)
    # damage is measured on text replay never trains on
    general = builtin_general_text()
    assert not any(d[:80] in general for d in docs)


def test_general_replay_source_needs_no_file(tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "Who runs the press line?", "answer": "Marta Ilvane."}\n' * 10)
    stage = StageSpec.model_validate({"kind": "sft", "data": {"replay": {"source": "general", "ratio": 0.5}},
                                      "train": {"seq_len": 32}})
    raw = load_stage_data(stage, corpus=None, qa=str(qa))
    assert raw.replay_docs == builtin_replay_documents()
    ex = build_stage_examples(stage, tiny_tokenizer(), raw, seed=0)
    assert ex.replay == 5 and len(ex) == 15 and ex.sources == 10
    assert all(len(e["input_ids"]) <= 32 for e in ex)


def test_general_is_not_resolved_as_a_path(tmp_path):
    from factlab.config import experiment_from_dict

    exp = experiment_from_dict({"name": "x", "model": "m", "data": {"qa": "qa.jsonl"},
                                "stages": [{"kind": "sft", "data": {"replay": {"source": ["general", "corpus"]}}}]},
                               base=tmp_path)
    assert exp.stages[0].data.replay.source == ["general", "corpus"]
