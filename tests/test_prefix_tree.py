"""data.reasoning_history=per_turn: every assistant turn trained in the context it is generated in, the K contexts of
a conversation merged into one prefix tree. The tree's loss and gradients equal the sum over the K expanded samples
(fp32, CPU); a template that keeps history unchanged (Qwen2.5) gives one branch and exactly today's tokens."""

import copy
import json
import re

import pytest
import torch
from test_chat_families import EXPECTED, FAMILIES, SHAPES, family_tokenizer

from sftforge import prefix_tree
from sftforge.attention import select
from sftforge.chat import RowError, template_markers
from sftforge.config import ConfigError, DataConfig, ModelConfig, load_config
from sftforge.data import tokenize_row
from sftforge.loss import loss_sum
from sftforge.model import load_model
from sftforge.packing import IGNORE_INDEX, pack


def test_merge_shares_prefixes_and_keeps_each_sequence():
    seqs = [([1, 2, 3, 4], [0, 0, 1, 1]), ([1, 2, 5, 6, 7], [0, 0, 0, 0, 1]), ([1, 2, 5, 6], [0, 0, 0, 0])]
    ids, mask, parents = prefix_tree.merge(seqs)
    assert ids == [1, 2, 3, 4, 5, 6, 7] and parents == [-1, 0, 1, 2, 1, 4, 5] and mask == [0, 0, 1, 1, 0, 0, 1]
    assert prefix_tree.depths(parents) == [0, 1, 2, 3, 2, 3, 4]
    anc = prefix_tree.ancestors(parents)
    assert anc[6].nonzero().flatten().tolist() == [0, 1, 4, 5, 6]  # 7 sees 1, 2, 5, 6 and itself: not 3, 4
    assert prefix_tree.shifted_labels(ids, mask, parents, -100) == [-100, 3, 4, -100, -100, 7, -100]
    assert prefix_tree.is_chain(prefix_tree.merge([([1, 2, 3], [0, 1, 1]), ([1, 2], [0, 1])])[2])


def _thinking_conversation():
    """Three user/assistant exchanges, every assistant turn with its reasoning (Qwen3 drops earlier turns' <think>)."""
    msgs = [{"role": "system", "content": "You are a calculator."}]
    for a, b in ((2, 2), (3, 5), (7, 1)):
        msgs.append({"role": "user", "content": f"add {a} {b}"})
        msgs.append({"role": "assistant", "reasoning_content": f"{a} plus {b} is {a + b}.", "content": str(a + b)})
    return {"messages": msgs}


def _tool_conversation(textcraft_dir):
    """A TextCraft tool-call episode with a thought per assistant turn and a follow-up question from the user."""
    row = json.loads((textcraft_dir / "train_tools.jsonl").read_text().splitlines()[0])
    msgs = row["messages"]
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            m["reasoning_content"] = f"step {i}: think about the recipe."
    msgs += [{"role": "user", "content": "How many steps did that take?"},
             {"role": "assistant", "reasoning_content": "Count the crafts.", "content": "A few."}]  # fmt: skip
    return {"messages": msgs, "tools": row.get("tools")}


def _expanded(row, tok, markers):
    """The naive reference: one sample per assistant turn, the conversation cut after it, its last turn trained."""
    cfg = DataConfig(train_on="last_assistant")
    msgs = row["messages"]
    return [tokenize_row(f"k{k}", {**row, "messages": msgs[: k + 1]}, tok, cfg, markers)
            for k, m in enumerate(msgs) if m["role"] == "assistant"]  # fmt: skip


def _loss_and_grads(model, samples):
    model.zero_grad(set_to_none=True)
    total, count = 0.0, 0
    for group in samples:
        s, n = loss_sum(model, pack(group, "sdpa"))
        s.backward()
        total, count = total + float(s.detach()), count + n
    return total, count, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(got, want, tol, tag=()):
    """Every parameter's gradient equal to tol, relative to the largest entry of the reference gradient."""
    assert got.keys() == want.keys()
    for k in want:
        d = float((got[k] - want[k]).abs().max()) / max(float(want[k].abs().max()), 1e-12)
        assert d < tol, (*tag, k, d)


@pytest.mark.parametrize("kind", ["thinking", "tools"])
def test_tree_loss_and_gradients_equal_the_expanded_samples(kind, tokenizers, model_config_dir, textcraft_dir):
    tok = tokenizers["qwen3"]
    markers = template_markers(tok)
    row = _thinking_conversation() if kind == "thinking" else _tool_conversation(textcraft_dir)
    tree = tokenize_row("row", row, tok, DataConfig(reasoning_history="per_turn"), markers)
    expanded = _expanded(row, tok, markers)
    assert tree.parents is not None and tree.contexts == len(expanded)  # Qwen3 re-renders history: branches
    assert len(tree.input_ids) < sum(len(s.input_ids) for s in expanded) == tree.expanded_tokens
    # every turn's reasoning is trained (in its own context), unlike the one-render default
    trained = tok.decode([t for t, m in zip(tree.input_ids, tree.loss_mask) if m])
    assert all(m["reasoning_content"] in trained for m in row["messages"] if m.get("reasoning_content"))
    default = tokenize_row("row", row, tok, DataConfig(), markers)
    one_render = tok.decode([t for t, m in zip(default.input_ids, default.loss_mask) if m])
    assert "step 2: think" not in one_render and "2 plus 2" not in one_render
    torch.manual_seed(0)
    model = load_model(ModelConfig(path=str(model_config_dir / "qwen3-tiny"))).eval()
    select(model)
    s_tree, n_tree, g_tree = _loss_and_grads(model, [[tree]])
    s_exp, n_exp, g_exp = _loss_and_grads(model, [[s] for s in expanded])
    assert n_tree == n_exp == sum(sum(s.loss_mask[1:]) for s in expanded)
    assert s_tree == pytest.approx(s_exp, rel=1e-5)
    _assert_same_grads(g_tree, g_exp, 1e-5)
    # packed with other samples in one row: still the same sum (attention never crosses samples)
    s_row, n_row, _ = _loss_and_grads(model, [[expanded[0], tree, expanded[-1]]])
    s_parts, n_parts, _ = _loss_and_grads(model, [[expanded[0]], [tree], [expanded[-1]]])
    assert n_row == n_parts and s_row == pytest.approx(s_parts, rel=1e-5)


@pytest.fixture(scope="module")
def family_model(model_config_dir):
    """qwen3-tiny with a vocabulary that holds every family's added special tokens (test_chat_families)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_config_dir / "qwen3-tiny"))
    config.vocab_size = 152_064
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()
    select(model)
    return model


@pytest.fixture(scope="module")
def families_root(tmp_path_factory) -> str:
    """One folder for the family tokenizers of this module (family_tokenizer caches per folder)."""
    return str(tmp_path_factory.mktemp("families"))


def _with_reasoning(messages):
    out = [dict(m) for m in messages]
    for i, m in enumerate(out):
        if m["role"] == "assistant":
            m.setdefault("reasoning_content", f"thought {i}: what comes next.")
    return out


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_per_turn_under_every_template_family(name, family_model, families_root):
    """No per-family code: under each of the conformance matrix's templates (test_chat_families), per_turn refuses
    exactly what the default path refuses; a template that renders the reasoning of the turn it generates has every
    turn's reasoning trained, one that never renders it (DeepSeek-R1's, Llama's) has it counted as not rendered,
    never trained silently half-way; an unbranched result is exactly today's sample; and a branched tree's loss and
    gradients equal the sum over the expanded samples (fp64 weights, 1e-6; the loss itself sums in fp32)."""
    tok = family_tokenizer(name, families_root)
    markers = template_markers(tok)
    for shape, (messages, tools) in SHAPES.items():
        if shape == "multi-turn":
            continue
        row = {"messages": _with_reasoning(messages), "tools": tools}
        per_turn = DataConfig(reasoning_history="per_turn")
        if "refused" in EXPECTED[name][shape]:
            with pytest.raises(RowError) as refused:
                tokenize_row("row", row, tok, per_turn, markers)
            assert refused.value.reason == EXPECTED[name][shape]["refused"], (name, shape)
            continue
        tree = tokenize_row("row", row, tok, per_turn, markers)
        today = tokenize_row("row", row, tok, DataConfig(), markers)
        trained = tok.decode([t for t, m in zip(tree.input_ids, tree.loss_mask) if m])
        thoughts = [m["reasoning_content"] for m in row["messages"] if m["role"] == "assistant"]
        assert tree.reasoning_dropped == sum(t not in trained for t in thoughts), (name, shape)
        assert tree.reasoning_dropped <= today.reasoning_dropped, (name, shape)
        if tree.parents is None:
            assert (tree.input_ids, tree.loss_mask) == (today.input_ids, today.loss_mask), (name, shape)
            continue
        expanded = _expanded(row, tok, markers)
        assert len(tree.input_ids) < tree.expanded_tokens == sum(len(s.input_ids) for s in expanded)
        model = copy.deepcopy(family_model).double()  # fp64 weights: fp32 left ~1.5e-5 of grouping noise
        s_tree, n_tree, g_tree = _loss_and_grads(model, [[tree]])
        s_exp, n_exp, g_exp = _loss_and_grads(model, [[s] for s in expanded])
        assert n_tree == n_exp and s_tree == pytest.approx(s_exp, rel=1e-6), (name, shape)
        _assert_same_grads(g_tree, g_exp, 1e-6, (name, shape))  # (the loss sums in fp32)


def test_per_turn_says_when_the_template_renders_no_reasoning_at_all(families_root):
    """DeepSeek-R1's template keeps only the text after </think> in every turn, the generated one included: per_turn
    cannot train the reasoning, and the data report says so and what to change (not the history hint)."""
    from sftforge.data import DataReport

    tok = family_tokenizer("deepseek-r1-distill", families_root)
    row = {"messages": _with_reasoning(SHAPES["reasoning"][0])}
    tree = tokenize_row("row", row, tok, DataConfig(reasoning_history="per_turn"), template_markers(tok))
    assert tree.parents is None and tree.reasoning_dropped == 2
    lines = DataReport(reasoning_dropped=tree.reasoning_dropped, contexts=tree.contexts).lines()
    assert any("not even as the turn being generated" in x and "set data.chat_template" in x for x in lines), lines


def test_history_keeping_template_gives_one_branch_and_todays_tokens(tokenizers):
    tok = tokenizers["qwen2.5"]
    markers = template_markers(tok)
    row = {"messages": [m for m in _thinking_conversation()["messages"]]}
    for m in row["messages"]:
        m.pop("reasoning_content", None)
    tree = tokenize_row("row", row, tok, DataConfig(reasoning_history="per_turn"), markers)
    today = tokenize_row("row", row, tok, DataConfig(), markers)
    assert tree.parents is None and tree.input_ids == today.input_ids and tree.loss_mask == today.loss_mask


def test_tree_positions_and_mask_in_a_micro_batch():
    samples = [([5, 6, 7, 8, 9], [0, 0, 1, 0, 1], [-1, 0, 1, 1, 3]), ([1, 2, 3], [0, 1, 1])]
    mb = pack(samples, "sdpa")
    assert mb.position_ids.tolist() == [[0, 1, 2, 2, 3, 0, 1, 2]]
    assert mb.labels.tolist() == [[-100, 7, -100, 9, -100, 2, 3, -100]]
    # sdpa: each sample's attention on its own (Σ l² work), the tree under its ancestor mask, the chain causal
    assert mb.attention_mask is None and mb.extra["packed_cu_seqlens"].tolist() == [0, 5, 8]
    tree, chain = mb.extra["packed_tree_masks"]
    assert chain is None and tree.dtype == torch.bool and tree.shape == (5, 5)
    assert tree[4].nonzero().flatten().tolist() == [0, 1, 3, 4]  # 9 sees 5, 6, 8 and itself, not 7
    # eager: one additive [1, 1, L, L] mask; the second sample never sees the first
    allowed = pack(samples, "eager").attention_mask[0, 0] == 0
    assert allowed[4].nonzero().flatten().tolist() == [0, 1, 3, 4] and allowed[6].nonzero().flatten().tolist() == [5, 6]
    assert IGNORE_INDEX == -100


def test_tree_rows_through_eager_equal_sdpa(tokenizers, model_config_dir):
    tok = tokenizers["qwen3"]
    tree = tokenize_row("row", _thinking_conversation(), tok, DataConfig(reasoning_history="per_turn"),
                        template_markers(tok))  # fmt: skip
    model = load_model(ModelConfig(path=str(model_config_dir / "qwen3-tiny"))).eval()
    select(model)
    with torch.no_grad():
        s_sdpa, n = loss_sum(model, pack([tree], "sdpa"))
        eager = load_model(ModelConfig(path=str(model_config_dir / "qwen3-tiny"), attn_implementation="eager")).eval()
        s_eager, n2 = loss_sum(eager, pack([tree], "eager"))
    assert n == n2 and float(s_sdpa) == pytest.approx(float(s_eager), rel=1e-5)


def test_subtree_ends_are_the_ancestor_mask_in_o_n():
    """Node j is an ancestor (or self) of node i iff j <= i < end[j], on random tries; a non-depth-first layout is
    refused."""
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        seqs = []
        for _ in range(int(torch.randint(1, 6, (1,), generator=g))):
            n = int(torch.randint(1, 12, (1,), generator=g))
            seqs.append((torch.randint(0, 3, (n,), generator=g).tolist(), [1] * n))
        _, _, parents = prefix_tree.merge(seqs)
        ends = torch.tensor(prefix_tree.subtree_ends(parents))
        i, j = torch.arange(len(parents))[:, None], torch.arange(len(parents))[None, :]
        assert torch.equal((j <= i) & (i < ends[None, :]), prefix_tree.ancestors(parents))
    with pytest.raises(ValueError, match="not a depth-first layout"):
        prefix_tree.subtree_ends([-1, 0, 0, 1])  # node 3's parent 1 is not on the path to node 2


def test_flex_tree_attention_equals_the_mask_path(tokenizers, model_config_dir, monkeypatch):
    """model.tree_attention=flex: one flex_attention call per row from the tokens' subtree ends, no l x l mask; the
    same loss as the per-tree mask (forward, CPU fp32: flex has no backward on CPU; the gradients are checked on a
    GPU by test_flex_tree_attention_gradients_on_cuda)."""
    from sftforge import attention

    tok = tokenizers["qwen3"]
    cfg = DataConfig(reasoning_history="per_turn")
    tree = tokenize_row("row", _thinking_conversation(), tok, cfg, template_markers(tok))
    plain = tokenize_row("plain", _thinking_conversation(), tok, DataConfig(), template_markers(tok))
    model = load_model(ModelConfig(path=str(model_config_dir / "qwen3-tiny"))).eval()
    select(model)
    rows = [plain, tree, plain]
    flex_mb = pack(rows, "sdpa", tree_attention="flex")
    assert "packed_tree_masks" not in flex_mb.extra and flex_mb.extra["packed_tree_ends"].shape == (flex_mb.n_tokens,)
    calls = []
    real = attention.flex_row
    monkeypatch.setattr(attention, "flex_row", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        s_mask, n_mask = loss_sum(model, pack(rows, "sdpa"))
        s_flex, n_flex = loss_sum(model, flex_mb)
    assert len(calls) == model.config.num_hidden_layers  # every layer through flex, one call per row
    assert n_mask == n_flex and float(s_flex) == pytest.approx(float(s_mask), rel=1e-5)


def test_tree_attention_choice_and_refusals():
    from sftforge.attention import resolve_tree_attention

    assert resolve_tree_attention("auto", "cpu") == "mask" and resolve_tree_attention("auto", "cuda") == "flex"
    assert resolve_tree_attention("mask", "cuda") == "mask"
    with pytest.raises(ConfigError, match="model.tree_attention=flex needs a CUDA device"):
        resolve_tree_attention("flex", "cpu")
    with pytest.raises(ConfigError, match="model.tree_attention must be auto | mask | flex"):
        load_config(None, ["model.tree_attention=sparse"])


def test_a_flex_failure_says_what_to_use_instead():
    """A flex_attention that fails on this torch/device (here: a backward on CPU, which torch refuses) is an error
    naming the way out, model.tree_attention=mask, not a bare kernel traceback."""
    from sftforge.attention import flex_row

    q, k, v = (torch.randn(1, 2, 8, 16, requires_grad=True) for _ in range(3))
    with pytest.raises(RuntimeError, match=r"model.tree_attention=flex failed \(NotImplementedError.*set "
                                           r"model.tree_attention=mask"):  # fmt: skip
        flex_row(q, k, v, torch.arange(1, 9))


@pytest.mark.gpu
def test_flex_tree_attention_gradients_on_cuda(tokenizers, model_config_dir):
    """On a GPU: loss and gradients of the flex path equal the per-tree mask path (fp32, 1e-4)."""
    tok = tokenizers["qwen3"]
    tree = tokenize_row("row", _thinking_conversation(), tok, DataConfig(reasoning_history="per_turn"),
                        template_markers(tok))  # fmt: skip
    torch.manual_seed(0)
    model = load_model(ModelConfig(path=str(model_config_dir / "qwen3-tiny")), "cuda").eval()
    select(model)
    out = {}
    for kind in ("mask", "flex"):
        model.zero_grad(set_to_none=True)
        s, n = loss_sum(model, pack([tree, tree], "sdpa", tree_attention=kind).to("cuda"))
        s.backward()
        out[kind] = (float(s), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert out["mask"][1] == out["flex"][1] and out["flex"][0] == pytest.approx(out["mask"][0], rel=1e-4)
    _assert_same_grads(out["flex"][2], out["mask"][2], 1e-4)


@pytest.mark.parametrize(
    "override,needs",
    [("data.packing=false", "data.packing=true"), ("model.attn_implementation=flash_attention_2", "sdpa or eager"),
     ("data.train_on=all", "data.train_on=assistant"), ("trainer.sp_size=2", "trainer.sp_size=1")],
)  # fmt: skip
def test_per_turn_refuses_what_it_cannot_do(override, needs):
    with pytest.raises(ConfigError, match=re.escape(needs)):
        load_config(None, ["data.reasoning_history=per_turn", override])


def _reasoning_file(textcraft_dir, tmp_path, n=16):
    """TextCraft react episodes with each 'Thought: X\\nAction: Y' turn split into reasoning_content and content."""
    rows = []
    for line in (textcraft_dir / "train_react.jsonl").read_text().splitlines()[:n]:
        row = json.loads(line)
        for m in row["messages"]:
            hit = re.match(r"^Thought:\s*(.*?)\n(Action:.*)$", m["content"], re.S) if m["role"] == "assistant" else None
            if hit:
                m["reasoning_content"], m["content"] = hit.group(1), hit.group(2)
        rows.append(row)
    path = tmp_path / "reasoning.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_per_turn_trains_the_same_on_two_processes_and_with_checkpointing(tmp_path, model_config_dir, tokenizer_dirs,
                                                                          textcraft_dir):  # fmt: skip
    """Tree micro-batches through the whole trainer: 2 processes (DDP and FSDP2, gloo) give the losses of 1, and
    gradient checkpointing (which re-runs each layer's forward with the tree mask) changes nothing."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from sftforge.metrics import read_metrics

    data = _reasoning_file(textcraft_dir, tmp_path)

    def run(name, nproc, *extra):
        args = ["train", f"model.path={model_config_dir / 'qwen3-tiny'}", f"model.tokenizer_path={tokenizer_dirs['qwen3']}",
                f"data.train_files={data}", "data.max_length=8192", "data.reasoning_history=per_turn",
                "data.train_batch_size=8", "data.micro_batch_size_per_gpu=2", "optim.lr=1e-3", "optim.warmup_steps=0",
                "trainer.max_steps=3", "trainer.device=cpu", "trainer.logger=[jsonl]",
                f"trainer.output_dir={tmp_path / name}", *extra]  # fmt: skip
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        cmd = [sys.executable, "-m", "sftforge", *args] if nproc == 1 else [
            torchrun, "--standalone", f"--nproc_per_node={nproc}", "-m", "sftforge", *args]  # fmt: skip
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert p.returncode == 0, p.stderr[-3000:]
        return [r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r], p.stdout + p.stderr

    one, log = run("one", 1)
    assert "as prefix trees" in log and "saved" in log  # the data report says what the tree saves
    assert run("gc", 1, "model.enable_gradient_checkpointing=true")[0] == pytest.approx(one, rel=1e-5)
    assert run("ddp", 2, "trainer.strategy=ddp")[0] == pytest.approx(one, rel=1e-5)
    assert run("fsdp2", 2, "trainer.strategy=fsdp2")[0] == pytest.approx(one, rel=1e-5)


def test_plan_shows_tokens_per_step_with_and_without_the_tree(tmp_path, model_config_dir, tokenizer_dirs,
                                                              textcraft_dir, capsys):  # fmt: skip
    from sftforge.cli import main

    data = _reasoning_file(textcraft_dir, tmp_path)
    args = ["plan", f"model.path={model_config_dir / 'qwen3-tiny'}", f"model.tokenizer_path={tokenizer_dirs['qwen3']}",
            f"data.train_files={data}", "data.max_length=8192", "data.train_batch_size=8"]  # fmt: skip
    assert main([*args, "data.reasoning_history=per_turn"]) == 0
    out = capsys.readouterr().out
    hit = re.search(r"per_turn: ~([\d,]+) tokens/step as prefix trees instead of ~([\d,]+) with every turn's context "
                    r"expanded \(([\d.]+)% saved\)", out)  # fmt: skip
    assert hit, out
    tree, expanded = (int(hit.group(i).replace(",", "")) for i in (1, 2))
    assert main(args) == 0
    one = int(re.search(r"sequences/step \(~([\d,]+) tokens", capsys.readouterr().out).group(1).replace(",", ""))
    assert one < tree < expanded
