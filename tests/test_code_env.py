"""code_math: episodes with a sandboxed code_interpreter tool, rendered and masked exactly like SFT data, scored by
math-verify; the same environment in `sftforge eval` and `sftforge rl`."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from sftforge.chat import template_markers
from sftforge.config import ConfigError, DataConfig, SandboxConfig, load_config
from sftforge.data import DataError, tokenize_row
from sftforge.envs import rollout
from sftforge.envs.code import CODE_TOOL, CodeEnv, load_code_tasks
from sftforge.sandbox import SandboxResult, check_sandbox

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "retool_smollm2"
TEMPLATES = {"qwen2.5's own": None, "the demo's ChatML": str(DEMO / "chatml_tools.jinja")}


def _sandbox_missing() -> str:
    try:
        check_sandbox(SandboxConfig())
    except ConfigError as e:
        return str(e)
    return ""


needs_sandbox = pytest.mark.skipif(bool(_sandbox_missing()), reason=f"no sandbox here: {_sandbox_missing()}")
math_verify = pytest.importorskip("math_verify", reason="math-verify is not installed (pip install 'sftforge[math]')")


def _scorer():
    from sftforge.scorers import get_scorer

    return get_scorer("math")


def _rows(name: str, n: int) -> list[tuple[str, dict]]:
    lines = (DEMO / "data" / f"{name}.jsonl").read_text().splitlines()[:n]
    return [(f"{name}.jsonl:{i + 1}", json.loads(line)) for i, line in enumerate(lines)]


def _gold_policy(rows):
    """Plays each task as its SFT trajectory does: the gold call first, then the answer after the tool's output."""
    by_question = {r["messages"][1]["content"]: r for _, r in rows}

    def policy(conversations):
        out = []
        for messages, _tools in conversations:
            row = by_question[next(m for m in messages if m["role"] == "user")["content"]]
            if messages[-1]["role"] == "user":
                code = row["messages"][2]["tool_calls"][0]["function"]["arguments"]["code"]
                out.append('<tool_call>\n{"name": "code_interpreter", "arguments": ' + json.dumps({"code": code})
                           + "}\n</tool_call>")  # fmt: skip
            else:
                out.append(row["messages"][-1]["content"])
        return out

    return policy


def test_tasks_from_rows_and_bad_rows_named():
    tasks = load_code_tasks(_rows("heldout", 3))
    assert [t.answer for t in tasks] == [r["answer"] for _, r in _rows("heldout", 3)]
    assert tasks[0].tools == [CODE_TOOL] and tasks[0].question.endswith("?") or tasks[0].question.endswith(".")
    assert all(len(r["messages"]) == 2 for _, r in _rows("heldout", 80) + _rows("rl", 240))  # prompts: no leak
    boxed = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "so \\boxed{4}"}]}
    assert load_code_tasks([("r:1", boxed)])[0].answer == "4"
    with pytest.raises(DataError, match=r"r:7: a code_math task needs its gold answer"):
        load_code_tasks([("r:7", {"messages": [{"role": "user", "content": "2+2?"}]})])
    other = {
        "messages": [{"role": "user", "content": "q"}],
        "answer": "1",
        "tools": [
            {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {}}}}
        ],
    }
    with pytest.raises(DataError, match="do not include 'code_interpreter'"):
        load_code_tasks([("r:2", other)])


@needs_sandbox
def test_an_episode_runs_the_code_in_the_sandbox_and_scores_the_answer():
    rows = _rows("sft", 5)
    tasks = load_code_tasks(rows)
    episodes = rollout(lambda: CodeEnv(SandboxConfig(), _scorer()), tasks, _gold_policy(rows), max_turns=3, workers=4)
    for ep, (_, row) in zip(episodes, rows):
        assert ep.turns == 2 and ep.done and ep.success, ep
        assert ep.observations[0] == f"{row['answer']}\n"  # what the sandbox printed
        assert [m["role"] for m in ep.messages] == ["system", "user", "assistant", "tool", "assistant"]


def test_errors_are_observations_and_no_answer_scores_zero():
    calls = []

    def fake_run(code, cfg):
        calls.append(code)
        return SandboxResult("", "Traceback ...\nZeroDivisionError: division by zero\n", 1, None, 0.01)

    env = CodeEnv(SandboxConfig(observation_chars=30), _scorer(), run=fake_run)
    (task,) = load_code_tasks(_rows("heldout", 1))
    env.reset(task)
    bad = env.step('<tool_call>{"name": "code_interpreter", "arguments": {"code": </tool_call>')
    assert not bad.done and bad.observation.startswith("Error: tool call is not valid JSON")
    other = env.step('<tool_call>{"name": "python", "arguments": {"code": "1"}}</tool_call>')
    assert "unknown tool 'python'" in other.observation
    empty = env.step('<tool_call>{"name": "code_interpreter", "arguments": {}}</tool_call>')
    assert "needs a non-empty string argument 'code'" in empty.observation and not calls
    failed = env.step('<tool_call>{"name": "code_interpreter", "arguments": {"code": "1/0"}}</tool_call>')
    assert calls == ["1/0"] and "[output truncated: " in failed.observation and "[exit status 1]" in failed.observation
    wrong = env.step("The answer is \\boxed{12}.")
    assert wrong.done and wrong.reward == 0.0
    env.reset(task)
    assert env.step(f"The answer is \\boxed{{{task.answer}}}.").reward == 1.0
    # no answer within max_turns: the episode is not done and scores 0
    (ep,) = rollout(lambda: CodeEnv(SandboxConfig(), _scorer(), run=fake_run), [task],
                    lambda convs: ['<tool_call>{"name": "code_interpreter", "arguments": {"code": "1"}}</tool_call>'] * len(convs),
                    max_turns=2)  # fmt: skip
    assert ep.turns == 2 and not ep.done and not ep.success and ep.reward == 0.0


def test_the_tool_calls_of_one_turn_run_concurrently():
    running, peak, lock = [0], [0], threading.Lock()

    def slow_run(code, cfg):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.4)
        with lock:
            running[0] -= 1
        return SandboxResult("7\n", "", 0, None, 0.4)

    tasks = load_code_tasks(_rows("heldout", 8))
    call = '<tool_call>{"name": "code_interpreter", "arguments": {"code": "print(7)"}}</tool_call>'
    t = time.perf_counter()
    episodes = rollout(lambda: CodeEnv(SandboxConfig(), _scorer(), run=slow_run), tasks,
                       lambda convs: [call] * len(convs), max_turns=1, workers=8)  # fmt: skip
    assert peak[0] == 8 and time.perf_counter() - t < 2.0  # 8 calls of 0.4 s: at once, not 3.2 s in a row
    assert all(ep.observations == ["7\n"] for ep in episodes)


@needs_sandbox
@pytest.mark.parametrize("template", list(TEMPLATES), ids=list(TEMPLATES))
def test_a_played_episode_is_rendered_and_masked_exactly_like_its_sft_row(tokenizer_dirs, template):
    """The episode the environment records (the policy's actions, the sandbox's real outputs) renders to the same
    ids and the same loss mask as the SFT row of the same trajectory: observations and the prompt never trained."""
    from sftforge.data import load_tokenizer
    from sftforge.rl_loop import episode_response

    own = [f"data.chat_template={TEMPLATES[template]}"] if TEMPLATES[template] else []
    cfg = load_config(None, [f"model.tokenizer_path={tokenizer_dirs['qwen2.5']}", "data.max_length=4096", *own])
    tok = load_tokenizer(cfg)
    markers = template_markers(tok, cfg.data.chat_template_kwargs)
    rows = _rows("sft", 5)
    tasks = load_code_tasks(rows)
    episodes = rollout(lambda: CodeEnv(SandboxConfig(), _scorer()), tasks, _gold_policy(rows), max_turns=3)
    for ep, (loc, row) in zip(episodes, rows):
        sft = tokenize_row(loc, row, tok, cfg.data, markers)
        played = episode_response(ep, tok, cfg, markers)
        assert played.input_ids == sft.input_ids and played.loss_mask == sft.loss_mask, loc
        trained = tok.decode([t for t, m in zip(played.input_ids, played.loss_mask) if m])
        assert "code_interpreter" in trained and f"\\boxed{{{row['answer']}}}" in trained
        assert row["messages"][1]["content"] not in trained  # the problem (prompt) is not trained
        assert trained.count(row["answer"]) == 1  # the tool's output (the same number) is not trained either
        assert played.reward == 1.0


def test_code_math_config_is_checked_up_front(tmp_path):
    from sftforge.rl_loop import check_rl_config

    cfg = load_config(None, ["algorithm.reward=code_math", "rollout.max_turns=1"])
    with pytest.raises(ConfigError, match="is an environment: set rollout.max_turns"):
        check_rl_config(cfg)
    assert DataConfig().chat_template == ""  # the demo sets its own template; nothing here changes the default


@needs_sandbox
def test_code_math_in_sftforge_eval_and_rl_with_a_tiny_model(tmp_path, model_config_dir, tokenizer_dirs):
    """The environment end to end through both entry points (a random tiny model: mechanics, not learning; the
    learning is the slow SmolLM2 demo)."""
    from sftforge.evaluation import evaluate
    from sftforge.metrics import read_metrics
    from sftforge.rl_loop import rl

    model = ["model.path=" + str(model_config_dir / "qwen3-tiny"), f"model.tokenizer_path={tokenizer_dirs['qwen3']}"]
    rows = [r for _, r in _rows("heldout", 4)]
    res = evaluate(model_config_dir / "qwen3-tiny", rows, "code_math", overrides=model[1:], max_new_tokens=8,
                   max_turns=2)  # fmt: skip
    assert res.summary["n"] == 4 and res.summary["episodes"] and res.summary["accuracy"] == 0.0
    assert all(1 <= r["turns"] <= 2 for r in res.records)
    data = tmp_path / "rl.jsonl"
    data.write_text("\n".join((DEMO / "data" / "rl.jsonl").read_text().splitlines()[:4]) + "\n")
    out = tmp_path / "rl"
    cfg = load_config(None, [*model, f"data.train_files={data}", "data.max_length=1024", "algorithm.reward=code_math",
                             "rollout.max_turns=2", "rollout.n=2", "rollout.prompts_per_step=2",
                             "rollout.max_response_length=8", "algorithm.dynamic_sampling=false",
                             "data.micro_batch_size_per_gpu=4", "trainer.max_steps=1", "trainer.logger=[jsonl]",
                             "trainer.device=cpu", f"trainer.output_dir={out}"])  # fmt: skip
    result = rl(cfg)
    rec = [r for r in read_metrics(out / "metrics.jsonl") if "reward_mean" in r][-1]
    assert result["final_dir"] and rec["trained_tokens"] > 0 and rec["reward_mean"] == 0.0
