"""Every stage's loss inputs through the chunked head (`align.logprobs`) equal the plain full-logits path:
values and the gradient of every parameter, to 1e-5 in fp32, on the batches the stages build (padded, packed,
shared-prompt, grouped rows), for Llama (untied head), Gemma 2 (tied head, final logit soft-capping) and GPT-2
(tied head); chunks of 5 positions so that every batch spans several. And a short training run gives the same
weights either way."""

from __future__ import annotations

import pytest
import torch
from families import SPECS
from test_family_logprobs import COLLATE, Family, rollout_rows, sft_batch, tokenized_pairs

from align import logprobs, models
from align.preference_data import supports_shared_prompt
from align.recipe import ModelConfig
from align.rollout import completion_logprobs
from align.stages import sft
from align.stages.kto import completion_sums
from align.stages.ppo import PolicyAndValue, forward_completion
from align.stages.preference import pair_logps

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module", params=["llama", "gemma2", "gpt2"])
def family(request, family_dir) -> Family:
    config = ModelConfig(name_or_path=str(family_dir(request.param)))
    return Family(SPECS[request.param], config, models.load_tokenizer(config))


def _both_paths(model, quantity):
    """quantity(model) -> a scalar, and the gradient of every parameter, through each path."""
    results = []
    for chunked in (True, False):
        lm = model.policy if isinstance(model, PolicyAndValue) else model
        logprobs.configure(lm, chunked=chunked, chunk_tokens=5)
        assert logprobs.output_head(lm).plain is not chunked
        model.zero_grad(set_to_none=True)
        value = quantity(model)
        value.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((value.detach(), grads))
    (chunked_value, chunked_grads), (plain_value, plain_grads) = results
    torch.testing.assert_close(chunked_value, plain_value, **TOL)
    assert chunked_grads.keys() == plain_grads.keys() and len(plain_grads) > 0
    for name, grad in plain_grads.items():  # 1e-5 of the tensor's scale (a gradient entry may be a cancellation)
        scale = grad.abs().max().clamp(min=1.0)
        torch.testing.assert_close(chunked_grads[name] / scale, grad / scale, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def _weighted(stats: dict) -> torch.Tensor:
    """A scalar that weighs every output differently, so a swapped or wrong one shows in the gradient."""
    return sum((i + 1) * v.sum() for i, v in enumerate(stats.values()) if v.requires_grad)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_sft_loss(family, layout):
    batch = sft_batch(family, layout, "messages")
    _both_paths(family.load().train(), lambda m: sft.SFTStage.__new__(sft.SFTStage).loss(m, dict(batch))[0])


@pytest.mark.parametrize("kind", ["explicit", "empty_prompt"])
def test_pair_logps_both_layouts(family, kind):
    pairs = tokenized_pairs(family, kind)
    model = family.load().train()
    layouts = ["two_rows"] + (["shared_prompt"] if supports_shared_prompt(model) else [])
    for layout in layouts:
        batch = COLLATE[layout](pairs, family.tokenizer.pad_token_id)
        _both_paths(model, lambda m, b=batch: _weighted(pair_logps(m, b, nll_on_prompt=True)))


def test_kto_completion_sums(family):
    batch = COLLATE["two_rows"](tokenized_pairs(family, "explicit"), family.tokenizer.pad_token_id)
    _both_paths(family.load().train(), lambda m: _weighted({"s": completion_sums(m, batch, slice(0, None))}))


@pytest.mark.parametrize("grouped", [True, False])
def test_grpo_logprobs_and_entropy_at_a_temperature(family, grouped):
    out = rollout_rows(family, grouped)
    args = (out.prompt_ids, out.prompt_mask, out.completion_ids, out.completion_mask)

    def quantity(m):
        logps, entropy = completion_logprobs(m, *args, temperature=0.7, return_entropy=True)
        return logps.sum() + 0.3 * entropy.sum()

    _both_paths(family.load().train(), quantity)


def test_ppo_logprobs_values_and_entropy(family):
    out = rollout_rows(family, grouped=False)
    model = PolicyAndValue(family.load(), family.load(head="score")).train()

    def quantity(m):
        logps, values, entropy = forward_completion(m, out.prompt_ids, out.prompt_mask, out.completion_ids,
                                                    out.completion_mask, 0.9)
        assert not entropy.requires_grad  # logged only
        return logps.sum() + 0.5 * values.sum() + 0 * entropy.sum()

    _both_paths(model, quantity)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_a_short_run_gives_the_same_weights_either_way(tmp_path, stage):
    from align import planning
    from align.recipe import load_recipe

    from helpers import REPO, max_relative_difference, tiny_sft_recipe, weights

    finals = []
    for chunked in (True, False):
        recipe = tiny_sft_recipe(tmp_path / str(chunked), **{"model.chunked_logprobs": chunked, "train.max_steps": 5,
                                                             "model.logprob_chunk_tokens": 16})
        if stage == "dpo":
            recipe["stage"] = "dpo"
            recipe["data"]["train"] = {"path": str(REPO / "data/arith/prefs_train.jsonl"), "take": 64}
        planning.run(load_recipe(None, data=recipe))
        finals.append(weights(tmp_path / str(chunked)))
    # measured 2.0-2.5e-4 (v_proj): Adam's normalisation turns float-rounding differences in near-zero gradient
    # entries into a fraction of a step; a wrong gradient would differ by whole steps (lr 1e-3 x 5 ~ 5e-2)
    assert max_relative_difference(*finals) < 1e-3


def test_lora_policy_logprobs_and_pairs(family):
    """A LoRA adapter leaves lm_head frozen: the chunked head forms each position's gradient in the forward."""
    from peft import LoraConfig, get_peft_model

    out = rollout_rows(family, grouped=True)
    args = (out.prompt_ids, out.prompt_mask, out.completion_ids, out.completion_mask)
    model = get_peft_model(family.load(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).train()
    assert logprobs.output_head(model).weight.requires_grad is False

    def quantity(m):
        logps, entropy = completion_logprobs(m, *args, temperature=0.7, return_entropy=True)
        return (logps * torch.linspace(-1, 2, logps.shape[1])).sum() + 0.3 * entropy.sum()

    _both_paths(model, quantity)
    batch = COLLATE["two_rows"](tokenized_pairs(family, "explicit"), family.tokenizer.pad_token_id)
    _both_paths(model, lambda m: _weighted(pair_logps(m, batch)))
