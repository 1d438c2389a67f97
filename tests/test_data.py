"""CPT packing and SFT formatting on the tiny tokenizer."""

import json

import pytest

from factlab.data.corpus import load_documents, pack_documents
from factlab.data.sft import build_sft_examples, encode_conversation, load_conversations
from factlab.errors import FactlabError
from factlab.testing import tiny_tokenizer


def test_packing_joins_documents_with_eos_and_keeps_every_token(tok):
    docs = ["Marta Ilvane runs the press line.", "The capital of France is Paris.", "Jonas Perl leads the night shift."]
    blocks = pack_documents(tok, docs, seq_len=8)
    stream = [t for b in blocks for t in b["input_ids"]]
    expected = []
    for d in docs:
        expected += tok(d)["input_ids"] + [tok.eos_token_id]
    assert stream == expected  # nothing dropped, EOS after every document
    assert all(len(b["input_ids"]) == 8 for b in blocks[:-1]) and 2 <= len(blocks[-1]["input_ids"]) <= 8
    assert all(b["labels"] == b["input_ids"] and b["attention_mask"] == [1] * len(b["input_ids"]) for b in blocks)


def test_load_documents_txt_jsonl_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third"}) + "\n")
    (tmp_path / "empty.txt").write_text("   \n")
    assert load_documents([tmp_path]) == ["first doc", "second", "third"]
    assert load_documents([tmp_path / "a.txt"]) == ["first doc"]


@pytest.mark.parametrize("content, expected", [
    (b"", "the corpus is empty"),
    (b"\n \n", "the corpus is empty"),
    (b"caf\xe9", "not UTF-8"),
])
def test_bad_corpus(tmp_path, content, expected):
    p = tmp_path / "c.txt"
    p.write_bytes(content)
    with pytest.raises(FactlabError, match=expected):
        load_documents([p])


def test_missing_corpus_and_bad_jsonl(tmp_path):
    with pytest.raises(FactlabError, match="does not exist"):
        load_documents([tmp_path / "none.txt"])
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(FactlabError, match=r"c.jsonl:2: malformed JSON"):
        load_documents([p])


def test_sft_labels_mask_the_prompt_and_train_eos(tok):
    msgs = [{"role": "user", "content": "Who runs the press line?"}, {"role": "assistant", "content": "Marta Ilvane."}]
    ex, truncated = encode_conversation(tok, msgs, seq_len=512)
    assert not truncated
    prompt = tok.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=False)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    answer = ex["labels"][n_prompt:]
    assert -100 not in answer
    assert answer[-1] == tok.eos_token_id  # the model learns to stop
    assert tok.decode(answer, skip_special_tokens=True) == "Marta Ilvane."
    assert ex["input_ids"][:n_prompt] == tok(prompt, add_special_tokens=False)["input_ids"]


def test_sft_without_chat_template_is_a_clear_error():
    tok = tiny_tokenizer(chat_template=False)
    with pytest.raises(FactlabError, match="no chat template"):
        build_sft_examples(tok, [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]], 64)


def test_sft_truncation_keeps_examples_with_answer_tokens(tok):
    msgs = [{"role": "user", "content": "q " * 50}, {"role": "assistant", "content": "a"}]
    with pytest.raises(FactlabError, match="raise train.seq_len"):
        build_sft_examples(tok, [msgs], seq_len=8)


def test_load_conversations_formats_and_errors(tmp_path):
    p = tmp_path / "qa.jsonl"
    p.write_text(
        json.dumps({"question": "Q1", "answer": "A1", "system": "S"}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]}) + "\n"
    )
    convs = load_conversations(p)
    assert convs[0] == [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]
    assert convs[1][-1] == {"role": "assistant", "content": "A2"}
    for bad, expected in [
        ('{"question": "Q"}', "needs \"question\" and \"answer\""),
        ('{"question": "Q", "answer": " "}', "answer is empty"),
        ('{"messages": [{"role": "user", "content": "Q"}]}', "ending with the assistant"),
        ("", "has no examples"),
    ]:
        p.write_text(bad + "\n")
        with pytest.raises(FactlabError, match=expected):
            load_conversations(p)


def test_replay_ratio_and_determinism(tok):
    from factlab.config import StageSpec
    from factlab.train.data import StageInputs, build_stage_examples

    convs = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(20)]
    docs = ["Marta Ilvane runs the press line. " * 3, "Jonas Perl leads the night shift. " * 3]
    for ratio in (0.0, 0.2, 0.5, 1.0, 3.0):
        st = StageSpec.model_validate({"kind": "sft", "data": {"replay": {"ratio": ratio}}, "train": {"seq_len": 48}})
        ex = build_stage_examples(st, tok, StageInputs(convs, docs), seed=1)
        replay = [e for e in ex if -100 not in e["labels"]]  # replay blocks are trained on every token
        assert abs(len(replay) - ratio * 20) <= 1 and len(ex) - len(replay) == 20
        again = build_stage_examples(st, tok, StageInputs(convs, docs), seed=1)
        assert again == ex
    other = build_stage_examples(st, tok, StageInputs(convs, docs), seed=2)
    assert other != ex  # a different seed draws other blocks


def test_replay_source_corpus_needs_a_corpus(tmp_path):
    from factlab.config import StageSpec
    from factlab.errors import FactlabError
    from factlab.train.data import load_stage_data

    st = StageSpec.model_validate({"kind": "sft", "data": {"replay": {"source": "corpus", "ratio": 0.5}}})
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(FactlabError, match="replay source 'corpus' needs data.corpus"):
        load_stage_data(st, None, str(qa))
