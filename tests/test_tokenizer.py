import json

import pytest

from data.errors import UserError
from data.tokenizer import load_tokenizer, train_bpe
from tools import train_tokenizer

# Texts where a byte-level BPE and its Hugging Face wrapper could part ways: accents (composed
# and combining), CJK, emoji with ZWJ sequences, odd whitespace, and special-token strings.
TRICKY = [
    "Hello world",
    " leading space and trailing space ",
    "naïve café déjà vu — Ünïcödé e\u0301",
    "日本語のテキスト、中文文本와 한국어",
    "emoji 😀🎉 family 👩‍👩‍👧 flag 🇫🇷",
    "tabs\tand\nnewlines\r\n  and   runs of spaces",
    "nbsp\u00a0zero\u200bwidth",
    "a <mask> b",
    "x<mask>y <mask><mask>",
    "<s>start</s> <pad> <unk> end",
    "",
]


def test_roberta_specials_and_properties(bpe_tokenizer):
    tok = bpe_tokenizer
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.special_ids == [0, 1, 2, 3, 4]
    assert tok.vocab_size == 1000  # the small corpus reaches the requested size
    assert tok.path.is_absolute() and (tok.path / "tokenizer.json").is_file()
    meta = json.loads((tok.path / "tokenizer_meta.json").read_text())
    assert meta["type"] == "bpe" and meta["vocab_size"] == 1000


def test_encode_adds_no_specials_and_decodes_back(bpe_tokenizer):
    tok = bpe_tokenizer
    for text in TRICKY:
        if "<mask>" in text:
            continue  # <mask> swallows the space before it (lstrip), as in RoBERTa
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.encode("") == []
    assert tok.encode_batch(TRICKY) == [tok.encode(t) for t in TRICKY]


def test_special_strings_in_text_become_special_ids(bpe_tokenizer):
    tok = bpe_tokenizer
    assert tok.encode("<s>") == [tok.bos_id]
    assert tok.encode("a <mask>") == tok.encode("a") + [tok.mask_id]  # lstrip takes the space
    assert tok.encode("b</s>") == tok.encode("b") + [tok.eos_id]


def test_hugging_face_loads_the_directory_and_encodes_identically(bpe_tokenizer):
    from transformers import AutoTokenizer

    tok = bpe_tokenizer
    hf = AutoTokenizer.from_pretrained(str(tok.path))
    assert hf.is_fast
    assert len(hf) == tok.vocab_size
    assert (hf.bos_token_id, hf.pad_token_id, hf.eos_token_id, hf.unk_token_id, hf.mask_token_id) == (0, 1, 2, 3, 4)
    assert (hf.cls_token_id, hf.sep_token_id) == (0, 2)
    assert hf.model_max_length == 512
    for text in TRICKY:
        ids = tok.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, text
        assert hf(text)["input_ids"] == [0, *ids, 2], text  # RobertaProcessing: <s> ... </s>
    assert hf("a", "b")["input_ids"] == [0, *tok.encode("a"), 2, 2, *tok.encode("b"), 2]


def test_fingerprint_survives_copies_and_tells_tokenizers_apart(bpe_tokenizer, demo_corpus, tmp_path):
    tok = bpe_tokenizer
    copy = load_tokenizer(tok.save_copy(tmp_path / "run" / "tokenizer"))
    assert copy.fingerprint() == tok.fingerprint()
    assert len(tok.fingerprint()) == 64
    assert copy.encode_batch(TRICKY) == tok.encode_batch(TRICKY)

    # training is deterministic: texts from an iterator train the same tokenizer as the file
    with open(demo_corpus.path, encoding="utf-8") as f:
        texts = (json.loads(line)["text"] for line in f)
        same = train_bpe(texts, 1000, tmp_path / "same")
    assert same.fingerprint() == tok.fingerprint()
    other = train_bpe(iter(["only a tiny corpus, only a tiny corpus"]), 300, tmp_path / "other")
    assert other.fingerprint() != tok.fingerprint()


def test_load_tokenizer_errors_name_the_path(tmp_path, bpe_tokenizer):
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a tokenizer directory"):
        load_tokenizer(tmp_path / "empty")
    broken = bpe_tokenizer.save_copy(tmp_path / "broken")
    (broken / "tokenizer_meta.json").write_text(json.dumps({"type": "wordpiece"}))
    with pytest.raises(UserError, match="unknown tokenizer type 'wordpiece'"):
        load_tokenizer(broken)


def test_train_tokenizer_tool_writes_atomically_and_replaces(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("one document per line\nanother document here\n" * 50)
    (tmp_path / "b.jsonl").write_text((json.dumps({"body": "from json zyxwvut", "text": "x"}) + "\n") * 20)
    out = tmp_path / "out" / "tok"
    args = ["--input", str(tmp_path / "*.txt"), str(tmp_path / "b.jsonl"), "--json-key", "body",
            "--vocab-size", "300", "--output", str(out)]
    assert train_tokenizer.main(args) == 0
    first = load_tokenizer(out)
    assert f"vocab size {first.vocab_size}" in capsys.readouterr().out
    assert first.vocab_size <= 300  # the tiny corpus runs out of pairs seen twice
    assert len(first.encode(" zyxwvut")) == 1  # learnt from the "body" field of the .jsonl

    assert train_tokenizer.main(args[:-3] + ["261", "--output", str(out)]) == 0  # rerun replaces it
    assert load_tokenizer(out).vocab_size == 261  # 5 specials + 256 bytes, no merges
    assert sorted(p.name for p in out.parent.iterdir()) == ["tok"]  # no temporary directories left


def test_train_tokenizer_tool_user_errors(tmp_path):
    with pytest.raises(UserError, match="matches no"):
        train_tokenizer.main(["--input", str(tmp_path / "*.jsonl"), "--output", str(tmp_path / "t")])
    with pytest.raises(UserError, match="not implemented yet"):
        train_tokenizer.main(["--input", "x.txt", "--type", "spm", "--output", str(tmp_path / "t")])
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    (tmp_path / "c.txt").write_text("text\n")
    with pytest.raises(UserError, match="holds no tokenizer"):
        train_tokenizer.main(["--input", str(tmp_path / "c.txt"), "--vocab-size", "300", "--output", str(keep)])
    assert (keep / "notes.txt").read_text() == "mine"
