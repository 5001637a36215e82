"""Training checkpoint -> one fp32 model: TP shards merged, ZeRO partitions gathered, fp32 masters read.

    locate(path, step)        the committed `global_stepN` directory (default: what `latest` names, as a resume)
    read_checkpoint(tag_dir)  -> NativeModel (the full TP=1 fp32 state dict of the registry model)
    write_native / write_hf   the project's native file / a Hugging Face directory
    verify_hf                 our model and the exported one on one batch, max |difference|

Where the fp32 weights are: the model-states files hold the module in the training dtype (bf16/fp16
weights are rounded copies, and under ZeRO-3 only placeholders); the optimizer holds the fp32 masters.
ZeRO 1-3 and DeepSpeed's bf16 optimizer keep them in per-data-parallel-rank partitions
(`*zero_pp_rank_D_mp_rank_TT_optim_states.pt`), which `deepspeed.utils.zero_to_fp32` gathers; it
globs every `*_optim_states.pt` of a directory and so cannot tell TP ranks apart (mp_rank_01's files
would count as more DP ranks), so it runs once per TP rank on a directory of links to that rank's
files only. ZeRO-0 in bf16/fp16 keeps unpartitioned fp32 copies in the model-states file's
`optimizer` entry (per parameter, or flattened per group), in the order of the optimizer's parameter
groups (trainer/engine.parameter_groups). ZeRO-0 in fp32 trains the module's own weights.
The TP ranks' state dicts are then concatenated along the dimension each parameter is split on
(models/parallel.py: partition_dims, merge_state_dicts).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch

from data.errors import UserError
from models.native import NativeModel, config_from_dict, save_native
from trainer.core.checkpoint import MANIFEST, TAG, committed, read_meta, resume_order, step_of, verify
from trainer.convert.model_card import write_model_card
from trainer.core.safe_load import safe_torch_load, weights_only_loads

Log = Callable[[str], None]
TOLERANCE = 1e-4  # --verify: max |ours - theirs| in fp32


def _quiet(log: Optional[Log]) -> Log:
    return log or (lambda message: None)


# ----------------------------------------------------------------------------- locate
def locate(path: str | os.PathLike, step: Optional[int] = None) -> Path:
    """The tag directory to convert: `path` is runs/NAME, runs/NAME/checkpoints or a global_stepN dir."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"--checkpoint {path} is not a directory")
    if TAG.match(path.name) and (path / MANIFEST).is_file():
        if step is not None and step_of(path.name) != step:
            raise UserError(f"--checkpoint {path} is step {step_of(path.name)}, not --step {step}")
        return path
    if (path / "checkpoints").is_dir() and not any(TAG.match(p.name) for p in path.iterdir()):
        path = path / "checkpoints"
    commits = sorted((c.step, c.path) for c in committed(path))
    if not commits:
        raise UserError(f"{path} holds no committed checkpoint (no global_stepN/{MANIFEST}); "
                        f"pass a run's checkpoints directory")
    if step is not None:
        found = dict(commits).get(step)
        if found is None:
            raise UserError(f"{path} has no checkpoint of step {step}; "
                            f"steps there: {', '.join(str(s) for s, _ in commits)}")
        return found
    return resume_order(path)[0]  # what `latest` names: the checkpoint a plain resume would load


def _rank_files(tag_dir: Path, meta: dict) -> tuple[list[Path], list[list[Path]]]:
    """(model-states file with the client state, optimizer partitions) per TP rank; UserError if one is missing."""
    tp, dp, stage = meta["tp_size"], meta["dp_size"], meta["zero_stage"]
    models, optims = [], []
    for t in range(tp):
        name = f"zero_pp_rank_0_mp_rank_{t:02d}_model_states.pt" if stage == 3 else f"mp_rank_{t:02d}_model_states.pt"
        if not (tag_dir / name).is_file():
            raise UserError(f"{tag_dir}: rank file {name} (TP rank {t}) is missing; the checkpoint is incomplete")
        models.append(tag_dir / name)
        parts = []
        for d in range(dp):
            found = sorted(tag_dir.glob(f"*zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt"))
            if stage > 0 and not found:
                raise UserError(f"{tag_dir}: rank file zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt "
                                f"(DP rank {d}, TP rank {t}) is missing; the checkpoint is incomplete")
            parts += found
        optims.append(parts)
    return models, optims


# ----------------------------------------------------------------------------- fp32 weights
def _zero_partitions_fp32(tag_dir: Path, tp_rank: int, files: list[Path]) -> dict[str, torch.Tensor]:
    """zero_to_fp32 over one TP rank's files (linked into a directory of their own)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with tempfile.TemporaryDirectory(prefix="convert_") as tmp:
        rank_dir = Path(tmp) / tag_dir.name
        rank_dir.mkdir()
        for path in files:
            (rank_dir / path.name).symlink_to(path.resolve())
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                weights_only_loads(files):
            sd = get_fp32_state_dict_from_zero_checkpoint(tmp, tag=tag_dir.name)
    return {k: v.detach().clone().float() for k, v in sd.items()}


def _unpartitioned_fp32(states: dict, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """ZeRO-0: fp32 masters of DeepSpeed's fp16/bf16 optimizer, else (fp32 training) the module.

    `model` (any TP layout: only names and grouping matter) gives the order of the masters: the
    optimizer's parameter groups as the trainer built them (trainer/engine.parameter_groups).
    """
    from trainer.core.engine import parameter_groups

    module = states["module"]
    optimizer = states.get("optimizer") or {}
    masters = optimizer.get("fp32_groups") or optimizer.get("fp32_groups_flat")
    if masters is None:
        return {k: v.float() for k, v in module.items()}
    name_of = {id(p): n for n, p in model.named_parameters()}
    aliases: dict[str, list[str]] = {}  # a parameter the state dict holds twice (embedding_sharing all)
    for alias, p in model.named_parameters(remove_duplicate=False):
        if alias != name_of[id(p)]:
            aliases.setdefault(name_of[id(p)], []).append(alias)
    groups = [[name_of[id(p)] for p in g["params"]] for g in parameter_groups(model, 0.01) if g["params"]]
    if len(groups) != len(masters):
        raise UserError(f"the optimizer holds {len(masters)} parameter groups, the model {len(groups)}: "
                        f"this checkpoint was not written by this version of trainer/pretraining/train.py")
    sd = dict(module)
    for names, group in zip(groups, masters):
        sizes = [module[n].numel() for n in names]
        if isinstance(group, torch.Tensor):  # one flat tensor per group (fused FP16_Optimizer)
            group = torch.split(group[: sum(sizes)], sizes)
        for name, value in zip(names, group):
            if value.numel() != module[name].numel():
                raise UserError(f"fp32 master of {name} has {value.numel()} elements, the module "
                                f"{module[name].numel()}: unknown optimizer layout")
            sd[name] = value.reshape(module[name].shape)
            # the module holds the masters rounded to the training dtype: proof the mapping is right
            if not torch.equal(sd[name].to(module[name].dtype), module[name]):
                raise UserError(f"the fp32 master taken for {name} does not round to its saved "
                                f"{module[name].dtype} weight: unknown optimizer parameter order")
            for alias in aliases.get(name, ()):
                sd[alias] = sd[name]
    return {k: v.float() for k, v in sd.items()}


def _with_every_name(sd: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`sd` with every name the model has for a shared parameter (embedding_sharing all: both towers'),
    in the model's key order. DeepSpeed records the second names (`shared_params`) in global rank 0's
    files only, so zero_to_fp32 gives them for TP rank 0 alone."""
    first = {id(p): n for n, p in model.named_parameters()}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name not in sd and first[id(param)] in sd:
            sd[name] = sd[first[id(param)]]
    return {**{k: sd[k] for k in model.state_dict() if k in sd}, **sd}


def read_checkpoint(tag_dir: Path, log: Optional[Log] = None, check_files: bool = True) -> NativeModel:
    """The checkpoint's full fp32 model (TP=1 layout, vocabulary padding kept), as save_native writes it."""
    from models.parallel import merge_state_dicts, partition_dims
    from models.registry import build_model

    log = _quiet(log)
    tag_dir = Path(tag_dir)
    meta = read_meta(tag_dir, ("tp_size", "dp_size", "zero_stage", "precision"))
    models, optims = _rank_files(tag_dir, meta)
    if check_files:
        problem = verify(tag_dir)
        if problem is not None:
            raise UserError(f"checkpoint {tag_dir} failed verification: {problem}")
    log(f"reading {tag_dir}: ZeRO-{meta['zero_stage']}, TP={meta['tp_size']}, DP={meta['dp_size']}, "
        f"{meta['precision']}")
    first = safe_torch_load(models[0])
    if "model_config" not in first:
        raise UserError(f"{models[0]} has no model_config: not a checkpoint of trainer/pretraining/train.py")
    info = dict(first["model_config"])
    name = info.pop("name")
    config = config_from_dict(name, info)
    model = build_model(config)
    rank_sds = []
    for t in range(meta["tp_size"]):
        states = first if t == 0 else safe_torch_load(models[t])
        if optims[t]:
            rank_files = optims[t] + sorted(tag_dir.glob(f"*mp_rank_{t:02d}_model_states.pt"))
            sd = _zero_partitions_fp32(tag_dir, t, rank_files)
            source = "ZeRO fp32 partitions"
        else:
            sd = _unpartitioned_fp32(states, model)
            source = "fp32 optimizer copy" if states.get("optimizer") else "module weights"
        log(f"  TP rank {t}: {len(sd)} tensors from {source} ({len(optims[t])} partition files)")
        rank_sds.append(_with_every_name(sd, model))
        del states
    full = merge_state_dicts(rank_sds, partition_dims(model)) if len(rank_sds) > 1 else rank_sds[0]
    try:
        model.load_state_dict(full, strict=True)
    except RuntimeError as err:
        raise UserError(f"{tag_dir}: the merged weights do not fit the {name} model the checkpoint "
                        f"describes: {str(err).splitlines()[0]}") from None
    full = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    provenance = {"source": str(tag_dir.resolve()), "step": step_of(tag_dir.name), "precision": meta["precision"],
                  "zero_stage": meta["zero_stage"], "tp_size": meta["tp_size"], "dp_size": meta["dp_size"],
                  "consumed_samples": first.get("consumed_samples"), "consumed_tokens": first.get("consumed_tokens"),
                  "tokenizer_fingerprint": first.get("tokenizer_fingerprint")}
    return NativeModel(name=name, config=config, state_dict=full, meta=provenance,
                       training_config=first.get("config") or {})


# ----------------------------------------------------------------------------- components
def check_component(name: str, component: Optional[str]) -> Optional[str]:
    """The tower to export (None for single-tower models); UserError for one the model lacks."""
    from models.registry import get_spec

    towers = get_spec(name).components
    if towers == ("model",):
        if component not in (None, "model"):
            raise UserError(f"--component {component}: a {name} model has one tower; leave --component out")
        return None
    component = component or towers[0]
    if component not in towers:
        raise UserError(f"--component must be one of {', '.join(towers)} for {name}, got {component!r}")
    return component


def hf_export(name: str, config, sd: dict, component: Optional[str]):
    """(transformers config, HF state dict, dropped-on-export warnings) of one tower, from the registry."""
    from models.registry import get_spec

    spec = get_spec(name)
    args = (component,) if component else ()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf_config = spec.hf_config(config, *args)
        hf_sd = spec.to_hf_state_dict(sd, config, *args)
    return hf_config, hf_sd, [str(w.message) for w in caught if "dropped" in str(w.message)]


def _hf_class(hf_config):
    import transformers
    return getattr(transformers, hf_config.architectures[0])


# ----------------------------------------------------------------------------- writers
def _size(path: Path) -> str:
    total = sum(p.stat().st_size for p in (path.rglob("*") if path.is_dir() else [path]) if p.is_file())
    return f"{total / 2**20:.1f} MiB"


def write_native(native: NativeModel, output: Path, tokenizer_dir: Optional[Path], log: Optional[Log] = None) -> Path:
    """models/native.py's file (a directory gets model.pt, and the run's tokenizer beside it)."""
    log = _quiet(log)
    from models.registry import get_spec

    spec = get_spec(native.name)
    path = save_native(output, native.name, native.config, native.state_dict, native.meta)
    if tokenizer_dir is not None and path.parent == Path(output):
        _copy_tokenizer(tokenizer_dir, path.parent / "tokenizer")
    if native.training_config and path.parent == Path(output):  # from a training checkpoint: its model card
        write_model_card(path.parent, {"model": native.name, "component": None, **native.meta}, native.training_config,
                         {"name": native.name, **asdict(native.config)}, log, location=str(output))
    params = sum(v.numel() for v in native.state_dict.values())
    log(f"wrote {path}: {native.name}, {len(native.state_dict)} tensors, {params / 1e6:.2f}M parameters"
        f"{' (' + ' and '.join(reversed(spec.components)) + ')' if len(spec.components) > 1 else ''}, "
        f"fp32, {_size(path)}")
    return path


def _copy_tokenizer(tokenizer_dir: Path, dest: Path) -> None:
    from data.tokenizer import load_tokenizer
    load_tokenizer(tokenizer_dir).save_copy(dest)


def write_hf(native: NativeModel, output: Path, component: Optional[str], tokenizer_dir: Optional[Path],
             log: Optional[Log] = None) -> dict:
    """A transformers directory (config.json, model.safetensors, tokenizer files, README.md: the model
    card of trainer/convert/model_card.py, conversion.json) of one tower."""
    log = _quiet(log)
    component = check_component(native.name, component)
    hf_config, hf_sd, dropped = hf_export(native.name, native.config, native.state_dict, component)
    for message in dropped:
        log(f"WARNING: {message}")
    model = _hf_class(hf_config)(hf_config)
    result = model.load_state_dict(hf_sd, strict=False)
    if result.missing_keys or result.unexpected_keys:  # a key map bug, never a user mistake
        raise RuntimeError(f"export to {hf_config.architectures[0]}: missing {result.missing_keys}, "
                           f"unexpected {result.unexpected_keys}")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    files = ["config.json", "model.safetensors"]
    files += _write_extras(native, component, output)
    if tokenizer_dir is not None:
        _copy_tokenizer(tokenizer_dir, output)
        files.append("tokenizer files")
    conversion = {"model": native.name, "component": component, **native.meta}
    params = sum(p.numel() for p in model.parameters())
    if native.training_config:  # from a training checkpoint (an imported model has no recipe or metrics)
        write_model_card(output, conversion, native.training_config, {"name": native.name, **asdict(native.config)},
                         log, hf_class=hf_config.architectures[0], parameters=params, location=str(output),
                         notes=dropped, files=files + ["conversion.json"])
        files.append("README.md (model card)")
    (output / "conversion.json").write_text(json.dumps(conversion, indent=1, default=str) + "\n")
    log(f"wrote {output}: {hf_config.architectures[0]} ({native.name}"
        f"{' ' + component if component else ''}), {params / 1e6:.2f}M parameters, fp32, "
        f"vocabulary {hf_config.vocab_size} (padding trimmed), {_size(output)}: {', '.join(files)}")
    return {"architecture": hf_config.architectures[0], "parameters": params, "dropped": dropped}


def _write_extras(native: NativeModel, component: Optional[str], output: Path) -> list[str]:
    """The adapter's files beside the HF model (hf_extras: the DeBERTaV3 RTD head); stale ones removed."""
    from safetensors.torch import save_file

    from models.registry import get_spec

    spec = get_spec(native.name)
    for name in spec.hf_extra_files:
        (output / name).unlink(missing_ok=True)  # a stale file from an earlier export here
    written = []
    for name, tensors in spec.hf_extras(native.state_dict, native.config, component).items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(output / name))
        written.append(f"{name} ({spec.hf_extra_files[name]})")
    return written


# ----------------------------------------------------------------------------- verify
def verify_batch(vocab_size: int, pad_id: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences of random non-pad ids, the second padded over its last quarter."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (2, length), generator=generator)
    ids[ids == pad_id] = (pad_id + 1) % vocab_size
    mask = torch.ones_like(ids)
    mask[1, length - max(1, length // 4):] = 0
    ids[mask == 0] = pad_id
    return ids, mask


def _tower_config(native: NativeModel, component: Optional[str]):
    return getattr(native.config, component) if component else native.config


def verify_hf(native: NativeModel, output: Path, component: Optional[str], log: Optional[Log] = None) -> float:
    """Max |ours - exported| on one batch (real tokens): what the adapter's verify_pairs names (logits
    where HF has the head, hidden states otherwise)."""
    import transformers
    from safetensors.torch import load_file

    from models.registry import get_family, get_spec

    log = _quiet(log)
    component = check_component(native.name, component)
    spec = get_spec(native.name)
    ours = native.build().eval()
    cfg = _tower_config(native, component)
    length = min(16, get_family(spec.family).position_rows(cfg))
    ids, mask = verify_batch(cfg.vocab_size, cfg.pad_token_id, length)
    real = mask.bool()
    hf_config = transformers.AutoConfig.from_pretrained(output)
    theirs_model, info = _hf_class(hf_config).from_pretrained(output, output_loading_info=True)
    if info["missing_keys"] or info["unexpected_keys"]:
        raise UserError(f"{output}: transformers reports missing {info['missing_keys']}, "
                        f"unexpected {info['unexpected_keys']}")
    theirs_model.eval()
    extras = {name: load_file(str(output / name)) for name in spec.hf_extra_files if (output / name).is_file()}
    with torch.no_grad():
        out = theirs_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        pairs = spec.verify_pairs(ours, out, ids, mask, component, extras)
    worst = 0.0
    for what, (a, b) in pairs.items():
        if a.shape != b.shape:
            raise UserError(f"--verify: {what} shapes differ: ours {tuple(a.shape)}, exported {tuple(b.shape)}")
        diff = (a[real] - b[real]).abs().max().item()
        log(f"verify: {what}: max |ours - exported| = {diff:.3g} on {int(real.sum())} tokens")
        worst = max(worst, diff)
    if not worst <= TOLERANCE:
        raise UserError(f"--verify failed: outputs differ by {worst:.3g} (> {TOLERANCE:g})")
    return worst


def verify_native(native: NativeModel, path: Path, log: Optional[Log] = None) -> float:
    """Reloads the native file, checks every tensor is the one converted, and compares outputs."""
    from models.native import load_native

    log = _quiet(log)
    back = load_native(path)
    if back.name != native.name or set(back.state_dict) != set(native.state_dict):
        raise UserError(f"--verify failed: {path} holds other keys than were converted")
    differing = [k for k, v in native.state_dict.items() if not torch.equal(v, back.state_dict[k])]
    if differing:
        raise UserError(f"--verify failed: {path}: {len(differing)} tensors differ, first {differing[0]}")
    log(f"verify: {len(native.state_dict)} tensors of {path} equal the converted fp32 weights bitwise")
    return 0.0
