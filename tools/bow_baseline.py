"""Bag-of-words baseline for a classification task: logistic regression on token counts.

    python tools/bow_baseline.py --train demo/word_order/train.tsv --validation demo/word_order/validation.tsv \
        [--tokenizer demo/spm]

What a model that ignores word order scores on the task (scikit-learn's CountVectorizer and
LogisticRegression; counts of the tokenizer's tokens with --tokenizer, of whitespace-separated
lower-cased words without). Printed beside the fine-tuned models: a task that it solves can be
solved from word counts, so it cannot show what pretraining added; on a task that needs context
it stays near chance (the majority class's share, printed too).
"""
import argparse
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from data.errors import UserError
from data.tasks import TaskFormat, label_ids, label_names, read_examples
from trainer.core.cli import run_cli


def _documents(examples, tokenizer) -> List[str]:
    texts = [" ".join(e.texts) for e in examples]
    if tokenizer is None:
        return [t.lower() for t in texts]
    return [" ".join(map(str, ids)) for ids in tokenizer.encode_batch(texts)]  # token ids as "words"


def bow_baseline(train: str | Path, validation: str | Path, tokenizer_dir: Optional[str | Path] = None,
                 task: Optional[TaskFormat] = None, c: float = 1.0) -> Dict[str, float]:
    """{"accuracy": validation accuracy, "chance": the majority class's share of validation, ...}."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    task = task or TaskFormat()
    if task.kind != "classification":
        raise UserError("the bag-of-words baseline is for classification tasks")
    tokenizer = None
    if tokenizer_dir is not None:
        from data.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(tokenizer_dir)
    train_ex, valid_ex = read_examples(train, task), read_examples(validation, task)
    names = label_names(train_ex, task)
    if len(names) < 2:
        raise UserError(f"{train}: only one class ({', '.join(names)}); a classifier needs two or more")
    y_train, y_valid = label_ids(train_ex, task, names), label_ids(valid_ex, task, names)
    vectorizer = CountVectorizer(token_pattern=r"\S+", lowercase=False)
    x_train = vectorizer.fit_transform(_documents(train_ex, tokenizer))
    x_valid = vectorizer.transform(_documents(valid_ex, tokenizer))
    model = LogisticRegression(C=c, max_iter=2000).fit(x_train, y_train)
    return {"accuracy": float((model.predict(x_valid) == y_valid).mean()),
            "train_accuracy": float((model.predict(x_train) == y_train).mean()),
            "chance": float(np.bincount(y_valid).max() / len(y_valid)),
            "features": int(x_train.shape[1])}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True, help="training file (.tsv/.csv/.jsonl, GLUE column names)")
    parser.add_argument("--validation", required=True, help="validation file, same layout")
    parser.add_argument("--tokenizer", help="count this tokenizer's tokens (default: lower-cased words)")
    parser.add_argument("--c", type=float, default=1.0, help="inverse L2 strength of the regression; default 1")
    args = parser.parse_args(argv)
    for path in (args.train, args.validation):
        if not Path(path).is_file():
            raise UserError(f"{path} does not exist")
    r = bow_baseline(args.train, args.validation, args.tokenizer, c=args.c)
    unit = "token" if args.tokenizer else "word"
    print(f"bag-of-words baseline (logistic regression on {unit} counts, scikit-learn): validation accuracy "
          f"{r['accuracy']:.4f} (chance {r['chance']:.4f}; train accuracy {r['train_accuracy']:.4f})")
    return 0


if __name__ == "__main__":
    run_cli(main)
