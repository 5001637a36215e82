"""The papers' ablations on your own data, one command per study.

    python tools/ablate.py STUDY --out DIR [--scale tiny|small] [--corpus JSONL] [--data DIR]
                           [key=value ...] [ARM:key=value ...]

STUDY is one of (arms; the paper whose table it checks):

    input-formats      segment_pair+nsp, sentence_pair+nsp, full_sentences, doc_sentences (RoBERTa Table 2)
    static-masking     static x10 vs dynamic masking (RoBERTa Table 1)
    rtd-vs-mlm         ELECTRA vs an MLM model of the discriminator's shape, at equal FLOPs (ELECTRA 3.2)
    embedding-sharing  none / ES / GDES, with the embedding-similarity diagnostic (DeBERTaV3 Table 2)
    generator-size     generator 1/4, 1/2, 1 of the discriminator, at equal FLOPs (ELECTRA Figure 3)
    schedule           joint vs two-stage training (ELECTRA Figure 3)
    weight-sharing     none / embeddings / all, same-size towers (ELECTRA 3.2)

Each arm is pretrained (DeepSpeed, `--scale small`: 2 local ranks; `tiny`: one process, a CI-sized
smoke run) on the same corpus with the same tokens (token-budget steps, so packings with short samples
see as many tokens), and where arms differ in size with the same estimated FLOPs (trainer/core/flops.py: the
reference is the first arm, the others get steps in proportion); the budget is printed. Then each arm's
last checkpoint is converted to a native file, probed (a linear probe on frozen mean-pooled features,
tools/probe_model.py, beside the same architecture with random weights) and fine-tuned over 3 seeds on
the word-order task (tools/build_word_order_task.py: needs context, word counts cannot solve it),
and each architecture of the study is fine-tuned from random weights over the same seeds.

Writes DIR/results.md (arm, steps, tokens, FLOPs, pretraining losses, RTD AUC or MLM accuracy, probe,
fine-tuned accuracy mean +- std and per seed, the random-init rows, the paper's finding),
DIR/results.json, DIR/loss.png (training loss against tokens or FLOPs) and DIR/downstream.png; they are
rewritten after every finished arm. DIR/arms/ (runs, native files, fine-tuning) and DIR/data/ are large
and excluded from git by DIR/.gitignore. Running the same command again resumes: finished arms are
skipped, an unfinished pretraining continues from its last checkpoint, an unfinished fine-tuning from
its finished seeds. A DIR made by another study, scale, set of overrides or version of this tool is
refused, not mixed.

Data: --corpus (JSONL, one {"text": ...} per line; default: the embedded docstring corpus, built on first
use) is tokenized (byte-level BPE for roberta/electra, SentencePiece for deberta_v3) and preprocessed into
--data (default DIR/data; `--data demo` reuses `make demo`'s), with static masks (x10) where the study
needs them, and the word-order task is built from it.

Overrides: `key=value` applies to every arm's pretraining config (trainer/pretraining/config.py keys); `ARM:key=value`
to one arm. Keys a study varies between its arms cannot be overridden for all arms, and keys that set an
arm's compute (steps, batch, tokens, sequence length, model size) cannot be overridden for one arm:
both are refused naming the key.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data.errors import UserError  # noqa: E402
from tools.ablation_studies import (COMPUTE_KEYS, RANDOM_INIT, RECIPES, SCALES, SEEDS, STATIC_COPIES,  # noqa: E402
                                    STUDIES, TOKENIZER_OF, VERSION, Arm, Scale, Study)
from tools.ablation_report import human, write_outputs  # noqa: E402
from trainer.core.metrics import read_metrics  # noqa: E402


# ----------------------------------------------------------------------------------- configs
def deep_merge(base: Dict, extra: Dict) -> Dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _covers(prefix: str, key: str) -> bool:
    return key == prefix or key.startswith(prefix + ".") or prefix.startswith(key + ".")


def split_overrides(study: Study, overrides: Sequence[str]) -> Tuple[List[str], Dict[str, List[str]]]:
    """(overrides for all arms, {arm: its own overrides}); refuses what would unbalance the study."""
    names = [a.name for a in study.arms]
    common, per_arm = [], {n: [] for n in names}
    for text in overrides:
        if "=" not in text:
            raise UserError(f"override {text!r} is not key=value (or ARM:key=value)")
        key = text.split("=", 1)[0]
        arm = None
        if ":" in key:
            arm, key = key.split(":", 1)
            if arm not in per_arm:
                raise UserError(f"override {text!r}: {study.name} has no arm {arm!r}; its arms: {', '.join(names)}")
        if key.startswith("run."):
            raise UserError(f"override {key} is set by this tool (each arm's run lives in --out DIR); drop it")
        if arm is None:
            for varied in study.varies:
                if _covers(varied, key):
                    raise UserError(f"override {key}: {study.name} varies {varied} between its arms; an override "
                                    f"for all arms would erase the comparison (use ARM:{key}=... for one arm)")
            common.append(text)
        else:
            for compute in COMPUTE_KEYS:
                if _covers(compute, key):
                    raise UserError(f"override {arm}:{key} would make the arms unequal in compute ({compute} "
                                    f"sets an arm's tokens or FLOPs); set it for all arms, without {arm}:")
            per_arm[arm].append(f"{key}={text.split('=', 1)[1]}")
    return common, per_arm


def scale_settings(scale: Scale, steps: int, run_dir: Path, name: str, data: "DataFiles", model: str) -> Dict:
    """The scale's lengths, steps, batches, logging and checkpoints, and where the arm's run lives."""
    prefix = data.static_prefix(model) if data.static else data.prefix(model)
    return {
        "run": {"dir": str(run_dir), "name": name},
        "data": {"prefix": str(prefix), "seq_length": scale.seq_length, "valid_fraction": 0.02},
        "train": {"steps": steps, "micro_batch_size": scale.micro_batch,
                  "global_batch_size": scale.micro_batch * scale.ranks,
                  "tokens_per_step": scale.samples_per_step * scale.seq_length, "seed": 1234},
        "optim": {"warmup_steps": max(1, steps // 10)},
        "zero": {"stage": 1 if scale.ranks > 1 else 0},
        "precision": "fp32",
        "checkpoint": {"every_steps": max(1, steps // 4), "keep_last": 1},
        "log": {"every_steps": scale.log_every},
        "eval": {"every_steps": max(1, steps // 4), "samples": scale.eval_samples},
    }


def arm_config(study: Study, arm: Arm, scale: Scale, steps: int, run_dir: Path, data: "DataFiles",
               common: Sequence[str], own: Sequence[str]) -> Dict:
    from trainer.core.config import apply_overrides

    config = deep_merge(RECIPES[arm.model], scale_settings(scale, steps, run_dir, "run", data, arm.model))
    config = deep_merge(config, arm.settings)
    return apply_overrides(config, list(common) + list(own))


def matched_steps(study: Study, base_steps: int, flops: Dict[str, float]) -> Dict[str, int]:
    """Steps of each arm for the FLOPs of the first arm's `base_steps` (equal tokens per step)."""
    reference = flops[study.arms[0].name] * base_steps
    return {a.name: max(1, round(reference / flops[a.name])) for a in study.arms}


def checked_config(path: Path):
    from trainer.pretraining.config import load_config

    return load_config(str(path))


def flops_per_token(config_path: Path, vocab_size: int) -> float:
    """trainer/core/flops.py's estimate for the arm's model at its sequence length and masking rate."""
    from models.registry import build_config
    from trainer.core.flops import training_flops_per_token

    cfg = checked_config(config_path)
    model = build_config(cfg.model.name, cfg.model.size, vocab_size, cfg.data.seq_length,
                         vocab_pad_multiple=cfg.model.vocab_pad_multiple, **cfg.model.overrides)
    return training_flops_per_token(model, cfg.data.seq_length, cfg.data.mask_prob)


# ----------------------------------------------------------------------------------- data
class DataFiles:
    """The study's corpus, tokenizers, indexed datasets and word-order task (built when missing)."""

    def __init__(self, root: Path, corpus: Optional[Path], scale: Scale, static: bool):
        self.root, self.scale, self.static = root, scale, static
        self.corpus = corpus or root / "corpus" / "demo.jsonl"
        self.task = root / f"word_order_{scale.task_train}"

    def tokenizer(self, model: str) -> Path:
        return self.root / ("tok" if TOKENIZER_OF[model] == "bpe" else "spm")

    def prefix(self, model: str) -> Path:
        return self.root / "bin" / ("corpus" if TOKENIZER_OF[model] == "bpe" else "spm_corpus")

    def static_prefix(self, model: str) -> Path:
        return Path(f"{self.prefix(model)}_static{STATIC_COPIES}")

    def build(self, models: Sequence[str], log: Path) -> None:
        py = [sys.executable]
        if not self.corpus.is_file():
            if self.corpus != self.root / "corpus" / "demo.jsonl":
                raise UserError(f"--corpus {self.corpus} does not exist")
            _step(f"building the embedded corpus ({self.scale.corpus_mb} MB of docstrings)")
            _tool(py + [ROOT / "tools/build_demo_corpus.py", "--output", self.corpus,
                        "--max-mb", self.scale.corpus_mb], log)
        for model in models:
            kind, tok = TOKENIZER_OF[model], self.tokenizer(model)
            if not (tok / "tokenizer_meta.json").is_file():
                _step(f"training a {kind} tokenizer")
                _tool(py + [ROOT / "tools/train_tokenizer.py", "--input", self.corpus, "--type", kind,
                            "--vocab-size", self.scale.vocab_size, "--output", tok], log)
            prefix = self.prefix(model)
            if not Path(f"{prefix}.idx").is_file():
                _step(f"preprocessing into {prefix}")
                _tool(py + [ROOT / "tools/preprocess_data.py", "--input", self.corpus, "--tokenizer", tok,
                            "--output-prefix", prefix, "--workers", "2"], log)
            if self.static:
                recipe = RECIPES[model].get("data", {})
                static = self.static_prefix(model)
                if not Path(f"{static}.static_masks.idx").is_file():
                    _step(f"preprocessing with {STATIC_COPIES} static masks into {static}")
                    _tool(py + [ROOT / "tools/preprocess_data.py", "--input", self.corpus, "--tokenizer", tok,
                                "--output-prefix", static, "--workers", "2", "--static-masks", STATIC_COPIES,
                                "--mask-prob", 0.15, "--mask-token-prob", recipe.get("mask_token_prob", 0.8),
                                "--random-token-prob", recipe.get("random_token_prob", 0.1)], log)
        if not (self.task / "validation.tsv").is_file():
            _step("building the word-order task")
            _tool(py + [ROOT / "tools/build_word_order_task.py", "--corpus", self.corpus, "--output", self.task,
                        "--train-size", self.scale.task_train, "--validation-size", self.scale.task_validation], log)


def _step(text: str) -> None:
    print(f"==> {text}", flush=True)


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def _tool(cmd: Sequence, log: Path, what: Optional[str] = None) -> None:
    """Runs cmd with its output appended to log; a failure names the log's last line."""
    cmd = [str(c) for c in cmd]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(("$ " + " ".join(cmd) + "\n").encode())
        out.flush()
        status = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT).returncode
    if status != 0:
        lines = [l for l in log.read_text(errors="replace").splitlines() if l.strip()]
        errors = [l for l in lines if l.startswith("error:")]
        tail = (errors or lines or ["(no output)"])[-1].strip()
        message = f"{what or Path(cmd[1]).name} exited with status {status}: {tail} (log: {log})"
        if status == 2:
            raise UserError(message)
        raise RuntimeError(message + ("; run the same command again to continue" if status == 75 else ""))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------- one arm
def pretrain(config_path: Path, run: Path, ranks: int, log: Path) -> None:
    if ranks > 1:
        launcher = Path(sys.executable).parent / "deepspeed"
        cmd = [launcher if launcher.exists() else "deepspeed", "--num_gpus", ranks, "--master_port", _free_port(),
               "--module", "trainer.pretrain", "--config", config_path]
    else:
        cmd = [sys.executable, "-m", "trainer.pretrain", "--config", config_path]
    _tool(cmd, log, what=f"pretraining {run}")


def last_checkpoint(run: Path, steps: int) -> Optional[Path]:
    """The committed checkpoint of the last step, or None when the run has not finished."""
    from trainer.core.checkpoint import committed

    return next((c.path for c in reversed(committed(run / "checkpoints")) if c.step == steps), None)


def last_value(records: List[Dict], key: str) -> Optional[float]:
    values = [r[key] for r in records if key in r and r[key] is not None]
    return float(values[-1]) if values else None


def run_arm(study: Study, arm: Arm, config_path: Path, steps: int, flops: float, data: DataFiles,
            scale: Scale, arm_dir: Path) -> Dict:
    from tools.crossover import convert, finetune
    from tools.probe_model import probe_model

    began = time.perf_counter()
    run = arm_dir / "run"
    if last_checkpoint(run, steps) is None:
        _step(f"{study.name} / {arm.name}: pretraining {steps} steps ({arm.model})")
        pretrain(config_path, run, scale.ranks, arm_dir / "pretrain.log")
    tag = last_checkpoint(run, steps)
    if tag is None:
        raise RuntimeError(f"pretraining of {arm.name} ended without a checkpoint of step {steps} in {run}")
    native = arm_dir / "native"
    meta = convert(tag, native)
    records = read_metrics(run)
    _step(f"{study.name} / {arm.name}: probe and fine-tuning ({len(SEEDS)} seeds)")
    probe = probe_model(native / "model.pt", data.task / "train.tsv", data.task / "validation.tsv", max_length=64,
                        poolings=("mean",), seeds=SEEDS, max_examples=scale.probe_examples)
    tuned = finetune(str(ROOT / "configs/finetune/word_order.yaml"), native / "model.pt", arm_dir / "finetune",
                     "word_order", list(SEEDS), finetune_overrides(data, scale))
    result = {
        "arm": arm.name, "model": arm.model, "steps": steps, "flops_per_token": flops,
        "tokens": meta.get("consumed_tokens") or last_value(records, "consumed_tokens"),
        "train_loss": last_value(records, "loss"), "valid_loss": last_value(records, "valid_loss"),
        "valid_rtd_auc": last_value(records, "valid_rtd_auc"),
        "valid_mlm_accuracy": last_value(records, "valid_mlm_accuracy"),
        "valid_context_free_accuracy": last_value(records, "valid_context_free_accuracy"),
        "valid_generator_accuracy": last_value(records, "valid_generator_accuracy"),
        "valid_nsp_accuracy": last_value(records, "valid_nsp_accuracy"),
        "probe": probe["mean"]["pretrained"]["accuracy"],
        "probe_random": [r["accuracy"] for r in probe["mean"]["random_init"]],
        "finetune": tuned, "seconds": time.perf_counter() - began,
    }
    if arm.model in ("electra", "deberta_v3"):
        result["embedding_cosine"] = embedding_similarity(run / "checkpoints", tag.name)
    result["tokens"] = int(result["tokens"]) if result["tokens"] is not None else None
    return result


def finetune_overrides(data: DataFiles, scale: Scale) -> List[str]:
    return [f"data.train={data.task / 'train.tsv'}", f"data.validation={data.task / 'validation.tsv'}",
            f"train.epochs={scale.finetune_epochs}"]


def embedding_similarity(checkpoints: Path, tag: str) -> Optional[Dict[str, float]]:
    """DeBERTaV3's diagnostic (tools/embedding_stats.py): average cosine of each tower's word table."""
    from tools.embedding_stats import embedding_stats, load_module_state

    try:
        module, model_config = load_module_state(checkpoints, tag)
        stats = embedding_stats(module, model_config)
    except UserError as err:  # e.g. a checkpoint layout it does not read: the row says so
        return {"error": str(err)}
    return {"generator": stats["generator_avg_cosine"], "discriminator": stats["discriminator_avg_cosine"]}


def random_init_row(model: str, native: Path, data: DataFiles, scale: Scale, work: Path) -> Dict:
    from tools.crossover import finetune

    tuned = finetune(str(ROOT / "configs/finetune/word_order.yaml"), native, work / model, "word_order",
                     list(SEEDS), finetune_overrides(data, scale), random_init=True)
    return {"model": model, "finetune": tuned}


# ----------------------------------------------------------------------------------- outputs
def identity(study: Study, scale: str, overrides: Sequence[str], corpus: Optional[Path]) -> Dict:
    return {"study": study.name, "version": VERSION, "scale": scale, "overrides": list(overrides),
            "corpus": str(corpus) if corpus else "embedded"}


def claim_directory(out: Path, ident: Dict) -> None:
    """Writes DIR/study.json, or refuses a DIR that holds another study (or version, scale, overrides)."""
    from trainer.core.metrics import write_atomic

    path = out / "study.json"
    if path.is_file():
        try:
            held = json.loads(path.read_text())
        except ValueError:
            raise UserError(f"{path} is not valid JSON; remove it or use another --out") from None
        if held != ident:
            differ = next(k for k in sorted(set(held) | set(ident)) if held.get(k) != ident.get(k))
            raise UserError(f"--out {out} holds another study ({differ}: {held.get(differ)!r} there, "
                            f"{ident.get(differ)!r} now); use another --out or remove it")
        return
    if out.exists() and any(p.name not in (".gitignore",) for p in out.iterdir()):
        raise UserError(f"--out {out} is not empty and holds no study.json; use an empty or new directory")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(ident, indent=1) + "\n")
    (out / ".gitignore").write_text("arms/\ndata/\ndata.log\n")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help=f"one of: {', '.join(STUDIES)}")
    p.add_argument("--out", required=True, help="the study's directory (results.md, plots; arms/ and data/ inside)")
    p.add_argument("--scale", default="small", help=f"one of: {', '.join(SCALES)} (default: small)")
    p.add_argument("--corpus", default=None, help="JSONL corpus (default: the embedded docstring corpus)")
    p.add_argument("--data", default=None, help="where tokenizers, indexed datasets and the task are built "
                   "(default: DIR/data; `demo` reuses make demo's)")
    p.add_argument("overrides", nargs="*", help="key=value for every arm's pretraining, ARM:key=value for one")
    return p.parse_intermixed_args(argv)  # overrides before or after the options


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.study not in STUDIES:
        raise UserError(f"unknown study {args.study!r}; the studies: {', '.join(STUDIES)}")
    if args.scale not in SCALES:
        raise UserError(f"--scale {args.scale!r} is not one of {', '.join(SCALES)}")
    study, scale = STUDIES[args.study], SCALES[args.scale]
    out = Path(args.out).resolve()
    corpus = Path(args.corpus).resolve() if args.corpus else None
    if corpus is not None and not corpus.is_file():
        raise UserError(f"--corpus {args.corpus} does not exist")
    common, per_arm = split_overrides(study, args.overrides)
    claim_directory(out, identity(study, args.scale, args.overrides, corpus))
    started = time.perf_counter()
    data = DataFiles(Path(args.data).resolve() if args.data else out / "data", corpus, scale, study.static_masks)
    data.build(study.models, out / "data.log")

    # every arm's config first: a bad override fails before any training
    import yaml

    from data.tokenizer import load_tokenizer

    arms_dir = out / "arms"
    vocab = {m: load_tokenizer(data.tokenizer(m)).vocab_size for m in study.models}
    steps = {a.name: scale.steps for a in study.arms}
    flops: Dict[str, float] = {}
    for attempt in range(2):  # the second pass writes the FLOP-matched steps
        for arm in study.arms:
            arm_dir = arms_dir / arm.name.replace("/", "_")
            config = arm_config(study, arm, scale, steps[arm.name], arm_dir, data, common, per_arm[arm.name])
            path = arm_dir / "pretrain.yaml"
            arm_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            checked_config(path)
            flops[arm.name] = flops_per_token(path, vocab[arm.model])
        if not study.equal_flops or attempt:
            break
        base = checked_config(arms_dir / study.arms[0].name.replace("/", "_") / "pretrain.yaml").train.steps
        steps = matched_steps(study, base, flops)
    tokens = scale.samples_per_step * scale.seq_length
    corpus_tokens = json.loads(Path(f"{data.prefix(study.arms[0].model)}.json").read_text()).get("tokens")
    epochs = (f"; the corpus holds {human(corpus_tokens)} tokens: {steps[study.arms[0].name] * tokens / corpus_tokens:.2f} "
              f"epochs for {study.arms[0].name}" if corpus_tokens else "")
    budget = (f"{tokens} tokens per step; " + ", ".join(
        f"{a.name}: {steps[a.name]} steps = {human(steps[a.name] * tokens)} tokens x "
        f"{human(flops[a.name])} FLOPs/token = {human(steps[a.name] * tokens * flops[a.name])} FLOPs"
        for a in study.arms) + (" (equal FLOPs)" if study.equal_flops else " (equal tokens)") + epochs)
    print(f"ablate {study.name} ({args.scale}): budget {budget}", flush=True)

    result = {**identity(study, args.scale, args.overrides, corpus), "budget": budget, "flops": flops,
              "arm_order": [a.name for a in study.arms], "arms": {}, "random_init": {}}
    held = out / "results.json"
    if held.is_file():
        try:
            previous = json.loads(held.read_text())
            result["arms"] = {k: v for k, v in previous.get("arms", {}).items() if k in steps}
            result["random_init"] = previous.get("random_init", {})
            result["seconds"] = previous.get("seconds", 0.0)
        except ValueError:
            pass
    spent = result.get("seconds", 0.0)
    runs = {a.name: arms_dir / a.name.replace("/", "_") / "run" for a in study.arms}
    for arm in study.arms:
        if arm.name in result["arms"] and result["arms"][arm.name]["steps"] == steps[arm.name]:
            print(f"{arm.name}: done before ({result['arms'][arm.name]['finetune']['mean']:.4f})", flush=True)
            continue
        arm_dir = arms_dir / arm.name.replace("/", "_")
        row = run_arm(study, arm, arm_dir / "pretrain.yaml", steps[arm.name], flops[arm.name], data, scale, arm_dir)
        result["arms"][arm.name] = row
        ft = row["finetune"]
        print(f"{arm.name}: word order {ft['mean']:.4f} +- {ft['std']:.4f}, probe {row['probe']:.3f} "
              f"({row['seconds']:.0f} s)", flush=True)
        if arm.model not in result["random_init"]:
            _step(f"{study.name}: fine-tuning a random-init {arm.model} ({len(SEEDS)} seeds)")
            result["random_init"][arm.model] = random_init_row(arm.model, arm_dir / "native" / "model.pt", data,
                                                               scale, out / "arms" / RANDOM_INIT)
        result["seconds"] = spent + time.perf_counter() - started
        write_outputs(result, out, runs)
    result["seconds"] = spent + time.perf_counter() - started
    write_outputs(result, out, runs)
    print(f"ablate {study.name}: wrote {out / 'results.md'}, results.json, loss.png, downstream.png "
          f"({result['seconds'] / 60:.1f} min)", flush=True)
    return 0


if __name__ == "__main__":
    from trainer.core.cli import run_cli

    run_cli(main)
