"""tools/ablate.py's report of a study: results.md (the table, the random-init rows, the paper's finding),
results.json, loss.png and downstream.png, rewritten after every finished arm."""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

from tools.ablation_studies import SEEDS, STUDIES, VERSION
from trainer.core.metrics import read_metrics


def _fmt(value: Optional[float], digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def human(n: Optional[float]) -> str:
    from tools.crossover import human

    return human(n)


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def markdown(result: Dict) -> str:
    study = STUDIES[result["study"]]
    lines = [f"# Ablation: {study.name}", "",
             f"`python tools/ablate.py {study.name} --scale {result['scale']}"
             f"{' ' + ' '.join(result['overrides']) if result['overrides'] else ''}` (tool version {VERSION}); "
             f"{result.get('seconds', 0) / 60:.1f} min of wall time on this machine (pretraining, probes, fine-tuning).", "",
             f"Budget: {result['budget']}", "",
             "| arm | model | steps | tokens | FLOPs | train loss | valid loss | RTD AUC, last (peak) / MLM acc (context-free) | NSP acc | "
             "probe (mean) | word order mean +- std | per seed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in result["arm_order"]:
        r = result["arms"].get(name)
        if r is None:
            lines.append(f"| {name} | | | | | | | | | | pending | |")
            continue
        quality = r.get("valid_rtd_auc")
        peak = (f" (peak {r['valid_rtd_auc_peak']:.3f} at {r['valid_rtd_auc_peak_step']})"
                if r.get("valid_rtd_auc_peak") is not None else "")
        baseline = r.get("valid_context_free_accuracy")
        baseline = f" ({baseline:.3f})" if baseline is not None else ""
        quality = f"AUC {quality:.3f}{peak}" if quality is not None else (
            f"acc {r['valid_mlm_accuracy']:.3f}{baseline}" if r.get("valid_mlm_accuracy") is not None else "")
        ft = r["finetune"]
        flops = r["flops_per_token"] * r["tokens"] if r.get("tokens") else None
        lines.append(f"| {name} | {r['model']} | {r['steps']} | {human(r['tokens'])} | {human(flops)} | "
                     f"{_fmt(r['train_loss'])} | {_fmt(r['valid_loss'])} | {quality} | "
                     f"{_fmt(r.get('valid_nsp_accuracy'))} | {_fmt(r['probe'])} | "
                     f"{ft['mean']:.4f} +- {ft['std']:.4f} | {', '.join(f'{v:.3f}' for v in ft['values'])} |")
    for model, r in sorted(result["random_init"].items()):
        ft = r["finetune"]
        probes = [p for a in result["arms"].values() if a["model"] == model for p in a["probe_random"]][:len(SEEDS)]
        pm, ps = mean_std(probes) if probes else (None, None)
        probe = f"{pm:.3f} +- {ps:.3f}" if pm is not None else ""
        lines.append(f"| random init ({model}) | {model} | 0 | 0 | 0 | | | | | {probe} | "
                     f"{ft['mean']:.4f} +- {ft['std']:.4f} | {', '.join(f'{v:.3f}' for v in ft['values'])} |")
    cosines = {n: r["embedding_cosine"] for n, r in result["arms"].items() if r.get("embedding_cosine")}
    if cosines:
        lines += ["", "Average cosine similarity of the word embeddings (tools/embedding_stats.py):", "",
                  "| arm | generator | discriminator |", "|---|---|---|"]
        for name, c in cosines.items():
            lines.append(f"| {name} | {_fmt(c.get('generator'))} | {_fmt(c.get('discriminator'))} |"
                         if "error" not in c else f"| {name} | {c['error']} | |")
    lines += ["", "Word order: fine-tuned validation accuracy, best epoch of each seed "
              f"({', '.join(map(str, SEEDS))}); probe: linear probe on frozen mean-pooled features (random init: "
              "mean +- std over the same seeds' fresh weights). Training loss is each objective's own "
              "(RTD: MLM + 50 x RTD), so compare it within a model only.", "", f"Paper: {study.paper}", "",
              "![training loss](loss.png)", "", "![downstream](downstream.png)", ""]
    return "\n".join(lines)


def plot(result: Dict, out: Path, runs: Dict[str, Path]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    study = STUDIES[result["study"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in result["arm_order"]:
        records = [r for r in read_metrics(runs[name]) if "loss" in r and "consumed_tokens" in r]
        if not records:
            continue
        flops = (result["arms"].get(name) or {}).get("flops_per_token") or result["flops"].get(name)
        xs = [r["consumed_tokens"] * (flops if study.equal_flops else 1) for r in records]
        ax.plot(xs, [r["loss"] for r in records], label=name, lw=1.2)
    ax.set_xlabel("estimated training FLOPs" if study.equal_flops else "pretraining tokens")
    ax.set_ylabel("training loss (each objective's own)")
    ax.set_yscale("log")
    ax.set_title(f"{study.name}: pretraining loss")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = [n for n in result["arm_order"] if n in result["arms"]]
    for i, name in enumerate(names):
        ft = result["arms"][name]["finetune"]
        ax.bar(i, ft["mean"], yerr=ft["std"], capsize=5, color="tab:blue", alpha=0.8)
        ax.scatter([i] * len(ft["values"]), ft["values"], color="k", s=10, zorder=3)
    colors = ["tab:gray", "tab:orange"]
    for j, (model, r) in enumerate(sorted(result["random_init"].items())):
        ft = r["finetune"]
        ax.axhspan(ft["mean"] - ft["std"], ft["mean"] + ft["std"], color=colors[j % 2], alpha=0.25,
                   label=f"random init ({model}) mean +- std")
    ax.set_xticks(range(len(names)), names, rotation=15)
    ax.set_ylabel("word order: fine-tuned validation accuracy")
    ax.set_title(f"{study.name}: downstream, mean +- std over {len(SEEDS)} seeds")
    values = [v for n in names for v in result["arms"][n]["finetune"]["values"]] + \
             [v for r in result["random_init"].values() for v in r["finetune"]["values"]]
    if values:
        ax.set_ylim(max(0.0, min(values) - 0.05), min(1.0, max(values) + 0.05))
    ax.grid(alpha=0.3, axis="y")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "downstream.png", dpi=110)
    plt.close(fig)


def add_peak_auc(result: Dict, runs: Dict[str, Path]) -> None:
    """Each RTD arm's highest validation AUC and its step: at small scale the AUC can rise and fall again
    (the generator's samples get harder), so the last value alone says where the run stopped."""
    for name, row in result["arms"].items():
        curve = [(r["valid_rtd_auc"], r["step"]) for r in read_metrics(runs[name]) if "valid_rtd_auc" in r]
        if curve:
            row["valid_rtd_auc_peak"], row["valid_rtd_auc_peak_step"] = max(curve, key=lambda c: (c[0], -c[1]))


def write_outputs(result: Dict, out: Path, runs: Dict[str, Path]) -> None:
    from trainer.core.metrics import write_atomic

    add_peak_auc(result, runs)
    write_atomic(out / "results.json", json.dumps(result, indent=1) + "\n")
    write_atomic(out / "results.md", markdown(result))
    plot(result, out, runs)


# ----------------------------------------------------------------------------------- the study
