"""GRPO / DAPO objective against hand-computed values."""

import math

import pytest
import torch

from sftforge.grpo import (
    group_advantages,
    informative_groups,
    kl_k3,
    overlong_penalty,
    policy_loss_sum,
    token_advantages,
)


def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    adv = group_advantages(r)
    # group 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.866025
    assert adv[0].tolist() == pytest.approx([0.866025, -0.866025, -0.866025, 0.866025], abs=1e-5)
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # all equal: no signal
    # group 2: mean 0.75, std sqrt((2.25^2 + 3 * 0.75^2) / 3) = 1.5 -> 1.5, -0.5, -0.5, -0.5
    assert adv[2].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-5)
    assert group_advantages(r, scale_by_std=False)[0].tolist() == [0.5, -0.5, -0.5, 0.5]
    with pytest.raises(ValueError, match="groups, responses per prompt"):
        group_advantages(torch.ones(4))


def test_dynamic_sampling_keeps_groups_with_a_reward_spread():
    r = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.2, 0.3]])
    assert informative_groups(r).tolist() == [True, False, False, True]


def test_overlong_penalty_by_hand():
    lengths = torch.tensor([50, 80, 90, 100, 120])
    assert overlong_penalty(lengths, 100, 20).tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])
    assert overlong_penalty(lengths, 100, 20, factor=0.5).tolist() == pytest.approx([0.0, 0.0, -0.25, -0.5, -0.5])
    assert overlong_penalty(lengths, 100, 0).tolist() == [0.0, 0.0, 0.0, 0.0, -1.0]


def test_kl_k3_by_hand():
    kl = kl_k3(torch.tensor([math.log(0.5), math.log(0.3)]), torch.tensor([math.log(0.25), math.log(0.3)]))
    # r = log(0.25 / 0.5): exp(r) - r - 1 = 0.5 + 0.693147 - 1
    assert kl.tolist() == pytest.approx([0.193147, 0.0], abs=1e-6)


def test_clipped_policy_loss_values_gradients_and_clip_fraction():
    # old policy log-prob 0 everywhere, so the ratio is exp(logp)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.7])).requires_grad_()
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, stats = policy_loss_sum(logp, torch.zeros(4), adv, clip_low=0.2, clip_high=0.28)
    # -min(1.5, 1.28) - min(0.5, 0.8) - min(-1.1, -1.1) - min(-0.7, -0.8) = -1.28 - 0.5 + 1.1 + 0.8
    assert float(loss.detach()) == pytest.approx(0.12, abs=1e-6)
    assert (
        stats.tokens == 4 and stats.clipped_tokens == 2
    )  # tokens 1 (ratio above 1.28, A > 0) and 4 (below 0.8, A < 0)
    loss.backward()
    # clipped tokens get no gradient; the others d(-ratio * A)/dlogp = -ratio * A
    assert logp.grad.tolist() == pytest.approx([0.0, -0.5, 1.1, 0.0], abs=1e-6)


def test_asymmetric_clip_and_kl_term():
    logp = torch.log(torch.tensor([1.25]))
    same = policy_loss_sum(logp, torch.zeros(1), torch.ones(1), clip_low=0.2, clip_high=0.28)[0]
    tight = policy_loss_sum(logp, torch.zeros(1), torch.ones(1), clip_low=0.2, clip_high=0.2)[0]
    assert float(same) == pytest.approx(-1.25) and float(tight) == pytest.approx(-1.2)  # DAPO's clip-higher
    ref = torch.log(torch.tensor([0.625]))
    loss, stats = policy_loss_sum(logp, torch.zeros(1), torch.ones(1), kl_coef=0.1, logp_ref=ref)
    kl = 0.5 + math.log(2) - 1  # r = log(0.625 / 1.25)
    assert float(loss) == pytest.approx(-1.25 + 0.1 * kl, abs=1e-6) and stats.kl_sum == pytest.approx(kl, abs=1e-6)


def test_dual_clip_caps_the_loss_of_a_negative_advantage():
    """ratio 20 with A = -1: the plain clipped loss is 20 (the unclipped side wins for A < 0), dual clip 10 caps it
    at 10 (and its gradient at 0); A > 0 tokens and ratios under the cap are untouched."""
    logp = torch.log(torch.tensor([20.0, 2.0, 20.0])).requires_grad_()
    adv = torch.tensor([-1.0, -1.0, 1.0])
    plain = policy_loss_sum(logp, torch.zeros(3), adv)[0]
    dual = policy_loss_sum(logp, torch.zeros(3), adv, clip_c=10.0)[0]
    assert float(plain) == pytest.approx(20 + 2 - 1.28) and float(dual) == pytest.approx(10 + 2 - 1.28)
    dual.backward()
    assert logp.grad.tolist() == pytest.approx([0.0, 2.0, 0.0])  # capped; -ratio*A = 2; clipped at 1.28


def test_token_advantages_repeat_per_response():
    out = token_advantages(torch.tensor([[0.5, -0.5]]), [2, 3])
    assert out.tolist() == [0.5, 0.5, -0.5, -0.5, -0.5]
    with pytest.raises(ValueError, match="2 advantages for 3 responses"):
        token_advantages(torch.tensor([[0.5, -0.5]]), [1, 1, 1])


def test_supervised_logprobs_match_full_logits(model_config_dir):
    """Per-token log-probs and entropies at trained positions (chunked) equal those of the model's full logits."""
    from sftforge.attention import select
    from sftforge.config import ModelConfig
    from sftforge.loss import loss_sum, supervised_logprobs
    from sftforge.model import load_model
    from sftforge.packing import IGNORE_INDEX, collate

    model = load_model(ModelConfig(path=str(model_config_dir / "qwen3-tiny")))
    select(model)
    g = torch.Generator().manual_seed(0)
    samples = [{"input_ids": torch.randint(0, 151000, (n,), generator=g).tolist(), "loss_mask": [0] * 3 + [1] * (n - 3)}
               for n in (9, 12)]  # fmt: skip
    mb = collate(samples, True, "sdpa", 0, torch.float32)
    logp, ent = supervised_logprobs(model, mb, chunk_size=4)
    logits = model(**mb.model_inputs()).logits[0].float()
    keep = mb.labels[0] != IGNORE_INDEX
    ref = torch.log_softmax(logits[keep], -1)
    assert logp.tolist() == pytest.approx(ref.gather(-1, mb.labels[0][keep][:, None]).squeeze(-1).tolist(), abs=1e-4)
    assert ent.tolist() == pytest.approx((-(ref.exp() * ref).sum(-1)).tolist(), abs=1e-4)
    assert float(-logp.detach().sum()) == pytest.approx(float(loss_sum(model, mb, 4)[0]), rel=1e-5)
    logp.sum().backward()  # chunks recomputed in the backward pass
    assert model.get_output_embeddings().weight.grad is not None
