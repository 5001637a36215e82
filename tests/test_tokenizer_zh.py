"""Tokenizers for Chinese: the `fullwidth` normalisation and `--preset zh`, byte-level BPE on Chinese,
Chinese sentence ends (Tokenizer.sentence_end_ids) and long-document cuts after them."""
import json
import random

import numpy as np
import pytest

from data.document_pieces import pieces
from data.pairs import sentences
from data.errors import UserError
from data.tokenizer import CLOSING_MARKS, load_tokenizer
from data.tokenizer_train import WIDTH_FOLDS, train_bpe, train_spm
from tests.indexed import write_indexed
from tools import train_tokenizer

# Written for these tests: Chinese with Latin words, digits, full-width forms, the ideographic space,
# emoji, and sentences ending in 。！？ and their relatives, closing quotes and brackets included.
ZH_TEXT = """\
春天的早晨，小明和他的朋友们去公园散步。公园里有很多花，红的、黄的、白的，非常漂亮！
“你看，那边有一只小鸟。”小红指着树上说。小明问：“它叫什么名字？”
老师说过，这种鸟每年3月从南方飞回来，一直住到10月底。
我们学校有１２３０名学生和８６位老师，校长姓王，今年５５岁。
他在ＧｉｔＨｕｂ上发布了一个Python项目，名字叫做“ｄｅｅｐ　ｌｅａｒｎｉｎｇ”。
会议定在２０２４年１２月３１日下午3点，地点：北京市海淀区中关村大街27号。
你真的要走吗？》她问。真的‼我已经决定了。
“等一下……”他犹豫了，“我还有话要说……”
这是什么（一个谜语）？答案在第5页。
价格是￥９９元，打折以后只要79.5元！太便宜了吧？」
今天天气真好😀，我们去爬山吧👍🏻！好的～
机器学习（Machine Learning）是人工智能的一个分支；深度学习又是机器学习的一部分。
在BERT和RoBERTa之后，DeBERTa提出了解耦注意力机制。中文预训练模型通常使用全词掩码。
他说：『我明天再来。』然后就走了。
《红楼梦》是中国古典四大名著之一，作者是曹雪芹。你读过吗？
一、二、三、四、五，上山打老虎！老虎不在家，打到小松鼠。
ｅ\u0301与Ａ\u0301是组合字符｡半角句号也算句号｡
数据集包含１０，０００条样本，准确率达到９８．５％。这个结果很好⁉
"""
ZH_LINES = [line for line in ZH_TEXT.splitlines() if line]
# characters the corpus never shows: spelt in byte tokens (BPE) or byte pieces (SentencePiece)
RARE = "龘靐齉𪚥"


def corpus_docs(seed=0, copies=40):
    """Documents for training: the lines in shuffled groups, each line many times."""
    rng = random.Random(seed)
    lines = ZH_LINES * copies
    rng.shuffle(lines)
    return ["".join(lines[i:i + 3]) for i in range(0, len(lines), 3)]


def zh_texts():
    rng = random.Random(7)
    mixed = ["".join(rng.sample(ZH_LINES, 3)) for _ in range(50)]
    corners = ["ＡＢＣ１２３", "ABC123", "\u3000\u3000首尾\u3000全角空格\u3000\u3000", "a\u3000 \u3000b", "Ｅ\u0301ｅ\u0301",
               "［ＭＡＳＫ］ [MASK]", "中[MASK]文", RARE, "😀👍🏻👩‍👩‍👧🇨🇳", "｢引用｣､顿号", "￠￡￢￣￤￥￦",
               "ｱｲｳｶﾞ", "", " ", "\u3000", "１．５＋２＝３．５", "ＨＥＬＬＯ　ＷＯＲＬＤ！"]
    return [ZH_TEXT, *ZH_LINES, *mixed, *corners]


@pytest.fixture(scope="module")
def zh_spm(tmp_path_factory):
    """SentencePiece (Unigram) trained through the tool with --preset zh."""
    tmp = tmp_path_factory.mktemp("zh_spm")
    (tmp / "zh.txt").write_text("\n".join(corpus_docs()) + "\n", encoding="utf-8")
    assert train_tokenizer.main(["--input", str(tmp / "zh.txt"), "--type", "spm", "--vocab-size", "1000",
                                 "--preset", "zh", "--output", str(tmp / "tok")]) == 0
    return load_tokenizer(tmp / "tok")


@pytest.fixture(scope="module")
def zh_bpe(tmp_path_factory):
    return train_bpe(iter(corpus_docs()), 1200, tmp_path_factory.mktemp("zh_bpe") / "tok", normalization="fullwidth")


def assert_hf_encodes_identically(tok, texts):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok.path))
    got = hf(texts, add_special_tokens=False)["input_ids"]
    assert [t for t, ids in zip(texts, got) if ids != tok.encode(t)] == []


def test_spm_preset_zh_encodes_identically_in_auto_tokenizer(zh_spm):
    meta = json.loads((zh_spm.path / "tokenizer_meta.json").read_text())
    assert (meta["normalization"], meta["character_coverage"], meta["byte_fallback"]) == ("fullwidth", 0.9995, True)
    assert_hf_encodes_identically(zh_spm, zh_texts())
    assert zh_spm.unk_id not in zh_spm.encode(RARE)  # byte fallback, not [UNK]
    assert zh_spm.decode(zh_spm.encode(RARE + "。")) == RARE + "。"
    assert zh_spm.encode("［ＭＡＳＫ］").count(zh_spm.mask_id) == 1  # folded, then matched, on both sides


def test_spm_bpe_model_type_with_fullwidth_encodes_identically(tmp_path):
    tok = train_spm(iter(corpus_docs(seed=1)), 900, tmp_path / "tok", model_type="bpe", normalization="fullwidth")
    assert_hf_encodes_identically(tok, zh_texts())


def test_byte_level_bpe_on_chinese_encodes_identically_and_round_trips(zh_bpe):
    assert json.loads((zh_bpe.path / "tokenizer_meta.json").read_text())["normalization"] == "fullwidth"
    assert_hf_encodes_identically(zh_bpe, zh_texts())
    text = "他写了“" + RARE + "”四个字。"
    ids = zh_bpe.encode(text)
    assert zh_bpe.decode(ids) == text
    rare_ids = zh_bpe.encode(RARE)
    assert len(rare_ids) > len(RARE)  # characters spelt in byte tokens...
    assert all(zh_bpe.decode([i]) == "\ufffd" for i in rare_ids)  # ...none of them a character alone
    # the whole text comes back, folded (Chinese ，！？ are full-width forms: they come back as , ! ?)
    folded = "".join(WIDTH_FOLDS.get(c, c) for c in ZH_TEXT)
    assert folded != ZH_TEXT and zh_bpe.decode(zh_bpe.encode(ZH_TEXT)) == folded


@pytest.mark.parametrize("backend", ["zh_spm", "zh_bpe"])
def test_fullwidth_forms_encode_as_their_ascii(backend, request):
    tok = request.getfixturevalue(backend)
    assert tok.encode("ＡＢＣ１２３") == tok.encode("ABC123")
    assert tok.encode("ＨＥＬＬＯ，ｗｏｒｌｄ！") == tok.encode("HELLO,world!")
    assert tok.encode("中文\u3000测试") == tok.encode("中文 测试")  # the ideographic space is a space
    assert tok.encode("句号｡") == tok.encode("句号。") and tok.encode("￥9") == tok.encode("¥9")
    assert tok.encode("ｱ") != tok.encode("ア")  # half-width Katakana is not folded


def test_fullwidth_folds_are_single_characters_as_nfkc():
    import unicodedata

    assert len(WIDTH_FOLDS) == 107 and WIDTH_FOLDS["\u3000"] == " " and WIDTH_FOLDS["Ｚ"] == "Z"
    assert all(len(a) == len(b) == 1 and unicodedata.normalize("NFKC", a) == b for a, b in WIDTH_FOLDS.items())


# each ends exactly one sentence, after its sentence mark
SENTENCES = ["他走了。", "太好了！", "真的吗？", "你要走吗？》", "我说：“好的。”", "他说：『明天见！』", "这是什么（谜语）？",
             "真的‼", "结果很好⁉", "半角也算｡", "“我还有话要说……”", "便宜吧？」", "书名是《红楼梦》。"]


@pytest.mark.parametrize("backend", ["zh_spm", "zh_bpe"])
def test_sentence_end_ids_flag_chinese_sentence_ends(backend, request):
    tok = request.getfixturevalue(backend)
    ends = tok.sentence_end_ids()
    for sentence in SENTENCES:
        ids = tok.encode(sentence)
        # data/pairs.py ends a sentence after a flagged token whose next token is not flagged
        cuts = [k + 1 for k in range(len(ids)) if ends[ids[k]] and (k + 1 == len(ids) or not ends[ids[k + 1]])]
        # at the end, or (a closing mark in tokens of its own, or in byte tokens) before closing marks only
        assert len(cuts) == 1 and tok.decode(ids[cuts[0]:]).strip(CLOSING_MARKS) == "", \
            (sentence, [tok.decode([i]) for i in ids], cuts)
    for middle in ["他说……然后", "一、二、三", "第5页", "“你好”他说"]:
        assert not ends[tok.encode(middle)].any(), middle
    # the known gap (a byte token holding part of a mark) costs nothing on this vocabulary: every mark
    # of the text is the end of a flagged token
    for line in ZH_LINES:
        ids = tok.encode(line)
        ends_at = {len(tok.decode(ids[:k + 1])) for k in range(len(ids)) if ends[ids[k]]}
        marks = [k + 1 for k, c in enumerate(line) if c in "。！？‼⁉"]
        assert [m for m in marks if not {m, m + 1, m + 2} & ends_at] == [], line


@pytest.mark.parametrize("backend", ["zh_spm", "zh_bpe"])
def test_sentence_marks_keep_closing_quotes_with_their_sentence(backend, request, tmp_path):
    """Tokenizer.sentence_marks through data/pairs.py's sentences: each sentence of a paragraph ends after
    its closing quotes and brackets, whether the tokenizer keeps them with the mark or apart. (The gap of
    sentence_end_ids holds here too: a closing mark cut into byte tokens is not recognised, so those
    sentences are left out of the paragraph; on a real vocabulary the marks are whole tokens.)"""
    tok = request.getfixturevalue(backend)
    marks = tok.sentence_marks()
    assert marks.dtype == np.int8 and not marks[tok.special_ids].any()
    assert np.array_equal(marks == 1, tok.sentence_end_ids())
    whole = lambda text: all("\ufffd" not in tok.decode([i]) for i in tok.encode(text))
    closers = [text for text in ("”", "」", "』", "）", "》") if whole(text)]
    assert len(closers) >= 3
    for text in closers:
        assert all(marks[i] == 2 for i in tok.encode(text) if tok.decode([i]).strip()), text
    quote = [i for i in range(tok.vocab_size) if tok.decode([i]) in ('"', "'", " (")]
    assert quote and not marks[quote].any()  # straight quotes open sentences too: never closers
    # a paragraph whose every sentence ends in a mark and closing marks, and its ids in one document
    paragraph = [s for s in SENTENCES if s[-1] in "”』》」）" and whole(s[-2:])] * 2
    assert len(set(paragraph)) >= 3
    ids = tok.encode("".join(paragraph))
    spans = sentences(write_indexed(tmp_path / "zh", [ids]), 0, 1, marks)
    got = [tok.decode(ids[b:b + n]).strip() for b, n in zip(spans["begin"].tolist(), spans["length"].tolist())]
    normalized = [tok.decode(tok.encode(s)).strip() for s in paragraph]  # the preset folds ？ to ?, ...
    assert got == normalized, [[tok.decode([i]) for i in ids[b:b + n]] for b, n in
                               zip(spans["begin"].tolist(), spans["length"].tolist())]


def test_long_chinese_document_is_cut_after_a_sentence_end(zh_bpe):
    doc = "".join(line.replace("\u3000", "") for line in ZH_LINES if " " not in line) * 3  # no spaces, no newlines
    cut = pieces(doc, 600)
    assert "".join(cut) == doc and len(cut) > 3
    assert all(len(p.encode()) <= 600 for p in cut)
    for p in cut[:-1]:
        assert p.rstrip("”’」』）》")[-1] in "。！？‼⁉｡", p[-10:]
    # cut where byte-level BPE's pre-tokenizer cuts anyway: the pieces' ids are the whole's
    assert [i for p in cut for i in zh_bpe.encode(p)] == zh_bpe.encode(doc)


def test_normalization_and_coverage_errors(tmp_path):
    (tmp_path / "a.txt").write_text("中文文本。\n" * 50, encoding="utf-8")
    base = ["--input", str(tmp_path / "a.txt"), "--output", str(tmp_path / "t")]
    with pytest.raises(UserError, match="--character-coverage applies to --type spm only"):
        train_tokenizer.main([*base, "--type", "bpe", "--character-coverage", "1.0"])
    with pytest.raises(UserError, match="--character-coverage must be within 0.9 to 1.0, got 1.5"):
        train_tokenizer.main([*base, "--type", "spm", "--character-coverage", "1.5"])
    with pytest.raises(UserError, match="normalization 'nfkc' is not supported"):
        train_bpe(iter(["x"]), 300, tmp_path / "t", normalization="nfkc")
    assert not (tmp_path / "t").exists()
