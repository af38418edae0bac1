"""DPO's reference precompute cut into forwards of at most train.micro_batch_tokens (its peak then stays
that of a training step, bench/profile_memory.py) scores every pair as the uncut pass does."""

import random

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from align.stages.preference import summed_pair_logps


def _pairs(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [1] + [rng.randrange(5, 40) for _ in range(rng.randrange(1, 30))]
        chosen = [rng.randrange(5, 40) for _ in range(rng.randrange(1, 20))] + [2]
        rejected = [rng.randrange(5, 40) for _ in range(rng.randrange(1, 20))] + [3, 2]
        out.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return out


def test_reference_pass_cut_by_the_token_budget_scores_the_same(monkeypatch):
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                         pad_token_id=0, eos_token_id=2, bos_token_id=1,
                                         attn_implementation="sdpa")).eval()
    pairs = _pairs(9, seed=1)
    seen = []
    original = model.forward

    def spy(*args, **kwargs):
        seen.append(tuple(kwargs["input_ids"].shape))
        return original(*args, **kwargs)

    for shared, rows in ((True, 1), (False, 2)):
        whole = summed_pair_logps(model, pairs, 0, batch_size=8, shared_prompt=shared)
        seen.clear()
        monkeypatch.setattr(model, "forward", spy)
        cut = summed_pair_logps(model, pairs, 0, batch_size=8, shared_prompt=shared, max_tokens=64)
        monkeypatch.setattr(model, "forward", original)
        torch.testing.assert_close(whole, cut, atol=1e-5, rtol=1e-5)
        assert len(seen) > 2 and all(n * w <= 64 or n == rows for n, w in seen), seen  # each forward within 64
