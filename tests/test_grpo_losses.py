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


@pytest.mark.parametrize("aggregation", sorted(TOKEN_AGGREGATIONS))
def test_grpo_loss_matches_trl(trl_trainer, aggregation):
    from align.rollout import completion_logprobs, completion_mask

    tr = trl_trainer
    g = torch.Generator().manual_seed(1)
    B, P, C = 4, 3, 5
    prompt_ids = torch.randint(7, 50, (B, P), generator=g)  # unpadded prompts: TRL passes no position ids
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    completion_ids = torch.randint(7, 50, (B, C), generator=g)
    completion_ids[0, 2] = 2  # EOS: ragged completion lengths
    completion_ids[2, 0] = 2
    mask, _ = completion_mask(completion_ids, 2)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    tr.model.train()
    with torch.no_grad():
        current = completion_logprobs(tr.model, prompt_ids, prompt_mask, completion_ids, mask)
    old = current + 0.3 * torch.randn(B, C, generator=g)  # off-policy: some ratios clipped
    ref = current + 0.5 * torch.randn(B, C, generator=g)
    for beta, correction in [(0.0, True), (0.04, True), (0.04, False)]:
        tr.loss_type, tr.beta = aggregation, beta
        tr.args.use_bias_correction_kl = correction
        inputs = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                      completion_mask=mask, advantages=adv, old_per_token_logps=old, ref_per_token_logps=ref,
                      num_items_in_batch=mask.sum())
        theirs = tr._compute_loss(tr.model, inputs)
        logps = completion_logprobs(tr.model, prompt_ids, prompt_mask, completion_ids, mask)
        losses, _, _ = grpo_token_losses(logps, old, adv, clip_eps=0.2, beta=beta, ref_logprobs=ref,
                                         kl_ratio_correction=correction)
        num, weight = aggregate_token_losses(losses, mask, aggregation=aggregation, max_completion_length=C)
        assert (num / weight).item() == pytest.approx(theirs.item(), abs=1e-6), (beta, correction)
