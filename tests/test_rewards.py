"""Reward functions (doctests, combination, errors) and a reward model read at the last real token."""

from __future__ import annotations

import doctest

import pytest
import torch

from align import rewards
from align.errors import AlignError


def test_doctests():
    assert doctest.testmod(rewards).failed == 0


def test_exact_match_prefers_answer_then_completion_column_then_task_check():
    prompts, completions = ["2+2=", "2+2="], ["4", "5"]
    assert rewards.exact_match(prompts, completions) == [1.0, 0.0]  # align.task.is_correct
    assert rewards.exact_match(prompts, completions, completion=["5", "5"]) == [0.0, 1.0]
    assert rewards.exact_match(prompts, completions, answer=["5", "4"], completion=["4", "4"]) == [0.0, 0.0]


def test_resolve_and_weights_errors():
    assert rewards.resolve("exact_match") is rewards.exact_match
    assert rewards.resolve("align.rewards:format_reward") is rewards.format_reward
    with pytest.raises(AlignError, match="exact_match"):
        rewards.resolve("exact_mtch")
    with pytest.raises(AlignError, match="2 weights for 1"):
        rewards.weighted_sum([rewards.exact_match], [1.0, 2.0])
    broken = rewards.weighted_sum([lambda prompts, completions, **_: [1.0]])
    with pytest.raises(AlignError, match="returned 1 scores for 2"):
        broken(["a", "b"], ["x", "y"])


def test_missing_eos_penalty():
    scores = torch.tensor([0.5, 0.5, 0.5])
    ended = torch.tensor([True, False, True])
    assert rewards.missing_eos_penalty(scores, ended, 1.0).tolist() == [0.5, -0.5, 0.5]
    assert rewards.missing_eos_penalty(scores, ended, None) is scores


@pytest.fixture(scope="module")
def reward_model():
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, pad_token_id=0, num_labels=1)
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config).eval()


def test_reward_model_reads_the_last_real_token_left_and_right_padded(reward_model):
    rm = rewards.RewardModel(reward_model)
    seqs = [[1, 5, 6, 7, 8], [1, 9, 10]]
    alone = torch.stack([rm.score(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0] for s in seqs])
    width = 7  # pad id 0, and also pad with a real-looking token (pad == eos case)
    for pad in (0, 8):
        right = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        left = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
        right_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        left_mask = right_mask.flip(-1)
        torch.testing.assert_close(rm.score(right, right_mask), alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rm.score(left, left_mask), alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(alone[0], alone[1])


def test_reward_model_scores_a_rollout_up_to_its_first_eos(reward_model):
    from align.rollout import Rollout, completion_mask, left_pad

    rm = rewards.RewardModel(reward_model, batch_size=1)
    prompt_ids, prompt_mask = left_pad([[1, 5, 6], [1, 9]], pad_id=0)
    completion_ids = torch.tensor([[11, 2, 0, 0], [12, 13, 2, 0]])
    mask, ended = completion_mask(completion_ids, eos_id=2)
    scores = rm.score_rollout(Rollout(prompt_ids, prompt_mask, completion_ids, mask, ended))
    expected = [rm.score(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0]
                for s in ([1, 5, 6, 11, 2], [1, 9, 12, 13, 2])]
    torch.testing.assert_close(scores, torch.stack(expected), atol=1e-5, rtol=1e-5)
