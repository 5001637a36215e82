"""Training-step throughput and peak memory: our models against the same architecture built from
Hugging Face transformers classes, with the same weights, batch and optimizer.

    .venv/bin/python bench/train_step.py --threads 1 [--models deberta_v3_rtd,deberta_mlm,roberta_mlm]
        [--seq 128,512] [--tokens 1024] [--repeats 5] [--device cpu|cuda] [--dtype fp32|bf16]

Models (registry `small` layout narrowed by the flags; defaults 6 x 256, 4 heads, FFN 1024, 32K vocab):
- deberta_v3_rtd: ours = registry `deberta_v3` (generator 3 layers, discriminator 6, GDES, RTD
  weight 50). HF = DebertaV2ForMaskedLM as the generator (full logits and its own loss, as HF
  computes them) + DebertaV2Model as the discriminator with our RTD head (LayerNorm(h_CLS + h) ->
  dense -> GELU -> classifier) in plain torch, GDES and Gumbel-max sampling in plain user code.
  The generator's enhanced mask decoder is off on our side by default (HF has none; --emd turns it on).
- deberta_mlm: registry `deberta` (EMD off unless --emd) vs DebertaV2ForMaskedLM.
- roberta_mlm: registry `roberta` vs RobertaForMaskedLM (HF's default attention, SDPA).
Weights: ours are built from the registry with a fixed seed and loaded into HF with the registry's
to_hf_state_dict maps. Batch: full-length rows of random ids, 15% of positions selected (the
mask token at each). Optimizer: torch.optim.AdamW on both sides. Dropout as the configs (0.1).

Method: each side runs in its own worker process (`--worker`), driven one step at a time by the
parent, which alternates ours / HF every repeat so machine noise hits both. One step = forward,
backward, AdamW step, zero_grad. tok/s = tokens per step / median step time (after --warmup steps).
Peak memory on CPU = the worker's resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs after the models are built) minus its resident set at that point: what the
steps add on top of the weights (activations, gradients, AdamW states, transients). On CUDA:
torch.cuda.max_memory_allocated over the steps minus the memory allocated before them.

Last lines, one per model and length (ratios ours / HF):
    RESULT deberta_v3_rtd seq=512 tok_ratio=1.62 mem_ratio=0.71
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("deberta_v3_rtd", "deberta_mlm", "roberta_mlm")
MASK_ID = 4
SELECT = 0.15


# ----------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class MemoryMeter:
    """Peak memory the steps add: RSS high-water mark on CPU, allocator peak on CUDA."""

    def __init__(self, device):
        import torch

        self.torch, self.device = torch, device

    def start(self) -> None:
        import gc

        gc.collect()
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            self.base = self.torch.cuda.memory_allocated()
            return
        self.base = _status_kib("VmRSS") * 1024
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.method = "VmHWM after clear_refs"
        except OSError:
            import resource

            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.method = "ru_maxrss"

    def peak(self) -> int:
        if self.device.type == "cuda":
            return self.torch.cuda.max_memory_allocated() - self.base
        if self.method == "ru_maxrss":
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base
        return _status_kib("VmHWM") * 1024 - self.base


# ----------------------------------------------------------------------------------- models
def config_for(model: str, args, seq: int):
    from models.registry import build_config

    layout = dict(hidden_size=args.hidden, num_heads=args.heads, intermediate_size=args.ffn)
    if model == "deberta_v3_rtd":
        gen = dict(layout, num_layers=args.gen_layers, enhanced_mask_decoder=args.emd)
        disc = dict(layout, num_layers=args.layers)
        return build_config("deberta_v3", "small", vocab_size=args.vocab, seq_length=seq,
                            generator=gen, discriminator=disc)
    name = "deberta" if model == "deberta_mlm" else "roberta"
    extra = {"enhanced_mask_decoder": args.emd} if name == "deberta" else {}
    return build_config(name, "small", vocab_size=args.vocab, seq_length=seq,
                        num_layers=args.layers, **layout, **extra)


def make_batch(model: str, args, seq: int, device):
    import torch

    gen = torch.Generator().manual_seed(1234)
    B = max(1, args.tokens // seq)
    ids = torch.randint(5, args.vocab, (B, seq), generator=gen)
    ids[:, 0] = 1 if model == "deberta_v3_rtd" or model == "deberta_mlm" else 0  # a CLS-like id
    mask = torch.ones(B, seq, dtype=torch.long)
    selected = torch.rand(B, seq, generator=gen) < SELECT
    selected[:, 0] = False
    labels = torch.where(selected, ids, torch.full_like(ids, -100))
    inputs = torch.where(selected, torch.full_like(ids, MASK_ID), ids)
    batch = {"input_ids": inputs, "attention_mask": mask, "labels": labels,
             "sample_index": torch.arange(B)}
    return {k: v.to(device) for k, v in batch.items()}


def build_ours(model: str, args, seq: int):
    import torch

    from models.registry import build_model

    cfg = config_for(model, args, seq)
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def _autocast(args, device):
    import contextlib

    import torch

    if args.dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def ours_step_fn(model: str, net, cfg, batch, args, device):
    from models import rtd

    if model == "deberta_v3_rtd":
        net.sampling_seed = 0
        counts = {"predicted": (batch["labels"] != -100).sum().float(),
                  "tokens": (batch["attention_mask"] != 0).sum().float()}

        def loss_fn():
            out = net(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["sample_index"])
            return rtd.total_loss(out, counts)
    else:
        def loss_fn():
            out = net(batch["input_ids"], batch["attention_mask"], batch["labels"])
            return out["loss_sum"] / out["num_predicted"]
    return loss_fn


def build_hf(model: str, args, seq: int, device):
    """The HF-built equivalent, with our weights, and its loss function."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from models import deberta_hf, deberta_v3, roberta

    cfg, ours = build_ours(model, args, seq)
    sd = ours.state_dict()
    if model == "roberta_mlm":
        import transformers

        net = transformers.RobertaForMaskedLM(roberta.hf_config(cfg))
        net.load_state_dict(roberta.to_hf_state_dict(sd, cfg), strict=True)
        modules = net
    elif model == "deberta_mlm":
        import transformers

        hf_cfg = deberta_hf.hf_config(cfg, "mlm")
        hf_cfg._attn_implementation = "eager"
        net = transformers.DebertaV2ForMaskedLM(hf_cfg)
        net.load_state_dict(deberta_hf.to_hf_state_dict(sd, cfg, "mlm"), strict=False)
        modules = net
    else:
        import transformers

        gen = transformers.DebertaV2ForMaskedLM(deberta_v3.deberta_v3_hf_config(cfg, "generator"))
        gen_sd = deberta_v3.deberta_v3_to_hf_state_dict(sd, cfg, component="generator")
        gen.load_state_dict(gen_sd, strict=False)  # EMD's position table, if any, has no place
        disc = transformers.DebertaV2Model(deberta_v3.deberta_v3_hf_config(cfg, "discriminator"))
        disc.load_state_dict(deberta_v3.deberta_v3_to_hf_state_dict(sd, cfg), strict=True)
        V = cfg.discriminator.vocab_size
        with torch.no_grad():  # GDES: the discriminator's own word table is E_Delta
            disc.embeddings.word_embeddings.weight.copy_(
                sd["discriminator.backbone.embeddings.word.gdes_delta.weight"][:V])
        H = cfg.discriminator.hidden_size
        head = nn.ModuleDict({"norm": nn.LayerNorm(H, eps=cfg.discriminator.layer_norm_eps),
                              "dense": nn.Linear(H, H), "classifier": nn.Linear(H, 1)})
        head.load_state_dict({k[len("discriminator.head."):]: v for k, v in sd.items()
                              if k.startswith("discriminator.head.")}, strict=True)
        modules = nn.ModuleDict({"generator": gen, "discriminator": disc, "head": head})
    del ours, sd
    modules.to(device)

    if model != "deberta_v3_rtd":
        def make_loss(batch):
            def loss_fn():
                return modules(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               labels=batch["labels"]).loss
            return loss_fn
        return cfg, modules, make_loss

    rtd_weight, temperature = cfg.rtd_weight, cfg.temperature
    gen, disc, head = modules["generator"], modules["discriminator"], modules["head"]

    def make_loss(batch):
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        predicted = labels != -100
        real = mask.bool()
        original = torch.where(predicted, labels, ids)

        def loss_fn():
            out = gen(input_ids=ids, attention_mask=mask, labels=labels)  # full logits, HF's loss
            with torch.no_grad():  # Gumbel-max sampling at the predicted positions
                logits = out.logits[predicted].float() / temperature
                u = torch.rand_like(logits).clamp_(1e-9, 1.0)
                sampled = (logits - torch.log(-torch.log(u))).argmax(-1)
                corrupted = original.masked_scatter(predicted, sampled)
                replaced = ((corrupted != original) & real).float()
            # GDES: E_D = sg(E_G) + E_Delta, looked up then summed
            embeds = (F.embedding(corrupted, gen.deberta.embeddings.word_embeddings.weight).detach()
                      + disc.embeddings.word_embeddings(corrupted))
            hidden = disc(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
            x = head["norm"](hidden[:, :1] + hidden)
            rtd_logits = head["classifier"](F.gelu(head["dense"](x))).squeeze(-1)
            rtd = F.binary_cross_entropy_with_logits(rtd_logits[real], replaced[real], reduction="sum")
            return out.loss + rtd_weight * rtd / real.sum()
        return loss_fn

    return cfg, modules, make_loss


def worker(args) -> None:
    """Build one side, then run one step per "step" line on stdin and answer its seconds; on
    "done", answer the peak memory in bytes."""
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, seq = args.model, args.seq_one
    batch = make_batch(model, args, seq, device)
    if args.worker == "ours":
        from models.layers import compile_layers, enable_activation_checkpointing, encoder_layers

        cfg, net = build_ours(model, args, seq)
        net.to(device)
        for layer in encoder_layers(net):
            if hasattr(layer.attention, "kernel"):
                layer.attention.kernel = args.kernel
        if args.activation_checkpointing:
            enable_activation_checkpointing(net)
        if args.compile:
            compile_layers(net)
        loss_fn = ours_step_fn(model, net, cfg, batch, args, device)
    else:
        cfg, net, make_loss = build_hf(model, args, seq, device)
        loss_fn = make_loss(batch)
    net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.01)
    meter = MemoryMeter(device)
    meter.start()
    print(json.dumps({"ready": True, "params": sum(p.numel() for p in net.parameters())}), flush=True)
    for line in sys.stdin:
        if line.strip() == "done":
            print(json.dumps({"peak": meter.peak(), "method": getattr(meter, "method", "cuda")}), flush=True)
            return
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with _autocast(args, device):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        print(json.dumps({"seconds": seconds, "loss": loss.detach().item()}), flush=True)


# ----------------------------------------------------------------------------------- parent
def train_flops(model: str, cfg, batch_size: int, seq: int) -> float:
    """Model FLOPs of one training step: trainer/core/flops.py's count (generator + discriminator, attention
    included, MLM head on the predicted positions only) times the step's tokens."""
    from trainer.core.flops import training_flops_per_token

    return batch_size * seq * training_flops_per_token(cfg, seq, SELECT)


def matmul_peak(args, seq: int) -> float:
    """The device's dense-matmul rate (FLOP/s) at this run's shapes and threads, measured here: the median
    over repeats of the faster of an FFN-shaped GEMM (tokens x hidden @ hidden x FFN) and an attention-shaped
    batched product (batch x heads, seq x head size @ head size x seq). A step made of matmuls alone, at
    this rate, takes flops / peak: the ceiling of any implementation's rate, and peak / HF's rate the
    ceiling of the tok/s ratio."""
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    batch, head = max(1, args.tokens // seq), args.hidden // args.heads
    shapes = [((args.tokens, args.hidden), (args.hidden, args.ffn)),
              ((batch * args.heads, seq, head), (batch * args.heads, head, seq))]
    best = 0.0
    for a_shape, b_shape in shapes:
        a, b = torch.randn(a_shape, device=device, dtype=dtype), torch.randn(b_shape, device=device, dtype=dtype)
        flops = 2 * a.numel() * b_shape[-1]
        times = []
        for _ in range(7):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(10):
                torch.matmul(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) / 10)
        best = max(best, flops / statistics.median(times[2:]))
    return best


def _spawn(side: str, model: str, seq: int, args) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--worker", side, "--model", model, "--seq-one", str(seq)]
    for flag in ("tokens", "vocab", "hidden", "heads", "ffn", "layers", "gen_layers", "threads",
                 "device", "dtype", "kernel"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    for flag in ("emd", "activation_checkpointing", "compile"):
        if getattr(args, flag):
            cmd.append(f"--{flag.replace('_', '-')}")
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)


def _ask(proc: subprocess.Popen, command: str | None) -> dict:
    if command is not None:
        proc.stdin.write(command + "\n")
        proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"worker exited with {proc.wait()}")
    return json.loads(line)


def measure(model: str, seq: int, args) -> dict:
    procs = {side: _spawn(side, model, seq, args) for side in ("ours", "hf")}
    info = {side: _ask(proc, None) for side, proc in procs.items()}
    times = {side: [] for side in procs}
    losses = {side: [] for side in procs}
    for repeat in range(args.warmup + args.repeats):
        order = ("ours", "hf") if repeat % 2 == 0 else ("hf", "ours")
        for side in order:
            answer = _ask(procs[side], "step")
            if repeat >= args.warmup:
                times[side].append(answer["seconds"])
            losses[side].append(answer["loss"])
    peaks = {side: _ask(proc, "done") for side, proc in procs.items()}
    for proc in procs.values():
        proc.wait()
    return {"times": times, "losses": losses, "peaks": peaks, "params": info}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--seq", default="128,512")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per step (batch = tokens / seq)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6, help="discriminator / MLM model layers")
    parser.add_argument("--gen-layers", type=int, default=3, help="RTD generator layers")
    parser.add_argument("--emd", action="store_true", help="keep our DeBERTa generator's EMD (HF has none)")
    parser.add_argument("--kernel", choices=("auto", "fused", "sdpa"), default="auto",
                        help="our DeBERTa attention implementation (models.disentangled_attention)")
    parser.add_argument("--activation-checkpointing", action="store_true", help="ours: recompute layers")
    parser.add_argument("--compile", action="store_true", help="ours: torch.compile each layer")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="device peak, for MFU on GPU")
    parser.add_argument("--json", type=Path, help="also write the raw measurements here")
    parser.add_argument("--worker", choices=("ours", "hf"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--seq-one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model {unknown[0]}; use {', '.join(MODELS)}")
    seqs = [int(s) for s in args.seq.split(",")]
    print(f"# torch {torch.__version__}, device {args.device} {args.dtype}, {args.threads} threads, "
          f"{os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f}")
    print(f"# layout: {args.layers} x {args.hidden} (heads {args.heads}, FFN {args.ffn}), RTD generator "
          f"{args.gen_layers} layers, vocab {args.vocab}, our DeBERTa EMD {'on' if args.emd else 'off'}, "
          f"kernel {args.kernel}, checkpointing {'on' if args.activation_checkpointing else 'off'}, "
          f"compile {'on' if args.compile else 'off'}; "
          f"{args.tokens} tokens per step, {args.warmup} warm-up + {args.repeats} interleaved repeats, "
          "medians; memory = peak resident memory the steps add (VmHWM minus RSS after building)")
    results, raw = [], {}
    for model in models:
        for seq in seqs:
            m = measure(model, seq, args)
            raw[f"{model}/{seq}"] = m
            batch = max(1, args.tokens // seq)
            tokens = batch * seq
            t = {side: statistics.median(v) for side, v in m["times"].items()}
            mem = {side: m["peaks"][side]["peak"] for side in t}
            cfg = config_for(model, args, seq)
            flops = train_flops(model, cfg, batch, seq)
            line = (f"{model:15s} seq={seq:4d} batch={batch:3d}  ours {tokens / t['ours']:8.0f} tok/s "
                    f"{mem['ours'] / 2**20:7.0f} MiB | HF {tokens / t['hf']:8.0f} tok/s "
                    f"{mem['hf'] / 2**20:7.0f} MiB | ours {flops / t['ours'] / 1e9:6.1f} GFLOP/s "
                    f"(load {os.getloadavg()[0]:.1f})")
            if args.peak_tflops:
                line += f" MFU {flops / t['ours'] / (args.peak_tflops * 1e12):.3f}"
            print(line, flush=True)
            if args.device == "cpu":  # the CPU's own matmul rate stands in for a datasheet peak
                peak = matmul_peak(args, seq)
                print(f"{'':15s} matmul peak {peak / 1e9:6.1f} GFLOP/s here: ours at "
                      f"{flops / t['ours'] / peak:.2f} of it, HF at {flops / t['hf'] / peak:.2f}; a step of "
                      f"matmuls alone would be {peak * t['hf'] / flops:.2f}x HF (the ratio's ceiling)", flush=True)
            results.append(f"RESULT {model} seq={seq} tok_ratio={t['hf'] / t['ours']:.2f} "
                           f"mem_ratio={mem['ours'] / mem['hf']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1))
    for line in results:
        print(line)


if __name__ == "__main__":
    main()
