"""Starting points from outside a run: a Hugging Face directory -> our model, and `model.init`.

    import_hf(DIR, generator_dir=None)   DeBERTa-v2/v3, RoBERTa or ELECTRA directory -> NativeModel
    initial_model(path, ...)             a native file as the initial weights of a pretraining run

What the model is comes from the directory: `model_type` roberta -> roberta; electra -> electra
(DIR is the discriminator, ElectraForPreTraining); deberta-v2 -> deberta_v3 (DIR is the
discriminator) when there is a generator, an RTD head or no MLM head, else deberta
(DebertaV2ForMaskedLM); `--model` overrides. Hugging Face has no enhanced mask decoder, so
imported DeBERTa towers have none: they compute what Hugging Face computes.
RTD models need a generator: from `generator_dir` (its shared tables must match the discriminator's
under `es`; under `gdes` E_Delta = E_D - E_G), or a fresh one (same width, half the depth for
DeBERTaV3; ELECTRA's 1/4-width generator) whose shared tables start as the discriminator's, so
E_Delta starts at zero as in the DeBERTaV3 paper. The DeBERTaV3 RTD head comes from DIR's
rtd_head.safetensors or `mask_predictions.*` weights (microsoft/DeBERTa's names), else it is fresh.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

from data.errors import UserError
from data.jsonio import read_json_object
from models.deberta_v3 import RTD_HEAD_FILE
from models.native import NativeModel, load_native
from trainer.core.safe_load import WEIGHTS_ONLY, safe_torch_load

Log = Callable[[str], None]
_HF_TYPES = {"roberta": "roberta", "electra": "electra", "deberta-v2": "deberta"}


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
            for shard in sorted(set(json.loads((path / index).read_text())["weight_map"].values())):
                sd.update(load(path / shard))
            return config, sd
        if (path / single).is_file():
            return config, dict(load(path / single))
    raise UserError(f"{path}: no model.safetensors or pytorch_model.bin weights")


def _model_type(config: dict, path: Path) -> str:
    kind = config.get("model_type")
    if kind not in _HF_TYPES:
        raise UserError(f"{path}: model_type {kind!r} is not one this project imports "
                        f"(roberta, electra, deberta-v2)")
    return _HF_TYPES[kind]


def _encoder_fields(hf: dict) -> dict:
    """Inverse of models/config.hf_encoder_kwargs (our field names), vocabulary padded for any TP <= 128."""
    from models.config import pad_vocab_size

    return dict(
        vocab_size=hf["vocab_size"], padded_vocab_size=pad_vocab_size(hf["vocab_size"], 128, 1),
        hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"], activation=hf.get("hidden_act", "gelu"),
        hidden_dropout=hf.get("hidden_dropout_prob", 0.1), attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        max_position_embeddings=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 0),
        initializer_range=hf.get("initializer_range", 0.02), layer_norm_eps=hf.get("layer_norm_eps", 1e-7),
        pad_token_id=hf.get("pad_token_id", 0) if hf.get("pad_token_id") is not None else 0,
    )


def _deberta_fields(hf: dict) -> dict:
    """DebertaV2Config -> DebertaConfig fields (HF's own defaults where config.json leaves one out)."""
    pos_att = hf.get("pos_att_type") or []
    if isinstance(pos_att, str):
        pos_att = [p.strip() for p in pos_att.lower().split("|") if p.strip()]
    return dict(_encoder_fields(hf), relative_attention=hf.get("relative_attention", False),
                pos_att_type=list(pos_att), position_buckets=hf.get("position_buckets", -1),
                max_relative_positions=hf.get("max_relative_positions", -1),
                norm_rel_ebd="layer_norm" if "layer_norm" in str(hf.get("norm_rel_ebd", "none")) else "none",
                share_att_key=hf.get("share_att_key", False),
                position_biased_input=hf.get("position_biased_input", True),
                enhanced_mask_decoder=False)


def _electra_fields(hf: dict) -> dict:
    return dict(_encoder_fields(hf), embedding_size=hf.get("embedding_size", hf["hidden_size"]))


# ----------------------------------------------------------------------------- import
def import_hf(path: str | Path, generator_dir: Optional[str | Path] = None, model: Optional[str] = None,
              embedding_sharing: Optional[str] = None, seed: int = 0, log: Optional[Log] = None) -> NativeModel:
    """A Hugging Face directory (and an optional generator directory) -> our full fp32 model."""
    from models.config import DebertaConfig, RobertaConfig, RTDConfig
    from models.registry import build_model, get_spec

    log = log or (lambda message: None)
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"--from-hf {path} is not a directory")
    hf_config, hf_sd = read_hf_dir(path)
    kind = _model_type(hf_config, path)
    has_mlm_head = any(k.startswith(("lm_predictions.", "cls.predictions.")) for k in hf_sd)
    if model is None:
        model = kind
        if kind == "deberta":
            hint = path / "conversion.json"
            exported_v3 = hint.is_file() and json.loads(hint.read_text()).get("model") == "deberta_v3"
            rtd_head = any(k.startswith("mask_predictions.") for k in hf_sd) or (path / RTD_HEAD_FILE).is_file()
            v3 = generator_dir is not None or exported_v3 or rtd_head or not has_mlm_head
            model = "deberta_v3" if v3 else "deberta"
    expected = {"roberta": "roberta", "deberta": "deberta", "deberta_v3": "deberta", "electra": "electra"}
    if model not in expected:
        raise UserError(f"--model {model!r} is unknown; use roberta, deberta, electra or deberta_v3")
    if expected[model] != kind:
        raise UserError(f"{path} holds a {hf_config.get('model_type')} model, not a {model} one")
    log(f"importing {path} ({hf_config.get('model_type')}, {len(hf_sd)} tensors) as {model}")
    spec = get_spec(model)

    def imported(*args):
        try:
            return spec.from_hf_state_dict(*args)
        except (KeyError, ValueError) as err:
            raise UserError(f"{path}: {err.args[0] if err.args else err}") from None

    if model in ("roberta", "deberta"):
        if model == "deberta" and not has_mlm_head:
            raise UserError(f"{path} has no MLM head (a DebertaV2Model); import it as --model deberta_v3")
        config = RobertaConfig(**_encoder_fields(hf_config)) if model == "roberta" else \
            DebertaConfig(**_deberta_fields(hf_config))
        sd = imported(hf_sd, config)
        native_sd = _complete(build_model(config), sd, strict=True, what=str(path))
        return NativeModel(model, config, native_sd, {"source": str(path.resolve()), "imported_from": "hf"})

    # RTD: discriminator from `path`, generator from generator_dir or fresh
    backbone = "deberta" if model == "deberta_v3" else "electra"
    fields = _deberta_fields if backbone == "deberta" else _electra_fields
    disc_fields = fields(hf_config)
    rtd_head = {k: v for k, v in hf_sd.items() if k.startswith("mask_predictions.")}
    if (path / RTD_HEAD_FILE).is_file():
        from safetensors.torch import load_file
        rtd_head = load_file(str(path / RTD_HEAD_FILE))
    if backbone == "deberta":
        dropped = [k for k in hf_sd if k.startswith(("lm_predictions.", "cls.", "mask_predictions."))]
        disc_sd = {k.removeprefix("deberta."): v for k, v in hf_sd.items() if k not in dropped}
        if any(k.startswith(("lm_predictions.", "cls.")) for k in dropped):
            log(f"  {path}: its MLM head is not part of a DeBERTaV3 discriminator; left out")
    else:
        if any(k.startswith("generator_predictions.") for k in hf_sd):
            raise UserError(f"{path} is an ELECTRA generator (ElectraForMaskedLM); pass the discriminator "
                            f"as --from-hf and this directory as --generator")
        disc_sd = hf_sd
    if generator_dir is not None:
        gen_config, gen_sd = read_hf_dir(Path(generator_dir))
        if _model_type(gen_config, Path(generator_dir)) != expected[model]:
            raise UserError(f"--generator {generator_dir} holds a {gen_config.get('model_type')} model, "
                            f"not a {expected[model]} one")
        gen_fields = fields(gen_config)
        source = f"generator from {generator_dir}"
    else:
        gen_fields = dict(disc_fields)
        if backbone == "deberta":
            gen_fields.update(num_layers=max(1, disc_fields["num_layers"] // 2),  # the registry's v3 generator
                              enhanced_mask_decoder=not disc_fields["position_biased_input"])
        else:  # ELECTRA's generator: 1/4 of the discriminator's width, the same embeddings
            gen_fields.update(hidden_size=max(disc_fields["hidden_size"] // 4, 1),
                              num_heads=max(disc_fields["num_heads"] // 4, 1),
                              intermediate_size=max(disc_fields["intermediate_size"] // 4, 1))
        gen_sd = None
        source = f"fresh generator (seed {seed}), its shared embeddings copied from the discriminator"
    from models.rtd import RTD_DEFAULTS
    sharing = embedding_sharing or RTD_DEFAULTS[backbone].get("embedding_sharing", "es")
    config = RTDConfig(generator=gen_fields, discriminator=disc_fields, backbone=backbone,
                       embedding_sharing=sharing)
    torch.manual_seed(seed)
    fresh = build_model(config)
    if gen_sd is None:  # the fresh generator in Hugging Face form, shared tables = the discriminator's
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gen_sd = spec.to_hf_state_dict(fresh.state_dict(), config, "generator")
        if sharing != "none":
            for key in gen_sd:
                bare = key.removeprefix("deberta.").removeprefix("electra.")
                table = bare in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight")
                for disc_key in (bare, "electra." + bare):
                    if table and disc_key in disc_sd and disc_sd[disc_key].shape == gen_sd[key].shape:
                        gen_sd[key] = disc_sd[disc_key].clone()
    log(f"  {source}; embedding sharing {sharing}")
    towers = {"generator": gen_sd, "discriminator": disc_sd}
    if backbone == "deberta":
        towers["rtd_head"] = rtd_head
        log(f"  RTD head: {'from ' + str(path) if rtd_head else 'fresh (seed ' + str(seed) + ')'}")
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
    native = load_native(path)
    if native.name != name:
        raise UserError(f"model.init={path} holds a {native.name} model but model.name is {name}")
    towers = [native.config.generator, native.config.discriminator] if hasattr(native.config, "generator") \
        else [native.config]
    for cfg in towers:
        if cfg.vocab_size != vocab_size:
            raise UserError(f"model.init={path} has a vocabulary of {cfg.vocab_size}, the tokenizer "
                            f"{vocab_size}; use the tokenizer the model was trained with")
        if cfg.padded_vocab_size % tp_size:
            raise UserError(f"model.init={path}: its padded vocabulary ({cfg.padded_vocab_size}) is not "
                            f"divisible by parallel.tensor={tp_size}")
        limit = cfg.max_position_embeddings - (cfg.pad_token_id + 1 if name == "roberta" else 0)
        if seq_length > limit:
            raise UserError(f"model.init={path} takes at most {limit} positions; data.seq_length is {seq_length}")
    return native.config, native.state_dict
