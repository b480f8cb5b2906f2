"""One render of a conversation with the model's own chat template -> (input_ids, loss_mask).

The rule: a token is trained iff it is part of what the model produces in an assistant turn — the assistant's
content, its tool calls, its reasoning where the template keeps it, and the end-of-turn token that closes the turn.
Role headers, the glue after the end-of-turn token, a trailing end-of-text and every system/user/tool token are not.

How: the whole conversation is rendered ONCE to text and tokenized ONCE with character offsets. The assistant
turns are located in that text by the template's own assistant header (what the template emits as its generation
prompt) and end-of-turn marker (what it emits right after an assistant message), both learned from a probe render.
The located turns are then checked against the messages (count, content, tool-call names), so a template that
renders something else than we think fails loudly instead of training on the wrong tokens.
Rendering messages one at a time and concatenating is wrong for Qwen3 (earlier turns lose their reasoning) and is
never done here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROLES = ("system", "user", "assistant", "tool")
_PROBE_USER = "Zq1probeUser"
_PROBE_ASSISTANT = "Zq1probeAssistant"


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
    header: str
    """Text the template writes before an assistant message (its generation prompt), e.g. '<|im_start|>assistant\\n'."""
    alt_headers: tuple[str, ...]
    """Shorter forms of the header tried when the full one does not match (e.g. without a thinking block)."""
    end_of_turn: str
    """Text that closes an assistant turn and is trained, e.g. '<|im_end|>'."""


@dataclass
class Rendered:
    text: str
    input_ids: list[int]
    loss_mask: list[int]
    spans: list[tuple[int, int]]
    """Character spans of the trained text, in order."""


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


def _render(tokenizer, messages, tools=None, add_generation_prompt=False, kwargs=None) -> str:
    return tokenizer.apply_chat_template(
        messages,
        tools=tools or None,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **(kwargs or {}),
    )


def _first_special(tokenizer, text: str) -> str | None:
    """The first added/special token in ``text`` if the text starts with it (ignoring nothing)."""
    specials = sorted(
        (t for t in tokenizer.get_added_vocab() if t and text.startswith(t)),
        key=len,
        reverse=True,
    )
    return specials[0] if specials else None


def template_markers(tokenizer, kwargs: dict | None = None) -> TemplateMarkers:
    """Learn the assistant header and end-of-turn marker from probe renders of the template itself."""
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            "The tokenizer has no chat template. Set data.chat_template to a .jinja file or an inline Jinja "
            "string (for example the template of the instruct model you fine-tune from)."
        )
    user = [{"role": "user", "content": _PROBE_USER}]
    try:
        without = _render(tokenizer, user, kwargs=kwargs)
        with_prompt = _render(tokenizer, user, add_generation_prompt=True, kwargs=kwargs)
        full = _render(tokenizer, user + [{"role": "assistant", "content": _PROBE_ASSISTANT}], kwargs=kwargs)
    except Exception as e:  # a broken template: jinja errors of many kinds
        raise TemplateError(f"The chat template failed to render a probe conversation: {e}") from e
    # The generation prompt is what with_prompt adds after the shared token prefix (Phi-3 ends the plain render
    # with an end-of-text token that the prompted render replaces, so a plain string prefix is not enough).
    a = tokenizer(without, add_special_tokens=False, return_offsets_mapping=True)
    b = tokenizer(with_prompt, add_special_tokens=False, return_offsets_mapping=True)
    k = 0
    while k < min(len(a["input_ids"]), len(b["input_ids"])) and a["input_ids"][k] == b["input_ids"][k]:
        k += 1
    header = with_prompt[b["offset_mapping"][k][0] :] if k < len(b["input_ids"]) else ""
    if not header.strip():
        raise TemplateError(
            "The chat template has no generation prompt (add_generation_prompt adds nothing), so assistant "
            "turns cannot be located. Set data.chat_template to a template that supports add_generation_prompt."
        )
    # Shorter forms of the header, cut after each newline: a template may add an empty thinking block to the
    # generation prompt only (Qwen3 with enable_thinking=false), or omit the newline before a tool call.
    alts = [header[: i + 1] for i, ch in enumerate(header[:-1]) if ch == "\n"]
    if header.rstrip() != header:
        alts.append(header.rstrip())
    end = full.find(_PROBE_ASSISTANT)
    if end == -1:
        raise TemplateError("The chat template does not render the assistant's content; set data.chat_template.")
    after = full[end + len(_PROBE_ASSISTANT) :]
    eot = _first_special(tokenizer, after)
    if eot is None:
        eos = tokenizer.eos_token
        if eos and after.lstrip(" ").startswith(eos):
            eot = eos
        else:
            raise TemplateError(
                f"The chat template writes {after[:30]!r} after an assistant message, which does not start with a "
                "special end-of-turn token, so the end of the turn the model must learn is unknown. Set "
                "data.chat_template to a template that closes assistant turns with a special token."
            )
    return TemplateMarkers(header=header, alt_headers=tuple(alts), end_of_turn=eot)


def end_of_turn_token_ids(tokenizer, kwargs: dict | None = None) -> list[int]:
    """Token ids that end a generated assistant turn: the template's end-of-turn token, then the tokenizer's eos."""
    ids = []
    eot = template_markers(tokenizer, kwargs).end_of_turn
    for t in (eot, tokenizer.eos_token):
        if t:
            tid = tokenizer.convert_tokens_to_ids(t)
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
        if not isinstance(content, str):
            raise RowError(
                "wrong type", f"message {i} ({role}): content must be a string, got {type(content).__name__}"
            )
        new: dict[str, Any] = {"role": role, "content": content}
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
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RowError("missing key", f"conversations[{i}] must have 'from' and 'value'")
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
        f"'conversations' (ShareGPT), 'instruction'+'output' (alpaca) or '{data_cfg.prompt_key}'+"
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


def _locate_turn_starts(text: str, markers: TemplateMarkers, n: int) -> list[int]:
    """Character positions where each assistant turn's output starts (just after its header).

    The anchor is the longest header form that occurs exactly once per assistant message; at each anchor the
    longest header form that matches there is skipped (so a generation-prompt-only thinking block stays context).
    """
    forms = sorted({markers.header, *markers.alt_headers}, key=len, reverse=True)
    counts = []
    for anchor in forms:
        positions, pos = [], text.find(anchor)
        while pos != -1:
            positions.append(pos)
            pos = text.find(anchor, pos + len(anchor))
        if len(positions) == n:
            return [p + max(len(f) for f in forms if text.startswith(f, p)) for p in positions]
        counts.append(f"{anchor!r} x{len(positions)}")
    raise RowError(
        "template mismatch",
        f"the conversation has {n} assistant messages but the rendered text has {'; '.join(counts[:3])} assistant "
        "headers (does a message contain template tokens?). Set data.chat_template if the template renders "
        "assistant turns differently.",
    )


def _check_turn(text: str, span: tuple[int, int], msg: dict, k: int) -> None:
    body = text[span[0] : span[1]]
    content = msg["content"]
    if "</think>" in content:
        content = content.split("</think>")[-1]
    content = content.strip()
    if content and content not in body:
        raise RowError(
            "template mismatch",
            f"assistant message {k}'s content is not inside its rendered turn {body[:80]!r}; the chat template "
            "changes or drops assistant content. Set data.chat_template to a template that renders it.",
        )
    for call in msg.get("tool_calls", []):
        if call["function"]["name"] not in body:
            raise RowError(
                "template mismatch",
                f"assistant message {k} has a tool call to '{call['function']['name']}' that the chat template does "
                "not render, so training would teach the model an empty turn. Set data.chat_template to a template "
                "that renders tool_calls (or convert the data to text actions).",
            )


def render(
    tokenizer,
    messages: list[dict],
    tools: list | None = None,
    flags: list[bool | None] | None = None,
    train_on: str = "assistant",
    template_kwargs: dict | None = None,
    markers: TemplateMarkers | None = None,
) -> Rendered:
    """Render the whole conversation once and derive the loss mask from that render."""
    markers = markers or template_markers(tokenizer, template_kwargs)
    flags = flags or [None] * len(messages)
    try:
        text = _render(tokenizer, messages, tools=tools, kwargs=template_kwargs)
    except Exception as e:
        raise RowError("template error", f"the chat template failed on this conversation: {e}") from None
    assistant_idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    starts = iter(_locate_turn_starts(text, markers, len(assistant_idx)))
    # Character span of every message in the render: an assistant turn from after its header through its
    # end-of-turn marker; any other message's content text, searched in order (None when the template drops it).
    spans: list[tuple[int, int] | None] = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = next(starts)
            end = text.find(markers.end_of_turn, start)
            if end == -1:
                raise RowError("template mismatch", f"assistant message {i} is not closed by {markers.end_of_turn!r}")
            span = (start, end + len(markers.end_of_turn))
            _check_turn(text, span, m, i)
        else:
            pos = text.find(m["content"], cursor) if m["content"] else -1
            span = (pos, pos + len(m["content"])) if pos != -1 else None
        spans.append(span)
        cursor = span[1] if span else cursor
    last = assistant_idx[-1]
    trained = [(0, len(text))] if train_on == "all" else []
    holes = []
    for i, (m, span) in enumerate(zip(messages, spans)):
        default = m["role"] == "assistant" and (train_on == "assistant" or i == last)
        if flags[i] is True and span is None:
            raise RowError("template mismatch", f"message {i} ({m['role']}) is flagged train but is not rendered")
        if span is None:
            continue
        if flags[i] is True or (flags[i] is None and default):
            trained.append(span)
        elif flags[i] is False:
            holes.append(span)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = _mask_from_spans(enc["offset_mapping"], len(text), trained, holes)
    return Rendered(text=text, input_ids=list(enc["input_ids"]), loss_mask=mask, spans=sorted(trained))


def _mask_from_spans(offsets, n_chars: int, spans, holes) -> list[int]:
    """A token is trained iff its first character lies in a trained span and in no hole."""
    chars = np.zeros(n_chars + 1, dtype=np.int8)
    for a, b in spans:
        chars[a:b] = 1
    for a, b in holes:
        chars[a:b] = 0
    first = np.fromiter((a for a, _ in offsets), dtype=np.int64, count=len(offsets))
    return chars[first].tolist()
