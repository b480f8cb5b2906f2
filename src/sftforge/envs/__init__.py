"""Multi-turn environments: generate an action, get an observation, repeat until done or max turns.

An environment has two methods:

    reset(task) -> str                       the first observation (the user message that starts the episode)
    step(action: str) -> StepResult          observation, done, reward (success is reward > 0 when done)

The action is the model's whole assistant turn as text. When it holds a tool call (``<tool_call>{json}</tool_call>``),
the conversation records it as an assistant message with ``tool_calls`` and the observation as a ``tool`` message,
so the chat template renders the next prompt exactly as it rendered the training data; otherwise the action is
assistant content and the observation a user message.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from sftforge.scorers import ToolCallError, parse_tool_calls


@dataclass
class StepResult:
    observation: str
    done: bool
    reward: float = 0.0
    info: dict = field(default_factory=dict)


@dataclass
class Task:
    id: str
    system: str | None = None
    tools: list | None = None
    reference: Any = None
    """What a gold episode did (for the records only)."""


class Env(Protocol):
    def reset(self, task: Any) -> str: ...

    def step(self, action: str) -> StepResult: ...


@dataclass
class Episode:
    task_id: str
    messages: list[dict]
    tools: list | None
    actions: list[str] = field(default_factory=list)
    observations: list[str] = field(default_factory=list)
    generations: list = field(default_factory=list)
    """Whatever the policy returned per turn (a Generation from sftforge.generation carries token counts)."""
    reward: float = 0.0
    done: bool = False
    reference: Any = None

    @property
    def turns(self) -> int:
        return len(self.actions)

    @property
    def success(self) -> bool:
        return self.done and self.reward > 0


def action_messages(action: str, observation: str, turn: int) -> list[dict]:
    """The assistant message for ``action`` and the message carrying ``observation``, as the training data has them."""
    try:
        calls = parse_tool_calls(action)
    except ToolCallError:
        calls = []
    if not calls:
        return [{"role": "assistant", "content": action}, {"role": "user", "content": observation}]
    content = action.split("<tool_call>")[0].strip()
    call_id = f"call_{turn}"
    tool_calls = [
        {"id": call_id, "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls
    ]
    return [
        {"role": "assistant", "content": content, "tool_calls": tool_calls},
        {"role": "tool", "tool_call_id": call_id, "name": calls[0]["name"], "content": observation},
    ]


Policy = Callable[[list[tuple[list[dict], list | None]]], Sequence[Any]]
"""Batched policy: (messages, tools) per active episode -> one action per episode (a str, or an object with .text)."""


def rollout(
    make_env: Callable[[], Env],
    tasks: Sequence[Task],
    policy: Policy,
    max_turns: int = 40,
    workers: int = 1,
    on_turn: Callable[[int, int], None] | None = None,
) -> list[Episode]:
    """Run every task to the end (or ``max_turns`` actions), batching the policy over the active episodes; the
    environment steps of one turn (tool calls: sandboxed programs) run ``workers`` at a time, in threads.
    ``on_turn(episodes ended, episodes)`` after every turn (a progress display)."""
    envs = [make_env() for _ in tasks]
    episodes = []
    for env, task in zip(envs, tasks):
        first = env.reset(task)
        messages = ([{"role": "system", "content": task.system}] if task.system else []) + [
            {"role": "user", "content": first}
        ]
        episodes.append(Episode(task.id, messages, task.tools, reference=task.reference))
    active = list(range(len(tasks)))
    for turn in range(max_turns):
        if not active:
            break
        outs = policy([(episodes[i].messages, episodes[i].tools) for i in active])
        actions = [out if isinstance(out, str) else out.text for out in outs]
        if workers > 1 and len(active) > 1:
            with ThreadPoolExecutor(min(workers, len(active))) as pool:
                results = list(pool.map(lambda ia: envs[ia[0]].step(ia[1]), zip(active, actions)))
        else:
            results = [envs[i].step(a) for i, a in zip(active, actions)]
        still = []
        for i, out, action, result in zip(active, outs, actions, results):
            ep = episodes[i]
            ep.actions.append(action)
            ep.observations.append(result.observation)
            ep.generations.append(out)
            messages = action_messages(action, result.observation, turn)
            ep.messages += messages[:1] if result.done and not result.observation else messages  # an answer ends it
            ep.reward += result.reward
            ep.done = result.done
            if not result.done:
                still.append(i)
        active = still
        if on_turn is not None:
            on_turn(len(tasks) - len(active), len(tasks))
    return episodes


__all__ = ["Env", "Episode", "StepResult", "Task", "action_messages", "rollout"]
