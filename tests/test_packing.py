import pytest
import torch

from sftforge.attention import select
from sftforge.config import ModelConfig
from sftforge.loss import hidden_states
from sftforge.model import load_model
from sftforge.packing import (
    IGNORE_INDEX,
    block_causal_mask,
    collate,
    pack,
    pad_collate,
    padded_tokens,
    shift_labels,
    split_to_budget,
)


def _samples(vocab: int, lens=(7, 12, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lens:
        ids = torch.randint(10, vocab, (n,), generator=g).tolist()
        mask = [0] * (n // 2) + [1] * (n - n // 2)
        out.append((ids, mask))
    return out


def test_shift_labels_never_cross_a_boundary():
    assert shift_labels([1, 2, 3, 4], [0, 0, 1, 1]) == [IGNORE_INDEX, 3, 4, IGNORE_INDEX]
    b = pack([([1, 2, 3], [0, 1, 1]), ([4, 5], [1, 1])])
    # the last position of sample 1 must not predict sample 2's first token (even though that token has mask 1)
    assert b.labels.tolist() == [[2, 3, IGNORE_INDEX, 5, IGNORE_INDEX]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert b.n_tokens == 5 and b.n_supervised == 3


def test_block_causal_mask():
    m = block_causal_mask([2, 3])[0, 0]
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(m, expected)
    f = block_causal_mask([2, 3], "float")[0, 0]
    assert torch.equal(f == 0, expected)


def test_pad_collate():
    b = pad_collate([([1, 2, 3], [0, 1, 1]), ([4, 5], [1, 1])], pad_id=9)
    assert b.input_ids.tolist() == [[1, 2, 3], [4, 5, 9]]
    assert b.labels.tolist() == [[2, 3, IGNORE_INDEX], [5, IGNORE_INDEX, IGNORE_INDEX]]
    assert b.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b.n_tokens == 5


def test_flash_kwargs():
    b = pack([([1, 2, 3], [1, 1, 1]), ([4, 5], [1, 1])], attn_implementation="flash_attention_2")
    assert b.attention_mask is None
    assert b.extra["cu_seq_lens_q"].tolist() == [0, 3, 5] and b.extra["max_length_q"] == 3


def test_split_to_budget():
    lens = [5, 3, 8, 2, 6]
    groups = split_to_budget(lens, 10)
    assert sorted(i for g in groups for i in g) == list(range(5))
    assert all(sum(lens[i] for i in g) <= 10 for g in groups)
    assert len(groups) == 3  # 24 tokens, budget 10 -> 3 bins
    assert split_to_budget(lens, 0) == [[0, 1, 2, 3, 4]]
    assert split_to_budget([20, 1], 10) == [[0], [1]]  # an over-budget sample goes alone
    padded = split_to_budget(lens, 12, packing=False)
    assert all(len(g) * max(lens[i] for i in g) <= 12 for g in padded if len(g) > 1)
    assert sorted(i for g in padded for i in g) == list(range(5))


def test_padded_tokens_is_what_collate_builds():
    samples = _samples(100, lens=(7, 12, 5))
    lens = [len(x) for x, _ in samples]
    for packing in (True, False):
        assert padded_tokens(lens, packing) == collate(samples, packing).input_ids.numel()
    assert padded_tokens(lens, False) == 36 and padded_tokens(lens, True) == 24


@pytest.mark.parametrize("name", ["qwen3-tiny", "phi3-tiny"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_unpacked(name, attn, model_config_dir):
    model = load_model(ModelConfig(path=str(model_config_dir / name), attn_implementation=attn))
    model.eval()
    select(model)  # what parallel.build_engine does for packed sdpa (a no-op for eager)
    samples = _samples(model.config.vocab_size)
    head = model.get_output_embeddings()
    with torch.no_grad():
        packed = head(hidden_states(model, collate(samples, packing=True, attn_implementation=attn)))[0]
        padded = head(hidden_states(model, collate(samples, packing=False)))
        start = 0
        for i, (ids, _) in enumerate(samples):
            alone = head(hidden_states(model, pack([samples[i]], attn)))[0]
            n = len(ids)
            torch.testing.assert_close(packed[start : start + n], alone, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(padded[i, :n], alone, rtol=1e-5, atol=1e-5)
            start += n


def test_packed_sdpa_builds_no_mask():
    """Packed sdpa micro-batches carry the samples' boundaries and a stride-0 placeholder, never an L×L mask."""
    b = pack([([1, 2, 3], [1, 1, 1]), ([4, 5], [1, 1])], attn_implementation="sdpa")
    assert b.attention_mask is None and b.extra["packed_cu_seqlens"].tolist() == [0, 3, 5]
    assert b.to("meta").extra["packed_cu_seqlens"].device.type == "cpu"  # boundaries are read on the host
    m = b.model_inputs()["attention_mask"]
    assert m.shape == (1, 1, 5, 5) and m.stride() == (0, 0, 0, 0) and m.isnan().all()


def test_packed_batch_on_a_model_without_the_packed_attention_fails_loudly(model_config_dir):
    """Called directly (not through loss.hidden_states) on a plain sdpa model, the placeholder mask (NaN) makes every
    output NaN: never a silent attention across samples."""
    model = load_model(ModelConfig(path=str(model_config_dir / "qwen3-tiny"))).eval()
    b = pack(_samples(model.config.vocab_size), "sdpa")
    inputs = {k: v for k, v in b.model_inputs().items() if k != "packed_cu_seqlens"}
    with torch.no_grad():
        assert torch.isnan(model.model(**inputs).last_hidden_state).all()


def test_packed_batch_needs_the_packed_attention_selected_up_front(model_config_dir):
    """The loss never switches attention on by itself: a packed sdpa micro-batch on a model without the packed
    attention selected (parallel.build_engine selects it) is an error that says what to call."""
    model = load_model(ModelConfig(path=str(model_config_dir / "qwen3-tiny"))).eval()
    with pytest.raises(ValueError, match=r"attention.select\(model\)"):
        hidden_states(model, pack(_samples(model.config.vocab_size), "sdpa"))
    assert model.config._attn_implementation == "sdpa"


def test_packed_attention_with_gradient_checkpointing(model_config_dir):
    """Gradient checkpointing re-runs each layer in the backward: the packed attention stays selected, so gradients
    are the same as without checkpointing (and as the padded batch's)."""
    from sftforge.loss import loss_sum

    grads = []
    for packing, gc in [(True, False), (True, True), (False, False)]:
        model = load_model(ModelConfig(path=str(model_config_dir / "qwen3-tiny"), enable_gradient_checkpointing=gc))
        model.train()
        select(model)
        s, _ = loss_sum(model, collate(_samples(model.config.vocab_size), packing=packing))
        s.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-4, atol=1e-5)


def test_generation_is_unchanged_by_the_packed_attention(model_config_dir):
    """Once selected, the packed attention is transformers' sdpa for everything else: left-padded batched generation
    gives the same tokens as a fresh sdpa model."""
    from sftforge.attention import NAME

    cfg = ModelConfig(path=str(model_config_dir / "qwen3-tiny"))
    plain, packed = load_model(cfg).eval(), load_model(cfg).eval()
    select(packed)
    with torch.no_grad():
        hidden_states(packed, pack(_samples(packed.config.vocab_size), "sdpa"))
    assert packed.config._attn_implementation == NAME and plain.config._attn_implementation == "sdpa"
    ids = torch.tensor([[0, 0, 11, 12, 13], [21, 22, 23, 24, 25]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    kw = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        assert torch.equal(plain.generate(ids, **kw), packed.generate(ids, **kw))
