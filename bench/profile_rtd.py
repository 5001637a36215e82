"""Where a DeBERTaV3 RTD training step spends its time: torch.profiler self-CPU time per part.

    .venv/bin/python bench/profile_rtd.py --threads 1 [--seq 128,512] [--tokens 1024] [--steps 3]
        [--warmup 2] [--kernel auto|fused|sdpa] [--emd] [--ops N] [--json PATH]

The model, batch and optimizer are bench/train_step.py's `deberta_v3_rtd` "ours" side (registry
`deberta_v3` narrowed to 6 x 256, 4 heads, FFN 1024, generator 3 layers, 32K vocab, GDES, dropout
0.1; full-length rows of random ids, 15% predicted; torch.optim.AdamW). After --warmup steps,
--steps full steps (forward, backward, AdamW step, zero_grad) run under torch.profiler (CPU
activity, no stacks or shapes) and every op's *self* CPU time is attributed to one part:

- forward, by module: bench-side forward pre/post hooks open a `record_function` label around
  each module of interest (nothing in models/ changes); an op belongs to its innermost label;
- c2p / p2c, inside the attention: by source line. A TorchFunctionMode, active only here, labels
  each torch call made from the lines of models/deberta.py and models/disentangled_attention.py
  that compute the c2p / p2c terms (the `if self.content_to_position` / `if pos_key is not None`
  blocks, their p2c twins and one-line conditionals, found by parsing those files, so the split
  follows edits there), in the fused kernel's forward and its hand-written backward alike; the
  2k-table projections (the attention's key / query linears called from those lines) likewise;
- functions outside modules: the generator's MLM loss (`vocab_parallel_cross_entropy`) and the
  replaced-token sampling (`models.rtd.sample_replacements`) are wrapped in labels here;
- backward: each autograd node's work (`autograd::engine::evaluate_function: ...`, children
  included) goes to the part of the forward op that created the node (matched by sequence_nr),
  or to the c2p / p2c label opened inside it; nodes without one (AccumulateGrad) to
  "grad accumulation". The backward pass runs through the autograd engine directly (as
  Tensor.backward does) so that the mode stays on for the kernel's Python backward;
- the AdamW step and zero_grad: "optimizer".

Shares are of the summed self CPU time of the profiled steps, not of wall-clock time: the machine
is shared, and other processes' load does not enter a process's own op times the way it enters
wall-clock. The profiler's per-op overhead (and the labelling's) inflates parts made of many
small ops (the optimizer's per-parameter loop, glue) relative to a run without the profiler; the
profiled and unprofiled step times are printed so the inflation can be judged. --ops N lists the
heaviest ops of the N largest (part, direction) entries.

Output: one table per length, then `RESULT profile model=deberta_v3 seq=<T> top=<part> share=<X>`
per length (X the largest part's share of the step, forward + backward).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import train_step  # noqa: E402  (bench/train_step.py: the model, batch and step being profiled)

LABEL = "part:"
# Parts in table order; forward labels are these names, backward ones "bwd " + name.
PARTS = ("embeddings (incl. GDES)", "attention projections", "attention core", "c2p", "p2c",
         "FFN", "layer norms", "residual + dropout", "relative table", "generator MLM head",
         "generator MLM loss", "sampling", "discriminator RTD head", "RTD loss, corruption, metrics",
         "grad accumulation", "optimizer", "other")


# ------------------------------------------------------------------------- c2p / p2c source lines
def _term_lines() -> dict[str, list[tuple[str, int, int]]]:
    """{"c2p": [(file, first, last), ...], "p2c": [...]}: the source lines computing each term."""
    rules = {"c2p": [], "p2c": []}
    names = {"c2p": ("content_to_position", "pos_key"), "p2c": ("position_to_content", "pos_query")}
    for rel in ("models/deberta.py", "models/disentangled_attention.py"):
        path = ROOT / rel
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, (ast.If, ast.IfExp)):
                continue
            test = ast.unparse(node.test)
            for term, words in names.items():
                # `if self.content_to_position:` / `if pos_key is not None:` (and p2c's, pos_query_s)
                if any(test in (f"self.{w}", f"{w} is not None", f"{w}_s is not None") for w in words):
                    rules[term].append((path.name, node.lineno, node.end_lineno))
    if not rules["c2p"] or not rules["p2c"]:
        raise SystemExit("error: no c2p / p2c blocks found in models/; update bench/profile_rtd.py")
    return rules


def _caller_term(rules, frame, depth: int = 6) -> str | None:
    """The term ("c2p" / "p2c") whose source lines one of the `depth` innermost frames is on."""
    for _ in range(depth):
        if frame is None:
            return None
        name, line = os.path.basename(frame.f_code.co_filename), frame.f_lineno
        for term, spans in rules.items():
            if any(name == f and a <= line <= b for f, a, b in spans):
                return term
        frame = frame.f_back
    return None


# ---------------------------------------------------------------------------------- labelling
class Labels:
    """record_function labels opened by forward hooks (and wrappers) around the parts."""

    def __init__(self, rules):
        from torch.autograd.profiler import record_function

        self.record_function = record_function
        self.rules = rules
        self.open = []
        self.handles = []

    def module(self, module, part: str, by_caller: bool = False) -> None:
        """Label `module`'s forward `part`, or the term whose lines call it if by_caller."""
        def pre(mod, args):
            term = _caller_term(self.rules, sys._getframe(1), 8) if by_caller else None
            rf = self.record_function(LABEL + (term or part))
            rf.__enter__()
            self.open.append(rf)

        def post(mod, args, out):
            self.open.pop().__exit__(None, None, None)

        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def function(self, fn, part: str):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            with self.record_function(LABEL + part):
                return fn(*args, **kwargs)
        return wrapped


def label_model(net, rules) -> Labels:
    from torch import nn

    from models import rtd
    from models.deberta import (DebertaEmbeddings, DebertaEncoder, DebertaLayer, DisentangledSelfAttention,
                                MaskedLMHead)
    from models.deberta_v3 import DebertaV3DiscriminatorHead
    from models.layers import FeedForward

    labels = Labels(rules)
    by_class = ((DebertaEmbeddings, "embeddings (incl. GDES)"), (DisentangledSelfAttention, "attention core"),
                (FeedForward, "FFN"), (DebertaLayer, "residual + dropout"), (DebertaEncoder, "relative table"),
                (MaskedLMHead, "generator MLM head"), (DebertaV3DiscriminatorHead, "discriminator RTD head"))
    labels.module(net, "RTD loss, corruption, metrics")  # the RTD forward's own work
    for name, module in net.named_modules():
        for cls, part in by_class:
            if isinstance(module, cls):
                labels.module(module, part)
        if isinstance(module, nn.LayerNorm) and ".encoder." in name:  # layers' and relative table's
            labels.module(module, "layer norms")
        if isinstance(module, nn.Linear) and ".attention." in name:  # q, k, v, output; the 2k table's
            labels.module(module, "attention projections", by_caller=True)  # projections: c2p / p2c
    rtd.sample_replacements = labels.function(rtd.sample_replacements, "sampling")
    parallel = net.parallel
    parallel.vocab_parallel_cross_entropy = labels.function(parallel.vocab_parallel_cross_entropy,
                                                            "generator MLM loss")
    return labels


def term_mode(rules):
    """A TorchFunctionMode labelling each torch call made from a c2p / p2c source line (forward and
    the fused kernel's Python backward) and from the generator's `_vocab_logits` (outside its head
    module): the line-level split that module hooks cannot give."""
    from torch.autograd.profiler import record_function
    from torch.overrides import TorchFunctionMode

    class TermMode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            frame = sys._getframe(1)
            term = _caller_term(rules, frame, 1)
            if term is None and frame.f_code.co_name == "_vocab_logits":
                term = "generator MLM head"
            if getattr(func, "__name__", "") == "apply":  # autograd.Function: watch its forward too
                with self:
                    return func(*args, **kwargs)
            if term is None:
                return func(*args, **kwargs)
            with record_function(LABEL + term):
                return func(*args, **kwargs)

    return TermMode()


def attribute(events) -> dict[str, float]:
    """Self CPU microseconds per part ("bwd " prefix for backward) over the profiled events."""
    # sequence_nr -> part of the forward op that created the node: the last forward op to record
    # that number (ops that create no node record the next one, so earlier holders may be others)
    forward_part = {}

    def part_of(event):
        """(part, in backward) of one event: its innermost label, or its autograd node's part."""
        node, label = event, None
        while node is not None:
            name = node.name
            if label is None and name.startswith(LABEL):
                label = name[len(LABEL):]
            if name.startswith("autograd::engine::evaluate_function"):
                if label is not None:  # a label inside backward: the fused kernel's c2p / p2c lines
                    return label, True
                if "AccumulateGrad" in name:
                    return "grad accumulation", True
                return forward_part.get(node.sequence_nr, "other"), True
            if name.startswith("Optimizer."):
                return "optimizer", False
            node = node.cpu_parent
        return label or "other", False

    totals, ops = defaultdict(float), defaultdict(float)
    for event in sorted(events, key=lambda e: e.time_range.start):  # forward ops before their nodes
        part, backward = part_of(event)
        if not backward and event.sequence_nr is not None and event.sequence_nr >= 0:
            forward_part[event.sequence_nr] = part
        key = ("bwd " if backward else "") + part
        totals[key] += event.self_cpu_time_total
        ops[(key, event.name)] += event.self_cpu_time_total
    return dict(totals), ops


# ---------------------------------------------------------------------------------- profiling
def profile(seq: int, args) -> dict:
    import torch
    from torch.autograd.graph import _engine_run_backward

    from models.layers import encoder_layers
    from torch.profiler import ProfilerActivity, profile as torch_profile, record_function

    torch.set_num_threads(args.threads)
    model = "deberta_v3_rtd"
    cfg, net = train_step.build_ours(model, args, seq)
    for layer in encoder_layers(net):
        if hasattr(layer.attention, "kernel"):
            layer.attention.kernel = args.kernel
    batch = train_step.make_batch(model, args, seq, torch.device("cpu"))
    loss_fn = train_step.ours_step_fn(model, net, cfg, batch, args, torch.device("cpu"))
    net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.01)

    def step(profiled: bool):
        loss = loss_fn()
        if profiled:  # Tensor.backward would switch the TorchFunctionMode off for the backward pass
            _engine_run_backward((loss,), (torch.ones_like(loss),), False, False, (),
                                 allow_unreachable=True, accumulate_grad=True)
        else:
            loss.backward()
        with record_function(LABEL + "optimizer") if profiled else contextlib.nullcontext():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    plain = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        step(False)
        if i >= args.warmup:
            plain.append(time.perf_counter() - start)
    rules = _term_lines()
    labels = label_model(net, rules)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof, term_mode(rules):
        start = time.perf_counter()
        for _ in range(args.steps):
            with record_function("step"):
                step(True)
        profiled_wall = (time.perf_counter() - start) / args.steps
    for handle in labels.handles:
        handle.remove()
    totals, ops = attribute(prof.events())
    return {"totals": totals, "ops": ops, "plain_step_s": sorted(plain)[len(plain) // 2], "profiled_step_s": profiled_wall,
            "batch": batch["input_ids"].shape[0]}


def table(seq: int, result: dict, steps: int, top_parts: int = 0, top_ops: int = 5) -> tuple[list[str], str, float]:
    totals = result["totals"]
    total = sum(totals.values())
    rows, best = [], ("", -1.0)
    header = (f"seq {seq}, batch {result['batch']}: {total / steps / 1e3:.0f} ms self CPU per profiled step "
              f"(wall: {result['profiled_step_s'] * 1e3:.0f} ms profiled, {result['plain_step_s'] * 1e3:.0f} ms "
              "without the profiler)")
    rows.append(header)
    rows.append(f"| {'part':32s} | forward % | backward % | total % |")
    rows.append(f"|{'-' * 34}|-----------|------------|---------|")
    unknown = sorted(k for k in totals if k.removeprefix("bwd ") not in PARTS)
    for part in PARTS + tuple(unknown):
        fwd, bwd = totals.get(part, 0.0), totals.get("bwd " + part, 0.0)
        if fwd + bwd == 0:
            continue
        share = 100 * (fwd + bwd) / total
        if share > best[1] and part not in ("other",):
            best = (part, share)
        rows.append(f"| {part:32s} | {100 * fwd / total:9.1f} | {100 * bwd / total:10.1f} | {share:7.1f} |")
    fwd_all = sum(v for k, v in totals.items() if not k.startswith("bwd "))
    rows.append(f"| {'all':32s} | {100 * fwd_all / total:9.1f} | "
                f"{100 * (total - fwd_all) / total:10.1f} | {100.0:7.1f} |")
    ranked = sorted(((v, k) for k, v in totals.items()), reverse=True)[:top_parts]
    for value, key in ranked:
        here = sorted(((v, name) for (k, name), v in result["ops"].items() if k == key), reverse=True)
        listed = ", ".join(f"{name} {100 * v / total:.1f}" for v, name in here[:top_ops])
        rows.append(f"  {key} ({100 * value / total:.1f}%): {listed}")
    return rows, best[0], best[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", default="128,512")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per step (batch = tokens / seq)")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kernel", choices=("auto", "fused", "sdpa"), default="auto")
    parser.add_argument("--emd", action="store_true", help="keep the generator's EMD (train_step.py's --emd)")
    parser.add_argument("--ops", type=int, default=0,
                        help="also list the heaviest ops of the N largest part/direction entries")
    parser.add_argument("--json", type=Path, help="also write the per-part microseconds here")
    args = parser.parse_args()
    # train_step's layout defaults (its argparse), so the profiled model is the benched one
    for key, value in dict(vocab=32000, hidden=256, heads=4, ffn=1024, layers=6, gen_layers=3).items():
        setattr(args, key, value)

    import torch

    print(f"# torch {torch.__version__}, CPU fp32, {args.threads} threads, {os.cpu_count()} CPUs, "
          f"load avg {os.getloadavg()[0]:.1f}; deberta_v3 RTD 6 x 256 (gen 3), {args.tokens} tokens/step, "
          f"kernel {args.kernel}, EMD {'on' if args.emd else 'off'}; {args.warmup} warm-up + {args.steps} "
          "profiled steps; shares of profiler self CPU time, not wall-clock")
    results, raw = [], {}
    for seq in (int(s) for s in args.seq.split(",") if s):
        result = profile(seq, args)
        raw[seq] = {k: v for k, v in result.items() if k != "ops"}
        rows, top, share = table(seq, result, args.steps, args.ops)
        print("\n".join(rows), flush=True)
        results.append(f"RESULT profile model=deberta_v3 seq={seq} top={top.replace(' ', '_')} "
                       f"share={share / 100:.3f}")
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1))
    for line in results:
        print(line)


if __name__ == "__main__":
    main()
