import json
import random
import unicodedata

import numpy as np
import pytest

from data.errors import UserError
from data.tokenizer import load_tokenizer
from data.tokenizer_train import _cut_utf8, _reservoir_sample, train_bpe, train_spm
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
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: malformed JSON .*--skip-bad-lines"):
        train_tokenizer.main(["--input", str(tmp_path / "bad.jsonl"), "--vocab-size", "300", "--output", str(tmp_path / "t")])
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    (tmp_path / "c.txt").write_text("text\n")
    with pytest.raises(UserError, match="holds no tokenizer"):
        train_tokenizer.main(["--input", str(tmp_path / "c.txt"), "--vocab-size", "300", "--output", str(keep)])
    assert (keep / "notes.txt").read_text() == "mine"


def test_bpe_word_starts_are_the_space_prefixed_tokens(bpe_tokenizer):
    tok = bpe_tokenizer
    starts = tok.word_start_ids()
    assert starts.dtype == bool and starts.shape == (tok.vocab_size,)
    ids = tok.encode(" the quick brown fox")
    assert starts[ids].tolist() == [tok._tok.id_to_token(i).startswith("Ġ") for i in ids]
    assert starts[tok.encode(" the")[0]] and not starts[tok.encode("the")[0]]
    assert not starts[tok.special_ids].any()


# -- SentencePiece ---------------------------------------------------------------------------------

# Where sentencepiece and a tokenizer.json could part ways: scripts, composed and decomposed accents,
# full-width forms, emoji sequences, odd whitespace, and the specials' and byte pieces' names in text.
TRICKY_SPM = TRICKY + [
    "naïve café déjà vu",
    unicodedata.normalize("NFD", "naïve café Ångström Việt Nam 한국어"),
    "Ｆｕｌｌ－ｗｉｄｔｈ　ｆｏｒｍｓ！ ﬁ ① x² ㍿",
    "Ａ\u0301 ﬁ\u0301 ￗ\u0592",
    "Ελληνικά, русский, עברית, العربية, हिन्दी, ไทย",
    "a [MASK] b [MASK][MASK]c [MASK",
    "[CLS] x [SEP] [PAD] [UNK] [MASK][SEP] y",
    "<0xE6> <0x41>literal byte names",
    "▁ leading ▁▁ and trailing ▁▁",
    "   \t  tabs\t\tand\n\nnewlines\r\n   ",
    "(((( ==== ))))",
]


def random_texts(count, seed):
    """Random strings over many Unicode blocks, spaces and the special names: the fuzz for parity."""
    blocks = [(0x20, 0x7e), (0xa0, 0x24f), (0x300, 0x36f), (0x370, 0x4ff), (0x590, 0x6ff), (0x900, 0x97f),
              (0xe00, 0xe7f), (0x1100, 0x11ff), (0x2000, 0x206f), (0x3000, 0x30ff), (0x4e00, 0x9fff),
              (0xac00, 0xd7a3), (0xff00, 0xffef), (0x1f300, 0x1faff), (0x0, 0x1f), (0x10000, 0x10ffff)]
    words = ["[MASK]", "[CLS]", "[SEP]", "[PAD]", "[UNK]", "<0xE6>", "▁", " ", "  ", "\t", "\n", "\u3000",
             "\u200d", "e\u0301", "👩‍👩‍👧", "((", "==", "the", "return"]
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(0, 10)):
            if rng.random() < 0.5:
                parts.append(rng.choice(words))
            else:
                lo, hi = rng.choice(blocks)
                parts.append("".join(chr(c) for c in (rng.randint(lo, hi) for _ in range(rng.randint(1, 5)))
                                     if not 0xd800 <= c <= 0xdfff))
        texts.append("".join(parts))
    return texts


def sentencepiece_of(tok):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(tok.path / "spm.model"))


def test_spm_layout_follows_deberta_v3(spm_tokenizer):
    tok, sp = spm_tokenizer, sentencepiece_of(spm_tokenizer)
    assert tok.vocab_size == 1000 == sp.get_piece_size()  # the small corpus reaches the requested size
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 999)
    assert [sp.id_to_piece(i) for i in (0, 1, 2, 3, 999)] == ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
    assert [sp.id_to_piece(i) for i in (4, 259)] == ["<0x00>", "<0xFF>"]  # byte fallback pieces
    assert tok.special_ids == [0, 1, 2, 3, 999]
    meta = json.loads((tok.path / "tokenizer_meta.json").read_text())
    assert (meta["type"], meta["model_type"], meta["normalization"]) == ("spm", "unigram", "identity")


def test_spm_encode_is_sentencepiece_with_byte_fallback(spm_tokenizer):
    tok, sp = spm_tokenizer, sentencepiece_of(spm_tokenizer)
    texts = TRICKY_SPM + random_texts(300, seed=1)
    assert tok.encode_batch(texts) == [sp.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    ids, lengths = tok.encode_batch_flat(texts)
    assert ids.dtype == np.int32 and lengths.tolist() == [len(sp.encode(t)) for t in texts]
    assert ids.tolist() == [i for t in texts for i in sp.encode(t)]
    assert not any(tok.unk_id in sp.encode(t) for t in texts)  # byte fallback: nothing is unknown
    assert tok.encode("a [MASK] b").count(tok.mask_id) == 1  # [MASK] is a user-defined piece
    assert not {tok.bos_id, tok.eos_id, tok.pad_id} & set(tok.encode("[CLS] [SEP] [PAD]"))
    for text in ["naïve 日本語 😀 Ｆｕｌｌ e\u0301", "tabs\tand\nnewlines kept", "a [MASK] b"]:
        assert tok.decode(tok.encode(text)) == text  # identity normalisation: single spaces round-trip
    assert tok.decode([tok.bos_id, *tok.encode("x y"), tok.eos_id]) == "[CLS] x y [SEP]"


def test_spm_hugging_face_encodes_exactly_as_sentencepiece(spm_tokenizer, demo_corpus):
    from transformers import AutoTokenizer

    tok, sp = spm_tokenizer, sentencepiece_of(spm_tokenizer)
    hf = AutoTokenizer.from_pretrained(str(tok.path))
    assert hf.is_fast and len(hf) == tok.vocab_size
    assert (hf.pad_token_id, hf.cls_token_id, hf.sep_token_id, hf.unk_token_id, hf.mask_token_id) == (0, 1, 2, 3, 999)
    assert (hf.bos_token_id, hf.eos_token_id) == (1, 2)
    with open(demo_corpus.path, encoding="utf-8") as f:
        corpus = [json.loads(line)["text"] for line in f][:200]
    texts = TRICKY_SPM + corpus + random_texts(3000, seed=2)
    expected = [sp.encode(t) for t in texts]
    got = hf(texts, add_special_tokens=False)["input_ids"]
    mismatches = [t for t, a, b in zip(texts, expected, got) if a != b]
    assert mismatches == []
    assert [hf.decode(ids) for ids in expected] == [sp.decode(ids) for ids in expected]
    assert hf("x")["input_ids"] == [1, *sp.encode("x"), 2]  # [CLS] A [SEP]
    assert hf("x", "y")["input_ids"] == [1, *sp.encode("x"), 2, *sp.encode("y"), 2]
    assert hf("a [MASK] b")["input_ids"].count(hf.mask_token_id) == 1


def test_spm_bpe_model_type_matches_too(demo_corpus, tmp_path):
    from transformers import AutoTokenizer

    tok = train_spm([demo_corpus.path], 800, tmp_path / "spm_bpe", model_type="bpe")
    sp, hf = sentencepiece_of(tok), AutoTokenizer.from_pretrained(str(tok.path))
    assert tok.vocab_size == 800 and tok.mask_id == 799
    # the one documented difference ("[MASK]" glued to a control or byte piece's name) is left out
    texts = [t.replace("[MASK][", "[MASK] [").replace("[MASK]<", "[MASK] <")
             for t in TRICKY_SPM + random_texts(2000, seed=3)]
    assert [t for t in texts if sp.encode(t) != hf(t, add_special_tokens=False)["input_ids"]] == []
    assert tok.encode("a [MASK] b").count(tok.mask_id) == 1


def test_spm_trains_on_a_line_sample_deterministically(demo_corpus, spm_tokenizer, tmp_path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((spm_tokenizer.path / "spm.model").read_bytes())
    assert proto.trainer_spec.byte_fallback and proto.normalizer_spec.name == "identity"
    assert all(p.score * 8 == int(p.score * 8) for p in proto.pieces)  # the 1/8 score grid

    def fingerprint(name, **kwargs):
        return train_spm([demo_corpus.path], 600, tmp_path / name, **kwargs).fingerprint()

    sampled = fingerprint("sampled", sample_lines=300)
    meta = json.loads((tmp_path / "sampled" / "tokenizer_meta.json").read_text())
    assert meta["sample_lines"] == 300 and meta["lines_read"] > 3000  # read everything, kept 300
    assert _reservoir_sample(iter(range(10)), 20, seed=0) == (list(range(10)), 10)
    counts = np.bincount([x for seed in range(2000) for x in _reservoir_sample(iter(range(10)), 3, seed)[0]])
    assert counts.min() > 0.9 * 600 and counts.max() < 1.1 * 600  # each of 10 items in ~3/10 of 2000 samples
    assert fingerprint("again", sample_lines=300) == sampled  # the seed fixes the sample
    assert fingerprint("other_seed", sample_lines=300, seed=1) != sampled
    assert fingerprint("all") != sampled


def test_spm_word_starts_are_the_meta_space_pieces(spm_tokenizer):
    tok, sp = spm_tokenizer, sentencepiece_of(spm_tokenizer)
    starts = tok.word_start_ids()
    assert starts.shape == (tok.vocab_size,) and not starts[tok.special_ids].any()
    ids = tok.encode("the quick brown fox jumps")
    assert starts[ids].tolist() == [sp.id_to_piece(i).startswith("▁") for i in ids]
    assert starts[ids].sum() == 5


def test_long_training_lines_are_cut_at_spaces_within_the_byte_limit():
    text = "日本語 " * 3000 + "x" * 10000 + " " + "日本語" * 3000  # the last run has no space to cut at
    pieces = list(_cut_utf8(text.encode("utf-8"), 4096))
    assert all(0 < len(p.encode("utf-8")) <= 4096 for p in pieces)
    assert "".join(pieces).replace(" ", "") == text.replace(" ", "")
    assert pieces[0].endswith("日本語") and not pieces[1].startswith(" ")


def test_train_tokenizer_tool_passes_its_options(tmp_path, monkeypatch, spm_tokenizer):
    seen = {}

    def fake_train_spm(files, vocab_size, output, **kwargs):
        seen.update(kwargs, vocab_size=vocab_size, files=files)
        return spm_tokenizer

    monkeypatch.setattr(train_tokenizer, "train_spm", fake_train_spm)
    (tmp_path / "a.txt").write_text("x\n")
    assert train_tokenizer.main(["--input", str(tmp_path / "a.txt"), "--type", "spm", "--txt-docs", "blank-line",
                                 "--skip-bad-lines", "--json-key", "body", "--spm-model-type", "bpe",
                                 "--sample-lines", "77", "--seed", "5", "--output", str(tmp_path / "t")]) == 0
    options = seen["read_options"]
    assert (options.txt_docs, options.skip_bad_lines, options.json_key) == ("blank-line", True, "body")
    assert (seen["model_type"], seen["sample_lines"], seen["seed"], seen["vocab_size"]) == ("bpe", 77, 5, 128001)


def test_train_tokenizer_tool_spm(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("first paragraph line\nstill the first\n\nsecond paragraph\n" * 200)
    out = tmp_path / "tok"
    assert train_tokenizer.main(["--input", str(tmp_path / "a.txt"), "--type", "spm", "--txt-docs", "blank-line",
                                 "--vocab-size", "500", "--output", str(out)]) == 0
    tok = load_tokenizer(out)
    assert tok.type == "spm" and f"vocab size {tok.vocab_size}" in capsys.readouterr().out
    assert tok.mask_id == tok.vocab_size - 1 and tok.vocab_size <= 500
    with pytest.raises(UserError, match="vocab size 300 is too small for SentencePiece"):
        train_tokenizer.main(["--input", str(tmp_path / "a.txt"), "--type", "spm", "--vocab-size", "300",
                              "--output", str(out)])
    assert load_tokenizer(out).fingerprint() == tok.fingerprint()  # the failed run left it alone
