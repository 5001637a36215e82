"""The model card (README.md) written with every export: recipe, data, diagnostics, how to load it.

    model_card(...)            -> the card's text (pure: tests call it on dicts)
    read_metrics_upto(run_dir) -> the run's metrics.jsonl records, or why there are none
    write_model_card(...)      README.md of an export directory, atomically; never fails the export

The recipe comes from the resolved config the checkpoint carries (client state `config`), the
architecture from its model config, the data position and tokenizer from the conversion record
(conversion.json), the diagnostics from the last records of `metrics.jsonl` at or before the
exported step (later ones belong to training the export never saw).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml

from models.registry import MODELS, get_spec
from trainer.core.metrics import unique_temp

CARD_FILE = "README.md"
# Diagnostics, in the card's order: each loss beside its baseline (DESIGN.md, "How we know
# pretraining works"): RTD loss and AUC beside the prior's loss, accuracies beside what a model reading no
# context scores (trainer/core/diagnostics.py).
METRIC_KEYS = ("loss", "loss_mlm", "loss_rtd", "rtd_prior_loss", "rtd_auc", "rtd_accuracy", "generator_accuracy",
               "mlm_accuracy", "context_free_accuracy", "unigram_accuracy", "generator_hidden_accuracy",
               "mlm_hidden_accuracy", "hidden_unigram_accuracy", "rtd_precision", "rtd_recall", "replaced_ratio",
               "probe_accuracy", "probe_majority_accuracy")
SHARING = {"none": "none (separate tables)", "es": "es (one table updated by both losses)",
           "gdes": "gdes (E_D = sg(E_G) + E_Delta: MLM updates E_G, RTD only E_Delta)",
           "all": "all (one backbone for both towers, only the MLM and RTD heads apart; Clark et al. 2020, 3.2)"}


def read_metrics_upto(run_dir: Path) -> tuple[Optional[list], str]:
    """(records, "") from run_dir/metrics.jsonl, or (None, why not): a missing or malformed file."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None, f"metrics not found: no {path}"
    try:
        records = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                    raise ValueError(f"line {number} is not a record with an integer step")
                records.append(record)
    except (OSError, UnicodeDecodeError, ValueError) as err:  # JSONDecodeError is a ValueError
        return None, f"metrics not found: {path} is unreadable ({err})"
    return records, ""


def _last_values(records: Sequence[dict], step: int, prefix: str) -> dict[str, tuple[Any, int]]:
    """key -> (value, step) of the last non-null value of each METRIC_KEY (with `prefix`) up to `step`."""
    found = {}
    for record in records:
        if record["step"] > step:
            continue
        for key in METRIC_KEYS:
            value = record.get(prefix + key)
            if value is not None and (key not in found or record["step"] >= found[key][1]):
                found[key] = (value, record["step"])
    return found


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def diagnostics(records: Optional[Sequence[dict]], step: int, problem: str = "") -> list[str]:
    """The card's diagnostics section: one table row per metric present, training and validation."""
    if records is None:
        return [problem or "metrics not found", ""]
    train, valid = _last_values(records, step, ""), _last_values(records, step, "valid_")
    if not train and not valid:
        return [f"metrics.jsonl holds none of the diagnostic keys up to step {step}.", ""]
    train_step = max((s for _, s in train.values()), default=None)
    valid_step = max((s for _, s in valid.values()), default=None)

    def cell(found: dict, key: str, usual: Optional[int]) -> str:
        if key not in found:
            return ""
        value, at = found[key]
        return _number(value) + (f" (step {at})" if at != usual else "")

    at = lambda what, s: f"{what} at step {s}" if s is not None else f"no {what} records"  # noqa: E731
    lines = [f"The last records of the run's metrics.jsonl at or before step {step}: {at('training', train_step)}, "
             f"{at('validation', valid_step)} (validation keys are `valid_*`).", "",
             "| metric | training | validation |", "|---|---|---|"]
    for key in METRIC_KEYS:
        if key in train or key in valid:
            lines.append(f"| {key} | {cell(train, key, train_step)} | {cell(valid, key, valid_step)} |")
    return lines + [""]


def _tower_line(config: dict) -> str:
    layers = config["num_layers"]
    return (f"{layers} layer{'s' if layers != 1 else ''}, hidden {config['hidden_size']}, {config['num_heads']} heads, "
            f"FFN {config['intermediate_size']}, vocabulary {config['vocab_size']:,} (padded to "
            f"{config.get('padded_vocab_size') or config['vocab_size']:,} in training, unpadded here), "
            f"{config['max_position_embeddings']} positions"
            + (", enhanced mask decoder" if config.get("enhanced_mask_decoder") else ""))


def model_card(conversion: dict, config: dict, model_config: dict, records: Optional[Sequence[dict]], *,
               hf_class: Optional[str] = None, parameters: Optional[int] = None, files: Sequence[str] = (),
               notes: Sequence[str] = (), metrics_problem: str = "", location: str = "path/to/this/directory") -> str:
    """The README.md of an export.

    conversion: what conversion.json holds (model, component, step, source, precision, ZeRO stage,
    TP/DP sizes, consumed samples/tokens, tokenizer fingerprint); config: the run's resolved config
    (PretrainConfig.to_dict()); model_config: the registry config as a dict (RTD: nested towers);
    records: metrics.jsonl's records (None: not found, `metrics_problem` says why); hf_class: the
    transformers class of config.json (None: a native file); parameters: the exported model's count;
    files: what the export holds; notes:
    warnings of the export (e.g. the EMD dropped).
    """
    step = conversion["step"]
    lines = _heading(conversion, config, model_config, hf_class)
    lines += _architecture(conversion, config, model_config, parameters)
    lines += _recipe(conversion, config, model_config)
    lines += _data(conversion, config)
    lines += ["## Diagnostics", ""] + diagnostics(records, step, metrics_problem)
    lines += _how_to_load(conversion, hf_class, location, notes, files)
    lines += ["## Conversion", "", "What conversion.json records:", ""]
    lines += [f"- {key}: `{value}`" for key, value in conversion.items()]
    return "\n".join(lines) + "\n"


def _section(config: dict, key: str) -> dict:
    return config.get(key) or {}  # an old checkpoint may lack a section


def _heading(conversion: dict, config: dict, model_config: dict, hf_class: Optional[str]) -> list[str]:
    """The front matter (library, tags, pipeline) and the title."""
    name, component, step = conversion["model"], conversion.get("component"), conversion["step"]
    rtd = "discriminator" in model_config
    run_name = _section(config, "run").get("name", "?")
    masked_lm = hf_class is not None and hf_class.endswith("ForMaskedLM")
    front = {"library_name": "transformers"} if hf_class else {}
    front["tags"] = [name.replace("_", "-"), "fill-mask" if masked_lm or (hf_class is None and not rtd)
                     else "replaced-token-detection" if rtd and component == "discriminator" else "encoder"]
    if hf_class:
        front["pipeline_tag"] = "fill-mask" if masked_lm else "feature-extraction"
    title = f"{get_spec(name).title if name in MODELS else name} {_section(config, 'model').get('size', '')}".strip()
    return ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
            f"# {run_name}: {title}{' ' + component if component else ''}", "",
            f"Exported from step {step} of run `{run_name}` ({conversion.get('source', '?')})"
            + (f", the {component} tower" if component else "")
            + (f", as `{hf_class}`." if hf_class else
               f", as the project's native file{' (both towers)' if rtd else ''}."), ""]


def _architecture(conversion: dict, config: dict, model_config: dict, parameters: Optional[int]) -> list[str]:
    name, component = conversion["model"], conversion.get("component")
    rtd = "discriminator" in model_config
    lines = ["## Architecture", "", f"- model: `{name}`, size `{_section(config, 'model').get('size', '?')}`"]
    if rtd:
        for which in ("discriminator", "generator"):
            lines.append(f"- {which}{' (exported)' if which == component else ''}: {_tower_line(model_config[which])}")
    else:
        lines.append(f"- {_tower_line(model_config)}")
    if parameters is not None:
        lines.append(f"- parameters: {parameters / 1e6:.2f}M (fp32)")
    return lines + [""]


def _recipe(conversion: dict, config: dict, model_config: dict) -> list[str]:
    """Objective, masking, optimiser, steps and batch, precision and parallelism."""
    data, train, optim = _section(config, "data"), _section(config, "train"), _section(config, "optim")
    lines = ["## Training recipe", ""]
    if "discriminator" in model_config:
        two_stage = train.get("rtd_schedule") == "two_stage"
        sharing = model_config.get("embedding_sharing")
        lines.append(f"- objective: RTD (replaced token detection), L = L_MLM + {model_config.get('rtd_weight')}"
                     f" * L_RTD; embedding sharing {SHARING.get(sharing, sharing)}; "
                     f"schedule {train.get('rtd_schedule', 'joint')}"
                     + (f" (generator alone for {train.get('generator_steps') or 'half of the'} steps)"
                        if two_stage else ""))
    else:
        lines.append("- objective: MLM (masked language modelling)")
    lines.append(f"- masking: {data.get('mask_prob')} of the tokens ({data.get('mask_token_prob')} mask token, "
                 f"{data.get('random_token_prob')} random), whole-word masking {data.get('whole_word_mask')}, "
                 f"max span {data.get('max_span')}")
    generator_lr = f", generator_lr {optim['generator_lr']}" if optim.get("generator_lr") is not None else ""
    return lines + [
        f"- optimiser: AdamW, lr {optim.get('lr')}{generator_lr}, betas {tuple(optim.get('betas') or ())}, "
        f"eps {optim.get('eps')}, weight decay {optim.get('weight_decay')}, warmup {optim.get('warmup_steps')} "
        f"steps then linear decay to {optim.get('min_lr')}, gradient clip {train.get('grad_clip')}",
        f"- steps: {train.get('steps')} planned (this export: step {conversion['step']}), global batch "
        f"{train.get('global_batch_size')} sequences (micro batch {train.get('micro_batch_size')}), "
        f"sequence length {data.get('seq_length')}, packing {data.get('packing')}, seed {train.get('seed')}",
        f"- precision {config.get('precision', conversion.get('precision'))}, ZeRO stage "
        f"{_section(config, 'zero').get('stage', conversion.get('zero_stage'))}, tensor parallel "
        f"{_section(config, 'parallel').get('tensor', conversion.get('tp_size'))}, "
        f"data parallel {conversion.get('dp_size')}",
        ""]


def _data(conversion: dict, config: dict) -> list[str]:
    data, step = _section(config, "data"), conversion["step"]
    lines = ["## Data", ""]
    if data.get("prefix") or not data.get("blend"):
        lines.append(f"- data.prefix: `{data.get('prefix')}`")
    for weight, prefix in data.get("blend") or []:
        lines.append(f"- data.blend: weight {weight} `{prefix}`")
    return lines + [f"- tokenizer fingerprint: `{conversion.get('tokenizer_fingerprint')}`",
                    f"- consumed at step {step}: {_number(conversion.get('consumed_samples'))} samples, "
                    f"{_number(conversion.get('consumed_tokens'))} tokens", ""]


def _how_to_load(conversion: dict, hf_class: Optional[str], location: str, notes: Sequence[str],
                 files: Sequence[str]) -> list[str]:
    name, component = conversion["model"], conversion.get("component")
    lines = ["## How to load", ""]
    if hf_class:
        lines += ["```python", "import transformers", "",
                  f'tokenizer = transformers.AutoTokenizer.from_pretrained("{location}")',
                  f'model = transformers.{hf_class}.from_pretrained("{location}")'
                  + ("" if hf_class.endswith("Model") else "  # transformers.AutoModel: the encoder alone"),
                  "```", ""]
        if name in MODELS and get_spec(name).hf_extra_files and component == "discriminator":
            lines += [f"Beside the model, `{file}`: {what}; the model class above gives the hidden states it reads."
                      for file, what in get_spec(name).hf_extra_files.items()] + [""]
    else:
        lines += ["```python", "from models.native import load_native", "",
                  f'native = load_native("{location}")  # fine-tuning: model.init={location}', "```", ""]
    if notes:
        lines += ["Left out of the export:", ""] + [f"- {note}" for note in notes] + [""]
    if files:
        lines += ["Files: " + ", ".join(files) + ".", ""]
    return lines


def write_model_card(output: Path, conversion: dict, config: dict, model_config: dict,
                     log: Callable[[str], None], **card: Any) -> Path:
    """README.md in `output` (temp file, then rename); a missing/malformed metrics.jsonl only warns."""
    # source: runs/NAME/checkpoints/global_stepN; metrics.jsonl lies in runs/NAME
    records, problem = read_metrics_upto(Path(conversion.get("source", ".")).parent.parent)
    if records is None:
        log(f"WARNING: {problem}; the model card has no diagnostics")
    text = model_card(conversion, config, model_config, records, metrics_problem=problem, **card)
    path = Path(output) / CARD_FILE
    tmp = unique_temp(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
