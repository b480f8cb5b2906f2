"""One render of a conversation with the model's own chat template -> (input_ids, loss_mask).

The rule: a token is trained iff it is part of what the model produces in an assistant turn — the assistant's
content, its tool calls, its reasoning where the template keeps it, and the closing tokens the model must emit to end
the turn. Role headers, the glue after the closing tokens and every system/user/tool token are not.

How: the whole conversation is rendered ONCE to text and tokenized ONCE with character offsets. Rendering messages
one at a time and concatenating is wrong for Qwen3 (earlier turns lose their reasoning) and is never done here.
What the template writes around an assistant turn is learned from the template itself (:func:`template_markers`),
from probe conversations whose messages are unique sentinel strings:

- the **lead-in** of an assistant turn after a user (or tool) message: what the generation prompt adds after that
  message's content (``<|im_end|>\\n<|im_start|>assistant\\n``; after a tool result Gemma 4 and DeepSeek-V3 add only
  the result's wrapper). History turns may render a shorter form (DeepSeek-R1 prefills ``<think>\\n`` only in the
  generation prompt), down to what a history probe shows.
- the **closing** of a turn, per context — followed by a user message, followed by a tool result, or last — as the
  run of special tokens after the turn's output: the part all contexts share is the assistant's own (Qwen's
  ``<|im_end|>``, Command-A's ``<|END_RESPONSE|><|END_OF_TURN_TOKEN|>``); where contexts differ, the turn closes
  differently in history and at the end (gpt-oss: ``<|end|>`` vs ``<|return|>``). A following special token that is
  a stop token (tokenizer eos, generation-config eos ids) is what the model emits to stop and is trained too
  (GLM's ``<|user|>`` / ``<|observation|>``; Gemma 4's ``<|tool_response>``); a token that opens the next turn is not.
  A template that leaves the last turn open (GLM) gets the stop token it would render next appended, trained.
- whether tool-call arguments are rendered from a dict or from a JSON string, whether a system role exists.

Each row is then located in its one render, message by message, and checked: every assistant message's content and
tool-call names lie inside its trained span, which ends with the closing learned for its context; every
system/user/tool message's content is found, in order, outside all trained spans; no message holds text that the
tokenizer reads as a special token. Anything else is a :class:`RowError` that says why — never a silent mis-mask.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

ROLES = ("system", "user", "assistant", "tool")
# Probe sentinels: no one is a prefix of another, none occurs in a template.
_PU, _PU2, _PA, _PA2 = "Zq1probeUserOne", "Zq1probeUserTwo", "Zq1probeReplyOne", "Zq1probeReplyTwo"
_PS, _PT, _PF, _PK, _PV = "Zq1probeSystemText", "Zq1probeToolText", "zq1probe_fn", "zq1probe_arg", "Zq1probeArgValue"
_PK2, _PV2 = "zq1probe_second", "Zq1probeSecondValue"  # a call of two arguments: its closing is learned after both
_PROBE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": _PF,
            "description": "probe",
            "parameters": {
                "type": "object",
                "properties": {_PK: {"type": "string"}, _PK2: {"type": "string"}},
                "required": [_PK, _PK2],
            },
        },
    }
]


IMAGE_PLACEHOLDER = "<image>"
"""Where an image of the row's ``images`` column goes in a message's text (verl, LLaMA-Factory)."""


class RowError(ValueError):
    """A malformed conversation; ``reason`` is a short category used by the skip report."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class TemplateError(ValueError):
    """The chat template cannot be used to derive masks; the message says what to change."""


@dataclass(frozen=True)
class TemplateMarkers:
    """What the chat template writes around assistant turns, learned from probe renders (see the module docstring)."""

    header: str
    """The assistant header of the generation prompt, e.g. '<|im_start|>assistant\\n' (shown to users)."""
    lead_ins: dict = field(default_factory=dict)
    """Role of the message before an assistant turn ('user', 'tool', '*' for any other) -> the text between that
    message's content and the assistant's output, longest form first."""
    closings: dict = field(default_factory=dict)
    """'text:user' | 'text:end' | 'call:tool' | 'call:end' -> the trained text that closes a turn (a plain answer or
    one with tool calls) followed by a user message / a tool result / nothing."""
    appended_closing: dict = field(default_factory=dict)
    """'text' | 'call' -> trained text appended after a last assistant turn that the template leaves open: the stop
    token it would render next (GLM: '<|user|>' after an answer, '<|observation|>' after a tool call)."""
    stop_tokens: tuple = ()
    """Tokens that end a generation: the tokenizer's eos and the generation config's eos ids."""
    tool_arguments: str = ""
    """How the template takes tool-call arguments: 'dict', 'json' (a JSON string), or '' (it renders no tool call)."""
    tool_problem: str = ""
    """Why tool-call rows are refused when the template cannot be used for them."""
    tool_call_content_none: bool = False
    """The template renders a tool call only when the message's content is None (not '')."""
    content_parts: bool = False
    """The template reads message content as a list of parts ([{"type": "text", "text": ...}], VLM templates)."""
    prompt_from_history: tuple = ()
    """Contexts ('user', 'tool', '*': the role of the message before the answer) where the template's generation
    prompt is not what its history renders before an answer: a generation prompt there is cut from a render with an
    answer, at the first token training trains (:func:`render_prompt`), so that the model continues what it learned."""
    needs_tools: bool = False
    """The template fails on a conversation without tools (it loops over ``tools`` unguarded): rows must have them."""
    system_role: bool = True
    """False when the template refuses or drops a system message."""
    specials: tuple = ()
    """The tokenizer's special tokens (text that must not occur inside a message)."""

    @property
    def end_of_turn(self) -> str:
        """The closing of a last plain turn (what a generation ends with)."""
        return self.closings.get("text:end") or self.appended_closing.get("text", "")

    def describe(self) -> list[str]:
        """Lines for `data preview` / `data check`: what was learned from the template."""
        c = self.closings
        out = [
            f"assistant header (generation prompt): {self.header!r}",
            f"lead-in after a user message: {self.lead_ins.get('user', ('?',))[0]!r}",
            f"closing, followed by a user message: {c.get('text:user', '')!r}; last turn: "
            f"{self.end_of_turn!r}"
            + (" (appended: the template leaves the last turn open)" if self.appended_closing else ""),
        ]
        if self.tool_arguments:
            out.append(
                f"tool calls: arguments as {'a JSON string' if self.tool_arguments == 'json' else 'a dict'}; lead-in "
                f"after a tool result: {self.lead_ins.get('tool', ('?',))[0]!r}; closing before a tool result: "
                f"{c.get('call:tool', '')!r}; last: {c.get('call:end') or self.appended_closing.get('call', '')!r}"
            )
        else:
            out.append(f"tool calls: refused ({self.tool_problem or 'the template does not render them'})")
        for ctx in self.prompt_from_history:
            out.append(
                f"generation prompt after a {'message' if ctx == '*' else ctx + ' message'}: cut from a render with "
                f"an answer (the template's own, ending {self.header!r}, is not what its history renders before an "
                f"answer: {self.lead_ins[ctx][0]!r})"
            )
        if self.needs_tools:
            out.append("tools: the template renders only conversations with tools (rows without them are refused)")
        if not self.system_role:
            out.append("system role: not supported (data.system_into_first_user=true merges it into the first user)")
        out.append(f"stop tokens: {', '.join(self.stop_tokens) or '(none)'}")
        return out


@dataclass
class Rendered:
    text: str
    input_ids: list[int]
    loss_mask: list[int]
    spans: list[tuple[int, int]]
    """Character spans of the trained text, in order."""
    system_merged: bool = False
    """data.system_into_first_user moved a system message into the first user message."""
    reasoning_dropped: int = 0
    """Assistant messages whose reasoning_content the template does not render (e.g. earlier turns under Qwen3)."""


def load_chat_template(value: str) -> str:
    """``data.chat_template``: a path to a Jinja file, or the template itself."""
    if "{%" in value or "{{" in value:
        return value
    p = Path(value)
    if not p.is_file():
        raise TemplateError(
            f"data.chat_template={value!r} is neither an existing file nor a Jinja template string "
            "(it contains no '{%' or '{{')."
        )
    return p.read_text()


def render_text(tokenizer, messages, tools=None, add_generation_prompt=False, kwargs=None) -> str:
    """The template's text for ``messages`` as given (see :func:`prepare_messages` for the template's forms)."""
    return tokenizer.apply_chat_template(
        messages,
        tools=tools or None,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **(kwargs or {}),
    )


def render_prompt(tokenizer, messages, tools=None, kwargs=None, markers: TemplateMarkers | None = None) -> str:
    """The prompt of a generation: the conversation in the template's forms, with the generation prompt. A template
    without a system role gets the system text in the first user message, as data.system_into_first_user trains it
    (without that option such conversations are refused in training, and the template itself would raise here)."""
    markers = markers or template_markers(tokenizer, kwargs)
    _check_tools(markers, tools)
    last = messages[-1]["role"] if messages else "*"
    ctx = last if last in markers.lead_ins else "*"
    if ctx not in markers.prompt_from_history:
        messages, _ = prepare_messages(messages, markers, system_into_first_user=True)
        return render_text(tokenizer, messages, tools, add_generation_prompt=True, kwargs=kwargs)
    # The one render decides: the prompt is a render with an answer, cut where training starts to train (the start
    # of the token that holds the answer's first character: the model writes that token, e.g. ' It' after ':').
    answer = {"role": "assistant", "content": _PA}
    shaped, _ = prepare_messages([*messages, answer], markers, system_into_first_user=True)
    text = render_text(tokenizer, shaped, tools, kwargs=kwargs)
    cut = text.rindex(_PA)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return text[: max([0] + [end for _, end in offsets if end <= cut])]


# ----------------------------------------------------------------------------------------------------------------
# Learning the template's markers


def special_tokens(tokenizer) -> tuple[str, ...]:
    """The tokenizer's special (atomic, never-split) tokens, longest first."""
    found = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special and t.content}
    found |= {t for t in getattr(tokenizer, "all_special_tokens", []) if t}
    return tuple(sorted(found, key=lambda t: (-len(t), t)))  # longest first; ties by name (the cache key is stable)


@lru_cache(maxsize=16)
def _specials_re(specials: tuple) -> re.Pattern:
    return re.compile("|".join(map(re.escape, specials))) if specials else re.compile(r"(?!x)x")


@lru_cache(maxsize=16)
def _first_chars(specials: tuple) -> frozenset:
    return frozenset(t[0] for t in specials)


def generation_eos_tokens(tokenizer) -> list[str]:
    """The eos ids of the model's generation_config.json next to the tokenizer (a local folder, or the hub repo the
    tokenizer came from), as tokens; [] when there is none."""
    name = str(getattr(tokenizer, "name_or_path", "") or "")
    path = Path(name) / "generation_config.json"
    ids = None
    try:
        if path.is_file():
            ids = json.loads(path.read_text()).get("eos_token_id")
        elif name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists():
            from transformers import GenerationConfig  # a hub id: its generation config, if it has one

            ids = GenerationConfig.from_pretrained(name).eos_token_id
    except Exception:  # no generation config (or offline): the tokenizer's eos alone
        ids = None
    if ids is None:
        return []
    ids = [ids] if isinstance(ids, int) else list(ids)
    return [t for t in tokenizer.convert_ids_to_tokens(ids) if t]


def _between(text: str, a: str, b: str | None) -> str:
    """The text after sentinel ``a`` up to sentinel ``b`` (or to the end)."""
    i = text.index(a) + len(a)
    return text[i : text.index(b, i)] if b else text[i:]


def _cut(text: str, d: int, toks) -> int:
    """``d`` moved back so that it does not split a special token of ``text``."""
    for s, e, _ in toks:
        if s < d < e:
            return s
    return d


def _closing(glue: str, shared: int, rx, stops: set, openers: set) -> str:
    """The trained closing at the start of ``glue`` (the text after an assistant turn's last output), of which the
    first ``shared`` characters are the same in every context (the assistant's own)."""
    toks = [(m.start(), m.end(), m.group()) for m in rx.finditer(glue)]
    shared = _cut(glue, shared, toks)
    own = [t for t in toks if t[1] <= shared]
    if own:  # the last run of adjacent special tokens of the assistant's own text, up to its first stop token
        j = len(own) - 1
        while j > 0 and own[j - 1][1] == own[j][0]:
            j -= 1
        begin, end = own[j][0], own[j][0]
        for _s, e, t in own[j:]:
            end = e
            if t in stops:
                return glue[begin:end]
    else:  # the turn closes differently per context: adjacent specials up to the next turn's opener
        begin = end = shared
    history_closing = not own
    for s, e, t in toks:
        if s < end:
            continue
        if s != end:
            break
        if t in stops:
            end = e
            break
        if t in openers or not history_closing:
            break
        end = e
    return glue[begin:end]


def _forms(full: str, history: str | None, rx) -> tuple[str, ...]:
    """``full`` and its shorter forms down to the part a history render shares with it (cut after a newline or a
    special token), longest first."""
    if history is None or history.startswith(full):
        return (full,)
    m = len(os.path.commonprefix([full, history]))
    cuts = {len(full), m}
    cuts |= {i + 1 for i in range(m, len(full)) if full[i] == "\n"}
    cuts |= {mt.end() for mt in rx.finditer(full) if m <= mt.end()}
    return tuple(sorted({full[:c] for c in cuts if full[:c].strip()}, key=len, reverse=True))


def _lead_in(prompted: str, history: str | None, header: str, rx) -> tuple[tuple[str, ...], bool]:
    """The lead-in of an answer in one context (the text between the previous message's content and the answer),
    as forms to look for in training renders, and whether generation prompts must be cut from a history render.

    ``prompted`` is what a generation prompt has there, ``history`` what a render with the answer has (training
    renders only history). In order: the generation prompt is in the history render as it is; or the history has
    the header, and what differs lies before it (Hermes closes a last tool result without the newline a history
    one has): the history's lead-in, and prompts cut from history renders (:func:`render_prompt`); or they share a
    form that opens the turn, after which the generation prompt opens more (GLM-4.7's '<|assistant|>' then
    '<think>', which the history drops): the template's prompt is kept, it is the model's reasoning mode; else the
    template's generation prompt is not what its history renders (Vicuna's 'ASSISTANT:\n' against 'ASSISTANT: '):
    the history's lead-in, and prompts cut from history renders."""
    if history is None or history.startswith(prompted):
        return (prompted,), False
    if header.strip() and header in history:
        return (history[: history.rindex(header) + len(header)],), True
    opener = rx.search(header)
    key = opener.group() if opener else (header.split() or [""])[0]
    forms = tuple(f for f in _forms(prompted, history, rx) if key and key in f)
    if any(history.startswith(f) for f in forms):
        return forms, False
    return (history,), True


def _as_parts(messages: list[dict]) -> list[dict]:
    """String contents as one text part, for templates that read content as a list of parts."""
    return [
        {**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m.get("content"), str) else m
        for m in messages
    ]


def _tool_call_message(arguments: str, content_none: bool) -> dict:
    """A probe tool call; its id is 9 letters and digits, the only ids Mistral's templates accept."""
    args: Any = {_PK: _PV, _PK2: _PV2} if arguments == "dict" else json.dumps({_PK: _PV, _PK2: _PV2})
    call = {"id": "Zq1probe9", "type": "function", "function": {"name": _PF, "arguments": args}}
    return {"role": "assistant", "content": None if content_none else "", "tool_calls": [call]}


_PROBE_USER, _PROBE_ANSWER = {"role": "user", "content": _PU}, {"role": "assistant", "content": _PA}
_PROBE_USER2, _PROBE_ANSWER2 = {"role": "user", "content": _PU2}, {"role": "assistant", "content": _PA2}
_TOOL_MESSAGE = {"role": "tool", "tool_call_id": "Zq1probe9", "name": _PF, "content": _PT}


_LEARNED: dict[tuple, TemplateMarkers] = {}


def template_markers(tokenizer, kwargs: dict | None = None) -> TemplateMarkers:
    """Learn the lead-ins, closings and forms of the template from probe renders of the template itself (memoized
    per tokenizer object, template and kwargs: a dozen renders, then free)."""
    key = (
        id(tokenizer),
        getattr(tokenizer, "chat_template", None),
        tokenizer.eos_token,
        getattr(tokenizer, "name_or_path", ""),
        json.dumps(kwargs or {}, sort_keys=True, default=str),
    )
    if key not in _LEARNED:
        if len(_LEARNED) > 32:
            _LEARNED.clear()
        _LEARNED[key] = _learn_markers(tokenizer, kwargs)
    return _LEARNED[key]


def _learn_markers(tokenizer, kwargs: dict | None) -> TemplateMarkers:
    """The template's markers, learned step by step from probe renders (each step reads what the ones before set)."""
    p = _start_probes(tokenizer, kwargs)
    _probe_shape(p)
    _learn_header(p)
    _learn_answer_lead_ins(p)
    _learn_text_closings(p)
    calls = _probe_tool_calls(p)
    if calls:
        _learn_call_closings(p, *calls)
    _learn_appended_closings(p)
    _check_closings(p)
    _learn_system_role(p)
    return p.markers()


@dataclass
class _Probes:
    """The state of :func:`_learn_markers` between its steps: how probes are rendered, the base renders, and what
    the steps have learned so far."""

    tokenizer: Any
    kwargs: dict | None
    specials: tuple
    rx: re.Pattern
    stops: set
    parts: bool = False
    """The template reads content as a list of parts (VLM templates), decided by :func:`_probe_shape`."""
    needs_tools: bool = False
    """The template renders only with tools (it loops over them unguarded), decided by :func:`_probe_shape`."""
    # The base renders: a user message; the same with the generation prompt; user, answer, user, answer; user, answer
    without: str = ""
    prompted: str = ""
    two: str = ""
    one: str = ""
    # Learned, as TemplateMarkers has them (see its fields)
    header: str = ""
    lead_user: str = ""
    """What the generation prompt writes after a user message's content (the header, where it writes nothing)."""
    openers: set = field(default_factory=set)
    """The special token that opens an assistant turn (the header's first), if any."""
    lead_ins: dict = field(default_factory=dict)
    from_history: set = field(default_factory=set)
    closings: dict = field(default_factory=dict)
    appended: dict = field(default_factory=dict)
    tool_arguments: str = ""
    tool_call_content_none: bool = False
    tool_problem: str = ""
    system_role: bool = True

    def render(self, msgs: list[dict], gen: bool = False, tools: list | None = None) -> str:
        """A probe rendered as the rows will be: content as parts, and tools, where the template needs them."""
        msgs = _as_parts(msgs) if self.parts else msgs
        tools = tools or (_PROBE_TOOLS if self.needs_tools else None)
        return render_text(self.tokenizer, msgs, tools, add_generation_prompt=gen, kwargs=self.kwargs)

    def markers(self) -> TemplateMarkers:
        """What was learned, as the template's markers."""
        return TemplateMarkers(
            header=self.header,
            lead_ins=self.lead_ins,
            closings=self.closings,
            appended_closing=self.appended,
            stop_tokens=tuple(sorted(self.stops)),
            tool_arguments=self.tool_arguments,
            tool_problem=self.tool_problem,
            tool_call_content_none=self.tool_call_content_none,
            content_parts=self.parts,
            needs_tools=self.needs_tools,
            prompt_from_history=tuple(sorted(self.from_history)),
            system_role=self.system_role,
            specials=self.specials,
        )


def _start_probes(tokenizer, kwargs: dict | None) -> _Probes:
    """The tokenizer's special and stop tokens, before any probe; refuses a tokenizer without a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            "The tokenizer has no chat template. Set data.chat_template to a .jinja file or an inline Jinja "
            "string (for example the template of the instruct model you fine-tune from)."
        )
    specials = special_tokens(tokenizer)
    stops = {t for t in [tokenizer.eos_token, *generation_eos_tokens(tokenizer)] if t}
    return _Probes(tokenizer, kwargs, specials, _specials_re(specials), stops)


def _probe_shape(p: _Probes) -> None:
    """Content as a string or as parts, without or with tools: the first shape in which the user/answer probes
    render both answers; keeps those base renders."""
    error = None
    # Probes as the rows will be: content as a string or as parts; without tools, or (a template that fails without
    # them, e.g. Hermes' tool_use) with the probe's tools, whose markers then serve the rows that have tools.
    for parts, needs_tools in ((False, False), (True, False), (False, True), (True, True)):
        p.parts, p.needs_tools = parts, needs_tools  # (read by p.render)
        try:
            p.without, p.prompted = p.render([_PROBE_USER]), p.render([_PROBE_USER], gen=True)
            p.two = p.render([_PROBE_USER, _PROBE_ANSWER, _PROBE_USER2, _PROBE_ANSWER2])
            p.one = p.render([_PROBE_USER, _PROBE_ANSWER])
        except Exception as e:  # a broken template: jinja errors of many kinds
            error = error or e
            continue
        if _PA in p.one and _PA2 in p.two:
            return
    if error is not None:
        raise TemplateError(f"The chat template failed to render a probe conversation: {error}") from error
    raise TemplateError("The chat template does not render the assistant's content; set data.chat_template.")


def _learn_header(p: _Probes) -> None:
    """The assistant header, from what the generation prompt adds to the one-user probe (or, where it adds nothing,
    from what the history probe writes between a user message and the answer)."""
    # The header: what the generation prompt adds after the shared token prefix (Phi-3 ends the plain render with
    # an end-of-text token that the prompted render replaces, so a plain string prefix is not enough).
    ta = p.tokenizer(p.without, add_special_tokens=False, return_offsets_mapping=True)
    tb = p.tokenizer(p.prompted, add_special_tokens=False, return_offsets_mapping=True)
    k = 0
    while k < min(len(ta["input_ids"]), len(tb["input_ids"])) and ta["input_ids"][k] == tb["input_ids"][k]:
        k += 1
    header = p.prompted[tb["offset_mapping"][k][0] :] if k < len(tb["input_ids"]) else ""
    lead_user = _between(p.prompted, _PU, None)
    hist_user = _between(p.two, _PU, _PA)
    if not header.strip():
        # add_generation_prompt adds nothing: the render after a user message ends where the answer begins (a header
        # always written, Command R7B's; Mistral's '[/INST]'), else the history render's lead-in is the header
        header = lead_user if lead_user.strip() and hist_user.startswith(lead_user) else hist_user
        lead_user = header
    if not header.strip():
        raise TemplateError(
            "The chat template has no generation prompt (add_generation_prompt adds nothing) and writes nothing "
            "between a user message and the assistant's answer, so assistant turns cannot be located. Set "
            "data.chat_template to a template that supports add_generation_prompt."
        )
    p.header, p.lead_user = header, lead_user
    p.openers = {m.group() for m in [p.rx.search(header)] if m}


def _learn_answer_lead_ins(p: _Probes) -> None:
    """The lead-ins of an answer after a user message and after any other message, from the generation prompt and
    the history probe."""
    hist_user = _between(p.two, _PU, _PA)
    user_close = p.lead_user[: len(p.lead_user) - len(p.header)] if p.lead_user.endswith(p.header) else ""
    hist_header = hist_user[len(user_close) :] if hist_user.startswith(user_close) else None
    _add_lead_in(p, "user", p.lead_user, hist_user)
    _add_lead_in(p, "*", p.header, hist_header)


def _add_lead_in(p: _Probes, ctx: str, prompted: str, history: str | None) -> None:
    """Records the lead-in of an answer in context ``ctx`` (:func:`_lead_in`), and whether prompts there are cut."""
    p.lead_ins[ctx], cut = _lead_in(prompted, history, p.header, p.rx)
    if cut:
        p.from_history.add(ctx)


def _learn_text_closings(p: _Probes) -> None:
    """The closings of a plain answer followed by a user message and of a last one, from the history probes."""
    t_user, t_end = _between(p.two, _PA, _PU2), _between(p.one, _PA, None)
    shared = len(os.path.commonprefix([t_user, t_end]))
    p.closings["text:user"] = _closing(t_user, shared, p.rx, p.stops, p.openers)
    p.closings["text:end"] = _closing(t_end, shared, p.rx, p.stops, p.openers)


def _probe_tool_calls(p: _Probes) -> tuple[str, str, str] | None:
    """How the template takes tool-call arguments (a dict or a JSON string; content '' or None): the first form whose
    call probes render the call; its renders (a call, its result and an answer; a last call; the generation prompt
    after the result), None when no form renders."""
    for args_form, none in (("dict", False), ("json", False), ("dict", True), ("json", True)):
        call = _tool_call_message(args_form, none)
        try:
            after_tool = p.render([_PROBE_USER, call, _TOOL_MESSAGE, _PROBE_ANSWER2], tools=_PROBE_TOOLS)
            last_call = p.render([_PROBE_USER, call], tools=_PROBE_TOOLS)
            prompted_tool = p.render([_PROBE_USER, call, _TOOL_MESSAGE], gen=True, tools=_PROBE_TOOLS)
        except Exception:
            continue
        if all(_PF in t and _PV in t and _PV2 in t for t in (after_tool, last_call)) and _PT in after_tool:
            p.tool_arguments, p.tool_call_content_none = args_form, none
            return after_tool, last_call, prompted_tool
    return None


def _learn_call_closings(p: _Probes, after_tool: str, last_call: str, prompted_tool: str) -> None:
    """The closings of a tool-call turn followed by a tool result and of a last one, and the lead-in of an answer
    after a tool result, from the tool-call probes."""
    c_tool, c_end = _between(after_tool, _PV2, _PT), _between(last_call, _PV2, None)
    # What follows every argument's value (the glue between two arguments shares it: an argument's own closing
    # tag, a quote) belongs to the call, not to the turn's closing: learned past it, the closing cannot be a tag
    # that also ends the first argument (a call would be cut, and trained, after its first argument).
    v = after_tool.index(_PV) + len(_PV)
    k2 = after_tool.find(_PK2, v)  # (the tools list in the system part names it too: after the first value)
    between_args = after_tool[v:k2] if k2 != -1 else ""
    own = len(os.path.commonprefix([between_args, c_tool, c_end]))
    own = _cut(c_tool, own, [(m.start(), m.end(), m.group()) for m in p.rx.finditer(c_tool)])
    c_tool, c_end = c_tool[own:], c_end[own:]
    shared = len(os.path.commonprefix([c_tool, c_end]))
    p.closings["call:tool"] = _closing(c_tool, shared, p.rx, p.stops, p.openers)
    p.closings["call:end"] = _closing(c_end, shared, p.rx, p.stops, p.openers)
    _add_lead_in(p, "tool", _between(prompted_tool, _PT, None), _between(after_tool, _PT, _PA2))


def _learn_appended_closings(p: _Probes) -> None:
    """For a last turn that the template leaves open (no closing learned), the closing that the same turn gets
    before the next message where it is stop tokens only (GLM's '<|user|>'): appended to a last turn, trained."""
    for kind, follow in (("text", "text:user"), ("call", "call:tool")):
        if f"{kind}:end" in p.closings and not p.closings[f"{kind}:end"] and _stop_only(p, p.closings[follow]):
            p.appended[kind] = p.closings[follow]


def _stop_only(p: _Probes, closing: str) -> bool:
    """``closing`` is stop tokens and nothing else."""
    return bool(closing) and p.rx.sub("", closing) == "" and all(t in p.stops for t in p.rx.findall(closing))


def _check_closings(p: _Probes) -> None:
    """Refuses a template whose plain turns end with nothing the model could learn to emit; refuses tool calls (not
    the template) where a tool-call turn does."""
    if not p.closings["text:end"] and "text" not in p.appended:
        t_user = _between(p.two, _PA, _PU2)
        raise TemplateError(
            f"The chat template writes nothing after the last assistant message and what it writes before the "
            f"next message ({t_user[:40]!r}) holds no stop token (stop tokens: {', '.join(sorted(p.stops)) or 'none'}"
            "), so the model could not learn to end its turn. Put the model's generation_config.json (its "
            "eos_token_id lists the tokens it stops on) next to the tokenizer, or set data.chat_template to a "
            "template that closes assistant turns with a special token."
        )
    if not p.closings["text:user"]:
        raise TemplateError(
            "The chat template closes an assistant turn that a user message follows with no special token, so the "
            "end of the turn the model must learn is unknown. Set data.chat_template to a template that closes "
            "assistant turns with a special token."
        )
    if p.tool_arguments and (not p.closings["call:tool"] or not (p.closings["call:end"] or "call" in p.appended)):
        p.tool_problem = "the template closes a tool-call turn with no special token or stop token"
        p.tool_arguments = ""


def _learn_system_role(p: _Probes) -> None:
    """Whether the template has a system role, from a probe with a system message (refused or dropped: none)."""
    try:
        p.system_role = _PS in p.render([{"role": "system", "content": _PS}, _PROBE_USER, _PROBE_ANSWER])
    except Exception:
        p.system_role = False


def end_of_turn_token_ids(tokenizer, kwargs: dict | None = None) -> list[int]:
    """Token ids that end a generated assistant turn: the last token of each closing a generation ends with (a plain
    answer, a tool call), then the stop tokens (tokenizer eos, generation-config eos ids)."""
    m = template_markers(tokenizer, kwargs)
    rx = _specials_re(m.specials)
    ends = [m.end_of_turn, m.closings.get("call:tool"), m.closings.get("call:end") or m.appended_closing.get("call")]
    tokens = [rx.findall(c)[-1] for c in ends if c and rx.findall(c)]
    tokens += [tokenizer.eos_token, *m.stop_tokens]
    ids: list[int] = []
    for t in tokens:
        tid = tokenizer.convert_tokens_to_ids(t) if t else None
        if tid is not None and tid not in ids:
            ids.append(tid)
    return ids


# ----------------------------------------------------------------------------------------------------------------
# Normalization: every supported row shape becomes (messages, tools, per-message train flags)


def _as_json(value: Any, what: str) -> Any:
    """Decode a JSON string column (parquet files often hold messages/tools as JSON, sometimes encoded twice)."""
    for _ in range(3):
        if not isinstance(value, str) or value.strip()[:1] not in ("[", "{", '"'):
            return value
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RowError("invalid JSON", f"{what} is a string that is not valid JSON: {e}") from None
    return value


def _flag(msg: dict, i: int) -> bool | None:
    for key in ("train", "loss_mask"):
        if key in msg and msg[key] is not None:
            v = msg[key]
            if isinstance(v, bool):
                return v
            if v in (0, 1):
                return bool(v)
            raise RowError("wrong type", f"message {i}: '{key}' must be true/false or 0/1, got {v!r}")
    return None


def _normalize_tool_calls(calls: Any, i: int) -> list[dict]:
    calls = _as_json(calls, f"message {i} tool_calls")
    if not isinstance(calls, list):
        raise RowError("wrong type", f"message {i}: tool_calls must be a list, got {type(calls).__name__}")
    out = []
    for j, call in enumerate(calls):
        if not isinstance(call, dict):
            raise RowError("wrong type", f"message {i} tool_calls[{j}] must be an object")
        fn = call.get("function", call)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn.get("name"):
            raise RowError("invalid tool call", f"message {i} tool_calls[{j}] has no function name")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise RowError(
                    "invalid tool-call arguments",
                    f"message {i} tool_calls[{j}] ({fn['name']}): arguments are not valid JSON: {e}",
                ) from None
        if not isinstance(args, dict):
            raise RowError(
                "invalid tool-call arguments",
                f"message {i} tool_calls[{j}] ({fn['name']}): arguments must be an object, got {type(args).__name__}",
            )
        new = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if "id" in call:
            new["id"] = call["id"]
        out.append(new)
    return out


def normalize_messages(messages: Any, what: str = "messages") -> tuple[list[dict], list[bool | None]]:
    """Validate OpenAI-style messages; returns clean messages and the per-message train flags."""
    messages = _as_json(messages, what)
    if not isinstance(messages, list):
        raise RowError("wrong type", f"'{what}' must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise RowError("no assistant turn", f"'{what}' is empty")
    clean, flags = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RowError("wrong type", f"message {i} must be an object with role and content, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise RowError("unknown role", f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        content = m.get("content")
        if content is None:
            content = ""
        parts = None
        if isinstance(content, list):
            content, parts = _content_parts(content, i, role)
        if not isinstance(content, str):
            raise RowError(
                "wrong type",
                f"message {i} ({role}): content must be a string or a list of parts, got {type(content).__name__}",
            )
        new: dict[str, Any] = {"role": role, "content": content}
        if parts is not None:
            new["parts"] = parts
        if role == "assistant":
            if m.get("tool_calls"):
                new["tool_calls"] = _normalize_tool_calls(m["tool_calls"], i)
            for key in ("reasoning_content", "thinking"):
                if isinstance(m.get(key), str):
                    new[key] = m[key]
        elif role == "tool":
            for key in ("tool_call_id", "name"):
                if key in m:
                    new[key] = m[key]
        clean.append(new)
        flags.append(_flag(m, i))
    if not any(m["role"] == "assistant" for m in clean):
        raise RowError("no assistant turn", "the conversation has no assistant message to train on")
    return clean, flags


EMPTY_TURN = "empty assistant turn"
"""The reason (and data report problem kind) of a row with an assistant message that says nothing."""


def empty_assistant_turns(messages: list[dict]) -> list[int]:
    """Indices of the normalized assistant messages with no text (None, '', whitespace, parts without text) and no
    tool call — reasoning alone does not count: the turn still ends without an answer."""
    return [
        i
        for i, m in enumerate(messages)
        if m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls")
    ]


def check_empty_assistant_turns(messages: list[dict], data_cfg) -> int:
    """data.empty_assistant_turns: ``error`` refuses a row holding an empty assistant turn (a RowError, so that
    data.bad_rows decides); ``keep`` lets it be trained. Returns the number of empty turns kept."""
    empty = empty_assistant_turns(messages)
    if not empty or getattr(data_cfg, "empty_assistant_turns", "error") == "keep":
        return len(empty)
    i, m = empty[0], messages[empty[0]]
    reasoning = (m.get("reasoning_content") or m.get("thinking") or "").strip()
    what = "only reasoning: no content and no tool calls" if reasoning else "no content and no tool calls"
    more = f" (empty assistant messages: {', '.join(map(str, empty))})" if len(empty) > 1 else ""
    raise RowError(
        EMPTY_TURN,
        f"message {i} (assistant) has {what}{more}; training on it teaches the model to end its turn at once "
        "(data.empty_assistant_turns=keep trains such turns as they are)",
    )


def _content_parts(parts: list, i: int, role: str) -> tuple[str, list[dict] | None]:
    """A content list -> (its text, its parts when it holds images, else None): text parts {"type": "text"},
    images {"type": "image", "image": SOURCE} (also OpenAI's {"type": "image_url", "image_url": {"url": ...}})."""
    out, texts = [], []
    for j, p in enumerate(parts):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "text" or (kind is None and isinstance(p, dict) and "text" in p):
            if not isinstance(p.get("text"), str):
                raise RowError("wrong type", f"message {i} ({role}) part {j}: text must be a string")
            out.append({"type": "text", "text": p["text"]})
            texts.append(p["text"])
        elif kind == "image" or (kind is None and isinstance(p, dict) and "image" in p):
            out.append({"type": "image", "image": p.get("image", p.get("path"))})
        elif kind == "image_url":
            url = p.get("image_url")
            out.append({"type": "image", "image": url.get("url") if isinstance(url, dict) else url})
        else:
            raise RowError(
                "wrong type",
                f"message {i} ({role}) part {j}: expected a text or image part ({{'type': 'text' | 'image' | "
                f"'image_url', ...}}), got {str(p)[:80]}",
            )
    if not any(p["type"] == "image" for p in out):
        return "".join(texts), None
    if role == "assistant":
        raise RowError(
            "image in assistant turn",
            f"message {i} (assistant) holds an image; only user, system and tool messages may (the model is not "
            "trained to output images)",
        )
    return "".join(texts), out


def attach_images(messages: list[dict], images: Any, what: str = "images") -> list[dict]:
    """The verl / LLaMA-Factory form: an ``images`` list and ``<image>`` placeholders in the message texts, in order
    -> image parts. The counts must match."""
    if isinstance(images, (str, bytes, dict)):
        images = [images]
    images = list(images)
    found = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if found != len(images):
        raise RowError(
            "image count",
            f"'{what}' has {len(images)} image(s) but the messages hold {found} {IMAGE_PLACEHOLDER} placeholder(s); "
            f"put one {IMAGE_PLACEHOLDER} where each image goes",
        )
    out, k = [], 0
    for i, m in enumerate(messages):
        if IMAGE_PLACEHOLDER not in m["content"]:
            out.append(m)
            continue
        if m["role"] == "assistant":
            raise RowError("image in assistant turn", f"message {i} (assistant) holds {IMAGE_PLACEHOLDER}")
        parts = []
        for j, piece in enumerate(m["content"].split(IMAGE_PLACEHOLDER)):
            if j:
                parts.append({"type": "image", "image": images[k]})
                k += 1
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({**m, "content": m["content"].replace(IMAGE_PLACEHOLDER, ""), "parts": parts})
    return out


def image_sources(messages: list[dict]) -> list[Any]:
    """The image sources of a conversation, in the order the template renders them."""
    return [p["image"] for m in messages for p in m.get("parts") or () if p["type"] == "image"]


def template_form(messages: list[dict]) -> list[dict]:
    """Messages as the template takes them: a message with images gets its parts as content (images without their
    source: the template only places a placeholder)."""
    if not any("parts" in m for m in messages):
        return messages
    out = []
    for m in messages:
        if "parts" in m:
            parts = [p if p["type"] == "text" else {"type": "image"} for p in m["parts"]]
            m = {**{k: v for k, v in m.items() if k != "parts"}, "content": parts}
        out.append(m)
    return out


_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "observation": "tool",
    "tool": "tool",
    "function_call": "assistant",
}


def _from_sharegpt(conv: Any) -> list[dict]:
    conv = _as_json(conv, "conversations")
    if not isinstance(conv, list):
        raise RowError("wrong type", f"'conversations' must be a list, got {type(conv).__name__}")
    out = []
    for i, turn in enumerate(conv):
        if isinstance(turn, dict) and "from" not in turn and "role" in turn:  # role/content messages under this key
            out.append(turn)
            continue
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RowError(
                "missing key", f"conversations[{i}] must have 'from' and 'value' (ShareGPT) or 'role' and 'content'"
            )
        src = turn["from"]
        if not isinstance(src, str) or src not in _SHAREGPT_ROLES:
            raise RowError(
                "unknown role", f"conversations[{i}] has from={src!r}; expected one of {', '.join(_SHAREGPT_ROLES)}"
            )
        msg: dict[str, Any] = {"role": _SHAREGPT_ROLES[src], "content": turn["value"]}
        if src == "function_call":
            call = _as_json(turn["value"], f"conversations[{i}] function_call")
            if not isinstance(call, dict) or "name" not in call:
                raise RowError(
                    "invalid tool call", f"conversations[{i}] function_call must be JSON with 'name' and 'arguments'"
                )
            msg = {"role": "assistant", "content": "", "tool_calls": [{"function": call}]}
        for key in ("train", "loss_mask"):
            if key in turn:
                msg[key] = turn[key]
        out.append(msg)
    return out


FORMATS = ("messages", "sharegpt", "alpaca", "prompt_response")


def detect_format(row: dict, data_cfg) -> str:
    # A parquet file with mixed shapes has every column in every row, null where absent: ignore nulls.
    def has(key: str) -> bool:
        return row.get(key) is not None

    if has(data_cfg.messages_key):
        return "messages"
    if has("conversations"):
        return "sharegpt"
    if has("instruction") and has("output"):
        return "alpaca"
    if has(data_cfg.prompt_key) and has(data_cfg.response_key):
        return "prompt_response"
    keys = ", ".join(sorted(map(str, row))[:12])
    raise RowError(
        "missing key",
        f"cannot tell the row's format from its keys ({keys}). Expected '{data_cfg.messages_key}' (messages), "
        f"'conversations' (ShareGPT from/value, or role/content), 'instruction'+'output' (alpaca) or '{data_cfg.prompt_key}'+"
        f"'{data_cfg.response_key}'; set data.format and data.messages_key / data.prompt_key / data.response_key.",
    )


def _need(row: dict, key: str, fmt: str) -> Any:
    if key not in row or row[key] is None:
        raise RowError("missing key", f"row has no '{key}' (needed by data.format={fmt})")
    return row[key]


def row_to_conversation(row: Any, data_cfg) -> tuple[list[dict], list | None, list[bool | None]]:
    """Any supported row -> (messages, tools or None, per-message train flags)."""
    if not isinstance(row, dict):
        raise RowError("wrong type", f"a row must be a JSON object, got {type(row).__name__}")
    fmt = data_cfg.format if data_cfg.format != "auto" else detect_format(row, data_cfg)
    if fmt == "messages":
        raw = _need(row, data_cfg.messages_key, fmt)
        messages, flags = normalize_messages(raw, data_cfg.messages_key)
    elif fmt == "sharegpt":
        messages, flags = normalize_messages(_from_sharegpt(_need(row, "conversations", fmt)), "conversations")
        if isinstance(row.get("system"), str) and row["system"] and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": row["system"]})
            flags.insert(0, None)
    elif fmt == "alpaca":
        instruction = _need(row, "instruction", fmt)
        output = _need(row, "output", fmt)
        extra = row.get("input") or ""
        if not all(isinstance(v, str) for v in (instruction, output, extra)):
            raise RowError("wrong type", "alpaca 'instruction', 'input' and 'output' must be strings")
        msgs = []
        if isinstance(row.get("system"), str) and row["system"]:
            msgs.append({"role": "system", "content": row["system"]})
        msgs += [
            {"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction},
            {"role": "assistant", "content": output},
        ]
        messages, flags = normalize_messages(msgs)
    elif fmt == "prompt_response":
        prompt = _as_json(_need(row, data_cfg.prompt_key, fmt), data_cfg.prompt_key)
        response = _need(row, data_cfg.response_key, fmt)
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if not isinstance(prompt, list):
            raise RowError("wrong type", f"'{data_cfg.prompt_key}' must be a string or a list of messages")
        if not isinstance(response, str):
            raise RowError("wrong type", f"'{data_cfg.response_key}' must be a string")
        prompt_msgs, prompt_flags = normalize_messages(
            list(prompt) + [{"role": "assistant", "content": "x"}], data_cfg.prompt_key
        )
        messages = prompt_msgs[:-1] + [{"role": "assistant", "content": response}]
        # Only the response is trained: the prompt's assistant turns (if any) are context.
        flags = [False if m["role"] == "assistant" else f for m, f in zip(messages[:-1], prompt_flags)] + [None]
    else:
        raise RowError("wrong type", f"unknown data.format {fmt!r}")
    images = row.get(data_cfg.images_key)
    if images is not None and not (hasattr(images, "__len__") and len(images) == 0):
        if any("parts" in m for m in messages):
            raise RowError(
                "image count", f"the row has both '{data_cfg.images_key}' and image parts in its messages; use one form"
            )
        messages = attach_images(messages, images, data_cfg.images_key)
    tools = None
    if data_cfg.tools_key in row and row[data_cfg.tools_key] is not None:
        tools = _as_json(row[data_cfg.tools_key], data_cfg.tools_key)
        if tools == "" or tools == []:
            tools = None
        elif not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise RowError("wrong type", f"'{data_cfg.tools_key}' must be a list of tool schemas (or its JSON string)")
    return messages, tools, flags


# ----------------------------------------------------------------------------------------------------------------
# Rendering and masks


ANSWER_COLUMNS = ("answer", "reference", "reward_model.ground_truth")
"""Where a row keeps its gold answer, first found wins (the last is verl's RL data: ``reward_model: {ground_truth}``)."""


def row_answer(row: Any) -> str | None:
    """The row's gold answer (a string or a number, as text) from :data:`ANSWER_COLUMNS`; None if it has none."""
    if not isinstance(row, dict):
        return None
    for key in ANSWER_COLUMNS:
        value: Any = row
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    return None


def prompt_or_conversation(row: Any, data_cfg) -> tuple[list[dict], list | None, list[bool | None], bool]:
    """:func:`row_to_conversation`, and a prompt-only row too: a messages row without an assistant message, or a row
    with ``data.prompt_key`` (a list of messages or a string) and no response — verl's RL data (``prompt``,
    ``reward_model.ground_truth``, ``data_source``). The last item says it was one (its messages are the prompt)."""
    try:
        return (*row_to_conversation(row, data_cfg), False)
    except RowError as e:
        if not isinstance(row, dict):
            raise
        key = data_cfg.messages_key
        if e.reason == "no assistant turn" and isinstance(row.get(key), list):
            prompt = row[key]
        elif (
            e.reason == "missing key"
            and data_cfg.format in ("auto", "prompt_response")
            and row.get(data_cfg.prompt_key) is not None
            and row.get(data_cfg.response_key) is None
        ):
            prompt = _as_json(row[data_cfg.prompt_key], data_cfg.prompt_key)
            prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            if not isinstance(prompt, list):
                raise RowError(
                    "wrong type", f"'{data_cfg.prompt_key}' must be a string or a list of messages"
                ) from None
        else:
            raise
    shaped = {**row, key: [*prompt, {"role": "assistant", "content": "-"}]}
    messages, tools, flags = row_to_conversation(shaped, _as_messages(data_cfg))
    return messages[:-1], tools, flags[:-1], True


def _as_messages(data_cfg):
    """``data_cfg`` reading the messages column (a prompt-only row reshaped into one)."""
    return data_cfg if data_cfg.format == "messages" else replace(data_cfg, format="messages")


def prepare_messages(messages: list[dict], markers: TemplateMarkers, system_into_first_user: bool = False):
    """The messages in the forms the template takes (tool-call arguments as dict or JSON string, the content of a
    tool-call message as '' or None, a system message merged into the first user message when asked).
    Returns (messages, system_merged)."""
    out, merged = messages, False
    if system_into_first_user and not markers.system_role and any(m["role"] == "system" for m in messages):
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system" and m["content"])
        out, merged = [], True
        for m in messages:
            if m["role"] == "system":
                continue
            if m["role"] == "user" and system:
                m = {**m, "content": f"{system}\n\n{m['content']}"}
                if "parts" in m:
                    m["parts"] = [{"type": "text", "text": f"{system}\n\n"}, *m["parts"]]
                system = ""
            out.append(m)
        if system:  # no user message to carry it
            raise RowError("system role", "data.system_into_first_user=true but the conversation has no user message")
    out = template_form(out)
    if markers.content_parts:
        out = _as_parts(out)
    if markers.tool_arguments == "json" or markers.tool_call_content_none:
        fixed = []
        for m in out:
            if m.get("tool_calls"):
                m = dict(m)
                if markers.tool_arguments == "json":
                    m["tool_calls"] = [
                        {**c, "function": {**c["function"], "arguments": _json_args(c["function"]["arguments"])}}
                        for c in m["tool_calls"]
                    ]
                if markers.tool_call_content_none and not m["content"]:
                    m["content"] = None
            fixed.append(m)
        out = fixed
    return out, merged


def _json_args(args: Any) -> str:
    return args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def _find_rendered(text: str, content: str, start: int) -> tuple[int, int] | None:
    """Where ``content`` (as given, stripped, or JSON-escaped as some templates write tool results) is, from start."""
    pos = text.find(content, start)
    if pos != -1:
        return pos, pos + len(content)
    for form in (content.strip(), json.dumps(content, ensure_ascii=False)[1:-1]):
        pos = text.find(form, start) if form else -1
        if pos != -1:
            return pos, pos + len(form)
    return None


def _find_parts(text: str, m: dict, start: int) -> tuple[int, int] | None:
    """Where a message's content is: its text, or for a message with images, from its first text part through its
    last (the images' placeholders between them)."""
    parts = m.get("parts") or (m["content"] if isinstance(m["content"], list) else None)  # (or in template form)
    if parts is None:
        return _find_rendered(text, m["content"], start)
    first = end = None
    for p in parts:
        if p["type"] == "text" and p["text"].strip():
            span = _find_rendered(text, p["text"], start if end is None else end)
            if span is None:
                return None
            first = span[0] if first is None else first
            end = span[1]
    return (first, end) if first is not None else None


def _assistant_anchors(m: dict) -> list[str]:
    content = m["content"] or ""
    if "</think>" in content:  # templates split reasoning off the content; the answer after it is rendered
        content = content.split("</think>")[-1]
    pieces = [content.strip()] if content.strip() else []
    return pieces + [c["function"]["name"] for c in m.get("tool_calls", [])]


def _check_tools(markers: TemplateMarkers, tools) -> None:
    if markers.needs_tools and not tools:
        raise RowError(
            "template needs tools",
            "the chat template renders only conversations that have tools (it loops over `tools` without checking "
            "that there are any) and this row has none. Give the row its tools (a `tools` column), or set "
            "data.chat_template to the model's template for plain chats.",
        )


def _check_no_specials(messages: list[dict], markers: TemplateMarkers) -> None:
    if not markers.specials:
        return
    rx, firsts = _specials_re(markers.specials), _first_chars(markers.specials)

    def texts(m: dict) -> list[str]:
        out = [m["content"] or "", m.get("reasoning_content") or ""]
        return out + [c["function"]["name"] + repr(c["function"]["arguments"]) for c in m.get("tool_calls", ())]

    blob = "\x00".join([m["content"] or "" for m in messages])  # one scan per row; per message only on a hit
    if any("reasoning_content" in m or "tool_calls" in m for m in messages):
        blob = "\x00".join(t for m in messages for t in texts(m))
    if not any(ch in blob for ch in firsts) or not rx.search(blob):
        return
    for i, m in enumerate(messages):
        hit = next((h for t in texts(m) for h in [rx.search(t)] if h), None)
        if hit:
            raise RowError(
                "special token in content",
                f"message {i} ({m['role']}) contains {hit.group()!r}, a special token of the tokenizer: it would be "
                "read as template structure, not text. Remove it from the data (or render the conversation as text "
                "yourself and train with data.train_on=all).",
            )


# The closing that ends a turn, by (what the turn holds, what follows it), in the order tried: a tool call that a user
# message follows is closed as a last tool call would be, else as a plain answer in history.
_CLOSING_KEYS = {
    ("text", "user"): ("text:user",),
    ("text", "tool"): ("text:user",),
    ("text", "end"): ("text:end",),
    ("call", "tool"): ("call:tool",),
    ("call", "user"): ("call:end", "text:user"),
    ("call", "end"): ("call:end",),
}


def _lead_in_end(text: str, forms: tuple[str, ...], cursor: int) -> int:
    """End of the first lead-in after ``cursor``: the earliest match, the longest form there; -1 if none."""
    if len(forms) == 1:  # the usual case
        p = text.find(forms[0], cursor)
        return p + len(forms[0]) if p != -1 else -1
    found = [(p, -len(f)) for f in forms for p in [text.find(f, cursor)] if p != -1]
    if not found:
        return -1
    p, neg = min(found)
    return p - neg


def _next_start(text: str, nxt_msg: dict | None, since: int, first: tuple | None) -> int:
    """Where the next message's content starts, looked for from ``since`` (``first``: where it was found from an
    earlier point, reused when it lies past ``since``); len(text) when it has none or is not found."""
    if nxt_msg is None or not nxt_msg.get("content"):
        return len(text)
    found = first if first is not None and first[0] >= since else _find_parts(text, nxt_msg, since)
    return found[0] if found else len(text)


def _locate(text: str, messages: list[dict], markers: TemplateMarkers) -> tuple[list, bool]:
    """Character span of every message in the one render: an assistant turn from after its lead-in through its
    closing; any other message's content (None when empty). Raises RowError on any mismatch.
    Returns (spans, whether the last turn needs markers.appended_closing)."""
    spans: list[tuple[int, int] | None] = []
    cursor, open_end = 0, False
    first_next = None  # where the message after an assistant turn was found (from before that turn)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            span = _locate_message(text, m, i, cursor, first_next)
            first_next = None
            cursor = span[1] if span else cursor
        else:
            turn = _Turn(text, messages, i, markers)
            _find_lead_in(turn, cursor)
            names = _find_output(turn)
            _find_arguments(turn, names)
            span, appended = _find_closing(turn)
            open_end = open_end or appended
            first_next = turn.first_next
            cursor = span[1]
        spans.append(span)
    return spans, open_end


def _locate_message(text: str, m: dict, i: int, cursor: int, found: tuple | None) -> tuple[int, int] | None:
    """The span of a system/user/tool message's content from ``cursor`` (``found``: where it was found from before
    the assistant turn it follows); None when it has none."""
    if found is not None and found[0] >= cursor:  # the first from cursor too: no second search
        span = found
    else:
        span = _find_parts(text, m, cursor) if m["content"] else None
    if m["content"] and span is None:
        raise RowError(
            "template mismatch",
            f"message {i} ({m['role']})'s content is not in the rendered text after the previous message: the "
            "chat template drops, reorders or rewrites it, so the mask cannot be checked. "
            + ("Set data.system_into_first_user=true or set" if m["role"] == "system" else "Set")
            + " data.chat_template to a template that renders it.",
        )
    return span


@dataclass
class _Turn:
    """An assistant turn being located in the one render (:func:`_locate`): the steps set where its output starts,
    where what is found of it so far ends, and the end of its search region."""

    text: str
    messages: list[dict]
    i: int
    markers: TemplateMarkers
    start: int = -1
    """Where the turn's trained text starts: after its lead-in."""
    at: int = -1
    """The end of the last piece of the turn's output found so far."""
    limit: int = -1
    """No closing is looked for from here on (the next message's content)."""
    first_next: tuple | None = None
    """Where the next message's content was found, from before the turn."""

    @property
    def m(self) -> dict:
        return self.messages[self.i]

    @property
    def nxt_msg(self) -> dict | None:
        return self.messages[self.i + 1] if self.i + 1 < len(self.messages) else None

    def next_start(self, since: int) -> int:
        """Where the next message's content starts, from ``since`` (:func:`_next_start`)."""
        return _next_start(self.text, self.nxt_msg, since, self.first_next)


def _find_lead_in(t: _Turn, cursor: int) -> None:
    """The start of the turn: the end of the lead-in learned for the message before it, from ``cursor``, before the
    next message's content (found here once, for the later steps)."""
    text, i, markers = t.text, t.i, t.markers
    prev = t.messages[i - 1]["role"] if i else ""
    forms = markers.lead_ins.get(prev) or markers.lead_ins["*"]
    start = _lead_in_end(text, forms, cursor)
    if start == -1 and forms is not markers.lead_ins["*"]:
        start = _lead_in_end(text, markers.lead_ins["*"], cursor)
    nxt_msg = t.nxt_msg
    # the next message's content (once; again only where this turn holds its text): no search runs past it
    t.first_next = _find_parts(text, nxt_msg, cursor) if nxt_msg is not None and nxt_msg.get("content") else None
    if start == -1 or start > t.next_start(cursor):
        raise RowError(
            "template mismatch",
            f"assistant message {i}: the assistant header {forms[0]!r} is not in the rendered text between message "
            f"{i - 1} and the next message; set data.chat_template if the template renders assistant turns "
            "differently.",
        )
    t.start = t.at = start


def _find_output(t: _Turn) -> list[tuple[int, int]]:
    """The turn's content and tool-call names, in order inside the turn; returns the (start, end) of each call's
    name."""
    m, text = t.m, t.text
    names = []  # (start, end) of each tool call's name
    for piece in _assistant_anchors(m):
        p = text.find(piece, t.at)
        if p != -1 and p > t.next_start(t.at):
            p = -1
        if p == -1:
            what = "content" if piece == _assistant_anchors(m)[0] and m["content"] else f"tool call '{piece}'"
            raise RowError(
                "template mismatch",
                f"assistant message {t.i}'s {what} is not rendered inside its turn, before the next message (the "
                "chat template drops or rewrites it), so training would teach the model a different turn. Set "
                "data.chat_template to a template that renders it"
                + (" (or convert the data to text actions)." if "tool" in what else "."),
            )
        t.at = p + len(piece)
        names.append((p, t.at))
    return names[len(names) - len(m.get("tool_calls") or []) :]


def _find_arguments(t: _Turn, names: list[tuple[int, int]]) -> None:
    """Every argument name and value of each tool call, after its call's name, before the next call's name or the
    next message."""
    text = t.text
    # the turn's closing is looked for after the last of them, so that all of them are trained
    t.limit = t.next_start(t.at) if names else len(text)
    for c, call in enumerate(t.m.get("tool_calls") or []):
        region = (names[c][1], names[c + 1][0] if c + 1 < len(names) else t.limit)
        arguments = call["function"].get("arguments") or {}
        whole = json.dumps(arguments, ensure_ascii=False)  # the arguments as `tojson` writes them: all at once
        p = text.find(whole, *region) if arguments else -1
        if p != -1:
            t.at = max(t.at, p + len(whole))
            continue
        for key, value in arguments.items():
            for n, piece in enumerate((key, *_leaves(value))):
                end = _value_end(text, piece, region)
                if end == -1:
                    label = f"argument name {key!r}" if n == 0 else f"argument {key!r}'s value"
                    raise RowError(
                        "template mismatch",
                        f"assistant message {t.i}: tool call {call['function']['name']!r}'s {label} is not rendered "
                        "inside its turn (the chat template drops or rewrites it), so training would teach a "
                        "call without it. Set data.chat_template to a template that renders tool arguments.",
                    )
                t.at = max(t.at, end)


def _find_closing(t: _Turn) -> tuple[tuple[int, int], bool]:
    """The closing learned for what the turn holds and what follows it, after its output, before the next
    message; returns the turn's span, and whether it is a last turn left open (its closing is appended)."""
    m, markers, i = t.m, t.markers, t.i
    kind = "call" if m.get("tool_calls") else "text"
    nxt = t.nxt_msg["role"] if t.nxt_msg is not None else "end"
    ctx = nxt if nxt in ("tool", "end") else "user"
    candidates = [markers.closings[k] for k in _CLOSING_KEYS[(kind, ctx)] if markers.closings.get(k)]
    found = None
    for c in candidates:
        p = t.text.find(c, t.at)
        if p != -1:
            found = (p, c)
            break
    if nxt == "end" and not markers.closings.get(f"{kind}:end") and kind in markers.appended_closing:
        return (t.start, len(t.text)), True
    if found is None:
        raise RowError(
            "template mismatch",
            f"assistant message {i} is not closed by {candidates[0] if candidates else '?'!r} in the rendered "
            "text; set data.chat_template if the template renders assistant turns differently.",
        )
    if found[0] >= t.limit:
        raise RowError(
            "template mismatch",
            f"assistant message {i}'s closing {found[1]!r} is not found before the next message: the chat template "
            "renders this turn differently from its probes; set data.chat_template.",
        )
    return (t.start, found[0] + len(found[1])), False


def _leaves(value: Any) -> list:
    """A value as the pieces a template writes, whatever its syntax for objects and lists (JSON, Gemma 4's
    ``{key:value}``...): an object's keys and its values' leaves, a list's items' leaves, else the value itself."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in (str(k), *_leaves(v))]
    if isinstance(value, list):
        return [p for v in value for p in _leaves(v)]
    return [value]


def _value_end(text: str, value: Any, region: tuple[int, int]) -> int:
    """The end of ``value`` in text[region] in one of its forms (the end of the furthest found); ``region[0]`` when
    it has no text form (an empty string), -1 when no form is there."""
    plain = value if isinstance(value, str) else str(value) if isinstance(value, (int, float)) else None
    if plain:  # as written (a number as Python and JSON write it): the usual case
        p = text.find(plain, *region)
        if p != -1:
            return p + len(plain)
    forms = _value_forms(value)
    if not forms:
        return region[0]
    return max((p + len(f) for f in forms for p in [text.find(f, *region)] if p != -1), default=-1)


def _value_forms(value: Any) -> tuple[str, ...]:
    """How a tool-call argument name or value may appear in a render: as written, stripped, JSON-escaped (a string
    inside a JSON object), or JSON / Python text (a number, a list, an object)."""
    if isinstance(value, str):
        forms = [value, value.strip(), json.dumps(value, ensure_ascii=False)[1:-1], json.dumps(value)[1:-1]]
    else:
        forms = [
            json.dumps(value, ensure_ascii=False),
            json.dumps(value),
            str(value),
            json.dumps(value, ensure_ascii=False, separators=(",", ":")),
            str(value).lower(),
        ]
    return tuple(dict.fromkeys(f for f in forms if f))


@dataclass
class Layout:
    """One checked render before tokenization: the text, and the character spans trained and held out."""

    text: str
    trained: list[tuple[int, int]]
    holes: list[tuple[int, int]]
    system_merged: bool = False
    reasoning_dropped: int = 0


def render(
    tokenizer,
    messages: list[dict],
    tools: list | None = None,
    flags: list[bool | None] | None = None,
    train_on: str = "assistant",
    template_kwargs: dict | None = None,
    markers: TemplateMarkers | None = None,
    system_into_first_user: bool = False,
) -> Rendered:
    """Render the whole conversation once and derive the loss mask from that render (checked, see the module doc)."""
    lay = layout(tokenizer, messages, tools, flags, train_on, template_kwargs, markers, system_into_first_user)
    ((ids, mask),) = tokenize_layouts(tokenizer, [lay])
    return Rendered(
        lay.text, ids.tolist(), mask.tolist(), sorted(lay.trained), lay.system_merged, lay.reasoning_dropped
    )


def layout(
    tokenizer,
    messages: list[dict],
    tools: list | None = None,
    flags: list[bool | None] | None = None,
    train_on: str = "assistant",
    template_kwargs: dict | None = None,
    markers: TemplateMarkers | None = None,
    system_into_first_user: bool = False,
) -> Layout:
    """:func:`render` up to the tokenizer: the one render and the spans it trains (the checks included)."""
    markers = markers or template_markers(tokenizer, template_kwargs)
    flags = flags or [None] * len(messages)
    if any(m.get("tool_calls") for m in messages) and not markers.tool_arguments:
        raise RowError(
            "template mismatch",
            f"the conversation has tool calls and {markers.tool_problem or 'the chat template does not render them'}"
            ", so training would teach the model an empty turn. Set data.chat_template to a template that renders tool_calls (or convert the "
            "data to text actions).",
        )
    if not markers.system_role and not system_into_first_user and any(m["role"] == "system" for m in messages):
        raise RowError(
            "system role",
            "the chat template has no system role (it refuses or drops system messages). Set "
            "data.system_into_first_user=true to prepend the system text to the first user message (counted in "
            "the data report), or remove the system messages.",
        )
    _check_tools(markers, tools)
    _check_no_specials(messages, markers)
    if system_into_first_user and not markers.system_role:
        keep = [j for j, m in enumerate(messages) if m["role"] != "system"]
        flags = [flags[j] for j in keep]
    shaped, merged = prepare_messages(messages, markers, system_into_first_user)
    try:
        text = render_text(tokenizer, shaped, tools=tools, kwargs=template_kwargs)
    except Exception as e:
        raise RowError("template error", f"the chat template failed on this conversation: {e}") from None
    view = [m for m in messages if not merged or m["role"] != "system"]
    if merged:  # locate the merged user text as the template saw it
        view = [s if s["role"] == "user" else v for v, s in zip(view, shaped)]
    spans, open_end = _locate(text, view, markers)
    if open_end:
        text += markers.appended_closing["call" if view[-1].get("tool_calls") else "text"]
        spans[-1] = (spans[-1][0], len(text))
    dropped = sum(
        1
        for m, span in zip(view, spans)
        if m["role"] == "assistant"
        and (m.get("reasoning_content") or "").strip()
        and m["reasoning_content"].strip() not in text[span[0] : span[1]]
    )
    assistant_idx = [i for i, m in enumerate(view) if m["role"] == "assistant"]
    last = assistant_idx[-1]
    trained = [(0, len(text))] if train_on == "all" else []
    holes = []
    for i, (m, span) in enumerate(zip(view, spans)):
        default = m["role"] == "assistant" and (train_on == "assistant" or i == last)
        if flags[i] is True and span is None:
            raise RowError("template mismatch", f"message {i} ({m['role']}) is flagged train but is not rendered")
        if span is None:
            continue
        if flags[i] is True or (flags[i] is None and default):
            trained.append(span)
        elif flags[i] is False:
            holes.append(span)
    return Layout(text, trained, holes, merged, dropped)


def tokenize_layouts(tokenizer, layouts: list[Layout]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input_ids int32, loss_mask uint8) of each layout, from ONE tokenizer call over all their texts."""
    encoded = _encode_with_offsets(tokenizer, [lay.text for lay in layouts])
    return [
        (np.asarray(ids, dtype=np.int32), _mask_from_spans(offsets, len(lay.text), lay.trained, lay.holes))
        for lay, (ids, offsets) in zip(layouts, encoded)
    ]


def _encode_with_offsets(tokenizer, texts: list[str]) -> list[tuple[list[int], list]]:
    """What ``tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)`` returns, per text. A fast
    tokenizer whose Python side adds nothing (no truncation, padding or split special tokens) is called directly
    (the same Rust call without the per-token conversion of transformers); any other goes through transformers."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    plain = (
        backend is not None
        and not getattr(tokenizer, "split_special_tokens", False)
        and not getattr(backend, "encode_special_tokens", False)
        and backend.truncation is None
        and backend.padding is None
    )
    if plain:
        return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return list(zip(enc["input_ids"], enc["offset_mapping"]))


def _mask_from_spans(offsets, n_chars: int, spans, holes) -> np.ndarray:
    """A token is trained iff one of its characters lies in a trained span and in no hole. A token that starts in a
    lead-in and ends in the output (' [/INST]' + ' A' in Mistral's format, where the space is the answer's) is trained:
    dropping it would drop the output's first token."""
    chars = np.zeros(n_chars + 1, dtype=np.int8)
    for a, b in spans:
        chars[a:b] = 1
    for a, b in holes:
        chars[a:b] = 0
    pos = np.fromiter(chain.from_iterable(offsets), dtype=np.int64, count=2 * len(offsets))  # no tuple-array detour
    start = pos[0::2]
    mask = chars[start]  # tokens that start in a span
    for a, _ in spans:  # and the one token (if any) that starts before a span and reaches into it
        k = int(np.searchsorted(start, a, side="right")) - 1
        if k >= 0 and start[k] < a < pos[2 * k + 1] and chars[a]:
            mask[k] = 1
    return mask.astype(np.uint8, copy=False)
