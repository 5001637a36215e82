import pytest

from data.errors import UserError
from trainer.pretraining.config import PretrainConfig, load_config
from trainer.core.deepspeed_json import deepspeed_config, deepspeed_json, trainer_clips_gradients


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_and_overrides_are_typed(tmp_path):
    path = write(tmp_path, "data: {prefix: bin/x, seq_length: 64}\ntrain: {steps: 5}\noptim: {lr: 1e-3, warmup_steps: 2}\n")
    cfg = load_config(path, ["train.micro_batch_size=2", "train.global_batch_size=8", "optim.betas=[0.9, 0.95]",
                             "model.overrides={hidden_dropout: 0.0}", "precision=bf16"])
    assert cfg.data.seq_length == 64 and cfg.train.steps == 5
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.model.overrides == {"hidden_dropout": 0.0}
    assert cfg.precision == "bf16"


def test_unknown_key_is_named(tmp_path):
    path = write(tmp_path, "data: {prefix: x, seq_lenght: 64}\n")
    with pytest.raises(UserError, match=r"unknown config key data\.seq_lenght"):
        load_config(path)
    with pytest.raises(UserError, match=r"unknown config key trian"):
        load_config(None, ["data.prefix=x", "trian.steps=3"])


def test_wrong_type_is_named():
    with pytest.raises(UserError, match=r"^train\.steps must be int, got 'many' \(str\)$"):
        load_config(None, ["data.prefix=x", "train.steps=many"])
    with pytest.raises(UserError, match=r"^checkpoint\.resume must be bool \(true or false\), got 3 \(int\)$"):
        load_config(None, ["data.prefix=x", "checkpoint.resume=3"])
    with pytest.raises(UserError, match=r"^optim\.generator_lr must be float \| None, got 'fast' \(str\)$"):
        load_config(None, ["data.prefix=x", "optim.generator_lr=fast"])


def test_model_configs_use_the_same_checker():
    """Model configs (keyword arguments, no YAML) and run configs report a wrong type or a non-finite
    float alike; model configs used to accept NaN and infinity."""
    from models.config import ElectraConfig, RobertaConfig, RTDConfig

    sizes = dict(vocab_size=99, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=37)
    with pytest.raises(UserError, match=r"^model config: nsp_weight=nan must be a finite number"):
        RobertaConfig(max_position_embeddings=20, nsp_weight=float("nan"), **sizes)
    with pytest.raises(UserError, match=r"^model config: padded_vocab_size must be int \| None, got 1.5 \(float\)$"):
        RobertaConfig(max_position_embeddings=20, padded_vocab_size=1.5, **sizes)
    tower = ElectraConfig(max_position_embeddings=16, **sizes)
    with pytest.raises(UserError, match=r"^model config: rtd_weight=inf must be a finite number"):
        RTDConfig(tower, tower, rtd_weight=float("inf"))
    assert RTDConfig(tower, tower, rtd_weight=10).rtd_weight == 10.0  # an int is stored as a float


def test_run_configs_share_the_common_sections():
    """The shared sections are declared once (RunConfig, AdamWSection) and the key order of config.yaml
    (saved in every checkpoint) is pretraining's and fine-tuning's own."""
    from trainer.core.config import AdamWSection, RunConfig
    from trainer.finetuning.config import FinetuneConfig, load_finetune_config

    assert issubclass(PretrainConfig, RunConfig) and issubclass(FinetuneConfig, RunConfig)
    assert list(load_config(None, ["data.prefix=x"]).to_dict()) == [
        "model", "run", "data", "train", "optim", "zero", "precision", "parallel", "checkpoint", "log", "eval",
        "probe", "debug"]
    cfg = load_finetune_config(None, ["model.init=m", "data.train=t", "data.validation=v"])
    assert list(cfg.to_dict()) == ["model", "run", "data", "train", "optim", "zero", "precision", "parallel", "eval",
                                   "checkpoint", "log", "sift"]
    assert list(cfg.to_dict()["optim"]) == ["lr", "betas", "eps", "weight_decay", "warmup_ratio", "layer_decay",
                                            "min_lr"]
    assert isinstance(cfg.optim, AdamWSection) and (cfg.optim.lr, cfg.optim.betas) == (2e-5, (0.9, 0.999))
    assert cfg.run.name == "finetune"


def test_invalid_values_rejected():
    with pytest.raises(UserError, match="precision='fp8'"):
        load_config(None, ["data.prefix=x", "precision=fp8"])
    with pytest.raises(UserError, match="zero.stage"):
        load_config(None, ["data.prefix=x", "zero.stage=4"])
    with pytest.raises(UserError, match="data.prefix is not set"):
        load_config(None, [])
    with pytest.raises(UserError, match="data.mask_prob"):
        load_config(None, ["data.prefix=x", "data.mask_prob=1.5"])


def test_inconsistent_batch_size_message():
    cfg = load_config(None, ["data.prefix=x", "train.micro_batch_size=4", "train.global_batch_size=12"])
    assert cfg.check_batch(1) == 3
    with pytest.raises(UserError, match=r"train\.global_batch_size=12 is not a multiple of .* = 8"):
        cfg.check_batch(2)


def test_deepspeed_json_is_generated():
    cfg = load_config(None, ["data.prefix=x", "train.micro_batch_size=2", "train.global_batch_size=16",
                             "zero.stage=2", "precision=bf16", "train.grad_clip=0.5", "optim.lr=2e-4"])
    ds = deepspeed_config(cfg, data_parallel_size=2, use_fused_adam=False)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["gradient_clipping"] == 0.5
    params = ds["optimizer"]["params"]
    assert ds["optimizer"]["type"] == "AdamW" and params["betas"] == [0.9, 0.98] and params["eps"] == 1e-6
    assert params["weight_decay"] == 0.01 and params["lr"] == 2e-4


def test_deepspeed_json_takes_the_fields_it_needs():
    """Fine-tuning's JSON from its own sections, with no pretraining-shaped `train.steps`; the same JSON as
    the whole-config form."""
    from trainer.finetuning.config import load_finetune_config

    cfg = load_finetune_config(None, ["model.init=m", "data.train=t", "data.validation=v", "zero.stage=3",
                                      "train.micro_batch_size=4", "train.global_batch_size=16", "precision=bf16"])
    ds = deepspeed_json(global_batch_size=16, micro_batch_size=4, accumulation=cfg.check_batch(2),
                        grad_clip=cfg.train.grad_clip, optim=cfg.optim, zero=cfg.zero, precision=cfg.precision,
                        use_fused_adam=True)
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 1.0
    assert ds["optimizer"]["params"] == {"lr": 2e-5, "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.01,
                                         "torch_adam": False}
    assert ds["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 100000}
    assert ds == deepspeed_config(cfg, data_parallel_size=2, use_fused_adam=True)
    assert trainer_clips_gradients(0, "fp32") and not trainer_clips_gradients(0, "bf16")
    assert not trainer_clips_gradients(3, "fp32")


def test_recipes_in_configs_load():
    import glob
    files = sorted(glob.glob("configs/pretrain/*.yaml"))
    assert files, "no pretraining recipes found"
    for path in files:
        cfg = load_config(path, ["data.prefix=x"])
        assert isinstance(cfg, PretrainConfig)


def test_rtd_schedule_keys_are_checked():
    cfg = load_config(None, ["data.prefix=x", "train.rtd_schedule=two_stage", "train.steps=10",
                             "train.generator_steps=4", "optim.generator_lr=1e-4", "optim.warmup_steps=2"])
    assert cfg.train.rtd_schedule == "two_stage" and cfg.optim.generator_lr == 1e-4
    with pytest.raises(UserError, match=r"train\.rtd_schedule='three' is not one of joint, two_stage"):
        load_config(None, ["data.prefix=x", "train.rtd_schedule=three"])
    with pytest.raises(UserError, match=r"train\.generator_steps=10 must be in \[0, train\.steps\)"):
        load_config(None, ["data.prefix=x", "train.rtd_schedule=two_stage", "train.steps=10",
                           "train.generator_steps=10", "optim.warmup_steps=2"])
    with pytest.raises(UserError, match=r"optim\.generator_lr=0\.0 must be > 0"):
        load_config(None, ["data.prefix=x", "optim.generator_lr=0.0"])
