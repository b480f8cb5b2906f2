"""A TextCraft-like crafting environment.

The task data comes from the files (data/textcraft, tests/fixtures/textcraft): the first user message holds
the goal and the starting inventory,

    Craft the following items: 1x andesite_stairs, 2x granite
    Inventory: cobblestone x11, quartz x8, ...

and the recipes are derived from the gold trajectories: ``craft 2 diorite using 4 cobblestone, 4 quartz`` answered by
``Crafted 4 minecraft:diorite`` means one application of a diorite recipe takes 2 cobblestone + 2 quartz and makes 2.
The book is the union over every task loaded, so a task may be solved by recipes seen in other tasks.

Actions, in either format of the data:
- react text: ``Action: craft <times> <item> using <count> <ingredient>, ...`` / ``Action: finish <message>``
  (``inventory`` shows the inventory); the observation comes back as ``Observation: ...``.
- tool calls: ``craft {item, times, ingredients: {name: total count}}`` / ``finish {message}``; the observation is
  the tool message's content.

An ingredient ``tag:planks`` stands for any item of that family (``acacia_planks``, ``oak_planks``, ...), both in
recipes and in actions. As in the environment the gold trajectories come from, a tag ingredient only requires
holding some item of the family and is not consumed (7 gold crafts of the data need this).
The episode ends at ``finish`` with reward 1 when the inventory holds every goal item in its count, else 0.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sftforge.chat import RowError, row_to_conversation
from sftforge.config import DataConfig
from sftforge.data import DataError
from sftforge.envs import StepResult, Task
from sftforge.scorers import ToolCallError, format_tool_call, parse_tool_calls

_GOAL = re.compile(r"Craft the following items:\s*(.*)")
_INVENTORY = re.compile(r"Inventory:\s*(.*)")
_CRAFT = re.compile(r"^craft\s+(\d+)\s+(\S+)\s+using\s+(.+)$", re.I)
_CRAFTED = re.compile(r"Crafted\s+(\d+)\s+(?:minecraft:)?(\S+)")
FINISHED = "Episode finished."


def _pairs(text: str, pattern: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in text.split(","):
        m = re.fullmatch(pattern, part.strip())
        if m:
            item, n = (m["item"], int(m["n"]))
            out[item] = out.get(item, 0) + n
    return out


def parse_goal_inventory(text: str) -> tuple[dict[str, int], dict[str, int]]:
    goal = _GOAL.search(text)
    inv = _INVENTORY.search(text)
    if not goal:
        raise ValueError(f"no 'Craft the following items:' line in {text[:80]!r}")
    goal_items = _pairs(goal.group(1), r"(?P<n>\d+)x\s+(?P<item>\S+)")
    inventory = _pairs(inv.group(1), r"(?P<item>\S+)\s+x(?P<n>\d+)") if inv else {}
    return goal_items, inventory


def parse_ingredients(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in text.split(","):
        m = re.fullmatch(r"(\d+)\s+(\S+)", part.strip())
        if not m:
            raise ValueError(f"cannot read ingredient {part.strip()!r} (expected '<count> <item>')")
        out[m[2]] = out.get(m[2], 0) + int(m[1])
    return out


def parse_action(action: str) -> tuple[str, str, Any]:
    """(format, command, payload): format is 'react' or 'tool'; command craft/finish/inventory/invalid."""
    try:
        calls = parse_tool_calls(action)
    except ToolCallError as e:
        return "tool", "invalid", str(e)
    if calls:
        call = calls[0]
        name, args = call["name"], call["arguments"]
        if name == "craft":
            try:
                ingredients = {str(k): int(v) for k, v in dict(args.get("ingredients") or {}).items()}
                return "tool", "craft", (str(args["item"]), int(args.get("times", 1)), ingredients)
            except (KeyError, TypeError, ValueError):
                return "tool", "invalid", "craft needs item (string), times (integer) and ingredients ({name: count})"
        if name == "finish":
            return "tool", "finish", str(args.get("message", ""))
        if name == "inventory":
            return "tool", "inventory", None
        return "tool", "invalid", f"unknown function {name!r}; use craft or finish"
    lines = [ln.strip() for ln in action.strip().splitlines() if ln.strip()]
    acts = [ln.split("Action:", 1)[1].strip() for ln in lines if "Action:" in ln]
    text = acts[-1] if acts else (lines[-1] if lines else "")
    if text.lower().startswith("finish"):
        return "react", "finish", text[6:].strip()
    if text.lower() == "inventory":
        return "react", "inventory", None
    m = _CRAFT.match(text)
    if not m:
        return "react", "invalid", "use 'craft <times> <item> using <count> <ingredient>, ...' or 'finish <message>'"
    try:
        return "react", "craft", (m[2], int(m[1]), parse_ingredients(m[3]))
    except ValueError as e:
        return "react", "invalid", str(e)


def in_tag(item: str, ingredient: str) -> bool:
    """``item`` can pay for ``ingredient`` (the same item, or a member of its tag family)."""
    if item == ingredient:
        return True
    if ingredient.startswith("tag:"):
        family = ingredient[4:]
        return item == family or item.endswith("_" + family)
    return False


def _compatible(a: str, b: str) -> bool:
    return in_tag(a, b) or in_tag(b, a) or (a.startswith("tag:") and a == b)


@dataclass(frozen=True)
class Recipe:
    output: int
    """Items made by one application."""
    ingredients: tuple[tuple[str, int], ...]
    """(name, count) per application, sorted; a name may be a tag (tag:planks)."""


@dataclass
class RecipeBook:
    recipes: dict[str, set[Recipe]] = field(default_factory=dict)

    def add(self, item: str, times: int, ingredients: dict[str, int], produced: int) -> None:
        if times < 1 or produced % times or any(n % times for n in ingredients.values()):
            return  # not a whole number of applications: not a recipe we can trust
        ing = tuple(sorted((k, n // times) for k, n in ingredients.items()))
        self.recipes.setdefault(item, set()).add(Recipe(produced // times, ing))

    def match(self, item: str, times: int, ingredients: dict[str, int]) -> Recipe | None:
        """The recipe for ``item`` that the action's ingredients fit (names compatible, counts = per-use × times)."""
        names = list(ingredients)
        for r in sorted(self.recipes.get(item, ()), key=lambda r: r.ingredients):
            if len(r.ingredients) != len(names):
                continue
            for perm in itertools.permutations(names):
                if all(
                    _compatible(a, name) and ingredients[a] == n * times for a, (name, n) in zip(perm, r.ingredients)
                ):
                    return r
        return None

    def __len__(self) -> int:
        return sum(len(v) for v in self.recipes.values())


@dataclass
class TextCraftTask(Task):
    goal: dict[str, int] = field(default_factory=dict)
    inventory: dict[str, int] = field(default_factory=dict)
    format: str = "react"
    gold: list[tuple[str, str]] = field(default_factory=list)
    """(action text as a model would write it, observation) per gold step."""


def _gold_steps(messages: list[dict]) -> list[tuple[str, str]]:
    steps = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        nxt = messages[i + 1]["content"] if i + 1 < len(messages) else ""
        if m.get("tool_calls"):
            fn = m["tool_calls"][0]["function"]
            text = (m["content"] + "\n" if m["content"] else "") + format_tool_call(fn["name"], fn["arguments"])
            steps.append((text, nxt))
        elif "Action:" in m["content"] or not steps:
            steps.append((m["content"], nxt))
        # else: the closing text turn after a finish tool call; no action
    return steps


def load_tasks(rows: Sequence[tuple[str, Any]], data_cfg=None) -> tuple[list[TextCraftTask], RecipeBook]:
    """TextCraft rows (react or tool-call conversations, jsonl or parquet) -> tasks and the recipe book of their gold
    trajectories."""
    data_cfg = data_cfg or DataConfig()
    tasks, book = [], RecipeBook()
    for loc, row in rows:
        try:
            if isinstance(row, RowError):
                raise row
            messages, tools, _ = row_to_conversation(row, data_cfg)
            first = next(m for m in messages if m["role"] == "user")
            goal, inventory = parse_goal_inventory(first["content"])
        except (RowError, StopIteration, ValueError) as e:
            raise DataError(f"{loc}: not a TextCraft task ({e})") from None
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        gold = _gold_steps(messages)
        fmt = "tool" if any(m.get("tool_calls") for m in messages) else "react"
        for action, obs in gold:
            _, command, payload = parse_action(action)
            crafted = _CRAFTED.search(obs)
            if command == "craft" and crafted and crafted[2] == payload[0]:
                book.add(payload[0], payload[1], payload[2], int(crafted[1]))
        rid = str(row.get("id", loc)) if isinstance(row, dict) else loc
        tasks.append(TextCraftTask(rid, system, tools, [a for a, _ in gold], goal, inventory, fmt, gold))
    return tasks, book


class TextCraftEnv:
    def __init__(self, book: RecipeBook):
        self.book = book
        self.inventory: Counter = Counter()
        self.goal: dict[str, int] = {}
        self.first_observation = ""

    def reset(self, task: TextCraftTask) -> str:
        self.inventory = Counter(task.inventory)
        self.goal = dict(task.goal)
        goal = ", ".join(f"{n}x {k}" for k, n in task.goal.items())
        inv = ", ".join(f"{k} x{n}" for k, n in task.inventory.items())
        self.first_observation = f"Craft the following items: {goal}\nInventory: {inv}"
        return self.first_observation

    def success(self) -> bool:
        return all(self.inventory[k] >= n for k, n in self.goal.items())

    def step(self, action: str) -> StepResult:
        fmt, command, payload = parse_action(action)
        done, reward = False, 0.0
        if command == "craft":
            text = self._craft(*payload)
        elif command == "finish":
            done = True
            reward = 1.0 if self.success() else 0.0
            text = FINISHED
        elif command == "inventory":
            text = "Inventory: " + ", ".join(f"{k} x{n}" for k, n in self.inventory.items() if n > 0)
        else:
            text = f"Invalid action: {payload}."
        if fmt == "react" and command != "finish":
            text = "Observation: " + text
        return StepResult(text, done, reward, {"success": done and reward > 0})

    def _craft(self, item: str, times: int, ingredients: dict[str, int]) -> str:
        if times < 1:
            return f"Could not craft minecraft:{item}: times must be at least 1."
        recipe = self.book.match(item, times, ingredients)
        if recipe is None:
            return f"Could not find a valid recipe for {item} using {ingredients_text(ingredients)}."
        inv = Counter(self.inventory)
        for name, n in ingredients.items():
            if name.startswith("tag:"):
                # As in the environment the gold trajectories come from: a tag is satisfied by holding any item of
                # its family and is not consumed (task 649 of the data crafts with 21 tag:planks holding 8 planks).
                if not any(inv[k] > 0 and in_tag(k, name) for k in inv):
                    return f"Could not find enough items to craft minecraft:{item}."
            elif inv[name] < n:
                return f"Could not find enough items to craft minecraft:{item}."
            else:
                inv[name] -= n
        made = recipe.output * times
        inv[item] += made
        self.inventory = +inv
        return f"Crafted {made} minecraft:{item}"


def ingredients_text(ingredients: dict[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in ingredients.items())


__all__ = [
    "FINISHED",
    "Recipe",
    "RecipeBook",
    "TextCraftEnv",
    "TextCraftTask",
    "in_tag",
    "load_tasks",
    "parse_action",
    "parse_goal_inventory",
]
