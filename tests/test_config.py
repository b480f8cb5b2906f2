import pytest

from sftforge.config import ConfigError, DataConfig, config_reference, field_docs, load_config


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  max_length: 128\noptim:\n  lr: 2e-5\n")
    cfg = load_config(
        p,
        [
            "data.train_on=last_assistant",
            "optim.betas=[0.9,0.99]",
            "data.chat_template_kwargs={enable_thinking: false}",
        ],
    )
    assert cfg.data.max_length == 128
    assert cfg.optim.lr == 2e-5
    assert cfg.data.train_on == "last_assistant"
    assert cfg.optim.betas == [0.9, 0.99]
    assert cfg.data.chat_template_kwargs == {"enable_thinking": False}


def test_unknown_key_suggests():
    with pytest.raises(ConfigError, match=r"Unknown config key 'data.max_lenght'.*Did you mean 'data.max_length'"):
        load_config(None, ["data.max_lenght=10"])


def test_wrong_type_and_choice():
    with pytest.raises(ConfigError, match=r"data.max_length must be int"):
        load_config(None, ["data.max_length=abc"])
    with pytest.raises(ConfigError, match=r"data.truncation must be one of error \| left \| right \| drop"):
        load_config(None, ["data.truncation=lefty"])


def test_every_field_has_help():
    docs = field_docs(DataConfig)
    assert "max_length" in docs and docs["max_length"]
    ref = config_reference()
    assert "`data.train_on`" in ref
    for line in ref.splitlines()[2:]:
        assert not line.endswith("|  |"), f"field without help text: {line}"
