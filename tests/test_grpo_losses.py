"""GRPO math: group advantages and token aggregation, by hand and against TRL 1.16's GRPOTrainer loss."""

from __future__ import annotations

import pytest
import torch

from align.losses import (
    TOKEN_AGGREGATIONS,
    aggregate_token_losses,
    group_advantages,
    grpo_token_losses,
    zero_std_groups,
)


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])  # two groups of G = 2
    # group 0: mean 0.5, unbiased std 0.70711; group 1: all equal -> 0
    expected = torch.tensor([0.5 / (0.70711 + 1e-4), -0.5 / (0.70711 + 1e-4), 0.0, 0.0])
    torch.testing.assert_close(group_advantages(rewards, 2), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(group_advantages(rewards, 2, scale_rewards="none"), torch.tensor([0.5, -0.5, 0.0, 0.0]))
    batch_std = 0.5  # unbiased std of [1, 0, 1, 1]
    torch.testing.assert_close(group_advantages(rewards, 2, scale_rewards="batch"),
                               torch.tensor([0.5, -0.5, 0.0, 0.0]) / (batch_std + 1e-4))
    assert zero_std_groups(rewards, 2) == 1
    assert zero_std_groups(torch.tensor([0.0, 1.0, 2.0, 3.0]), 2) == 0


def test_group_advantages_groups_are_contiguous_rows():
    rewards = torch.tensor([3.0, 1.0, 10.0, 30.0])
    adv = group_advantages(rewards, 2, scale_rewards="none")
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, -10.0, 10.0]))  # not interleaved
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.ones(5), 2)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.ones(4), 2, scale_rewards="groups")


def test_token_aggregations_by_hand():
    losses = torch.tensor([[1.0, 1.0, 0.0], [3.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    hand = {"grpo": (1.0 + 3.0) / 2, "dr_grpo": (2.0 + 3.0) / (2 * 3), "dapo": (2.0 + 3.0) / 3}
    assert set(hand) == set(TOKEN_AGGREGATIONS)
    for name, value in hand.items():
        num, weight = aggregate_token_losses(losses, mask, aggregation=name, max_completion_length=3)
        assert float(num / weight) == pytest.approx(value)


@pytest.mark.parametrize("aggregation", sorted(TOKEN_AGGREGATIONS))
def test_aggregation_is_invariant_to_splitting(aggregation):
    """sum of numerators / sum of weights over any split == the whole batch's value (the engine's contract)."""
    g = torch.Generator().manual_seed(0)
    losses = torch.randn(8, 6, generator=g)
    mask = (torch.arange(6)[None] < torch.randint(1, 7, (8, 1), generator=g)).long()
    num, weight = aggregate_token_losses(losses, mask, aggregation=aggregation, max_completion_length=6)
    parts = [aggregate_token_losses(losses[s: s + 3], mask[s: s + 3], aggregation=aggregation,
                                    max_completion_length=6) for s in (0, 3, 6)]
    assert float(sum(p[0] for p in parts) / sum(p[1] for p in parts)) == pytest.approx(float(num / weight))


def test_grpo_token_losses_clip_and_kl_by_hand():
    lp = torch.tensor([[0.0, 0.0]])
    old = torch.tensor([[-0.5, 0.5]])  # ratios e^0.5 = 1.65, e^-0.5 = 0.61
    adv = torch.tensor([1.0])
    losses, clipped, kl = grpo_token_losses(lp, old, adv, clip_eps=0.2)
    torch.testing.assert_close(losses, torch.tensor([[-1.2, -0.60653]]), atol=1e-5, rtol=0)  # clipped at 1.2
    assert clipped.tolist() == [[1.0, 0.0]] and kl is None
    ref = torch.tensor([[-1.0, 0.0]])  # k3 = e^-1 - 1 + 1 = 0.36788, 0
    losses, _, kl = grpo_token_losses(lp, lp, adv, clip_eps=0.2, beta=0.5, ref_logprobs=ref)
    torch.testing.assert_close(kl, torch.tensor([[0.36788, 0.0]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(losses, torch.tensor([[-1.0 + 0.5 * 0.36788, -1.0]]), atol=1e-5, rtol=0)
    # clip-higher: a separate upper epsilon
    losses, _, _ = grpo_token_losses(lp, old, adv, clip_eps=0.2, clip_eps_high=0.28)
    assert losses[0, 0].item() == pytest.approx(-1.28)


# ---------------------------------------------------------------------------
# TRL 1.16 as the oracle
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trl_trainer(tmp_path_factory):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, LlamaConfig
    from trl import GRPOConfig, GRPOTrainer

    from align import builtin

    root = tmp_path_factory.mktemp("trl_grpo")
    tok = builtin.load_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(root / "m")
    tok.save_pretrained(root / "m")
    model.config._name_or_path = str(root / "m")  # TRL loads the reference from here (no hub)
    args = GRPOConfig(output_dir=str(root / "out"), use_cpu=True, bf16=False, per_device_train_batch_size=4,
                      num_generations=2, max_completion_length=5, beta=0.04, report_to=[],
                      gradient_checkpointing=False)
    trainer = GRPOTrainer(model=model, reward_funcs=lambda prompts, completions, **k: [0.0] * len(completions),
                          args=args, train_dataset=Dataset.from_list([{"prompt": "1+1="}] * 8),
                          processing_class=tok)
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def _random_rows(tr, g, *, eos_at, B=4, P=3, C=5):
    """Random unpadded prompts (TRL passes no position ids) and completions with EOS at `eos_at` (ragged
    lengths): -> ((prompt_ids, prompt_mask, completion_ids, mask), the model's current log-probs (B, C))."""
    from align.rollout import completion_logprobs, completion_mask

    prompt_ids = torch.randint(7, 50, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    completion_ids = torch.randint(7, 50, (B, C), generator=g)
    for row, col in eos_at:
        completion_ids[row, col] = 2
    mask, _ = completion_mask(completion_ids, 2)
    tr.model.train()
    with torch.no_grad():
        current = completion_logprobs(tr.model, prompt_ids, prompt_mask, completion_ids, mask)
    return (prompt_ids, prompt_mask, completion_ids, mask), current


def _compare_with_trl(tr, aggregation, rows, adv, old, ref, **level) -> torch.Tensor:
    """align's aggregated GRPO loss equals TRL's `_compute_loss` on the same rows, for beta 0 and 0.04, with
    and without the KL ratio correction; -> align's clipped mask of the last case."""
    from align.rollout import completion_logprobs

    prompt_ids, prompt_mask, completion_ids, mask = rows
    for beta, correction in [(0.0, True), (0.04, True), (0.04, False)]:
        tr.loss_type, tr.beta = aggregation, beta
        tr.args.use_bias_correction_kl = correction
        inputs = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                      completion_mask=mask, advantages=adv, old_per_token_logps=old, ref_per_token_logps=ref,
                      num_items_in_batch=mask.sum())
        theirs = tr._compute_loss(tr.model, inputs)
        logps = completion_logprobs(tr.model, prompt_ids, prompt_mask, completion_ids, mask)
        losses, clipped, _ = grpo_token_losses(logps, old, adv, clip_eps=0.2, beta=beta, ref_logprobs=ref,
                                               kl_ratio_correction=correction, **level)
        num, weight = aggregate_token_losses(losses, mask, aggregation=aggregation,
                                             max_completion_length=completion_ids.shape[1])
        assert (num / weight).item() == pytest.approx(theirs.item(), abs=1e-6), (beta, correction)
    return clipped


@pytest.mark.parametrize("aggregation", sorted(TOKEN_AGGREGATIONS))
def test_grpo_loss_matches_trl(trl_trainer, aggregation):

    tr = trl_trainer
    g = torch.Generator().manual_seed(1)
    rows, current = _random_rows(tr, g, eos_at=[(0, 2), (2, 0)])
    old = current + 0.3 * torch.randn(current.shape, generator=g)  # off-policy: some ratios clipped
    ref = current + 0.5 * torch.randn(current.shape, generator=g)
    _compare_with_trl(tr, aggregation, rows, torch.tensor([1.0, -1.0, 0.5, -0.5]), old, ref)


# ---------------------------------------------------------------------------
# advantage estimators (RLOO, REINFORCE++) and GSPO's sequence-level ratio
# ---------------------------------------------------------------------------
def test_new_math_doctests():
    import doctest

    import align.losses as L

    for fn in (L.rloo_advantages, L.reinforce_pp_advantages, L.sequence_log_ratio):
        finder = doctest.DocTestFinder()
        runner = doctest.DocTestRunner()
        for test in finder.find(fn, fn.__name__, globs=vars(L)):
            runner.run(test)
        assert runner.failures == 0 and runner.tries > 0, fn.__name__


def test_rloo_and_reinforce_pp_by_hand():
    from align.losses import ADVANTAGE_ESTIMATORS, reinforce_pp_advantages, rloo_advantages

    rewards = torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 5.0])  # two groups of G = 3
    # group 0: baselines (0+0)/2, (1+0)/2, (1+0)/2; group 1: (2+5)/2, (2+5)/2, (2+2)/2
    torch.testing.assert_close(rloo_advantages(rewards, 3), torch.tensor([1.0, -0.5, -0.5, -1.5, -1.5, 3.0]))
    # = G/(G-1) x (r - group mean)
    torch.testing.assert_close(rloo_advantages(rewards, 3), 1.5 * group_advantages(rewards, 3, scale_rewards="none"))
    with pytest.raises(ValueError, match="'none' or 'batch'"):
        rloo_advantages(rewards, 3, scale_rewards="group")
    # REINFORCE++: no baseline; equal lengths -> plain population whitening of the batch
    r = torch.tensor([3.0, 1.0, 1.0, 3.0])
    torch.testing.assert_close(reinforce_pp_advantages(r), torch.tensor([1.0, -1.0, -1.0, 1.0]))
    torch.testing.assert_close(reinforce_pp_advantages(r, torch.tensor([5, 5, 5, 5])), torch.tensor([1.0, -1.0, -1.0, 1.0]))
    # a long completion weighs as many tokens: mu = (3 x 3 + 1 + 1 + 3) / 6 = 7/3
    a = reinforce_pp_advantages(r, torch.tensor([3, 1, 1, 1]))
    mu, var = 7 / 3, (4 * (3 - 7 / 3) ** 2 + 2 * (1 - 7 / 3) ** 2) / 6
    torch.testing.assert_close(a, (r - mu) / var**0.5)
    assert reinforce_pp_advantages(torch.ones(4)).abs().max() == 0  # no signal, no NaN
    assert set(ADVANTAGE_ESTIMATORS) == {"grpo", "rloo", "reinforce_pp"}


def test_gspo_sequence_ratio_gradient_equals_gspo_token_stop_gradient_form():
    """TRL 1.16 broadcasts s_i = exp(mean_t log-ratio) over the tokens; GSPO-token writes
    s_i,t = sg[s_i] * pi_t / sg[pi_t]. Same values, and the same gradient under every aggregation."""
    g = torch.Generator().manual_seed(3)
    lp = torch.randn(4, 5, generator=g, dtype=torch.float64) * 0.1 - 1
    old = lp + torch.randn(4, 5, generator=g, dtype=torch.float64) * 0.05
    mask = (torch.arange(5)[None] < torch.tensor([[5], [3], [1], [4]])).long()
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0], dtype=torch.float64)
    for aggregation in sorted(TOKEN_AGGREGATIONS):
        x = lp.clone().requires_grad_(True)
        losses, _, _ = grpo_token_losses(x, old, adv, clip_eps=10.0, importance_sampling_level="sequence", mask=mask)
        num, w = aggregate_token_losses(losses, mask, aggregation=aggregation, max_completion_length=5)
        (num / w).backward()
        y = lp.clone().requires_grad_(True)
        m = mask.double()
        s = torch.exp(((y - old) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True))  # (B, 1)
        token_ratio = s.detach() * torch.exp(y - y.detach())  # GSPO-token
        num2, w2 = aggregate_token_losses(-adv[:, None] * token_ratio, mask, aggregation=aggregation,
                                          max_completion_length=5)
        (num2 / w2).backward()
        torch.testing.assert_close(x.grad, y.grad)
        torch.testing.assert_close(num / w, num2 / w2)


def test_gspo_clips_whole_sequences():
    lp = torch.zeros(1, 3)
    old = torch.tensor([[-0.6, 0.0, 0.0]])  # token ratios e^0.6 = 1.82, 1, 1; sequence ratio e^0.2 = 1.2214
    losses, clipped, _ = grpo_token_losses(lp, old, torch.tensor([1.0]), clip_eps=0.2,
                                           importance_sampling_level="sequence", mask=torch.ones(1, 3))
    torch.testing.assert_close(losses, torch.full((1, 3), -1.2))  # clipped once, on every token
    assert clipped.tolist() == [[1.0, 1.0, 1.0]]
    token, clipped_t, _ = grpo_token_losses(lp, old, torch.tensor([1.0]), clip_eps=0.2)
    assert clipped_t.tolist() == [[1.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo_token_losses(lp, old, torch.tensor([1.0]), importance_sampling_level="seq")


@pytest.mark.parametrize("aggregation", sorted(TOKEN_AGGREGATIONS))
def test_gspo_loss_matches_trl(trl_trainer, aggregation):
    """TRL 1.16 GRPOTrainer._compute_loss with importance_sampling_level="sequence", off-policy, to 1e-6."""

    tr = trl_trainer
    g = torch.Generator().manual_seed(2)
    rows, current = _random_rows(tr, g, eos_at=[(1, 1), (3, 3)])
    # sequence log-ratios about -0.5 (A > 0: clipped at 1.2), 0, 0, +0.5 (A < 0: clipped at 0.8)
    old = current + 0.05 * torch.randn(current.shape, generator=g) + torch.tensor([[-0.5], [0.0], [0.0], [0.5]])
    ref = current + 0.5 * torch.randn(current.shape, generator=g)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    mask = rows[3]
    tr.importance_sampling_level = "sequence"
    try:
        clipped = _compare_with_trl(tr, aggregation, rows, adv, old, ref,
                                    importance_sampling_level="sequence", mask=mask)
        assert clipped[:, 0].tolist() == [1.0, 0.0, 0.0, 1.0]  # two sequences clipped, two not
    finally:
        tr.importance_sampling_level = "token"


def test_rloo_advantages_match_trl():
    """TRL 1.16 RLOOTrainer._generate_and_score_completions on a tiny model with random rewards, to 1e-6:
    its advantages (normalize_advantages False and True) against rloo_advantages of the same rewards."""
    import tempfile

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, LlamaConfig
    from trl import RLOOConfig, RLOOTrainer

    from align import builtin
    from align.losses import rloo_advantages

    root = tempfile.mkdtemp()
    tok = builtin.load_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(f"{root}/m")
    model.config._name_or_path = f"{root}/m"  # TRL reads the model's name from here (no hub)
    g = torch.Generator().manual_seed(5)
    given = []

    def random_reward(prompts, completions, **kwargs):
        given.append(torch.randn(len(completions), generator=g, dtype=torch.float64).float())
        return given[-1].tolist()

    G, prompts = 4, 3
    args = RLOOConfig(output_dir=f"{root}/out", use_cpu=True, bf16=False, per_device_train_batch_size=G * prompts,
                      num_generations=G, max_completion_length=3, report_to=[], gradient_checkpointing=False)
    rows = [{"prompt": f"{i}+1="} for i in range(prompts)]
    trainer = RLOOTrainer(model=model, reward_funcs=random_reward, args=args, train_dataset=Dataset.from_list(rows * G),
                          processing_class=tok)
    inputs = [row for row in rows for _ in range(G)]  # groups contiguous, as TRL's sampler repeats them
    for normalize, scale in [(False, "none"), (True, "batch")]:
        trainer.normalize_advantages = normalize
        theirs = trainer._generate_and_score_completions(inputs)["advantages"]
        torch.testing.assert_close(rloo_advantages(given[-1], G, scale_rewards=scale), theirs, atol=1e-6, rtol=0)
