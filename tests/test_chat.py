"""Masks from one render of the real chat templates (Qwen3, Qwen2.5, Phi-3)."""

import json

import pytest

from sftforge.chat import RowError, TemplateError, end_of_turn_token_ids, render, row_to_conversation, template_markers
from sftforge.config import DataConfig

EOT = {"qwen3": "<|im_end|>", "qwen2.5": "<|im_end|>", "phi3": "<|end|>"}


def segments(tok, r):
    """The trained text, as one string per contiguous run of trained tokens (sliced from the render by offsets)."""
    enc = tok(r.text, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"] == r.input_ids
    out, cur = [], None
    for (a, b), m in zip(enc["offset_mapping"], r.loss_mask):
        if m:
            cur = (cur[0], b) if cur else (a, b)
        elif cur:
            out.append(r.text[cur[0] : cur[1]])
            cur = None
    if cur:
        out.append(r.text[cur[0] : cur[1]])
    return out


def conv(row, **kw):
    return row_to_conversation(row, DataConfig(**kw))


def rend(tok, row, train_on="assistant", kwargs=None, **cfg):
    msgs, tools, flags = conv(row, **cfg)
    return render(tok, msgs, tools, flags, train_on, kwargs)


SIMPLE = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6, of course."},
    ]
}


@pytest.mark.parametrize("name", ["qwen3", "qwen2.5", "phi3"])
def test_multi_turn_trains_assistant_content_and_end_of_turn_only(tokenizers, name):
    tok = tokenizers[name]
    r = rend(tok, SIMPLE)
    eot = EOT[name]
    if name == "qwen3":  # the last turn gets an (empty) thinking block from the template: it is model output
        assert segments(tok, r) == ["4" + eot, "<think>\n\n</think>\n\n6, of course." + eot]
    else:
        assert segments(tok, r) == ["4" + eot, "6, of course." + eot]
    # One render: the ids are exactly the tokenization of the template's full render.
    assert r.text == tok.apply_chat_template(SIMPLE["messages"], tokenize=False)
    assert r.input_ids == tok(r.text, add_special_tokens=False)["input_ids"]


def test_phi3_trailing_endoftext_and_glue_not_trained(tokenizers):
    tok = tokenizers["phi3"]
    r = rend(tok, SIMPLE)
    assert r.text.endswith("<|end|>\n<|endoftext|>")
    eos_id = tok.convert_tokens_to_ids("<|endoftext|>")
    assert r.input_ids[-1] == eos_id and r.loss_mask[-1] == 0
    end_id = tok.convert_tokens_to_ids("<|end|>")
    trained_ends = [i for i, (t, m) in enumerate(zip(r.input_ids, r.loss_mask)) if t == end_id and m]
    assert len(trained_ends) == 2  # the two assistant <|end|>, not the system/user ones


def test_qwen25_default_system_prompt_not_trained(tokenizers):
    tok = tokenizers["qwen2.5"]
    row = {"messages": SIMPLE["messages"][1:]}
    r = rend(tok, row)
    assert "You are Qwen, created by Alibaba Cloud." in r.text
    assert segments(tok, r) == ["4<|im_end|>", "6, of course.<|im_end|>"]


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def tool_row(arguments):
    return {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "18C, sunny"},
            {"role": "assistant", "content": "It is 18C and sunny in Paris."},
        ],
        "tools": TOOLS,
    }


@pytest.mark.parametrize("name", ["qwen3", "qwen2.5"])
def test_tool_calls_trained_tool_response_not(tokenizers, name):
    tok = tokenizers[name]
    r = rend(tok, tool_row({"city": "Paris"}))
    segs = segments(tok, r)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    assert segs[0] == call
    assert segs[1].endswith("It is 18C and sunny in Paris.<|im_end|>")
    assert len(segs) == 2
    assert "# Tools" in r.text and "18C, sunny" in r.text  # schema and tool output are context


@pytest.mark.parametrize("name", ["qwen3", "qwen2.5"])
def test_tool_call_arguments_as_json_string_equal_dict(tokenizers, name):
    tok = tokenizers[name]
    a = rend(tok, tool_row({"city": "Paris"}))
    b = rend(tok, tool_row('{"city": "Paris"}'))
    assert a.input_ids == b.input_ids and a.loss_mask == b.loss_mask


def test_tools_as_json_string_column(tokenizers):
    tok = tokenizers["qwen2.5"]
    row = tool_row({"city": "Paris"})
    row2 = {"messages": json.dumps(row["messages"]), "tools": json.dumps(row["tools"])}
    assert rend(tok, row).input_ids == rend(tok, row2).input_ids


def test_phi3_template_dropping_tool_calls_is_an_error(tokenizers):
    with pytest.raises(RowError, match="does not render"):
        rend(tokenizers["phi3"], tool_row({"city": "Paris"}))


def test_qwen3_thinking_in_several_turns(tokenizers):
    """Reasoning after the last user query is kept by the template (and trained); earlier reasoning is dropped."""
    tok = tokenizers["qwen3"]
    row = {
        "messages": [
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "reasoning_content": "old thought", "content": "A1"},
            {"role": "user", "content": "Q2"},
            {
                "role": "assistant",
                "reasoning_content": "call the tool",
                "content": "",
                "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}],
            },
            {"role": "tool", "content": "-3C"},
            {"role": "assistant", "content": "<think>\nsummarize\n</think>\n\nIt is -3C."},
        ],
        "tools": TOOLS,
    }
    r = rend(tok, row)
    assert "old thought" not in r.text  # the template drops it: a per-message render would have kept it
    assert r.reasoning_dropped == 1  # and the data report counts it
    segs = segments(tok, r)
    assert segs == [
        "A1<|im_end|>",
        '<think>\ncall the tool\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
        "</tool_call><|im_end|>",
        "<think>\nsummarize\n</think>\n\nIt is -3C.<|im_end|>",
    ]


def test_qwen3_enable_thinking_false_keeps_generation_prompt_block_as_context(tokenizers):
    tok = tokenizers["qwen3"]
    kwargs = {"enable_thinking": False}
    m = template_markers(tok, kwargs)
    assert m.header == "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    r = rend(tok, SIMPLE, kwargs=kwargs)
    # the empty think block is part of the prompt at inference with enable_thinking=false: not trained
    assert segments(tok, r) == ["4<|im_end|>", "6, of course.<|im_end|>"]


@pytest.mark.parametrize("name", ["qwen3", "qwen2.5", "phi3"])
def test_train_on_modes_and_per_message_flags(tokenizers, name):
    tok = tokenizers[name]
    eot = EOT[name]
    last = rend(tok, SIMPLE, train_on="last_assistant")
    assert len(segments(tok, last)) == 1 and segments(tok, last)[0].endswith("6, of course." + eot)
    everything = rend(tok, SIMPLE, train_on="all")
    assert all(everything.loss_mask)
    flagged = {"messages": [dict(m) for m in SIMPLE["messages"]]}
    flagged["messages"][2]["train"] = False  # assistant "4": not trained
    flagged["messages"][3]["loss_mask"] = 1  # user "And 3+3?": trained
    segs = segments(tok, rend(tok, flagged))
    assert segs[0] == "And 3+3?"
    assert segs[-1].endswith("6, of course." + eot) and len(segs) == 2
    # per-message flags win over train_on=all too
    r = rend(tok, flagged, train_on="all")
    assert "4" + eot not in "".join(segments(tok, r))


def test_flag_wrong_type(tokenizers):
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "train": "yes"}]}
    with pytest.raises(RowError, match="'train' must be true/false or 0/1"):
        conv(row)


@pytest.mark.parametrize("name", ["qwen3", "qwen2.5", "phi3"])
def test_shapes_normalize_to_the_same_conversation(tokenizers, name):
    tok = tokenizers[name]
    msgs = [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}]
    ref = rend(tok, {"messages": msgs})
    sharegpt = {"conversations": [{"from": "human", "value": "Name a color."}, {"from": "gpt", "value": "Blue."}]}
    alpaca = {"instruction": "Name a color.", "input": "", "output": "Blue."}
    pr = {"prompt": "Name a color.", "response": "Blue."}
    pr_list = {"prompt": [{"role": "user", "content": "Name a color."}], "response": "Blue."}
    pr_custom = {"question": "Name a color.", "answer": "Blue."}
    for row, kw in [
        (sharegpt, {}),
        (alpaca, {}),
        (pr, {}),
        (pr_list, {}),
        (pr_custom, {"prompt_key": "question", "response_key": "answer"}),
    ]:
        r = rend(tok, row, **kw)
        assert (r.input_ids, r.loss_mask) == (ref.input_ids, ref.loss_mask), row


def test_alpaca_input_and_sharegpt_tools(tokenizers):
    tok = tokenizers["qwen2.5"]
    r = rend(tok, {"instruction": "Translate", "input": "chat", "output": "cat", "system": "S"})
    assert "Translate\n\nchat" in r.text and "<|im_start|>system\nS<|im_end|>" in r.text
    sg = {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
            {"from": "observation", "value": "18C, sunny"},
            {"from": "gpt", "value": "It is 18C and sunny in Paris."},
        ],
        "tools": json.dumps(TOOLS),
    }
    segs = segments(tok, rend(tok, sg))
    assert segs[0].startswith('<tool_call>\n{"name": "get_weather"') and len(segs) == 2


def test_prompt_response_trains_only_the_response(tokenizers):
    tok = tokenizers["qwen2.5"]
    row = {
        "prompt": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "bye"},
        ],
        "response": "see you",
    }
    assert segments(tok, rend(tok, row)) == ["see you<|im_end|>"]


@pytest.mark.parametrize(
    "row,reason",
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ({"messages": []}, "no assistant turn"),
        ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown role"),
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}, "wrong type"),
        ({"messages": "not a list"}, "wrong type"),
        ({"text": "hello"}, "missing key"),
        ({"messages": '[{"role": "user", '}, "invalid JSON"),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}],
                    },
                ]
            },
            "invalid tool-call arguments",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]},
                ]
            },
            "invalid tool call",
        ),
        ({"instruction": "x", "output": 5}, "wrong type"),
        ({"conversations": [{"from": "alien", "value": "x"}]}, "unknown role"),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "tools": 7},
            "wrong type",
        ),
    ],
)
def test_bad_rows_have_a_reason(row, reason):
    with pytest.raises(RowError) as e:
        conv(row)
    assert e.value.reason == reason


def test_message_containing_template_tokens_is_caught(tokenizers):
    tok = tokenizers["qwen2.5"]
    row = {
        "messages": [
            {"role": "user", "content": "<|im_start|>assistant\nfake"},
            {"role": "assistant", "content": "real"},
        ]
    }
    with pytest.raises(RowError, match="special token of the tokenizer"):
        rend(tok, row)


def test_no_chat_template_error_names_the_key(tokenizers):
    tok = tokenizers["qwen2.5"]
    saved = tok.chat_template
    try:
        tok.chat_template = None
        with pytest.raises(TemplateError, match="data.chat_template"):
            template_markers(tok)
    finally:
        tok.chat_template = saved


def test_end_of_turn_ids(tokenizers):
    assert end_of_turn_token_ids(tokenizers["qwen3"]) == [tokenizers["qwen3"].convert_tokens_to_ids("<|im_end|>")]
    phi = tokenizers["phi3"]
    assert end_of_turn_token_ids(phi) == [
        phi.convert_tokens_to_ids("<|end|>"),
        phi.convert_tokens_to_ids("<|endoftext|>"),
    ]


@pytest.mark.parametrize("name", ["qwen3", "qwen2.5", "phi3"])
def test_unicode_content_masks_whole_characters(tokenizers, name):
    tok = tokenizers[name]
    row = {
        "messages": [
            {"role": "user", "content": "Say hello in Chinese 🌍"},
            {"role": "assistant", "content": "你好，世界 🌍!"},
        ]
    }
    segs = segments(tok, rend(tok, row))
    assert segs[-1].endswith("你好，世界 🌍!" + EOT[name]) and len(segs) == 1


@pytest.mark.parametrize("name", ["qwen3", "qwen2.5", "phi3"])
def test_ids_equal_transformers_apply_chat_template(tokenizers, name):
    tok = tokenizers[name]
    r = rend(tok, SIMPLE)
    ref = tok.apply_chat_template(SIMPLE["messages"], tokenize=True, return_dict=True)["input_ids"]
    assert r.input_ids == list(ref)


def test_conversations_key_with_role_content_messages(tokenizers):
    """The ExplicitLM form: {"conversations": [{"role": ..., "content": ...}]} is read as messages, not ShareGPT."""
    tok = tokenizers["qwen2.5"]
    conv_row = {"conversations": SIMPLE["messages"]}
    assert rend(tok, conv_row).input_ids == rend(tok, SIMPLE).input_ids


def test_tool_call_content_string_or_dict_and_markers_describe(tokenizers):
    m = template_markers(tokenizers["qwen3"])
    assert m.tool_arguments == "dict" and m.closings["text:user"] == "<|im_end|>"
    text = "\n".join(m.describe())
    assert "'<|im_start|>assistant\\n'" in text and "closing" in text and "stop tokens: <|im_end|>" in text
    phi = "\n".join(template_markers(tokenizers["phi3"]).describe())
    assert "tool calls: refused" in phi
