import pytest

from data.errors import UserError
from trainer.pretraining.config import PretrainConfig, load_config
from trainer.core.deepspeed_json import deepspeed_config


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
    with pytest.raises(UserError, match=r"train\.steps must be of type int"):
        load_config(None, ["data.prefix=x", "train.steps=many"])
    with pytest.raises(UserError, match=r"checkpoint\.resume must be true or false"):
        load_config(None, ["data.prefix=x", "checkpoint.resume=3"])


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
