"""Conformance matrix: masks under the real chat templates of 20+ model families, or a clear refusal.

Each family's tokenizer is the vendored Qwen3 vocabulary plus the family's special tokens (atomic), its bos/eos,
its chat template and, where the model has one, its generation_config.json eos ids (tests/fixtures/chat_templates).
For each family and conversation shape the exact trained text is compared with conformance.json (read by hand when
it was written: `python tests/test_chat_families.py --write`), and real TextCraft conversations are checked against
invariants computed from the messages alone: one trained segment per assistant message, holding its content and
tool calls and ending with a special token, and no character of any system/user/tool message's content.
"""

from __future__ import annotations

import json
import sys
from functools import cache
from pathlib import Path

import pytest
from test_chat import segments  # the trained text as one string per run of trained tokens

from sftforge.bench import unpack_tokenizer
from sftforge.chat import RowError, TemplateError, normalize_messages, render, row_to_conversation, template_markers
from sftforge.config import DataConfig

FIXTURES = Path(__file__).parent / "fixtures"
TEMPLATES = FIXTURES / "chat_templates"
FAMILIES = json.loads((TEMPLATES / "families.json").read_text())
EXPECTED_FILE = TEMPLATES / "conformance.json"

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "craft",
            "description": "Craft an item",
            "parameters": {"type": "object", "properties": {"item": {"type": "string"}}, "required": ["item"]},
        },
    }
]


def _call(i: int, item: str) -> dict:
    return {"id": f"c{i}", "type": "function", "function": {"name": "craft", "arguments": {"item": item}}}


SHAPES = {
    "multi-turn": (
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "It is 4."},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "It is 6."},
        ],
        None,
    ),
    "tool calls": (
        [
            {"role": "user", "content": "Craft a stick and a torch."},
            {"role": "assistant", "content": "", "tool_calls": [_call(0, "stick")]},
            {"role": "tool", "tool_call_id": "c0", "name": "craft", "content": "Crafted 4 stick"},
            {"role": "assistant", "content": "", "tool_calls": [_call(1, "torch")]},
            {"role": "tool", "tool_call_id": "c1", "name": "craft", "content": "Crafted 4 torch"},
            {"role": "assistant", "content": "Both are crafted."},
        ],
        TOOLS,
    ),
    "reasoning": (
        [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "reasoning_content": "Two plus two.", "content": "It is 4."},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "reasoning_content": "Three plus three.", "content": "It is 6."},
        ],
        None,
    ),
}


@cache
def family_tokenizer(name: str, root: str):
    """The test tokenizer of a family, saved to and loaded from a folder (with its generation_config.json)."""
    from transformers import AutoTokenizer

    spec = FAMILIES[name]
    real = {"qwen2.5": "qwen2.5", "qwen3": "qwen3", "phi3": "phi3"}.get(name)
    if real:
        return AutoTokenizer.from_pretrained(str(unpack_tokenizer(real, Path(root))))
    tok = AutoTokenizer.from_pretrained(str(unpack_tokenizer("qwen3", Path(root))))
    tok.add_special_tokens({"additional_special_tokens": spec["special_tokens"]})
    if spec["bos"]:
        tok.bos_token = spec["bos"]
    tok.eos_token = spec["eos"]
    tok.chat_template = (TEMPLATES / spec["template"]).read_text()
    out = Path(root) / f"family-{name}"
    tok.save_pretrained(str(out))
    if spec["generation_eos"]:
        ids = tok.convert_tokens_to_ids(spec["generation_eos"])
        (out / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}))
    return AutoTokenizer.from_pretrained(str(out))


def outcome(tok, messages, tools) -> dict:
    try:
        markers = template_markers(tok)
    except TemplateError as e:
        return {"refused": "template", "detail": str(e)[:300]}
    msgs, flags = normalize_messages(messages)
    try:
        r = render(tok, msgs, tools, flags, markers=markers)
    except RowError as e:
        return {"refused": e.reason, "detail": e.detail[:300]}
    return {"trained": segments(tok, r)}


def compute_all(root: str) -> dict:
    return {
        name: {shape: outcome(family_tokenizer(name, root), *SHAPES[shape]) for shape in SHAPES} for name in FAMILIES
    }


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("families"))


EXPECTED = json.loads(EXPECTED_FILE.read_text()) if EXPECTED_FILE.exists() else {}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_matches_the_reviewed_matrix(name, root):
    tok = family_tokenizer(name, root)
    for shape, (messages, tools) in SHAPES.items():
        got, want = outcome(tok, messages, tools), EXPECTED[name][shape]
        if "trained" in want:
            assert got == {"trained": want["trained"]}, (name, shape)
        else:
            assert got.get("refused") == want["refused"], (name, shape, got)


def test_matrix_covers_at_least_15_families_with_no_silent_mis_mask():
    trained = {n for n, shapes in EXPECTED.items() if any("trained" in o for o in shapes.values())}
    families = {FAMILIES[n]["family"].split(" (")[0] for n in trained}
    assert len(families) >= 15, families
    for name, shapes in EXPECTED.items():
        messages, _ = SHAPES["multi-turn"]
        for shape, o in shapes.items():
            if "trained" not in o:
                continue
            text = "".join(o["trained"])
            others = [m["content"] for m in SHAPES[shape][0] if m["role"] != "assistant"]
            assert not any(c in text for c in others), (name, shape)
            answers = [m["content"] for m in SHAPES[shape][0] if m["role"] == "assistant" and m["content"]]
            assert all(any(a in seg for seg in o["trained"]) for a in answers), (name, shape)


def textcraft_rows(shape: str, n: int = 6) -> list[dict]:
    lines = (FIXTURES / "textcraft" / f"train_{shape}.jsonl").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("shape", ["react", "tools"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_textcraft_conversations_train_exactly_the_assistant_output(name, shape, root):
    """Invariants from the messages alone, on real multi-turn agent conversations."""
    tok = family_tokenizer(name, root)
    kind = "tool calls" if shape == "tools" else "multi-turn"
    if EXPECTED[name][kind].get("refused", "system role") != "system role":  # system_into_first_user below
        pytest.skip(f"{name} refuses the {kind} shape: {EXPECTED[name][kind]['refused']}")
    markers = template_markers(tok)
    cfg = DataConfig(system_into_first_user=True)
    for row in textcraft_rows(shape):
        messages, tools, flags = row_to_conversation(row, cfg)
        r = render(tok, messages, tools, flags, markers=markers, system_into_first_user=True)
        assert r.text.startswith(tok.apply_chat_template(r_messages(messages, markers), tools=tools, tokenize=False))
        segs = segments(tok, r)
        assistants = [m for m in messages if m["role"] == "assistant"]
        assert len(segs) == len(assistants), (name, segs)
        others = [m["content"] for m in messages if m["role"] != "assistant" and m["content"]]
        specials = set(markers.specials)
        for seg, m in zip(segs, assistants):
            assert m["content"].strip() in seg
            assert all(c["function"]["name"] in seg for c in m.get("tool_calls", []))
            assert not any(o in seg for o in others), (name, seg)
            assert any(seg.endswith(s) for s in specials), (name, seg[-40:])


def r_messages(messages, markers):
    from sftforge.chat import prepare_messages

    return prepare_messages(messages, markers, system_into_first_user=True)[0]


def test_gpt_oss_history_turns_close_with_end_and_never_train_the_user(root):
    """The silent mis-mask of the one-message probe: <|return|> only closes the last turn."""
    tok = family_tokenizer("gpt-oss", root)
    segs = outcome(tok, *SHAPES["multi-turn"])["trained"]
    assert segs == ["<|channel|>final<|message|>It is 4.<|end|>", "<|channel|>final<|message|>It is 6.<|return|>"]
    calls = outcome(tok, *SHAPES["tool calls"])["trained"]
    assert calls[0].endswith('{"item": "stick"}<|call|>') and "Crafted" not in "".join(calls)
    from sftforge.chat import end_of_turn_token_ids

    stops = tok.convert_ids_to_tokens(end_of_turn_token_ids(tok))  # a generation ends at <|return|> or <|call|>,
    assert {"<|return|>", "<|call|>"} <= set(stops) and "<|end|>" not in stops  # not after an analysis message


def test_command_a_trains_both_closing_tokens(root):
    tok = family_tokenizer("command-a", root)
    segs = outcome(tok, *SHAPES["multi-turn"])["trained"]
    assert segs == ["It is 4.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>", "It is 6.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"]


def test_glm_trains_the_next_role_token_it_stops_on(root):
    tok = family_tokenizer("glm4.5", root)
    segs = outcome(tok, *SHAPES["multi-turn"])["trained"]
    assert segs[0].endswith("It is 4.<|user|>") and segs[1].endswith("It is 6.<|user|>")  # the last one appended
    calls = outcome(tok, *SHAPES["tool calls"])["trained"]
    assert calls[0].endswith("</tool_call><|observation|>") and calls[-1].endswith("Both are crafted.<|user|>")
    from sftforge.chat import end_of_turn_token_ids

    stops = tok.convert_ids_to_tokens(end_of_turn_token_ids(tok))
    assert {"<|user|>", "<|observation|>"} <= set(stops)


def test_glm_without_its_generation_config_is_refused_with_the_fix(root, tmp_path):
    from transformers import AutoTokenizer

    src = Path(family_tokenizer("glm4.5", root).name_or_path)
    for f in src.iterdir():
        if f.name != "generation_config.json":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    with pytest.raises(TemplateError, match="generation_config.json"):
        template_markers(tok)


def test_deepseek_generation_prefill_and_string_arguments(root):
    tok = family_tokenizer("deepseek-v3", root)
    m = template_markers(tok)
    assert m.tool_arguments == "json" and m.lead_ins["user"][-1] == "<｜Assistant｜>"
    one_call = SHAPES["tool calls"][0][:3] + [{"role": "assistant", "content": "Done."}]
    segs = outcome(tok, one_call, TOOLS)["trained"]
    assert segs[0].startswith("<｜tool▁calls▁begin｜>") and '{"item": "stick"}' in segs[0]
    assert segs[1] == "Done.<｜end▁of▁sentence｜>"


def test_system_into_first_user_for_a_template_without_system_role(root, tmp_path):
    from sftforge.data import build_dataset

    tok = family_tokenizer("gemma2", root)
    assert EXPECTED["gemma2"]["multi-turn"]["refused"] == "system role"
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"messages": SHAPES["multi-turn"][0]}) + "\n")
    ds = build_dataset(DataConfig(system_into_first_user=True, cache_dir="none"), tok, str(f))
    assert ds.report.system_merged == 1 and any("system message merged" in line for line in ds.report.lines())
    text = tok.decode(ds[0].input_ids)
    assert "Answer briefly.\n\nWhat is 2+2?" in text
    from sftforge.chat import render_prompt  # generation prompts are built the same way

    prompt = render_prompt(tok, normalize_messages(SHAPES["multi-turn"][0][:4])[0])
    assert "Answer briefly.\n\nWhat is 2+2?" in prompt and prompt.endswith("<start_of_turn>model\n")


def test_a_template_that_drops_a_user_message_is_refused(tokenizers):
    tok = tokenizers["qwen2.5"]
    saved = tok.chat_template
    try:  # renders every user message but the second: its text would silently vanish from the context
        tok.chat_template = saved.replace("{%- for message in messages %}", "{%- for message in messages %}"
                                          "{%- if message.content == 'And 3+3?' %}{%- continue %}{%- endif %}")  # fmt: skip
        with pytest.raises(RowError, match="message 3 \\(user\\)'s content is not in the rendered text"):
            outcome_or_raise(tok, SHAPES["multi-turn"][0])
    finally:
        tok.chat_template = saved


def outcome_or_raise(tok, messages):
    msgs, flags = normalize_messages(messages)
    return render(tok, msgs, None, flags)


def write_expected() -> None:
    import tempfile

    result = compute_all(tempfile.mkdtemp())
    EXPECTED_FILE.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {EXPECTED_FILE}")


if __name__ == "__main__" and "--write" in sys.argv:
    write_expected()


# ------------------------------------------------------------------------------------------------------------------
# The guard against a silent mis-mask of tool calls: whatever tags a tokenizer makes special, a call of several
# arguments is trained whole (its name, every argument, its closing) or the row is refused.

TWO_ARGS_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "craft",
            "description": "Craft an item",
            "parameters": {
                "type": "object",
                "properties": {"item": {"type": "string"}, "count": {"type": "integer"}},
                "required": ["item", "count"],
            },
        },
    }
]
TWO_ARGS = [
    {"role": "user", "content": "Make two sticks."},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_stick", "type": "function", "function": {"name": "craft", "arguments": {"item": "stick", "count": 2}}}]},
    {"role": "tool", "tool_call_id": "call_stick", "content": "Crafted 2 stick"},
    {"role": "assistant", "content": "Done."},
]  # fmt: skip


def template_tags(name: str) -> list[str]:
    """The tag-like strings a family's template writes (``<tool_call>``, ``</arg_value>``, ``<|observation|>``...)
    that its test tokenizer does not already hold as special tokens."""
    import re

    spec = FAMILIES[name]
    text = (TEMPLATES / spec["template"]).read_text() if spec["template"] else ""
    return sorted(set(re.findall(r"</?[A-Za-z_]+>|<\|[A-Za-z_]+\|>", text)) - set(spec["special_tokens"]))


def _tokenizer_with_special(name: str, root: str, tags: list[str]):
    from transformers import AutoTokenizer

    base = family_tokenizer(name, root)
    folder = Path(root) / f"family-{name}"
    tok = AutoTokenizer.from_pretrained(str(folder)) if folder.exists() else base
    tok.add_special_tokens({"additional_special_tokens": list(FAMILIES[name]["special_tokens"]) + tags})
    return tok


@pytest.mark.parametrize("name", sorted(n for n in FAMILIES if "trained" in EXPECTED.get(n, {}).get("tool calls", {})))
def test_a_call_of_two_arguments_is_trained_whole_whatever_tags_are_special(name, root):
    """Random mixes of the template's tags made special (all, none and four seeded mixes): the trained text is the
    same as with the family's own tokenizer, or the row is refused; never a call cut after its first argument."""
    import random

    tags = template_tags(name)
    reference = outcome(family_tokenizer(name, root), TWO_ARGS, TWO_ARGS_TOOLS)
    if "refused" in reference:
        pytest.skip(f"{name}: {reference['refused']}")
    call = reference["trained"][0]
    assert all(piece in call for piece in ("craft", "item", "stick", "count", "2")), (name, call)
    rng = random.Random(name)
    mixes = [tags, []] + [[t for t in tags if rng.random() < 0.5] for _ in range(4)]
    for mix in mixes:
        got = outcome(_tokenizer_with_special(name, root, mix), TWO_ARGS, TWO_ARGS_TOOLS)
        assert "refused" in got or got == reference, (name, mix, got, reference)


def test_glm_with_its_argument_tags_special_trains_the_whole_call(root):
    """The case that mis-masked silently: GLM-4.5's template with </arg_value> and <arg_key> special tokens learned
    its tool-call closing at </arg_value>, so only the first argument was trained and the call's closing
    (</tool_call><|observation|>) never was."""
    got = outcome(_tokenizer_with_special("glm4.5", root, ["</arg_value>", "<arg_key>"]), TWO_ARGS, TWO_ARGS_TOOLS)
    call = got["trained"][0]
    assert "<arg_key>count</arg_key>\n<arg_value>2</arg_value>" in call and call.endswith("</tool_call><|observation|>")


# ------------------------------------------------------------------------------------------------------------------
# The mechanisms behind the last wrong refusals (issue 36), each on a real template (sources in the fixtures' README).


def test_a_template_that_renders_only_with_tools_is_probed_with_tools(root):
    """Hermes 3's tool_use template loops over `tools` unguarded: probes without tools raise, and every row was
    refused although every row with tools renders. Its last tool result also closes without the newline a history
    one has: a shortened lead-in then trained the tool turn's end and the assistant header."""
    tok = family_tokenizer("hermes3", root)
    m = template_markers(tok)
    assert m.needs_tools and any("only conversations with tools" in line for line in m.describe())
    calls = outcome(tok, *SHAPES["tool calls"])["trained"]
    assert calls[1] == '<tool_call>\n{"name": "craft", "arguments": {"item": "torch"}}\n</tool_call><|im_end|>'
    assert calls[2] == "Both are crafted.<|im_end|>"
    plain = outcome(tok, *SHAPES["multi-turn"])
    assert plain["refused"] == "template needs tools" and "tools" in plain["detail"]
    from sftforge.chat import render_prompt

    with pytest.raises(RowError, match="only conversations that have tools"):
        render_prompt(tok, SHAPES["multi-turn"][0][:2])
    assert render_prompt(tok, SHAPES["tool calls"][0][:1], TOOLS).endswith("<|im_start|>assistant\n")


def test_a_generation_prompt_unlike_the_history_header_is_cut_from_history(root):
    """Vicuna's generation prompt writes 'ASSISTANT:' on its own line; its history writes 'ASSISTANT: ' before an
    answer. Training learns the history's lead-in, and the prompt of a generation is cut from a render with an
    answer where training starts to train, so the model continues exactly what it learned."""
    tok = family_tokenizer("vicuna", root)
    m = template_markers(tok)
    assert "user" in m.prompt_from_history and any("cut from a render" in line for line in m.describe())
    assert outcome(tok, *SHAPES["multi-turn"]) == {"trained": [" It is 4.</s>", " It is 6.</s>"]}
    from sftforge.chat import render_prompt

    prompt = render_prompt(tok, SHAPES["multi-turn"][0][:4])
    assert prompt.endswith("ASSISTANT:") and not prompt.endswith("ASSISTANT:\n")


def test_a_header_always_written_and_tool_turns_that_open_differently(root):
    """Command R7B's template writes the assistant header after every conversation (add_generation_prompt is never
    read), opens an answer with <|START_RESPONSE|> and a tool-call turn with <|START_THINKING|>…<|START_ACTION|>.
    The lead-in is the header the prompt ends with; what follows it is the model's to write, per turn kind. The
    search had run ahead into a later turn (the tool call's name matched in 'crafted')."""
    tok = family_tokenizer("command-r7b", root)
    m = template_markers(tok)
    assert m.header.endswith("<|CHATBOT_TOKEN|>") and m.lead_ins["user"] == (m.header,)
    segs = outcome(tok, *SHAPES["tool calls"])["trained"]
    assert segs[0].startswith("<|START_THINKING|><|END_THINKING|><|START_ACTION|>[") and '"item": "stick"' in segs[0]
    assert segs[0].endswith("<|END_ACTION|><|END_OF_TURN_TOKEN|>")
    assert segs[2] == "<|START_RESPONSE|>Both are crafted.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"


def test_a_lead_in_search_never_runs_past_the_next_message(root):
    """DeepSeek-V3 renders a second tool-call turn after a tool result without its lead-in: the refusal names the
    turn, not a later one whose header the search would have found."""
    got = outcome(family_tokenizer("deepseek-v3", root), *SHAPES["tool calls"])
    assert got["refused"] == "template mismatch"
    assert "assistant message 3" in got["detail"] and "and the next message" in got["detail"]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_generation_prompt_is_what_training_continues(name, root):
    """The one-render rule for generation: the prompt's tokens are the training render's tokens up to the first
    trained token of the last answer (for every family whose template lets a prompt say so; see the exceptions)."""
    from sftforge.chat import render_prompt

    tok = family_tokenizer(name, root)
    shape = "multi-turn" if "trained" in EXPECTED[name]["multi-turn"] else "tool calls"
    messages, tools = SHAPES[shape]
    if "trained" not in EXPECTED[name][shape]:
        pytest.skip(f"{name} refuses both shapes")
    msgs, flags = normalize_messages(messages)
    r = render(tok, msgs, tools, flags)
    first = max(i for i in range(len(r.loss_mask)) if r.loss_mask[i] and not r.loss_mask[i - 1])
    prompt = tok(render_prompt(tok, msgs[:-1], tools), add_special_tokens=False)["input_ids"]
    text = render_prompt(tok, msgs[:-1], tools)
    lead_in_end = r.spans[-1][0]
    if name in PROMPT_OPENS_REASONING:  # the template's prompt: the trained render's text up to the answer (or past
        # it, into a token that training trains whole: '<think>\n' against '<think>' + '\n\n</think>'), with <think>
        assert r.text.startswith(text) or text.startswith(r.text[:lead_in_end]), (name, text[-40:])
        assert "<think>" in text[-12:] and prompt != r.input_ids[:first], f"{name} no longer needs its exception"
        return
    assert prompt == r.input_ids[:first], (name, tok.decode(prompt[-8:]), tok.decode(r.input_ids[first - 8 : first]))


# Templates whose generation prompt opens reasoning that their history renders drop (a thinking mode): the prompt
# keeps the template's opening; the trained answer starts where history and prompt part.
PROMPT_OPENS_REASONING = {"deepseek-r1-distill", "deepseek-v3", "glm4.7-flash", "minimax-m2", "nemotron3", "qwen3.5"}
