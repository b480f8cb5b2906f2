"""code_math: a problem, a ``code_interpreter`` tool, a checked final answer (verl's ReTool job).

Each row is a task: its first user message is the problem, its gold answer the row's ``answer``/``reference`` column
or else the ``\\boxed{}`` of its last assistant message (so the SFT file of tool-use trajectories serves as RL
prompts too). An episode:

- the model's turn holds a ``code_interpreter`` tool call (``<tool_call>{"name": "code_interpreter", "arguments":
  {"code": "..."}}</tool_call>``, the schema of verl's ReTool tool config): the code runs in the sandbox
  (:mod:`sftforge.sandbox`, a fresh program per call) and its output, cut to ``sandbox.observation_chars`` with the
  cut and any limit said, is the tool message the model reads next;
- a turn without a tool call is the final answer: the episode ends, scored by the ``math`` scorer (math-verify:
  ``\\boxed{}``, DAPO's ``Answer:``, equivalence rather than string match): reward 1 or 0;
- a malformed call or an unknown tool gets an error observation and the episode goes on; no answer within
  ``rollout.max_turns`` turns scores 0.

The conversation is recorded as assistant ``tool_calls`` + ``tool`` messages (:func:`sftforge.envs.action_messages`)
and rendered ONCE with the chat template, as SFT data is: tool outputs are never trained.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sftforge.chat import ANSWER_COLUMNS, RowError, prompt_or_conversation, row_answer
from sftforge.config import DataConfig, SandboxConfig
from sftforge.data import DataError
from sftforge.envs import StepResult, Task
from sftforge.sandbox import run_code
from sftforge.scorers import EvalSample, ToolCallError, last_boxed, parse_tool_calls

TOOL_NAME = "code_interpreter"
CODE_TOOL = {
    "type": "function",
    "function": {
        "name": TOOL_NAME,
        "description": "A tool for executing code.",
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "The code to execute."}},
            "required": ["code"],
        },
    },
}


@dataclass
class CodeTask(Task):
    question: str = ""
    answer: str = ""


def load_code_tasks(rows: Sequence[tuple[str, Any]], data_cfg: DataConfig | None = None) -> list[CodeTask]:
    """Rows (any format data.format reads; a prompt-only row with an ``answer`` column too) -> tasks."""
    data_cfg = data_cfg or DataConfig()
    tasks = []
    for loc, row in rows:
        try:
            if isinstance(row, RowError):
                raise row
            messages, row_tools, *_ = prompt_or_conversation(row, data_cfg)
            question = next(m for m in messages if m["role"] == "user")["content"]
        except (RowError, StopIteration) as e:
            raise DataError(f"{loc}: not a code_math task: {e}") from None
        answer = row_answer(row)
        if answer is None:
            last = [m for m in messages if m["role"] == "assistant"]
            answer = last_boxed(str(last[-1].get("content") or "")) if last else None
        if not answer:
            raise DataError(
                f"{loc}: a code_math task needs its gold answer: a column ({', '.join(ANSWER_COLUMNS)}) "
                "or a \\boxed{...} in the last assistant message."
            )
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{loc}: the first user message (the problem) is empty.")
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        offered = row_tools or [CODE_TOOL]
        if not any((t.get("function", t) or {}).get("name") == TOOL_NAME for t in offered):
            raise DataError(f"{loc}: the row's tools do not include {TOOL_NAME!r}, the tool this environment runs.")
        rid = str(row.get("id", loc))
        tasks.append(CodeTask(rid, system, offered, answer, question=question, answer=answer))
    return tasks


class CodeEnv:
    """One episode of code_math. ``scorer(generation, sample)`` judges the final answer (the ``math`` scorer)."""

    def __init__(self, sandbox: SandboxConfig, scorer: Callable, run: Callable = run_code):
        self.sandbox, self.scorer, self.run = sandbox, scorer, run
        self.task: CodeTask | None = None
        self.calls = 0
        self.limits: list[str] = []

    def reset(self, task: CodeTask) -> str:
        self.task, self.calls, self.limits = task, 0, []
        return task.question

    def step(self, action: str) -> StepResult:
        assert self.task is not None
        try:
            calls = parse_tool_calls(action)
        except ToolCallError as e:
            return StepResult(
                f'Error: {e}. Call the tool as <tool_call>{{"name": "{TOOL_NAME}", "arguments": '
                '{"code": "..."}}</tool_call>.',
                False,
            )
        if not calls:
            sample = EvalSample(
                self.task.id,
                [],
                None,
                {"role": "assistant", "content": self.task.answer},
                row={"answer": self.task.answer},
            )
            score = self.scorer(action, sample)
            reward = float(score["score"] if isinstance(score, dict) else score)
            return StepResult("", True, reward, {"tool_calls": self.calls, "limits": self.limits})
        if not self.task.tools:
            return StepResult("Error: no tool is available; give the final answer.", False)
        outputs = []
        for call in calls:
            code = call["arguments"].get("code")
            if call["name"] != TOOL_NAME:
                outputs.append(f"Error: unknown tool {call['name']!r}; the tool is {TOOL_NAME!r}.")
            elif not isinstance(code, str) or not code.strip():
                outputs.append(f"Error: {TOOL_NAME} needs a non-empty string argument 'code'.")
            else:
                self.calls += 1
                result = self.run(code, self.sandbox)
                if result.limit:
                    self.limits.append(result.limit)
                outputs.append(result.observation(self.sandbox.observation_chars))
        return StepResult("\n".join(outputs), False)


__all__ = ["CODE_TOOL", "TOOL_NAME", "CodeEnv", "CodeTask", "load_code_tasks"]
