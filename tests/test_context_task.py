"""The demo's context task (tools/build_word_order_task.py) and the bag-of-words baseline beside it
(tools/bow_baseline.py): a swapped sentence has the words of an original one, so word counts stay at
chance on it while they solve a task that word counts can solve."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from data.errors import UserError
from tools.bow_baseline import bow_baseline
from tools.build_word_order_task import build_word_order_task, sentences, swappable

NOUNS = ["river", "garden", "window", "letter", "market", "engine", "forest", "castle", "doctor", "teacher"]
VERBS = ["watched", "opened", "carried", "painted", "followed", "visited", "repaired", "described"]
ADJS = ["old", "quiet", "bright", "narrow", "famous", "broken", "distant", "gentle"]


def _corpus(path, documents: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(documents):
        said = []
        for _ in range(3):
            words = ["The", rng.choice(ADJS), rng.choice(NOUNS), rng.choice(VERBS), "the", rng.choice(ADJS),
                     rng.choice(NOUNS), "near", "the", rng.choice(NOUNS) + "."]
            said.append(" ".join(words))
        said.append("x = f(3) + g[4]; return x")  # code: never a sentence of the task
        lines.append(json.dumps({"text": " ".join(said)}) + "\n")
    path.write_text("".join(lines))
    return path


def _rows(path):
    return [line.split("\t") for line in path.read_text().splitlines()[1:]]


def test_sentences_and_swap_positions():
    text = "The old river watched the quiet garden near the castle. Then x = f(3) + g[4]; return x. Short one."
    found = list(sentences(text, min_words=8, max_words=30))
    assert found == [["The", "old", "river", "watched", "the", "quiet", "garden", "near", "the", "castle."]]
    spots = swappable(found[0])
    assert 0 not in spots and 8 not in spots  # never the first word; "castle." has punctuation
    assert all(found[0][j].lower() != found[0][j + 1].lower() for j in spots) and 1 in spots


def test_word_order_task_is_balanced_split_by_document_and_swaps_two_adjacent_words(tmp_path):
    corpus = _corpus(tmp_path / "c.jsonl", 400)
    summary = build_word_order_task(corpus, tmp_path / "task", train_size=300, validation_size=100,
                                    per_document=2)
    assert summary == {"documents": 400, "train": 300, "validation": 100}
    originals = {" ".join(s) for line in corpus.read_text().splitlines()
                 for s in sentences(json.loads(line)["text"], 8, 30)}
    seen = {}
    for side in ("train", "validation"):
        rows = _rows(tmp_path / "task" / f"{side}.tsv")
        assert Counter(label for _, label in rows) == {"original": len(rows) // 2, "swapped": len(rows) // 2}
        for text, label in rows:
            if label == "original":
                assert text in originals
            else:  # exactly one adjacent pair inverted, giving a sentence of the corpus back
                words = text.split(" ")
                back = [j for j in range(len(words) - 1)
                        if " ".join(words[:j] + [words[j + 1], words[j]] + words[j + 2:]) in originals]
                assert back and text not in originals and 0 not in back
                assert Counter(words) == Counter(" ".join(words[:back[0]] + [words[back[0] + 1], words[back[0]]]
                                                          + words[back[0] + 2:]).split(" "))
            seen.setdefault(text, set()).add(side)
    assert all(len(sides) == 1 for sides in seen.values())
    again = build_word_order_task(corpus, tmp_path / "again", train_size=300, validation_size=100, per_document=2)
    assert again == summary and (tmp_path / "again" / "train.tsv").read_text() == (
        tmp_path / "task" / "train.tsv").read_text()  # deterministic


def test_word_order_task_bad_input(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_word_order_task(tmp_path / "none.jsonl", tmp_path / "t")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not a JSON line"):
        build_word_order_task(bad, tmp_path / "t")
    with pytest.raises(UserError, match="only .* usable sentences for train"):
        build_word_order_task(_corpus(tmp_path / "small.jsonl", 10), tmp_path / "t", train_size=500)
    assert not (tmp_path / "t" / "train.tsv").exists()


def test_bag_of_words_is_at_chance_on_word_order_and_solves_a_topic_task(tmp_path):
    corpus = _corpus(tmp_path / "c.jsonl", 1200, seed=1)
    build_word_order_task(corpus, tmp_path / "order", train_size=1000, validation_size=400, per_document=2)
    order = bow_baseline(tmp_path / "order" / "train.tsv", tmp_path / "order" / "validation.tsv")
    assert order["chance"] == 0.5 and abs(order["accuracy"] - 0.5) < 0.08  # 400 examples: std of chance 0.025
    rng = np.random.default_rng(2)
    topics = {"rivers": NOUNS[:5], "people": NOUNS[5:]}
    for side, n in (("train", 200), ("validation", 100)):
        rows = ["sentence\tlabel\n"] + [f"the {' '.join(rng.choice(topics[t], 4))} {' '.join(rng.choice(ADJS, 3))}"
                                        f"\t{t}\n" for t in rng.choice(sorted(topics), n)]
        (tmp_path / f"{side}.tsv").write_text("".join(rows))
    topic = bow_baseline(tmp_path / "train.tsv", tmp_path / "validation.tsv")
    assert topic["accuracy"] > 0.95  # the same baseline can learn: its chance level above is the task's


def test_compare_finetune_says_whether_the_gap_beats_the_spread(tmp_path):
    from tools.compare_finetune import comparison, read_summary

    pre = {"metric": "accuracy", "mean": 0.605, "std": 0.011, "values": [0.596, 0.601, 0.617]}
    rand = {"metric": "accuracy", "mean": 0.503, "std": 0.003, "values": [0.5, 0.506, 0.504]}
    paid = comparison(pre, rand, "word order")
    assert paid["pays"] and paid["gap"] == pytest.approx(0.102)
    assert paid["line"] == ("word order: pretrained 0.6050 +- 0.0110 vs random init 0.5030 +- 0.0030 "
                            "(accuracy, 3 seeds each): +0.1020")
    close = comparison({**pre, "mean": 0.52, "std": 0.03}, {**rand, "std": 0.013})
    assert not close["pays"] and "within the seeds' spread" in close["verdict"]
    hurt = comparison({**pre, "mean": 0.40, "std": 0.01}, rand)
    assert not hurt["pays"] and "hurt" in hurt["verdict"]
    with pytest.raises(UserError, match="different metrics"):
        comparison(pre, {**rand, "metric": "mcc"})
    with pytest.raises(UserError, match="summary.json does not exist"):
        read_summary(tmp_path)
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(UserError, match="not a fine-tuning summary"):
        read_summary(tmp_path)
