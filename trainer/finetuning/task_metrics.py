"""GLUE's evaluation metrics, in numpy: accuracy, F1, Matthews correlation, Pearson and Spearman.

Small GLUE tasks are scored by different metrics (CoLA: Matthews correlation; MRPC, QQP: F1 and
accuracy; STS-B: Pearson and Spearman), so a fine-tuning run reports all that apply to its task
kind. The conventions follow scikit-learn and scipy: a degenerate case (a constant prediction, no
positive class) scores 0 rather than NaN, so "the best checkpoint" stays well defined.
"""
from __future__ import annotations

from typing import Dict

import numpy as np


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(predictions) == np.asarray(labels))) if len(labels) else 0.0


def f1(predictions: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    """F1 of the positive class (GLUE's binary F1 for MRPC and QQP)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    tp = float(np.sum((predictions == positive) & (labels == positive)))
    predicted, actual = float(np.sum(predictions == positive)), float(np.sum(labels == positive))
    return 2 * tp / (predicted + actual) if predicted + actual else 0.0


def matthews_corrcoef(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation, multi-class (Gorodkin's R_K), equal to the binary formula for 2 classes:
    (c*s - sum_k p_k*t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)), c correct, s samples,
    p_k predicted and t_k true counts of class k."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    classes = np.union1d(predictions, labels)
    p = np.array([np.sum(predictions == k) for k in classes], dtype=np.float64)
    t = np.array([np.sum(labels == k) for k in classes], dtype=np.float64)
    s, c = float(len(labels)), float(np.sum(predictions == labels))
    denominator = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - p @ t) / denominator) if denominator > 0 else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    denominator = np.sqrt((dx @ dx) * (dy @ dy))
    return float(dx @ dy / denominator) if denominator > 0 else 0.0


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of their ranks (scipy.stats.rankdata's default)."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = (start + 1 + end) / 2.0  # mean of ranks start+1 .. end
            start = end
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(average_ranks(x), average_ranks(y))


def task_metrics(kind: str, num_labels: int, logits: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
    """Every metric that applies: classification -> accuracy, mcc (+ f1 with two labels);
    regression -> pearson, spearman and their mean (GLUE's STS-B score), mse."""
    if kind == "regression":
        scores = np.asarray(logits, dtype=np.float64).reshape(-1)
        out = {"pearson": pearson(scores, labels), "spearman": spearman(scores, labels),
               "mse": float(np.mean((scores - np.asarray(labels)) ** 2)) if len(labels) else 0.0}
        out["pearson_spearman"] = (out["pearson"] + out["spearman"]) / 2
        return out
    predictions = np.asarray(logits).argmax(axis=-1)
    out = {"accuracy": accuracy(predictions, labels), "mcc": matthews_corrcoef(predictions, labels)}
    if num_labels == 2:
        out["f1"] = f1(predictions, labels)
    return out
