"""Checkpoint conversion (tools/convert_checkpoint.py, trainer/convert/export.py, trainer/convert/hf_import.py).

One module fixture trains four tiny 2-rank runs that cover every model type, ZeRO 0-3, TP=2 and
fp32/bf16 between them; each is converted and compared with Hugging Face transformers in-process.
The merge itself is checked against the training processes' own weights: every rank's model-states
file holds its TP shard of the module (fp32, or bf16 rounded from the fp32 masters).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from launch import ROOT, as_overrides, deepspeed_cmd, run
from data.errors import UserError
from models.deberta_v3 import RTD_HEAD_FILE
from models.native import load_native
from models.parallel import partition_dims, shard_state_dict
from trainer.convert.export import locate, read_checkpoint, verify_batch, verify_hf, write_hf, write_native
from trainer.convert.hf_import import import_hf
from tests.parity import LEGACY_MLM_HEAD, rename_modules

pytestmark = pytest.mark.distributed

# name -> (model, ZeRO stage, TP, precision)
RUNS = {
    "roberta_z1_bf16": ("roberta", 1, 1, "bf16"),  # DeepSpeed's BF16_Optimizer: bf16_zero_* partitions
    "deberta_z3": ("deberta", 3, 1, "fp32"),  # every parameter partitioned (threshold 0)
    "electra_z2_tp2": ("electra", 2, 2, "fp32"),
    # ZeRO-0 bf16: DeepSpeed's FP16_Optimizer keeps fp32 masters per parameter group (per tower here)
    "deberta_v3_z0_tp2_bf16": ("deberta_v3", 0, 2, "bf16"),
}
TOWERS = {"roberta": [None], "deberta": [None], "electra": ["discriminator", "generator"],
          "deberta_v3": ["discriminator", "generator"]}


def overrides(prefix: Path, runs: Path, name: str, model: str, stage: int, tp: int, precision: str, **extra):
    values = {
        "data.prefix": prefix, "data.seq_length": 32, "data.valid_fraction": 0.05,
        "model.name": model, "model.size": "debug", "run.dir": runs, "run.name": name,
        "train.steps": 3, "train.micro_batch_size": 2, "train.global_batch_size": 4, "train.seed": 5,
        "optim.lr": 5e-3, "optim.warmup_steps": 0, "log.every_steps": 1, "checkpoint.every_steps": 2,
        "checkpoint.keep_last": 2, "eval.every_steps": 0, "zero.stage": stage, "parallel.tensor": tp,
        "precision": precision, "zero.param_persistence_threshold": 0,
    }
    return as_overrides(values, **extra)


@pytest.fixture(scope="module")
def prefix(demo_corpus, spm_tokenizer, tmp_path_factory) -> Path:
    from data.preprocess import preprocess
    path = tmp_path_factory.mktemp("convert_data") / "corpus"
    preprocess([demo_corpus.path], spm_tokenizer.path, path, workers=1)
    return path


@pytest.fixture(scope="module")
def runs(prefix, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("convert_runs")
    for name, (model, stage, tp, precision) in RUNS.items():
        run(deepspeed_cmd(2, overrides(prefix, root, name, model, stage, tp, precision)))
    return root


@pytest.fixture(scope="module")
def converted(runs):
    return {name: read_checkpoint(locate(runs / name / "checkpoints")) for name in RUNS}


@pytest.fixture(scope="module")
def exports(runs, converted, tmp_path_factory):
    """name -> component -> exported HF directory (tokenizer included)."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for name, native in converted.items():
        for component in TOWERS[native.name]:
            path = root / f"{name}_{component or 'model'}"
            write_hf(native, path, component, runs / name / "tokenizer")
            out.setdefault(name, {})[component] = path
    return out


# ----------------------------------------------------------------------------- reading
def test_latest_and_step_selection(runs):
    checkpoints = runs / "roberta_z1_bf16" / "checkpoints"
    assert locate(checkpoints).name == "global_step3"
    assert locate(runs / "roberta_z1_bf16").name == "global_step3"  # the run directory works too
    assert locate(checkpoints, step=2).name == "global_step2"
    with pytest.raises(UserError, match="no checkpoint of step 7; steps there: 2, 3"):
        locate(checkpoints, step=7)


@pytest.mark.parametrize("name", [n for n, spec in RUNS.items() if spec[1] < 3])
def test_merged_fp32_weights_are_every_ranks_module(runs, converted, name):
    """Sharded again, the merged weights are each TP rank's saved module (bf16: its rounding)."""
    from models.registry import build_model

    native = converted[name]
    _, _, tp, precision = RUNS[name]
    dims = partition_dims(build_model(native.config))
    tag_dir = locate(runs / name / "checkpoints")
    finer = 0
    for rank in range(tp):
        module = torch.load(tag_dir / f"mp_rank_{rank:02d}_model_states.pt", weights_only=False)["module"]
        shard = shard_state_dict(native.state_dict, dims, rank, tp)
        assert set(shard) == set(module)
        for key, saved in module.items():
            assert shard[key].dtype == torch.float32
            expected = saved.float() if precision == "fp32" else saved
            torch.testing.assert_close(shard[key].to(saved.dtype), expected, atol=0, rtol=0, msg=key)
            finer += int(not torch.equal(shard[key], saved.float()))
    # bf16 runs: the fp32 masters were read, not the bf16 weights
    assert (finer > 0) == (precision == "bf16")


def test_zero3_gathers_full_parameters(converted):
    native = converted["deberta_z3"]
    assert native.meta["zero_stage"] == 3
    model = native.build()  # strict load: every parameter has its full shape
    assert all(v.abs().sum() > 0 for k, v in model.state_dict().items() if k.endswith("weight"))


def test_zero3_with_tp2_and_dp2_merges_to_the_zero1_weights(prefix, tmp_path):
    """4 ranks, TP=2 x DP=2: ZeRO-3 partitions every TP shard over the data-parallel pair. Merged,
    its weights are those of the same run under ZeRO-1 (dropout off: the same arithmetic)."""
    merged = {}
    for stage in (3, 1):
        name = f"z{stage}"
        run(deepspeed_cmd(4, overrides(prefix, tmp_path, name, "deberta_v3", stage, 2, "fp32",
                                       model__overrides="{hidden_dropout: 0.0, attention_dropout: 0.0}")))
        merged[stage] = read_checkpoint(locate(tmp_path / name / "checkpoints"))
    assert merged[3].meta["zero_stage"] == 3 and merged[3].meta["tp_size"] == 2
    files = {p.name for p in locate(tmp_path / "z3" / "checkpoints").iterdir()}
    assert "zero_pp_rank_1_mp_rank_01_model_states.pt" in files  # DP rank 1 of TP rank 1 holds a partition
    assert set(merged[3].state_dict) == set(merged[1].state_dict)
    for key, value in merged[1].state_dict.items():
        torch.testing.assert_close(merged[3].state_dict[key], value, atol=1e-6, rtol=0, msg=key)


# ----------------------------------------------------------------------------- Hugging Face
@pytest.mark.parametrize("name", list(RUNS))
def test_hf_export_matches_ours(converted, exports, name):
    import transformers

    native = converted[name]
    for component, path in exports[name].items():
        config = transformers.AutoConfig.from_pretrained(path)
        tower = getattr(native.config, component) if component else native.config
        assert config.vocab_size == tower.vocab_size < tower.padded_vocab_size  # padding trimmed
        expected = {"roberta": "RobertaForMaskedLM", "deberta": "DebertaV2ForMaskedLM",
                    ("electra", "discriminator"): "ElectraForPreTraining", ("electra", "generator"): "ElectraForMaskedLM",
                    ("deberta_v3", "discriminator"): "DebertaV2Model", ("deberta_v3", "generator"): "DebertaV2ForMaskedLM"}
        assert config.architectures == [expected.get(native.name) or expected[(native.name, component)]]
        diff = verify_hf(native, path, component)  # loads by config.json's class: no missing/unexpected keys
        assert diff <= 1e-4
        assert (path / RTD_HEAD_FILE).is_file() == (native.name == "deberta_v3" and component == "discriminator")
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        assert tokenizer.pad_token_id == tower.pad_token_id
        card = (path / "README.md").read_text()  # the model card
        assert f"step 3 of run `{name}`" in card and f"transformers.{config.architectures[0]}" in card
        assert ("rtd_head.safetensors" in card) == (path / RTD_HEAD_FILE).is_file()


def test_verify_detects_a_wrong_export(converted, exports, tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "broken"
    shutil.copytree(exports["electra_z2_tp2"]["discriminator"], path)
    sd = load_file(str(path / "model.safetensors"))
    key = "electra.encoder.layer.1.output.dense.weight"
    sd[key] = sd[key] * 1.5  # not a constant shift: the LayerNorm after it would remove that
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="--verify failed: outputs differ by"):
        verify_hf(converted["electra_z2_tp2"], path, "discriminator")


def test_finetune_the_export_with_hugging_face_classes(exports):
    """The user's path: AutoTokenizer + *ForSequenceClassification from the export, a few AdamW steps."""
    import transformers

    for name, component, cls in (("deberta_v3_z0_tp2_bf16", "discriminator", "DebertaV2ForSequenceClassification"),
                                 ("roberta_z1_bf16", None, "RobertaForSequenceClassification")):
        path = exports[name][component]
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        model = getattr(transformers, cls).from_pretrained(path, num_labels=2)
        batch = tokenizer(["a good sentence", "def f(x): return x", "another one", "bad"], padding=True,
                          return_tensors="pt")
        labels = torch.tensor([1, 0, 1, 0])
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        torch.manual_seed(0)
        losses = []
        for _ in range(4):
            loss = model(**batch, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], (name, losses)


# ----------------------------------------------------------------------------- native and import
def test_native_file_round_trip(converted, tmp_path):
    native = converted["deberta_v3_z0_tp2_bf16"]
    path = write_native(native, tmp_path / "native", None)
    back = load_native(path)
    assert back.name == "deberta_v3" and back.config == native.config and back.meta["step"] == 3
    assert "Exported from step 3 of run `deberta_v3_z0_tp2_bf16`" in (tmp_path / "native" / "README.md").read_text()
    assert set(back.state_dict) == set(native.state_dict)
    assert all(torch.equal(back.state_dict[k], v) for k, v in native.state_dict.items())
    assert any(k.startswith("generator.") for k in back.state_dict)  # both towers
    ids, mask = verify_batch(native.config.discriminator.vocab_size, 0, 12)
    with torch.no_grad():
        torch.testing.assert_close(back.build().eval().discriminator.rtd_logits(ids, mask),
                                   native.build().eval().discriminator.rtd_logits(ids, mask), atol=0, rtol=0)


def _hf_weights(path: Path, name: str = "model.safetensors") -> dict:
    from safetensors.torch import load_file
    return load_file(str(path / name))


@pytest.mark.parametrize("name", ["roberta_z1_bf16", "deberta_z3", "electra_z2_tp2", "deberta_v3_z0_tp2_bf16"])
def test_import_then_export_gives_identical_weights(converted, exports, name, tmp_path):
    native = converted[name]
    towers = exports[name]
    imported = import_hf(towers[TOWERS[native.name][0]], generator_dir=towers.get("generator"))
    assert imported.name == native.name
    for component, path in towers.items():
        again = tmp_path / f"again_{component}"
        write_hf(imported, again, component, None)
        before, after = _hf_weights(path), _hf_weights(again)
        assert set(before) == set(after), component
        for key in before:
            # DeBERTaV3's E_D = E_G + (E_D - E_G): equal up to one float rounding
            atol = 1e-6 if (native.name == "deberta_v3" and "word_embeddings" in key
                            and component == "discriminator") else 0
            torch.testing.assert_close(after[key], before[key], atol=atol, rtol=0, msg=f"{component} {key}")
        if (path / RTD_HEAD_FILE).is_file():
            assert _hf_weights(path, RTD_HEAD_FILE).keys() == _hf_weights(again, RTD_HEAD_FILE).keys()
            for key, value in _hf_weights(path, RTD_HEAD_FILE).items():
                assert torch.equal(value, _hf_weights(again, RTD_HEAD_FILE)[key])


def test_import_without_generator_starts_a_fresh_one(exports):
    imported = import_hf(exports["deberta_v3_z0_tp2_bf16"]["discriminator"])
    assert "fresh generator" in imported.meta["generator"]
    sd = imported.state_dict
    delta = [k for k in sd if k.endswith("gdes_delta.weight")]
    assert delta and all(sd[k].abs().max() == 0 for k in delta)  # E_G = E_D: E_Delta starts at zero
    ids, mask = verify_batch(imported.config.discriminator.vocab_size, 0, 12)
    assert torch.isfinite(imported.build().eval().discriminator.rtd_logits(ids, mask)).all()


def test_pretraining_continues_from_an_imported_native_file(prefix, runs, exports, tmp_path):
    """model.init: the run starts from the file's weights (a tiny LR keeps them after one step)."""
    native_dir = tmp_path / "init"
    write_native(import_hf(exports["electra_z2_tp2"]["discriminator"],
                           generator_dir=exports["electra_z2_tp2"]["generator"]), native_dir, None)
    start = load_native(native_dir)
    run([sys.executable, "-m", "trainer.pretrain",  # one process: DeepSpeed without its launcher
         *overrides(prefix, runs, "from_native", "electra", 1, 1, "fp32", train__steps=1, optim__lr=1e-9,
                    optim__weight_decay=0.0, model__init=native_dir / "model.pt")])
    after = read_checkpoint(locate(runs / "from_native"))
    assert after.config == start.config
    for key, value in start.state_dict.items():
        torch.testing.assert_close(after.state_dict[key], value, atol=1e-6, rtol=0, msg=key)


# ----------------------------------------------------------------------------- errors
def test_user_errors(runs, exports, tmp_path):
    with pytest.raises(UserError, match="is not a directory"):
        locate(tmp_path / "nowhere")
    with pytest.raises(UserError, match="holds no committed checkpoint"):
        locate(tmp_path)
    broken = tmp_path / "checkpoints"
    shutil.copytree(runs / "deberta_z3" / "checkpoints", broken)
    (broken / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(UserError, match="rank file zero_pp_rank_1_mp_rank_00_optim_states.pt .*is missing"):
        read_checkpoint(locate(broken))
    with pytest.raises(UserError, match="holds a roberta model, not a deberta_v3 one"):
        import_hf(exports["roberta_z1_bf16"][None], model="deberta_v3")
    with pytest.raises(UserError, match="is not a Hugging Face model directory"):
        import_hf(tmp_path)
    with pytest.raises(UserError, match="is an ELECTRA generator"):
        import_hf(exports["electra_z2_tp2"]["generator"])


def test_cli_exports_and_fails_in_one_line(runs, tmp_path):
    tool = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py")]
    ok = run(tool + ["--checkpoint", runs / "electra_z2_tp2" / "checkpoints", "--output", tmp_path / "g",
                     "--component", "generator", "--step", "2", "--verify"], check=False)
    assert ok.returncode == 0, ok.stderr
    assert "ZeRO-2, TP=2" in ok.stdout and "ElectraForMaskedLM" in ok.stdout and "verify: MLM logits" in ok.stdout
    # the model card: step 2's training record, not step 3's (logged after the exported checkpoint)
    card = (tmp_path / "g" / "README.md").read_text()
    assert yaml.safe_load(card.split("---\n")[1])["pipeline_tag"] == "fill-mask"
    records = {r["step"]: r for r in map(json.loads, (runs / "electra_z2_tp2" / "metrics.jsonl").open()) if "loss" in r}
    assert "Exported from step 2 of run `electra_z2_tp2`" in card and "the generator tower" in card
    assert f"| loss | {records[2]['loss']:.4f} |" in card and f"{records[3]['loss']:.4f}" not in card
    bad = run(tool + ["--checkpoint", runs / "electra_z2_tp2", "--output", tmp_path / "x", "--step", "9"], check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and "no checkpoint of step 9" in bad.stderr


def test_flattened_fp32_masters_read_like_per_parameter_ones(runs, converted, tmp_path):
    """On GPUs DeepSpeed's fused FP16_Optimizer (ZeRO-0 bf16/fp16) saves one flat fp32 tensor per
    parameter group instead of the unfused optimizer's per-parameter list: the same run's masters
    flattened that way give the same weights."""
    name = "deberta_v3_z0_tp2_bf16"
    copy = tmp_path / "checkpoints"
    shutil.copytree(runs / name / "checkpoints", copy)
    tag_dir = locate(copy)
    for rank in range(2):
        path = tag_dir / f"mp_rank_{rank:02d}_model_states.pt"
        states = torch.load(path, weights_only=False)
        groups = states["optimizer"].pop("fp32_groups")
        states["optimizer"]["fp32_groups_flat"] = [torch.cat([t.flatten() for t in g]) for g in groups]
        torch.save(states, path)
    flat = read_checkpoint(tag_dir, check_files=False)
    assert all(torch.equal(flat.state_dict[k], v) for k, v in converted[name].state_dict.items())
    with pytest.raises(UserError, match="failed verification: .*(checksum|truncated)"):
        read_checkpoint(tag_dir)  # the manifest noticed the rewritten files


# ------------------------------------------------------------------ models built by transformers itself
SMALL = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64)
V3_ATTENTION = dict(relative_attention=True, position_buckets=16, pos_att_type=["p2c", "c2p"],
                    norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False)


def _transformers_models():
    import transformers as t
    small_gen = {**SMALL, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}
    return {  # name -> (model, generator, what we import it as)
        "roberta": (t.RobertaForMaskedLM(t.RobertaConfig(**SMALL, pad_token_id=1)), None, "roberta"),
        "deberta_legacy_head": (t.DebertaV2ForMaskedLM(t.DebertaV2Config(**SMALL, **V3_ATTENTION, legacy=True)),
                                None, "deberta"),
        "deberta_v3": (t.DebertaV2Model(t.DebertaV2Config(**SMALL, **V3_ATTENTION)), None, "deberta_v3"),
        "electra": (t.ElectraForPreTraining(t.ElectraConfig(**SMALL, embedding_size=16)),
                    t.ElectraForMaskedLM(t.ElectraConfig(**small_gen, embedding_size=16)), "electra"),
    }


@pytest.mark.parametrize("name", ["roberta", "deberta_legacy_head", "deberta_v3", "electra"])
def test_import_of_a_transformers_model_computes_the_same_and_exports_back(name, tmp_path):
    torch.manual_seed(0)
    hf, generator, expected = _transformers_models()[name]
    hf.save_pretrained(tmp_path / "hf")
    if generator is not None:
        generator.save_pretrained(tmp_path / "gen")
        with pytest.raises(UserError, match="differs from the generator's.*try --embedding-sharing"):
            import_hf(tmp_path / "hf", generator_dir=tmp_path / "gen")  # es needs one shared table
    native = import_hf(tmp_path / "hf", generator_dir=tmp_path / "gen" if generator is not None else None,
                       embedding_sharing="none" if generator is not None else None)
    assert native.name == expected
    ids, mask = verify_batch(300, hf.config.pad_token_id, 10)
    model = native.build().eval()
    with torch.no_grad():
        theirs = hf.eval()(input_ids=ids, attention_mask=mask)
        if expected == "deberta_v3":  # DebertaV2Model: hidden states
            ours, theirs = model.discriminator.backbone.encode, theirs.last_hidden_state
        elif expected == "electra":
            ours, theirs = model.discriminator.rtd_logits, theirs.logits
        else:
            ours, theirs = model.logits, theirs.logits
        real = mask.bool()  # HF also masks padded queries, whose outputs nobody reads
        torch.testing.assert_close(ours(ids, mask)[real], theirs[real], atol=1e-5, rtol=0)
    component = "discriminator" if expected in ("electra", "deberta_v3") else None
    write_hf(native, tmp_path / "again", component, None)
    before, after = _hf_weights(tmp_path / "hf"), _hf_weights(tmp_path / "again")
    # the legacy MLM head (cls.predictions.*) is written in the current layout (lm_predictions.lm_head.*)
    renamed = rename_modules(before, {legacy: current for current, legacy in LEGACY_MLM_HEAD.items()})
    assert set(renamed) == set(after)
    assert all(torch.equal(renamed[k], after[k]) for k in after)
