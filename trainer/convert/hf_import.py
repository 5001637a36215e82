"""Starting points from outside a run: a Hugging Face directory -> our model, and `model.init`.

    read_hf_dir(DIR)                     (config.json, every tensor) of a transformers directory: the one
                                         reader of HF weights (single or sharded safetensors / .bin)
    transformers_config(config, DIR)     config.json's dict -> its transformers config (class defaults)
    import_hf(DIR, generator_dir=None)   a Hugging Face directory -> NativeModel
    initial_model(path, ...)             a native file as the initial weights of a pretraining run

What the model is comes from the directory: its `model_type` names a tower family (models/registry.py
FAMILIES); of the architectures built on that family, the one that recognises the directory (its
adapter's `hf_recognises`, e.g. a DeBERTaV3 discriminator by its RTD head or missing MLM head), the
one conversion.json names, or the two-tower one when a generator is given; `--model` overrides.
Hugging Face has no enhanced mask decoder, so imported DeBERTa towers have none: they compute what
Hugging Face computes.
RTD models need a generator: from `generator_dir` (its shared tables must match the discriminator's
under `es`; under `gdes` E_Delta = E_D - E_G), or a fresh one (the adapter's `fresh_generator`)
whose shared tables start as the discriminator's, so E_Delta starts at zero as in the DeBERTaV3
paper. Files beside the weights that the adapter names (`hf_extra_files`: the DeBERTaV3 RTD head)
win over the same weights inside the model file.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

from data.errors import UserError
from data.jsonio import read_json_object
from models.native import NativeModel, load_native
from trainer.core.safe_load import WEIGHTS_ONLY, safe_torch_load

Log = Callable[[str], None]


# ----------------------------------------------------------------------------- reading
def read_hf_dir(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, every tensor of the weight files) of a transformers directory."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a Hugging Face model directory (no config.json)")
    config = read_json_object(path / "config.json", "fix the file or download the model again")
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for index, single, load in (
        ("model.safetensors.index.json", "model.safetensors", lambda f: load_file(str(f))),
        ("pytorch_model.bin.index.json", "pytorch_model.bin",
         lambda f: safe_torch_load(f, allowed=WEIGHTS_ONLY)),
    ):
        if (path / index).is_file():
            for shard in _shards(path / index):
                sd.update(load(path / shard))
            return config, sd
        if (path / single).is_file():
            return config, dict(load(path / single))
    raise UserError(f"{path}: no model.safetensors or pytorch_model.bin weights")


def _shards(index: Path) -> list[str]:
    """The weight files a sharded checkpoint's index names: plain file names beside it, each once."""
    weight_map = read_json_object(index, "fix the file or download the model again").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{index}: no \"weight_map\" of parameter names to files")
    shards = sorted(set(map(str, weight_map.values())))
    for shard in shards:
        if Path(shard).name != shard or not (index.parent / shard).is_file():
            raise UserError(f"{index}: names weight file {shard!r}, which is not a file beside it")
    return shards


def transformers_config(config: dict, path: Path):
    """config.json's dict -> the transformers config of its model_type (the class's defaults where
    the file leaves a key out); UserError for a model_type no registered family reads."""
    import transformers

    from models.registry import family_of_hf

    family_of_hf(config.get("model_type"))  # the one-line error for a type we do not import
    try:
        return transformers.CONFIG_MAPPING[config["model_type"]].from_dict(config)
    except (TypeError, ValueError) as err:
        raise UserError(f"{path}/config.json: {err}") from None


def _family(config: dict, path: Path) -> str:
    from models.registry import family_of_hf

    try:
        return family_of_hf(config.get("model_type"))
    except UserError as err:
        raise UserError(f"{path}: {err}") from None


def _tower_fields(config: dict, path: Path) -> dict:
    from models.registry import get_family

    return get_family(_family(config, path)).fields_from_hf(transformers_config(config, path))


def _pick_model(path: Path, family: str, hf_sd: dict, generator_given: bool) -> str:
    """The architecture a directory of `family` holds (see the module docstring)."""
    from models.registry import MODELS, hf_candidates

    candidates = hf_candidates(family)
    hint = path / "conversion.json"
    named = json.loads(hint.read_text()).get("model") if hint.is_file() else None
    if named in candidates:
        return named
    if generator_given:
        towers = [name for name in candidates if MODELS[name].rtd_import is not None]
        if towers:
            return towers[0]
    files = {p.name for p in path.iterdir()}
    keys = set(hf_sd)
    for name in candidates:
        recognises = MODELS[name].hf_recognises
        if recognises is None or recognises(keys, files):
            return name
    return candidates[-1]


# ----------------------------------------------------------------------------- import
def import_hf(path: str | Path, generator_dir: Optional[str | Path] = None, model: Optional[str] = None,
              embedding_sharing: Optional[str] = None, seed: int = 0, log: Optional[Log] = None) -> NativeModel:
    """A Hugging Face directory (and an optional generator directory) -> our full fp32 model."""
    from models.registry import MODELS, build_model, get_spec

    log = log or (lambda message: None)
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"--from-hf {path} is not a directory")
    hf_config, hf_sd = read_hf_dir(path)
    family = _family(hf_config, path)
    model = model or _pick_model(path, family, hf_sd, generator_dir is not None)
    if model not in MODELS:
        raise UserError(f"--model {model!r} is unknown; use {', '.join(MODELS)}")
    spec = get_spec(model)
    if spec.family != family:
        raise UserError(f"{path} holds a {hf_config.get('model_type')} model, not a {model} one")
    log(f"importing {path} ({hf_config.get('model_type')}, {len(hf_sd)} tensors) as {model}")
    fields = _tower_fields(hf_config, path)
    if spec.rtd_import is None:
        config = spec.config_class(**fields)
        try:
            sd = spec.from_hf_state_dict(hf_sd, config)
        except (KeyError, ValueError) as err:
            raise UserError(f"{path}: {err.args[0] if err.args else err}") from None
        native_sd = _complete(build_model(config), sd, strict=True, what=str(path))
        return NativeModel(model, config, native_sd, {"source": str(path.resolve()), "imported_from": "hf"})
    return _import_rtd(model, path, fields, hf_sd, generator_dir, embedding_sharing, seed, log)


def _import_rtd(model: str, path: Path, disc_fields: dict, hf_sd: dict, generator_dir, embedding_sharing,
                seed: int, log: Log) -> NativeModel:
    """The discriminator from `path`, the generator from generator_dir or fresh (see the docstring)."""
    from models.registry import build_model, get_family, get_spec

    spec = get_spec(model)
    try:
        disc_sd, extras, dropped_mlm = spec.rtd_import.discriminator(hf_sd)
    except ValueError as err:
        raise UserError(f"{path} {err}") from None
    if dropped_mlm:
        log(f"  {path}: its MLM head is not part of a {model} discriminator; left out")
    extras.update(_extra_files(spec, path))
    if generator_dir is not None:
        gen_config, gen_sd = read_hf_dir(Path(generator_dir))
        if _family(gen_config, Path(generator_dir)) != spec.family:
            raise UserError(f"--generator {generator_dir} holds a {gen_config.get('model_type')} model, "
                            f"not a {get_family(spec.family).hf_model_type} one")
        gen_fields = _tower_fields(gen_config, Path(generator_dir))
        source = f"generator from {generator_dir}"
    else:
        gen_fields, gen_sd = spec.rtd_import.fresh_generator(disc_fields), None
        source = f"fresh generator (seed {seed}), its shared embeddings copied from the discriminator"
    config = spec.rtd_import.config(gen_fields, disc_fields, embedding_sharing)
    torch.manual_seed(seed)
    fresh = build_model(config)
    if gen_sd is None:  # the fresh generator in Hugging Face form, shared tables = the discriminator's
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gen_sd = spec.to_hf_state_dict(fresh.state_dict(), config, "generator")
        if config.embedding_sharing != "none":
            _copy_shared_tables(gen_sd, disc_sd, get_family(spec.family).hf_prefix)
    log(f"  {source}; embedding sharing {config.embedding_sharing}")
    towers = {"generator": gen_sd, "discriminator": disc_sd}
    for name, tensors in extras.items():
        towers[name] = tensors
        log(f"  {name.replace('_', ' ')}: {'from ' + str(path) if tensors else 'fresh (seed ' + str(seed) + ')'}")
    try:
        sd = spec.from_hf_state_dict(towers, config)
    except ValueError as err:
        hint = "; try --embedding-sharing gdes or none" if "differs" in str(err) else ""
        raise UserError(f"{path}: {err}{hint}") from None
    except KeyError as err:
        raise UserError(f"{path}: {err.args[0]}") from None
    native_sd = _complete(fresh, sd, strict=False, what=str(path))
    meta = {"source": str(path.resolve()), "imported_from": "hf", "generator": source}
    return NativeModel(model, config, native_sd, meta)


def _extra_files(spec, path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The adapter's files beside the HF weights (hf_extra_files), keyed by the file's stem ("rtd_head")."""
    from safetensors.torch import load_file

    return {Path(name).name.split(".")[0]: load_file(str(path / name))
            for name in spec.hf_extra_files if (path / name).is_file()}


def _copy_shared_tables(gen_sd: dict, disc_sd: dict, prefix: str) -> None:
    """The fresh generator's word / position tables := the discriminator's, where shapes agree."""
    for key in gen_sd:
        bare = key.removeprefix(prefix)
        table = bare in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight")
        for disc_key in (bare, prefix + bare):
            if table and disc_key in disc_sd and disc_sd[disc_key].shape == gen_sd[key].shape:
                gen_sd[key] = disc_sd[disc_key].clone()


def _complete(model: torch.nn.Module, sd: dict, strict: bool, what: str) -> dict[str, torch.Tensor]:
    """The model's full state dict with `sd` loaded over it (what HF lacks stays as initialised)."""
    try:
        result = model.load_state_dict(sd, strict=strict)
    except RuntimeError as err:
        raise UserError(f"{what}: the weights do not fit the model its config.json describes: "
                        f"{str(err).splitlines()[1] if len(str(err).splitlines()) > 1 else err}") from None
    if result.unexpected_keys:
        raise UserError(f"{what}: unexpected weights {result.unexpected_keys[:3]}")
    return {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- model.init
def initial_model(path: str, name: str, vocab_size: int, tp_size: int, seq_length: int):
    """(config, full fp32 state dict) of a native file to start pretraining from (`model.init`).

    The file's architecture and config are used as they are (model.size and model.overrides do not
    apply); the run's model.name, tokenizer size and sequence length must fit them.
    """
    from models.registry import get_family, get_spec

    native = load_native(path)
    if native.name != name:
        raise UserError(f"model.init={path} holds a {native.name} model but model.name is {name}")
    towers = [native.config.generator, native.config.discriminator] if hasattr(native.config, "generator") \
        else [native.config]
    family = get_family(get_spec(name).family)
    for cfg in towers:
        if cfg.vocab_size != vocab_size:
            raise UserError(f"model.init={path} has a vocabulary of {cfg.vocab_size}, the tokenizer "
                            f"{vocab_size}; use the tokenizer the model was trained with")
        if cfg.padded_vocab_size % tp_size:
            raise UserError(f"model.init={path}: its padded vocabulary ({cfg.padded_vocab_size}) is not "
                            f"divisible by parallel.tensor={tp_size}")
        limit = family.position_rows(cfg)
        if seq_length > limit:
            raise UserError(f"model.init={path} takes at most {limit} positions; data.seq_length is {seq_length}")
    return native.config, native.state_dict
