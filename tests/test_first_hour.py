"""What a new user (from verl or TRL) trips over in the first hour: the run record is always written, every path and
key of the config is checked up front with one paragraph and exit code 2 (never a traceback), plan refuses what
train refuses, suggestions point to the key meant, the warmup warning says its cause, and the Python API."""

import contextlib
import io
import json
import typing
from pathlib import Path

import pytest

from sftforge import cli, demo
from sftforge.config import CHOICES, RANGES, Config, ConfigError, all_keys, load_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(model folder: the demo's character tokenizer + a 1-layer config, 16 Q/A rows)."""
    root = tmp_path_factory.mktemp("tiny")
    model = root / "model"
    model.mkdir()
    tok = demo.make_tokenizer(model)
    demo.make_model_config(model, len(tok))
    c = json.loads((model / "config.json").read_text())
    c.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, head_dim=16, num_attention_heads=2,
             num_key_value_heads=1)  # fmt: skip
    (model / "config.json").write_text(json.dumps(c))
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(16)]  # fmt: skip
    data = root / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, data


def base(tiny, out) -> list[str]:
    model, data = tiny
    return [f"model.path={model}", f"data.train_files={data}", "data.train_batch_size=4",
            "data.micro_batch_size_per_gpu=2", "trainer.max_steps=2", "trainer.device=cpu",
            f"trainer.output_dir={out}", "data.cache_dir=none"]  # fmt: skip


def cli_run(args: list[str]) -> tuple[int, str, str]:
    """``sftforge ARGS`` in this process: (exit code, stdout, stderr). An exception escaping main is a failure."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(args)
    return rc, out.getvalue(), err.getvalue()


def one_paragraph_error(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


# ---- 1. the run record ---------------------------------------------------------------------------------------------


def test_console_logger_alone_still_writes_the_run_record_and_the_report_works(tiny, tmp_path):
    """verl's trainer.logger=['console'] used to drop metrics.jsonl, and the advertised `sftforge report` failed."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    rc, stdout, err = cli_run(["train", *base(tiny, out), "trainer.logger=['console']"])
    assert rc == 0, err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "step" in r] == [1, 2] and records[-1]["event"] == "end"
    assert f"sftforge report {out}" in stdout + err
    rc, _, err = cli_run(["report", str(out)])
    assert rc == 0 and (out / "report.html").is_file(), err


# ---- 2. every path and every key: one paragraph, exit 2, before anything slow ----------------------------------------


@pytest.fixture
def nothing_slow(monkeypatch):
    """Loading a model or reading the data fails the test: a path error must come before both."""

    def slow(*a, **k):
        raise AssertionError("the model or the data was loaded before the paths were checked")

    monkeypatch.setattr("sftforge.sft.load_data", slow)
    monkeypatch.setattr("sftforge.run.build_model", slow)


def _bad_paths(tmp: Path) -> list[tuple[str, str, str]]:
    """(key, bad value, words the error must hold) for every path the config names."""
    a_file = tmp / "a_file.txt"
    a_file.write_text("not a folder")
    empty = tmp / "empty_dir"
    empty.mkdir()
    missing = str(tmp / "missing" / "x")
    return [
        ("trainer.output_dir", str(a_file), "is a file, not a folder"),
        ("trainer.output_dir", str(a_file / "sub"), "cannot be created"),
        ("trainer.resume", missing, "is not a complete checkpoint folder"),
        ("model.path", missing, "does not exist"),
        ("model.path", str(a_file), "is a file"),
        ("model.path", str(empty), "no config.json"),
        ("model.tokenizer_path", missing, "does not exist"),
        ("model.init_checkpoint", missing, "is not a file"),
        ("model.builder", f"{missing}.py:build", "is not a file"),
        ("data.train_files", missing, "does not exist"),
        ("data.train_files", str(empty), "is a folder"),
        ("data.train_files", str(a_file), "unsupported suffix"),
        ("data.val_files", missing, "does not exist"),
        ("data.eval_files", missing, "does not exist"),
        ("data.chat_template", missing, "neither an existing file"),
        ("data.image_processor", missing, "does not exist"),
        ("data.cache_dir", str(a_file), "is a file"),
        ("model.gguf_file", "nope.gguf", "is not in"),
    ]


def test_every_path_is_checked_before_anything_slow(tiny, tmp_path, nothing_slow):
    cases = _bad_paths(tmp_path)
    assert {k for k, _, _ in cases} >= {
        k
        for k in all_keys()
        if k.endswith(("path", "_dir", "_file", "_files", "checkpoint", "builder", "resume", "template"))
    } | {"data.image_processor"}  # every key that names a path has a case
    for key, value, words in cases:
        extra = ["trainer.eval_freq=1"] if key == "data.eval_files" else []
        rc, _, err = cli_run(["train", *base(tiny, tmp_path / "run"), f"{key}={value}", *extra])
        line = one_paragraph_error(err)
        assert rc == 2 and key in line and words in line, (key, value, err)
        rc_plan, _, err_plan = cli_run(["plan", *base(tiny, tmp_path / "run"), f"{key}={value}", *extra])
        assert rc_plan == 2 and one_paragraph_error(err_plan) == line  # plan refuses it in the same words


def _bad_values(key: str) -> list[str]:
    """Values of the wrong type, out of range or not among the choices."""
    section, leaf = Config(), key.rsplit(".", 1)[-1]
    for part in key.split(".")[:-1]:
        section = getattr(section, part)
    typ = typing.get_type_hints(type(section))[leaf]
    values = {bool: ["maybe"], int: ["many"], float: ["much"], dict: ["not-a-mapping"]}.get(typ, [])
    if key in RANGES:
        low, high = RANGES[key]
        if low is not None:
            values.append(str((low[0] if isinstance(low, tuple) else low) - 1))
        if high is not None:
            values.append(str((high[0] if isinstance(high, tuple) else high) + 1))
    if key in CHOICES:
        values.append("nope")
    return values


VERL_MEANS = {("trainer.save_freq", "-1"), ("trainer.test_freq", "-1")}  # verl's -1: at the end only (our 0)
BAD = [(k, v) for k in all_keys() for v in _bad_values(k) if (k, v) not in VERL_MEANS]


def test_the_walk_covers_every_typed_key():
    """Free-form keys (column names, scorer names, patterns) are checked where they are used (rollout.backend by
    sftforge rl, naming what is supported; sandbox.interpreter and sandbox.fusion_url by the sandbox, tests/test_sandbox.py); every other key
    is walked."""
    walked = {k for k, _ in BAD}
    untyped = {"data.format", "data.messages_key", "data.tools_key", "data.images_key", "data.prompt_key",
               "data.response_key", "data.num_proc", "model.compile_backend", "model.lora.target_modules",
               "model.trainable", "model.frozen", "trainer.eval_task", "trainer.logger", "trainer.gpu_memory",
               "algorithm.reward", "optim.betas", "model.attn_implementation", "model.tree_attention",
               "rollout.backend", "sandbox.interpreter", "sandbox.fusion_url"}  # fmt: skip
    rest = set(all_keys()) - walked - untyped  # the keys that name paths: test_every_path_is_checked_...
    assert all(k.endswith(("path", "_dir", "_file", "_files", "checkpoint", "builder", "resume", "template",
                          "processor"))
               for k in rest), rest  # fmt: skip


@pytest.mark.parametrize("key,value", BAD + [("optim.betas", "[nope, 7]"), ("optim.betas", "[0.9]"),
                                             ("trainer.gpu_memory", "lots"), ("trainer.logger", "[nope]"),
                                             ("data.num_proc", "-2"), ("model.attn_implementation", "nope")],
                         ids=str)  # fmt: skip
def test_a_bad_value_of_any_key_is_one_paragraph_and_exit_2(tiny, tmp_path, key, value, nothing_slow):
    rc, _, err = cli_run(["train", *base(tiny, tmp_path / "run"), f"{key}={value}"])
    line = one_paragraph_error(err)
    assert rc == 2 and key in line, err


# ---- 6. plan refuses what train refuses --------------------------------------------------------------------------------


def test_plan_refuses_an_sp_size_that_does_not_divide_the_world_in_trains_words(tiny, tmp_path):
    args = [*base(tiny, tmp_path / "run"), "trainer.sp_size=3"]
    rc, stdout, _ = cli_run(["plan", *args, "trainer.n_gpus_per_node=1"])
    assert rc == 2 and "data-parallel 0" not in stdout
    planned = [line for line in stdout.splitlines() if line.startswith("error:")]
    rc_train, _, err = cli_run(["train", *args])
    assert rc_train == 2 and planned == [one_paragraph_error(err)]
    assert "trainer.sp_size=3 must divide the world size (1" in planned[0]


# ---- 7. suggestions -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("given,meant", [("rollout.max_response_len", "rollout.max_response_length"),
                                         ("data.temperature", "rollout.temperature"), ("trainer.lr", "optim.lr"),
                                         ("data.max_lenght", "data.max_length"), ("lr", "optim.lr"),
                                         ("trainer.max_step", "trainer.max_steps")])  # fmt: skip
def test_an_unknown_key_suggests_the_key_meant(given, meant):
    with pytest.raises(ConfigError, match=rf"Unknown config key '{given}'\. Did you mean '{meant}'\?"):
        load_config(None, [f"{given}=1"])


def test_rl_help_says_where_the_keys_are(capsys):
    with pytest.raises(SystemExit):
        cli.main(["rl", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "rollout.*" in out and "algorithm.*" in out and "sftforge config" in out


# ---- 5. the Python API ---------------------------------------------------------------------------------------------


def test_the_python_api_names_functions_not_modules():
    import sftforge
    import sftforge.sft  # noqa: F401  (importing the module behind a name does not replace the name)
    from sftforge import Config, EvalResult, evaluate, export_checkpoint, load_config, rl, train

    for fn in (evaluate, export_checkpoint, load_config, rl, train):
        assert callable(fn) and fn.__doc__ and typing.get_type_hints(fn)
    assert sftforge.train is train and isinstance(load_config(), Config) and EvalResult.__name__ == "EvalResult"
    assert sorted(sftforge.__all__) == sorted(sftforge._API)


def test_load_config_from_a_path_keywords_and_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model: {path: m}\noptim: {lr: 1.0e-4}\n")
    a = load_config(y, ["optim.lr=3e-5", "trainer.max_steps=7"])
    b = load_config(y, {"optim.lr": 3e-5, "trainer.max_steps": 7})
    c = load_config(model={"path": "m"}, optim={"lr": 3e-5}, trainer={"max_steps": 7})
    assert a == b == c and a.optim.lr == 3e-5 and a.model.path == "m"
    assert load_config(None, {"trainer.total_training_steps": 3}).trainer.max_steps == 3  # verl's names too
    assert load_config(data={"max_response_length": 10}).rollout.max_response_length == 10  # verl's RL name
    with pytest.raises(ConfigError, match="Did you mean 'rollout.temperature'"):
        load_config(data={"temperature": 0.5})


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's Python API block, as written, from the repository root (it trains the demo task briefly)."""
    import re

    root = Path(__file__).resolve().parent.parent
    block = re.search(r"<!-- readme-test: python -->\s*\n```python\n(.*?)```", (root / "README.md").read_text(), re.S)
    assert block, "the README's Python API section has a <!-- readme-test: python --> block"
    code = block.group(1).replace("outputs/api-demo", str(tmp_path / "api-demo"))
    monkeypatch.chdir(root)
    monkeypatch.setenv("SFTFORGE_CACHE", str(tmp_path / "cache"))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["result"]["step"] == scope["result"]["total_steps"] and Path(scope["result"]["final_dir"]).is_dir()
    assert 0.0 <= scope["scores"].summary["accuracy"] <= 1.0


def test_evaluate_takes_a_loaded_model_and_rows_in_memory(tiny):
    from transformers import AutoTokenizer

    from sftforge import evaluate
    from sftforge.config import ModelConfig
    from sftforge.model import load_model

    model_dir, _ = tiny
    rows = [{"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]}] * 3
    model = load_model(ModelConfig(path=str(model_dir)))  # random init from config.json
    tok = AutoTokenizer.from_pretrained(model_dir)
    by_module = evaluate(model.eval(), rows, "exact", tokenizer=tok, max_new_tokens=3)
    assert by_module.summary["n"] == 3 and by_module.records[0]["id"] == "rows[0]"
    with pytest.raises(ConfigError, match="needs tokenizer="):
        evaluate(model, rows)
    with pytest.raises(ConfigError, match="does not exist"):
        evaluate(str(model_dir / "missing" / "x"), rows)


def test_a_folder_named_as_data_is_refused_by_every_command(tiny, tmp_path):
    model, data = tiny
    folder = tmp_path / "shards"
    folder.mkdir()
    for args in (["data", "preview", f"model.path={model}", f"data.train_files={folder}"],
                 ["data", "tokenize", f"model.path={model}", f"data.train_files={folder}", "-o", str(tmp_path / "t")],
                 ["eval", "--model", str(model), "--data", str(folder), "--task", "exact"]):  # fmt: skip
        rc, _, err = cli_run(args)
        assert rc == 2 and "is a folder" in one_paragraph_error(err), (args, err)
