"""Multi-turn environments: TextCraft replaying the gold trajectories succeeds on every fixture task with the gold
observations, in both the react text and the tool-call format; the rollout loop with a scripted "model" rebuilds the
training conversations message for message."""

import pytest

from sftforge.chat import render, row_to_conversation
from sftforge.config import DataConfig
from sftforge.data import read_rows
from sftforge.envs import StepResult, rollout
from sftforge.envs.textcraft import TextCraftEnv, in_tag, load_tasks, parse_action

FILES = ["train_react.jsonl", "train_react.parquet", "train_tools.jsonl", "train_tools.parquet"]


def tasks_of(textcraft_dir, name):
    rows = list(read_rows(str(textcraft_dir / name)))
    return rows, *load_tasks(rows)


@pytest.mark.parametrize("name", FILES)
def test_gold_replay_succeeds_on_every_fixture_task(textcraft_dir, name):
    rows, tasks, book = tasks_of(textcraft_dir, name)
    assert len(tasks) == 40 and len(book) > 50
    for task in tasks:
        env = TextCraftEnv(book)
        first = env.reset(task)
        assert first in row_to_conversation(rows[tasks.index(task)][1], DataConfig())[0][1]["content"]
        for k, (action, gold_obs) in enumerate(task.gold):
            result = env.step(action)
            if gold_obs:  # every observation equals the data's own
                assert result.observation == gold_obs, (task.id, k, action)
            if result.done:
                break
        assert result.done and result.reward == 1.0 and k == len(task.gold) - 1, task.id


def scripted(tasks):
    """A "model" that answers with the next gold action of the episode it is shown."""
    by_prompt = {TextCraftEnv(None).reset(t): t for t in tasks}

    def policy(conversations):
        out = []
        for messages, _tools in conversations:
            task = by_prompt[next(m["content"] for m in messages if m["role"] == "user")]
            turn = sum(m["role"] == "assistant" for m in messages)
            out.append(task.gold[turn][0])
        return out

    return policy


@pytest.mark.parametrize("name", ["train_react.jsonl", "train_tools.parquet"])
def test_rollout_with_scripted_model_rebuilds_the_training_conversations(textcraft_dir, tokenizers, name):
    rows, tasks, book = tasks_of(textcraft_dir, name)
    episodes = rollout(lambda: TextCraftEnv(book), tasks, scripted(tasks), max_turns=40)
    assert sum(ep.success for ep in episodes) == 40
    tok = tokenizers["qwen2.5"]
    for ep, task, (_, row) in zip(episodes, tasks, rows):
        gold, tools, _ = row_to_conversation(row, DataConfig())
        assert ep.turns == len(task.gold) and ep.tools == tools
        if "react" in name:  # the gold messages, then the observation of finish
            assert ep.messages[: len(gold)] == gold and ep.messages[len(gold)]["role"] == "user"
        else:  # up to the tool message answering finish (the data then has a closing text turn)
            assert ep.messages == gold[:-1]
        # and the chat template renders the rollout exactly as the training conversation
        assert render(tok, gold, tools).text.startswith(render(tok, ep.messages[:-1], tools).text)


def test_rollout_failures_finish_early_invalid_and_max_turns(textcraft_dir):
    _, tasks, book = tasks_of(textcraft_dir, "train_react.jsonl")
    three = tasks[:3]
    eps = rollout(lambda: TextCraftEnv(book), three, lambda convs: ["Action: finish done"] * len(convs))
    assert [(e.done, e.reward, e.success, e.turns) for e in eps] == [(True, 0.0, False, 1)] * 3
    eps = rollout(lambda: TextCraftEnv(book), three, lambda convs: ["I am not sure."] * len(convs), max_turns=3)
    assert all(not e.done and e.turns == 3 and not e.success for e in eps)
    assert eps[0].observations[0].startswith("Observation: Invalid action")
    assert eps[0].messages[-1] == {"role": "user", "content": eps[0].observations[-1]}

    calls = []

    class Counting:
        """Any object with reset/step is an environment."""

        def reset(self, task):
            return f"start {task.id}"

        def step(self, action):
            calls.append(action)
            return StepResult(f"seen {action}", done=action == "stop", reward=1.0 if action == "stop" else 0.0)

    actions = iter(["a", "b", "stop"])
    eps = rollout(Counting, three[:1], lambda convs: [next(actions)], max_turns=10)
    assert calls == ["a", "b", "stop"] and eps[0].success and eps[0].messages[1]["content"].startswith("start")


def test_env_rules(textcraft_dir):
    _, tasks, book = tasks_of(textcraft_dir, "train_react.jsonl")
    task = tasks[0]  # 1x andesite_stairs, 2x granite, 3x writable_book; cobblestone x11, quartz x8, ...
    env = TextCraftEnv(book)
    env.reset(task)
    assert env.step("Action: craft 2 diorite using 4 cobblestone, 4 quartz").observation == (
        "Observation: Crafted 4 minecraft:diorite"
    )
    assert env.inventory["diorite"] == 4 and env.inventory["cobblestone"] == 7 and env.inventory["quartz"] == 4
    # wrong proportions, unknown recipe, not enough items: nothing changes
    before = dict(env.inventory)
    assert "valid recipe" in env.step("Action: craft 1 diorite using 3 cobblestone, 2 quartz").observation
    assert "valid recipe" in env.step("Action: craft 1 diamond using 1 cobblestone").observation
    assert "enough items" in env.step("Action: craft 5 diorite using 10 cobblestone, 10 quartz").observation
    assert dict(env.inventory) == before
    # the tool-call format on the same env: plain observation for the tool message
    tool = '<tool_call>\n{"name": "craft", "arguments": {"item": "granite", "times": 2, "ingredients": {"diorite": 2, "quartz": 2}}}\n</tool_call>'
    assert env.step(tool).observation == "Crafted 2 minecraft:granite"
    assert env.step("Action: inventory").observation.startswith("Observation: Inventory: ")
    assert "Invalid action" in env.step('<tool_call>{"name": "smelt", "arguments": {}}</tool_call>').observation
    r = env.step('<tool_call>{"name": "finish", "arguments": {"message": "done"}}</tool_call>')
    assert r.done and r.reward == 0.0  # the goal is not crafted


def test_parse_action_and_tags():
    assert parse_action("Thought: x\nAction: craft 3 stick using 6 tag:planks") == (
        "react", "craft", ("stick", 3, {"tag:planks": 6}),
    )  # fmt: skip
    assert parse_action("Action: finish all done")[:2] == ("react", "finish")
    assert parse_action("Action: craft some stuff")[1] == "invalid"
    assert parse_action('<tool_call>{"name": "craft", "arguments": {"item": "stick"}}</tool_call>')[1] == "craft"
    assert (
        parse_action('<tool_call>{"name": "craft", "arguments": {"item": 1, "ingredients": 5}}</tool_call>')[1]
        == "invalid"
    )
    assert in_tag("acacia_planks", "tag:planks") and not in_tag("planks_x", "tag:planks")
