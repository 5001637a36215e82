"""Disentangled attention alone, forward + backward: ours against Hugging Face's DebertaV2 with
identical weights.

    .venv/bin/python bench/attention.py [--seq 128,512] [--tokens 1024] [--repeats 7]
        [--kernel auto|fused|sdpa] [--device cpu|cuda] [--dtype fp32|bf16]

Ours: models.deberta.DisentangledSelfAttention (q/k/v, position projections shared with k/q as
DeBERTaV3, the c2p + p2c bias, softmax, dropout, output projection) with the cached relative
indices. HF: DebertaV2's DisentangledSelfAttention + its output dense layer (DebertaV2SelfOutput's
linear; its LayerNorm and residual belong to our layer, not to the attention), given the relative
positions its encoder builds once per forward and its (B, 1, T, T) mask. Same relative table (2k
rows, DeBERTaV3 defaults: 256 buckets, 512 distances), same input, training mode (dropout 0.1).
Time: median over interleaved repeats in one process. Memory: fresh process per side, resident
high-water mark of one forward + backward (after a warm-up one) minus the resident set before it,
with glibc's mmap threshold fixed at 128 KiB so that freed large blocks leave the resident set.

Last lines:  RESULT attention seq=512 tok_ratio=1.30 mem_ratio=0.60
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
sys.path.insert(0, str(ROOT / "bench"))


def build(args, seq: int):
    import torch
    import transformers
    from transformers.models.deberta_v2 import modeling_deberta_v2 as hf_mod

    from models.deberta import DebertaEncoder, DisentangledSelfAttention, key_padding_mask
    from models.parallel import ParallelLayers
    from models.registry import build_config

    cfg = build_config("deberta", "small", vocab_size=1000, seq_length=seq, hidden_size=args.hidden,
                       num_heads=args.heads, intermediate_size=4 * args.hidden, num_layers=1)
    torch.manual_seed(0)
    layers = ParallelLayers(1)
    ours = DisentangledSelfAttention(cfg, layers)
    ours.kernel = args.kernel
    encoder = DebertaEncoder(cfg, layers)  # the relative table and the cached indices
    hf_cfg = transformers.DebertaV2Config(
        hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads, relative_attention=True,
        position_buckets=cfg.position_buckets, max_relative_positions=cfg.max_relative_positions,
        pos_att_type=list(cfg.pos_att_type), share_att_key=cfg.share_att_key,
        attention_probs_dropout_prob=cfg.attention_dropout, hidden_dropout_prob=cfg.hidden_dropout)
    hf_self = hf_mod.DisentangledSelfAttention(hf_cfg)
    hf_out = torch.nn.Linear(cfg.hidden_size, cfg.hidden_size)
    with torch.no_grad():
        for ours_name, hf_name in (("query", "query_proj"), ("key", "key_proj"), ("value", "value_proj")):
            getattr(hf_self, hf_name).weight.copy_(getattr(ours, ours_name).weight)
            getattr(hf_self, hf_name).bias.copy_(getattr(ours, ours_name).bias)
        hf_out.weight.copy_(ours.output.weight)
        hf_out.bias.copy_(ours.output.bias)
    device = torch.device(args.device)
    B = max(1, args.tokens // seq)
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(B, seq, cfg.hidden_size, generator=gen).to(device)
    mask = torch.ones(B, seq, dtype=torch.long, device=device)
    mask[-1, seq * 7 // 8 :] = 0  # some padding
    table = encoder.relative_embeddings.weight.detach().to(device)
    for module in (ours, hf_self, hf_out):
        module.to(device).train()

    def run_ours(x):
        indices = encoder.relative_indices(seq, device)
        return ours(x, key_padding_mask(mask), table, indices)

    def run_hf(x):
        pair = mask[:, None, :, None] * mask[:, None, None, :]  # HF's (B, 1, T, T) mask
        rel = hf_mod.build_relative_position(x, x, bucket_size=cfg.position_buckets,
                                             max_position=cfg.max_relative_positions)
        context, _ = hf_self(x, pair, relative_pos=rel, rel_embeddings=table)
        return hf_out(context)

    return {"ours": run_ours, "hf": run_hf}, hidden, B


def _step(fn, hidden, args):
    import contextlib

    import torch

    x = hidden.detach().requires_grad_()
    autocast = (torch.autocast(x.device.type, dtype=torch.bfloat16) if args.dtype == "bf16"
                else contextlib.nullcontext())
    with autocast:
        out = fn(x)
    out.float().square().mean().backward()


def worker(args) -> None:
    import torch
    from train_step import MemoryMeter

    torch.set_num_threads(args.threads)
    fns, hidden, _ = build(args, args.seq_one)
    _step(fns[args.side], hidden, args)  # warm-up (caches, allocator)
    meter = MemoryMeter(torch.device(args.device))
    meter.start()
    _step(fns[args.side], hidden, args)
    print(json.dumps({"peak": meter.peak()}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", default="128,512")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per call (batch = tokens / seq)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--kernel", default="auto", choices=("auto", "fused", "sdpa"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--side", choices=("ours", "hf"), help=argparse.SUPPRESS)
    parser.add_argument("--seq-one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        worker(args)
        return

    import torch

    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, device {args.device} {args.dtype}, {args.threads} threads, "
          f"kernel {args.kernel}, {args.hidden} wide, {args.heads} heads, {args.tokens} tokens per call, "
          f"load avg {os.getloadavg()[0]:.1f}")
    results = []
    for seq in (int(s) for s in args.seq.split(",")):
        fns, hidden, B = build(args, seq)
        times = {"ours": [], "hf": []}
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
        for repeat in range(args.repeats + 1):
            for side in (("ours", "hf") if repeat % 2 == 0 else ("hf", "ours")):
                sync()
                start = time.perf_counter()
                _step(fns[side], hidden, args)
                sync()
                if repeat:
                    times[side].append(time.perf_counter() - start)
        peaks = {}
        for side in ("ours", "hf"):
            cmd = [sys.executable, __file__, "--side", side, "--seq-one", str(seq)]
            for flag in ("tokens", "hidden", "heads", "kernel", "threads", "device", "dtype"):
                cmd += [f"--{flag}", str(getattr(args, flag))]
            # A fixed mmap threshold: glibc otherwise raises it after the warm-up frees its large
            # blocks, and the measured pass reuses heap pages the high-water mark no longer sees.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, env=env).stdout
            peaks[side] = json.loads(out.strip().splitlines()[-1])["peak"]
        t = {side: statistics.median(v) for side, v in times.items()}
        print(f"seq={seq:4d} batch={B:3d}  ours {t['ours'] * 1e3:8.1f} ms {peaks['ours'] / 2**20:7.1f} MiB | "
              f"HF {t['hf'] * 1e3:8.1f} ms {peaks['hf'] / 2**20:7.1f} MiB", flush=True)
        results.append(f"RESULT attention seq={seq} tok_ratio={t['hf'] / t['ours']:.2f} "
                       f"mem_ratio={peaks['ours'] / peaks['hf']:.2f}")
    for line in results:
        print(line)


if __name__ == "__main__":
    main()
