"""GGUF models (model.path=FILE.gguf, or a folder holding one): where the file is, which one of several, what is
missing to read it, and the command-line errors around them. Reading a real GGUF file (SmolLM2-135M-Instruct) is
tests/test_real_model.py's part."""

from __future__ import annotations

import pytest

from sftforge import model_files
from sftforge.cli import main
from sftforge.config import ConfigError, ModelConfig
from sftforge.model import check_model_options
from sftforge.model_files import gguf_location, pretrained_args


def _gguf(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"GGUF")
    return folder


def test_a_gguf_file_or_a_folder_with_one(tmp_path):
    d = _gguf(tmp_path / "m", "a.Q4.gguf")
    assert gguf_location(str(d / "a.Q4.gguf")) == (str(d), "a.Q4.gguf")
    assert gguf_location(str(d)) == (str(d), "a.Q4.gguf")
    assert gguf_location(str(d), "a.Q4.gguf") == (str(d), "a.Q4.gguf")
    assert gguf_location("Qwen/Qwen3-0.6B") is None and gguf_location("") is None
    (d / "config.json").write_text("{}")  # a save_pretrained folder that also holds a .gguf: the folder wins
    assert gguf_location(str(d)) is None
    assert gguf_location(str(d), "a.Q4.gguf") == (str(d), "a.Q4.gguf")  # unless model.gguf_file picks the file


def test_several_gguf_files_need_model_gguf_file(tmp_path):
    d = _gguf(tmp_path / "m", "m.Q4_1.gguf", "m.Q8_0.gguf")
    with pytest.raises(ConfigError, match=r"2 \.gguf files \(m\.Q4_1\.gguf, m\.Q8_0\.gguf\).*model\.gguf_file=NAME"):
        gguf_location(str(d))
    assert gguf_location(str(d), "m.Q8_0.gguf") == (str(d), "m.Q8_0.gguf")
    with pytest.raises(ConfigError, match=r"model\.gguf_file='m\.F16\.gguf' is not in .*m\.Q4_1\.gguf, m\.Q8_0"):
        gguf_location(str(d), "m.F16.gguf")
    with pytest.raises(ConfigError, match="names a .gguf file and model.gguf_file='m.Q4_1.gguf' another"):
        gguf_location(str(d / "m.Q8_0.gguf"), "m.Q4_1.gguf")
    with pytest.raises(ConfigError, match="not a local folder"):
        gguf_location("HuggingFaceTB/SmolLM2-135M-Instruct", "m.gguf")


def test_missing_packages_are_named_with_the_install_line(tmp_path, monkeypatch):
    f = _gguf(tmp_path / "m", "m.gguf") / "m.gguf"
    monkeypatch.setattr(model_files.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        ConfigError, match=r"GGUF file: reading it needs the packages gguf and accelerate.*sftforge\[gguf\]"
    ):
        pretrained_args(str(f))
    with pytest.raises(ConfigError, match=r"model\.path=.*m\.gguf.*packages gguf and accelerate"):
        check_model_options(ModelConfig(path=str(f)))


def test_check_model_options_accepts_gguf_and_says_what_else_it_takes(tmp_path, monkeypatch):
    monkeypatch.setattr(model_files, "missing_gguf_packages", lambda: [])
    d = _gguf(tmp_path / "m", "m.gguf")
    check_model_options(ModelConfig(path=str(d / "m.gguf")))
    check_model_options(ModelConfig(path=str(d)))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"is a file; give the model's folder .*a \.gguf file or a hub id"):
        check_model_options(ModelConfig(path=str(tmp_path / "weights.bin")))
    with pytest.raises(ConfigError, match="model.gguf_file is set but model.path is empty"):
        check_model_options(ModelConfig(builder="sftforge.demo:build", gguf_file="m.gguf"))


def test_train_with_missing_gguf_packages_stops_in_one_line(tmp_path, monkeypatch, capsys):
    f = _gguf(tmp_path / "m", "m.gguf") / "m.gguf"
    monkeypatch.setattr(model_files, "missing_gguf_packages", lambda: ["gguf"])
    rc = main(["train", f"model.path={f}", "data.train_files=examples/quickstart/train.jsonl",
               f"trainer.output_dir={tmp_path / 'run'}"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.count("error:") == 1 and "needs the package gguf, not installed" in err and "sftforge[gguf]" in err


def test_a_data_or_model_file_given_as_the_config_is_named(tmp_path, capsys):
    assert main(["data", "preview", "data/textcraft/train_react.parquet", "--index", "0"]) == 2
    err = capsys.readouterr().err
    assert "is a data file, not a config" in err and "data.train_files=data/textcraft/train_react.parquet" in err
    f = _gguf(tmp_path / "m", "m.gguf") / "m.gguf"
    assert main(["train", str(f)]) == 2
    assert f"give it as model.path={f}" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\xd4\xff\x00 not text")
    assert main(["train", str(bad)]) == 2
    assert "is not valid YAML" in capsys.readouterr().err
    bad.write_text("- a\n- b\n")
    assert main(["train", str(bad)]) == 2
    assert "holds a list, not a mapping of sections" in capsys.readouterr().err


def test_export_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path)])  # no folder to write
    assert "give the folder to write once" in capsys.readouterr().err
    rc = main(["export", str(tmp_path / "nothing"), str(tmp_path / "out")])
    assert rc == 2 and "is not a folder: give a step_<N> checkpoint" in capsys.readouterr().err
