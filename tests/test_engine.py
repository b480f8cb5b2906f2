"""The generation engine (engine.py): greedy answers token for token those of ``model.generate``, with continuous
batching, prefixes kept across calls, a template that rewrites history, and stale weights; sampling reproducible
whatever the batch; TextCraft episodes identical to today's path with each episode's prefill about its length once."""

import pytest
import torch
from transformers import GenerationConfig

from sftforge.config import DataConfig, ModelConfig
from sftforge.engine import Engine, supports
from sftforge.envs import rollout
from sftforge.envs.textcraft import TextCraftEnv, load_tasks
from sftforge.generation import GenerationOptions, Generator, HFBackend
from sftforge.model import load_model

STOP = [7]


@pytest.fixture(scope="module")
def tiny(model_config_dir):
    """qwen3-tiny, random weights, in float64: greedy choices far from floating-point ties (equality is exact)."""
    torch.manual_seed(0)
    return load_model(ModelConfig(path=str(model_config_dir / "qwen3-tiny"))).double().eval()


def _generate(model, prompts, n, stop=STOP):
    """Today's path, one prompt at a time (no padding): model.generate, greedy."""
    out = []
    for p in prompts:
        cfg = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=stop, pad_token_id=0)
        r = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                           generation_config=cfg)  # fmt: skip
        out.append(r[0, len(p) :].tolist())
    return out


def _prompts(seed=1, lengths=(5, 17, 9, 30, 5, 12, 3)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 5000, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_greedy_equals_generate_with_continuous_batching_and_kept_prefixes(tiny, attn):
    tiny.config._attn_implementation = attn
    try:
        prompts = _prompts()
        prompts.append(list(prompts[1]))  # an identical prompt: one prefill, forked
        engine = Engine(tiny, max_batch=3)  # fewer rows than prompts: waiting ones join as others finish
        first = engine.generate(prompts, 12, STOP)
        assert first == _generate(tiny, prompts, 12)
        assert engine.stats.prefill == sum(map(len, prompts)) - len(prompts[1])  # the copy was not prefilled
        # the next turn: each conversation continued by its answer and new tokens; only the new part is computed
        follow = [p + a + [11, 12, 13] for p, a in zip(prompts, first)]
        before = engine.stats.prefill
        assert engine.generate(follow, 12, STOP) == _generate(tiny, follow, 12)
        kept = sum(len(p) + len(a) - 1 for p, a in zip(prompts, first))  # a last token is sampled, not computed
        assert engine.stats.reused >= kept - len(prompts[1]) - len(first[1]) + 1  # (the two copies share one slot)
        assert engine.stats.prefill - before <= sum(len(f) for f in follow) - engine.stats.reused + 0
    finally:
        tiny.config._attn_implementation = "sdpa"


def test_a_rewritten_history_is_recomputed_and_counted(tiny):
    prompts = _prompts(2, (20, 25))
    engine = Engine(tiny, max_batch=4)
    answers = engine.generate(prompts, 8, STOP)
    edited = [p[:10] + [99] + p[11:] + a + [5, 6] for p, a in zip(prompts, answers)]  # token 10 changed (a template
    assert engine.generate(edited, 8, STOP) == _generate(tiny, edited, 8)  # dropping old reasoning does this)
    assert engine.stats.reused == 2 * 10 and engine.stats.recomputed > 0


def test_kept_slots_are_dropped_when_the_weights_change(tiny):
    model = type(tiny)(tiny.config).double().eval()
    model.load_state_dict(tiny.state_dict())
    prompts = _prompts(3, (15, 15))
    engine = Engine(model, max_batch=4)
    engine.generate(prompts, 6, STOP)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)  # fused: no version-counter bump
    model(input_ids=torch.tensor([prompts[0]])).logits.sum().backward()
    opt.step()
    reused = engine.stats.reused
    assert engine.generate(prompts, 6, STOP) == _generate(model, prompts, 6)
    assert engine.stats.reused == reused  # nothing computed with the old weights was used


def test_sampling_is_reproducible_whatever_the_batch(tiny):
    prompts = _prompts(4)
    prompts.append(list(prompts[0]))
    kw = {"do_sample": True, "temperature": 1.0, "top_p": 0.9, "seed": 5}
    a = Engine(tiny, max_batch=2).generate(prompts, 10, STOP, **kw)
    order = list(range(len(prompts) - 1))[::-1] + [len(prompts) - 1]  # (copies of a prompt keep their order)
    b = Engine(tiny, max_batch=8).generate([prompts[i] for i in order], 10, STOP, **kw)
    assert [b[order.index(i)] for i in range(len(prompts))] == a
    assert a[0] != a[-1]  # two samples of one prompt differ
    assert Engine(tiny, max_batch=8).generate(prompts, 10, STOP, **{**kw, "seed": 6}) != a


def test_supports_names_what_it_cannot_run(tiny, model_config_dir):
    assert supports(tiny) is None
    tiny.config._attn_implementation = "flash_attention_2"
    try:
        assert "flash_attention_2" in supports(tiny)
    finally:
        tiny.config._attn_implementation = "sdpa"
    tiny.config.sliding_window, tiny.config.use_sliding_window = 64, True
    try:
        assert "sliding-window" in supports(tiny)
    finally:
        tiny.config.sliding_window, tiny.config.use_sliding_window = None, False
    assert supports(torch.nn.Linear(2, 2)) is not None


def test_textcraft_episodes_equal_todays_path_and_prefill_each_once(tiny, textcraft_dir, tokenizers):
    """Greedy episodes of 6 turns: every action, message and token count identical to model.generate re-prefilling
    the whole conversation every turn; the engine computes each token of an episode once, except the tokens that
    re-tokenize differently from how they were sampled (a random model's answers do; counted as recomputed)."""
    from sftforge.data import read_rows

    tok = tokenizers["qwen3"]
    rows = list(read_rows(str(textcraft_dir / "train_tools.jsonl")))[:4]
    tasks, book = load_tasks(rows, DataConfig())
    opts = GenerationOptions(max_new_tokens=16, batch_size=8)
    runs, gens = [], []
    for engine in (False, True):
        gen = Generator(HFBackend(tiny, tok.pad_token_id, engine=engine), tok, opts)
        runs.append(rollout(lambda: TextCraftEnv(book), tasks, gen.chat, max_turns=6))
        gens.append(gen)
    old, new = runs
    assert [e.messages for e in new] == [e.messages for e in old]
    assert [[g.n_tokens for g in e.generations] for e in new] == [[g.n_tokens for g in e.generations] for e in old]
    assert all(e.turns == 6 for e in new)
    final = sum(len(tok(gens[1].prompt(e.messages, e.tools), add_special_tokens=False)["input_ids"]) for e in new)
    stats = gens[1].backend.engine.stats
    assert stats.prefill + stats.generated - stats.recomputed <= final, (stats, final)
    assert stats.reused > 3 * stats.prefill  # today's path computes prefill + reused


def test_progress_lines_when_the_output_is_not_a_terminal(capsys):
    from sftforge.progress import Periodic

    p = Periodic("eval textcraft", 20, "episodes", interval=30)
    assert p.active  # pytest's captured stderr is not a terminal
    p.update(5, 1000)
    assert capsys.readouterr().err == ""  # not 30 s yet
    p.t0 -= 60
    p.last -= 60
    p.update(5, 1200)
    err = capsys.readouterr().err
    assert err.startswith("eval textcraft: 5/20 episodes, 20 tokens/s, 1m00s, ETA 3m00s"), err


def test_a_shared_system_prompt_is_copied_and_every_conversation_keeps_its_own_slot(tiny):
    """Six conversations with one system prompt, two rows at a time: later ones copy the shared beginning from a
    finished one instead of taking its slot, so the next turn of every conversation finds all of its own tokens."""
    header = _prompts(5, (40,))[0]
    prompts = [header + tail for tail in _prompts(6, (5, 9, 7, 11, 6, 8))]
    engine = Engine(tiny, max_batch=2)
    answers = engine.generate(prompts, 6, STOP)
    assert engine.stats.reused >= 4 * 40  # every prompt after the first two copied the header
    follow = [p + a + [21, 22] for p, a in zip(prompts, answers)]
    reused = engine.stats.reused
    assert engine.generate(follow, 6, STOP) == _generate(tiny, follow, 6)
    assert engine.stats.reused - reused == sum(len(p) + len(a) - 1 for p, a in zip(prompts, answers))
    assert engine.stats.recomputed == 0
