"""Where pretraining starts to pay: fine-tuned accuracy against pretraining tokens, beside random init.

    python tools/crossover.py --run runs/deberta_v3_demo --finetune-config configs/finetune/word_order.yaml \\
        --output docs/crossover [--steps 100,200,...] [--seeds 1,2,3] [--title TEXT] [key=value ...]

For each committed checkpoint of the pretraining run (runs/NAME/checkpoints/global_stepN; all by default,
--steps picks some; taken last, first, then midpoints, so an early stop leaves a usable curve) the checkpoint is converted to a native file (as tools/convert_checkpoint.py --format
native does) and fine-tuned over the seeds (`python -m trainer.finetune --config CFG model.init=NATIVE
train.seeds=[...]`, one process per checkpoint); the same fine-tuning from random weights
(model.random_init=true: same architecture and tokenizer, fresh weights) runs once, first. Trailing key=value
arguments are fine-tuning overrides (e.g. data.train=PATH); model.init, model.random_init, run.dir,
run.name and train.seeds are the tool's.

Writes OUTPUT/crossover.md (the table: step, pretraining tokens, the run's validation diagnostics at that
step where metrics.jsonl has them, fine-tuned metric mean +- std and per-seed values; the random-init row;
the crossover: the first step whose mean - std exceeds random init's mean + std, or "not reached"),
OUTPUT/crossover.json (the numbers) and OUTPUT/crossover.png; these three are rewritten after every finished
fine-tuning. OUTPUT/work/ holds the native files and the fine-tuning runs (logs, best checkpoints of each
seed: it can be large, tens of MB per checkpoint and more for bigger models) and is excluded from git by
OUTPUT/.gitignore: commit the md, json and png. Running the same command again resumes: checkpoints whose
fine-tuning summary.json exists are skipped, and an unfinished fine-tuning continues from its finished seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from data.errors import UserError
from trainer.core.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
DIAGNOSTICS = ("valid_loss_rtd", "valid_rtd_prior_loss", "valid_rtd_auc", "valid_generator_accuracy",
               "valid_mlm_accuracy", "valid_context_free_accuracy", "valid_unigram_accuracy")
RESERVED = ("model.init", "model.random_init", "run.dir", "run.name", "train.seeds")
RANDOM_INIT = "random_init"


# ----------------------------------------------------------------------------- pure arithmetic
def crossover(rows: List[Dict], random_init: Optional[Dict]) -> Optional[int]:
    """The first step (in step order) whose fine-tuned mean - std exceeds random init's mean + std; None
    when no row does (or random init is not known yet). Rows: dicts with step, mean, std."""
    if random_init is None:
        return None
    bar = random_init["mean"] + random_init["std"]
    for row in sorted(rows, key=lambda r: r["step"]):
        if row.get("mean") is not None and row["mean"] - row["std"] > bar:
            return row["step"]
    return None


def nearest_validation(records: List[Dict], step: int) -> Dict:
    """The validation record (one with valid_* keys) nearest to `step` (ties: the earlier), or {}."""
    valid = [r for r in records if "step" in r and any(k.startswith("valid_") for k in r)]
    if not valid:
        return {}
    return min(valid, key=lambda r: (abs(r["step"] - step), r["step"]))


def tokens_at(records: List[Dict], step: int) -> Optional[int]:
    """consumed_tokens of the training record at `step` (the last one at or before it), or None."""
    best = None
    for r in records:
        if "consumed_tokens" in r and "step" in r and r["step"] <= step:
            if best is None or r["step"] >= best["step"]:
                best = r
    return None if best is None else int(best["consumed_tokens"])


def bisection_order(steps: Sequence[int]) -> List[int]:
    """The order to fine-tune checkpoints in: the last, the first, then midpoints (breadth first), so that a
    run stopped early has the ends of the curve and an even spread between them."""
    s = sorted(set(steps))
    out = s[-1:] + s[:1] if len(s) > 1 else list(s)
    spans = [(0, len(s) - 1)]
    while spans:
        lo, hi = spans.pop(0)
        if hi - lo >= 2:
            mid = (lo + hi) // 2
            out.append(s[mid])
            spans += [(lo, mid), (mid, hi)]
    return out


def human(n: Optional[float]) -> str:
    if n is None:
        return "?"
    for unit, scale in (("P", 1e15), ("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def markdown(result: Dict) -> str:
    """crossover.md from crossover.json's dict (see `assemble`)."""
    metric = result.get("metric") or "metric"
    rows, rnd = result["rows"], result.get("random_init")
    diag = [k for k in DIAGNOSTICS if any(k in (r.get("diagnostics") or {}) for r in rows)]
    lines = [f"# {result.get('title') or 'Where pretraining starts to pay'}", ""]
    lines.append(f"Pretraining run `{result.get('run')}`, fine-tuned with `{result.get('finetune_config')}`"
                 f"{' (' + ' '.join(result['overrides']) + ')' if result.get('overrides') else ''}; "
                 f"validation {metric}, best epoch of each seed, mean +- std over seeds "
                 f"{', '.join(str(s) for s in result.get('seeds', []))}.")
    lines.append("")
    head = ["step", "pretraining tokens"] + diag + [f"{metric} mean +- std", "per seed"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))

    def cells(mean, std, values):
        if mean is None:
            return ["pending", ""]
        return [f"{mean:.4f} +- {std:.4f}", ", ".join(f"{v:.4f}" for v in values)]

    for r in sorted(rows, key=lambda r: r["step"]):
        d = r.get("diagnostics") or {}
        dcells = [f"{d[k]:.4f}" if isinstance(d.get(k), (int, float)) else "" for k in diag]
        lines.append("| " + " | ".join([str(r["step"]), human(r.get("tokens"))] + dcells
                                        + cells(r.get("mean"), r.get("std"), r.get("values") or [])) + " |")
    rcells = cells(rnd["mean"], rnd["std"], rnd["values"]) if rnd else ["pending", ""]
    lines.append("| " + " | ".join(["random init", "0"] + [""] * len(diag) + rcells) + " |")
    lines.append("")
    step = result.get("crossover")
    if rnd is None:
        lines.append("**Crossover:** not known yet (the random-init baseline has not finished).")
    elif step is None:
        done = [r for r in rows if r.get("mean") is not None]
        lines.append(f"**Crossover:** not reached: no checkpoint's mean - std exceeds random init's mean + std "
                     f"({rnd['mean'] + rnd['std']:.4f}) over the {len(done)} checkpoint(s) fine-tuned.")
    else:
        row = next(r for r in rows if r["step"] == step)
        lines.append(f"**Crossover:** step {step} ({human(row.get('tokens'))} pretraining tokens): "
                     f"{row['mean']:.4f} - {row['std']:.4f} = {row['mean'] - row['std']:.4f} > random init "
                     f"{rnd['mean']:.4f} + {rnd['std']:.4f} = {rnd['mean'] + rnd['std']:.4f}.")
    if diag:
        lines.append("")
        baselines = [k for k in ("valid_rtd_prior_loss", "valid_context_free_accuracy", "valid_unigram_accuracy")
                     if k in diag]
        lines.append("Diagnostics: the pretraining run's validation record nearest each step (metrics.jsonl)"
                     + (f"; read them beside their baselines ({', '.join(baselines)})." if baselines else
                        "; the run logged no baselines (valid_rtd_prior_loss, valid_context_free_accuracy) to "
                        "read them against."))
    lines.append("")
    lines.append("Made by `tools/crossover.py`; its work directory (native files, fine-tuning runs) is `work/` "
                 "beside this file, large and not committed.")
    return "\n".join(lines) + "\n"


def plot(result: Dict, path: Path) -> Path:
    """crossover.png: mean +- std against pretraining tokens, random init as a band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = result.get("metric") or "metric"
    done = sorted((r for r in result["rows"] if r.get("mean") is not None), key=lambda r: r["step"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rnd = result.get("random_init")
    if rnd is not None:
        ax.axhspan(rnd["mean"] - rnd["std"], rnd["mean"] + rnd["std"], color="tab:gray", alpha=0.25,
                   label="random init mean +- std")
        ax.axhline(rnd["mean"], color="tab:gray", lw=1)
    if done:
        xs = [r["tokens"] if r.get("tokens") is not None else r["step"] for r in done]
        ax.errorbar(xs, [r["mean"] for r in done], yerr=[r["std"] for r in done], marker="o", capsize=4,
                    color="tab:blue", label="pretrained, mean +- std over seeds")
        for x, r in zip(xs, done):
            ax.annotate(f"step {r['step']}", (x, r["mean"]), textcoords="offset points", xytext=(4, 6), fontsize=7)
        step = result.get("crossover")
        if step is not None:
            x = next(x for x, r in zip(xs, done) if r["step"] == step)
            ax.axvline(x, color="tab:red", ls="--", lw=1, label=f"crossover (step {step})")
    ax.set_xlabel("pretraining tokens" if all(r.get("tokens") is not None for r in done) else "pretraining step")
    ax.set_ylabel(f"fine-tuned validation {metric}")
    ax.set_title(result.get("title") or "Where pretraining starts to pay")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def assemble(rows: List[Dict], random_init: Optional[Dict], **info) -> Dict:
    """crossover.json's dict: the rows (step, tokens, diagnostics, mean, std, values), random init, crossover."""
    return {**info, "rows": sorted(rows, key=lambda r: r["step"]), "random_init": random_init,
            "crossover": crossover(rows, random_init)}


def write_outputs(result: Dict, output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / ".gitignore").write_text("work/\n")
    for name, text in (("crossover.json", json.dumps(result, indent=1) + "\n"), ("crossover.md", markdown(result))):
        tmp = output / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, output / name)
    plot(result, output / "crossover.png")


# ----------------------------------------------------------------------------- the launches
def parse_ints(text: Optional[str], flag: str) -> Optional[List[int]]:
    if text is None:
        return None
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"{flag}={text}: give comma-separated integers, e.g. 100,200") from None
    if not values:
        raise UserError(f"{flag} is empty")
    return values


def committed_steps(run: Path) -> Dict[int, Path]:
    """Step -> committed checkpoint (trainer/core/checkpoint.py's finder; the newest commit of a step wins)."""
    from trainer.core.checkpoint import MANIFEST, committed

    folder = run / "checkpoints" if (run / "checkpoints").is_dir() else run
    if not folder.is_dir():
        raise UserError(f"--run {run} is not a directory")
    found = {c.step: c.path for c in committed(folder)}
    if not found:
        raise UserError(f"--run {run} has no committed checkpoint (no checkpoints/global_stepN/{MANIFEST})")
    return dict(sorted(found.items()))


def convert(tag_dir: Path, dest: Path) -> Dict:
    """The checkpoint as a native file in dest/ (skipped when there); its provenance (consumed tokens)."""
    from trainer.convert.export import read_checkpoint, write_native

    info_path = dest / "provenance.json"
    if (dest / "model.pt").is_file() and info_path.is_file():
        return json.loads(info_path.read_text())
    native = read_checkpoint(tag_dir)
    run = tag_dir.parent.parent
    tokenizer = run / "tokenizer" if (run / "tokenizer" / "tokenizer_meta.json").is_file() else None
    write_native(native, dest, tokenizer)
    info_path.write_text(json.dumps(native.meta, indent=1) + "\n")
    return native.meta


def read_summary(path: Path) -> Optional[Dict]:
    try:
        s = json.loads(path.read_text())
        return {"metric": s["metric"], "mean": s["mean"], "std": s["std"], "values": s["values"], "seeds": s["seeds"]}
    except (OSError, ValueError, KeyError):
        return None


def finetune(config: str, native: Path, runs: Path, name: str, seeds: List[int], overrides: List[str],
             random_init: bool = False) -> Dict:
    """One `python -m trainer.finetune` process over all seeds; its summary. Output goes to RUN/finetune.log."""
    summary_path = runs / name / "summary.json"
    done = read_summary(summary_path)
    if done is not None and sorted(done["seeds"]) == sorted(seeds):
        return done
    (runs / name).mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "trainer.finetune", "--config", config, *overrides, f"model.init={native}",
           f"run.dir={runs}", f"run.name={name}", f"train.seeds=[{','.join(str(s) for s in seeds)}]"]
    if random_init:
        cmd.append("model.random_init=true")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    log_path = runs / f"{name}.log"
    with open(log_path, "ab") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        status = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if status != 0:
        tail = [l for l in log_path.read_text(errors="replace").splitlines() if l.strip()][-1:] or ["(no output)"]
        message = f"fine-tuning {name} exited with status {status}: {tail[0].strip()} (log: {log_path})"
        if status == 2:
            raise UserError(message)
        if status == 75:
            raise RuntimeError(f"{message}; run the same command again to continue")
        raise RuntimeError(message)
    summary = read_summary(summary_path)
    if summary is None:
        raise RuntimeError(f"fine-tuning {name} finished without {summary_path} (log: {log_path})")
    return summary


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="the pretraining run directory (runs/NAME)")
    parser.add_argument("--finetune-config", required=True, help="fine-tuning recipe (configs/finetune/*.yaml)")
    parser.add_argument("--output", required=True, help="directory for crossover.md/.json/.png; work/ inside it "
                        "holds native files and fine-tuning runs (large; git-ignored)")
    parser.add_argument("--steps", help="comma-separated checkpoint steps (default: every committed checkpoint)")
    parser.add_argument("--seeds", default="1,2,3", help="fine-tuning seeds (default: 1,2,3)")
    parser.add_argument("--title", default=None, help="title of the table and the plot (default: names the run "
                        "and the task)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value fine-tuning overrides (e.g. data.train=PATH)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    run, output = Path(args.run), Path(args.output)
    seeds = parse_ints(args.seeds, "--seeds")
    wanted = parse_ints(args.steps, "--steps")
    if not Path(args.finetune_config).is_file():
        raise UserError(f"--finetune-config {args.finetune_config} does not exist")
    for o in args.overrides:
        if "=" not in o:
            raise UserError(f"override {o!r} is not key=value")
        if o.split("=", 1)[0] in RESERVED:
            raise UserError(f"override {o.split('=', 1)[0]} is set by this tool ({', '.join(RESERVED)}); drop it")
    from trainer.finetuning.config import load_finetune_config
    probe = load_finetune_config(args.finetune_config, args.overrides + ["model.init=unused"])  # fail early on keys
    metric = probe.best_metric if hasattr(probe, "best_metric") else None
    checkpoints = committed_steps(run)
    if wanted is not None:
        missing = [s for s in wanted if s not in checkpoints]
        if missing:
            raise UserError(f"--run {run} has no committed checkpoint of step(s) {', '.join(map(str, missing))}; "
                            f"steps there: {', '.join(map(str, checkpoints))}")
        checkpoints = {s: checkpoints[s] for s in sorted(set(wanted))}
    records = read_metrics(run)
    work = output / "work"
    runs = (work / "finetune").resolve()
    title = args.title or f"Where pretraining starts to pay: {run.resolve().name}, {Path(args.finetune_config).stem}"
    info = {"title": title, "run": str(run), "finetune_config": args.finetune_config,
            "overrides": list(args.overrides), "seeds": seeds, "metric": metric}
    rows = {s: {"step": s, "tokens": tokens_at(records, s), "diagnostics":
                {k: v for k, v in nearest_validation(records, s).items() if k in DIAGNOSTICS},
                "mean": None, "std": None, "values": None} for s in checkpoints}
    for s, row in rows.items():  # a previous invocation's finished results
        summary = read_summary(runs / f"step{s}" / "summary.json")
        if summary is not None and sorted(summary["seeds"]) == sorted(seeds):
            row.update(mean=summary["mean"], std=summary["std"], values=summary["values"])
    rnd = read_summary(runs / RANDOM_INIT / "summary.json")
    rnd = rnd if rnd is not None and sorted(rnd["seeds"]) == sorted(seeds) else None
    start = time.perf_counter()
    print(f"crossover: {len(checkpoints)} checkpoint(s) of {run} x {len(seeds)} seed(s) + random init; "
          f"work directory {work} (large)", flush=True)

    def report(label: str, summary: Dict, began: float) -> None:
        info["metric"] = summary["metric"]
        print(f"{label}: {summary['metric']} {summary['mean']:.4f} +- {summary['std']:.4f} "
              f"[{', '.join(f'{v:.4f}' for v in summary['values'])}] in {time.perf_counter() - began:.0f} s "
              f"(elapsed {time.perf_counter() - start:.0f} s)", flush=True)
        write_outputs(assemble(list(rows.values()), rnd, **info), output)

    write_outputs(assemble(list(rows.values()), rnd, **info), output)
    order = bisection_order(checkpoints)
    for i, step in enumerate(order):
        began = time.perf_counter()
        native_dir = (work / "native" / f"step{step}").resolve()
        meta = convert(checkpoints[step], native_dir)
        if rows[step]["tokens"] is None and meta.get("consumed_tokens") is not None:
            rows[step]["tokens"] = int(meta["consumed_tokens"])
        if i == 0 and rnd is None:  # the baseline first: every row is read against it (same architecture)
            rnd = finetune(args.finetune_config, native_dir / "model.pt", runs, RANDOM_INIT, seeds, args.overrides,
                           random_init=True)
            report("random init", rnd, began)
            began = time.perf_counter()
        if rows[step]["mean"] is None:
            summary = finetune(args.finetune_config, native_dir / "model.pt", runs, f"step{step}", seeds,
                               args.overrides)
            rows[step].update(mean=summary["mean"], std=summary["std"], values=summary["values"])
            report(f"step {step} ({human(rows[step]['tokens'])} tokens)", summary, began)
        else:
            print(f"step {step}: already fine-tuned ({rows[step]['mean']:.4f} +- {rows[step]['std']:.4f})", flush=True)
    result = assemble(list(rows.values()), rnd, **info)
    write_outputs(result, output)
    step = result["crossover"]
    print(f"crossover: {'step ' + str(step) if step is not None else 'not reached'}; wrote "
          f"{output / 'crossover.md'}, crossover.json, crossover.png in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from trainer.core.cli import run_cli
    run_cli(main)
