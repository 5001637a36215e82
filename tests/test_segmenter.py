"""Word starts from jieba (data/segmenter.py) and token offsets (Tokenizer.encode_batch_offsets) on
Chinese and mixed text, for both tokenizer backends trained here on a little Chinese."""
import numpy as np
import pytest

jieba = pytest.importorskip("jieba")

from data.segmenter import load_segmenter  # noqa: E402
from data.tokenizer_train import train_bpe, train_spm  # noqa: E402

# Chinese sentences, Latin words, digits (ASCII and full-width), full-width punctuation, and rare
# characters (鬱龘) that a tiny vocabulary spells in bytes
TEXT = ("我们在2024年3月15日去了北京大学，参加了Machine Learning研讨会！价格是3.14元。"
        "他说：“你好 world” C++和Python3都很好。\n第二行：ＡＢＣ１２３，鬱龘之谜。"
        "自然语言处理是人工智能的一个重要方向，iPhone15发布了。")
RARE = "鬱龘"  # left out of the training text
TRAINING = [TEXT.replace(RARE, ""), "今天天气很好，我们去公园散步。", "中文分词对于全词掩码非常重要。",
            "the quick brown fox 42"] * 10
KINDS = ["bpe", "spm", "bpe-fullwidth", "spm-fullwidth"]  # "fullwidth": the Chinese normalisation (Ａ -> A)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zh_tok")
    out = {}
    for kind in KINDS:
        backend, _, normalization = kind.partition("-")
        train, size = (train_bpe, 300) if backend == "bpe" else (train_spm, 600)
        out[kind] = train(iter(TRAINING), size, tmp / kind, normalization=normalization or "identity")
    return out


@pytest.fixture(scope="module")
def segmenter():
    return load_segmenter("jieba")


def units(flags):
    """Unit index of each token: a unit is a token with flag 1 and the flag-0 tokens after it."""
    return np.maximum.accumulate(np.where(flags == 1, np.arange(len(flags)), 0))


@pytest.mark.parametrize("kind", KINDS)
def test_every_jieba_word_lies_inside_one_unit(tokenizers, segmenter, kind):
    tok = tokenizers[kind]
    [(ids, begins, ends)] = tok.encode_batch_offsets([TEXT])
    assert ids.tolist() == tok.encode(TEXT) == tok.encode_batch([TEXT])[0]  # the ids preprocessing stores
    flags = segmenter.token_flags(TEXT, begins, ends)
    assert flags.dtype == np.uint8 and len(flags) == len(ids) and set(flags.tolist()) <= {0, 1}
    unit = units(flags)
    words, start = [], 0
    for word in jieba.lcut(TEXT):
        if word.strip():
            words.append((word, start, start + len(word)))
        start += len(word)
    for word, first, end in words:
        overlapping = np.flatnonzero((begins < end) & (ends > first))
        assert len(overlapping), word
        assert len(set(unit[overlapping].tolist())) == 1, f"{kind}: jieba word {word!r} split across units"
    # and the words are not all merged: a unit per jieba word or close to it
    assert int(flags.sum()) >= 0.5 * len(words), (int(flags.sum()), len(words))


def test_byte_tokens_of_one_character_share_its_unit(tokenizers, segmenter):
    """鬱 is not in either vocabulary: SentencePiece spells it in 3 byte pieces, byte-level BPE in byte tokens."""
    text = "之谜，鬱龘。"
    at = text.index("鬱")
    for kind, tok in tokenizers.items():
        [(ids, begins, ends)] = tok.encode_batch_offsets([text])
        pieces = np.flatnonzero((begins <= at) & (ends > at))  # the tokens holding bytes of 鬱
        assert len(pieces) >= 2, (kind, begins, ends)
        assert (begins[pieces] == at).all() and (ends[pieces] == at + 1).all(), (kind, begins, ends)
        flags = segmenter.token_flags(text, begins, ends)
        assert flags[pieces].tolist() == [1] + [0] * (len(pieces) - 1), kind  # 鬱 begins a word (after ，)


def test_class_rules_only_remove_jieba_boundaries(segmenter):
    from data.segmenter import char_classes, code_points

    text = "在2024年，Machine Learning！ＡＢＣ１２３ 3.14"
    classes = char_classes(code_points(text))
    starts = np.flatnonzero(segmenter.char_starts(text, classes)).tolist()
    # jieba: 在|2024|年|，|Machine| |Learning|！|Ａ|Ｂ|Ｃ|１|２|３| |3.14 -- full-width letters and digits
    # are one word each by class (one start), the spaces start nothing
    assert [text[i] for i in starts] == ["在", "2", "年", "，", "M", "L", "！", "Ａ", "１", "3"]
    jieba_starts = np.cumsum([0] + [len(w) for w in jieba.lcut(text)])[:-1].tolist()
    assert set(starts) <= set(jieba_starts)


def test_whitespace_and_mid_word_tokens_do_not_start_words(segmenter):
    from data.segmenter import token_starts

    text = "ab  北京"  # a token of the spaces alone, a token from the middle of "ab", an empty span
    char_starts = np.array([1, 0, 0, 0, 1, 0], dtype=bool)
    is_space = np.array([0, 0, 1, 1, 0, 0], dtype=bool)
    begins, ends = np.array([0, 1, 2, 4, 4, 5]), np.array([1, 2, 4, 4, 5, 6])
    assert token_starts(char_starts, is_space, begins, ends).tolist() == [1, 0, 0, 0, 1, 0]
    # a token of leading spaces takes the flag of its first character; one covered already does not
    assert token_starts(char_starts, is_space, np.array([0, 2, 4]), np.array([2, 5, 6])).tolist() == [1, 1, 0]
    assert token_starts(char_starts, is_space, np.array([0, 3]), np.array([5, 5])).tolist() == [1, 0]
    assert len(text) == len(char_starts)
