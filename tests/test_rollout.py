"""Rollouts: left padding, the completion mask, recomputed log-probs, the ZeRO-3 gather hook."""

from __future__ import annotations

import copy
import doctest
import sys
import types

import pytest
import torch

from align import rollout as ro


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, LlamaConfig

    from align import builtin

    tok = builtin.load_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval(), tok


def test_doctests():
    assert doctest.testmod(ro).failed == 0


def test_completion_mask_ends_at_first_eos_even_when_pad_is_eos():
    ids = torch.tensor([[5, 2, 2, 2], [5, 6, 7, 8], [2, 5, 2, 6]])  # pad == eos == 2 in row 0
    mask, ended = ro.completion_mask(ids, eos_id=2)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


def test_logprobs_of_left_padded_rows_equal_unpadded(tiny):
    model, _ = tiny
    prompts = [[1, 20, 21, 22, 23], [1, 30]]
    completions = torch.tensor([[40, 41, 2], [50, 2, 0]])
    mask, _ = ro.completion_mask(completions, eos_id=2)
    ids, pmask = ro.left_pad(prompts, pad_id=0)
    batched = ro.completion_logprobs(model, ids, pmask, completions, mask)  # (2, 3)
    for row, prompt in enumerate(prompts):
        n = int(mask[row].sum())
        alone = torch.tensor([prompt + completions[row, :n].tolist()])
        logits = model(input_ids=alone).logits[0, len(prompt) - 1: -1].log_softmax(-1)
        expected = logits.gather(-1, completions[row, :n, None]).squeeze(-1)
        torch.testing.assert_close(batched[row, :n], expected, atol=1e-5, rtol=1e-5)
        assert (batched[row, n:] == 0).all()


def test_greedy_batch_equals_rows_alone_and_logprobs_match_generate_scores(tiny):
    model, tok = tiny
    prompts = [[1, 20, 21, 22, 23], [1, 30], [1, 40, 41]]
    ids, pmask = ro.left_pad(prompts, tok.pad_token_id)
    sampling = ro.SamplingConfig(max_new_tokens=5)
    batched = ro.sample(model, ids, pmask, sampling=sampling, eos_id=2, pad_id=0, do_sample=False)
    for row, prompt in enumerate(prompts):
        alone = ro.sample(model, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long),
                          sampling=sampling, eos_id=2, pad_id=0, do_sample=False)
        n = alone.shape[1]
        assert batched[row, :n].tolist() == alone[0].tolist()
        # the forward's log-probs equal the (cached, incremental) generate's own scores
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=5, do_sample=False, eos_token_id=2,
                             pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        scores = torch.stack(out.scores, 1)[0].log_softmax(-1)  # (C, V)
        mask, _ = ro.completion_mask(alone, 2)
        lp = ro.completion_logprobs(model, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long),
                                    alone, mask)
        expected = scores.gather(-1, alone[0, :, None]).squeeze(-1)
        torch.testing.assert_close(lp[0], expected * mask[0], atol=1e-4, rtol=1e-4)


def test_rollout_sampling_is_seeded_and_scores_reference(tiny):
    model, tok = tiny
    prompts = [[1, 20, 21]] * 4 + [[1, 30]] * 4
    sampling = ro.SamplingConfig(max_new_tokens=6, temperature=0.7, top_k=20, top_p=0.9)
    a = ro.rollout(model, prompts, sampling=sampling, eos_id=2, pad_id=0, ref_model=model, generator_seed=3)
    b = ro.rollout(model, prompts, sampling=sampling, eos_id=2, pad_id=0, generator_seed=3, policy_logprobs=False)
    assert torch.equal(a.completion_ids, b.completion_ids) and b.logprobs is None and b.ref_logprobs is None
    torch.testing.assert_close(a.logprobs, a.ref_logprobs)  # same weights -> same log-probs
    assert (a.logprobs * (1 - a.completion_mask) == 0).all()
    assert (a.completion_ids[a.completion_mask == 0] == 0).all()  # pads after the first EOS
    # temperature-scaled: log-probs are of the distribution at temperature 0.7 (top-k/p not applied)
    direct = ro.completion_logprobs(model, a.prompt_ids, a.prompt_mask, a.completion_ids, a.completion_mask,
                                    temperature=0.7)
    torch.testing.assert_close(a.logprobs, direct.detach(), atol=1e-5, rtol=1e-5)
    assert len(a.texts(tok)) == 8


def test_zero3_generation_gathers_all_parameters_once(tiny, monkeypatch):
    model, _ = tiny
    entered = []

    class Gathered:
        def __init__(self, params, modifier_rank=None):
            entered.append((len(params), modifier_rank))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    fake = types.ModuleType("deepspeed")
    fake.zero = types.SimpleNamespace(GatheredParameters=Gathered)
    monkeypatch.setitem(sys.modules, "deepspeed", fake)

    class Engine(torch.nn.Module):  # stands in for a DeepSpeedEngine at stage 3
        def __init__(self, module):
            super().__init__()
            self.module = module

        def zero_optimization_stage(self):
            return 3

    class Unwrapping:
        def unwrap_model(self, m):
            return m.module

    engine = Engine(model)
    assert ro.is_zero3(engine) and not ro.is_zero3(model)
    with ro.generation_model(engine, Unwrapping()) as gen:
        assert gen is model
    assert entered == [(len(list(model.parameters())), None)]
    with ro.generation_model(model) as gen:  # no DeepSpeed: no gather
        assert gen is model
    assert len(entered) == 1


def _generate(model, ids, mask, max_new_tokens, processors=()):
    """Hugging Face `generate` (greedy + our processors), completions padded to max_new_tokens with 0."""
    from transformers import LogitsProcessorList

    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=2, pad_token_id=0, logits_processor=LogitsProcessorList(processors))
    out = out[:, ids.shape[1]:]
    return torch.nn.functional.pad(out, (0, max_new_tokens - out.shape[1]), value=0)


def test_decode_loop_gives_generates_tokens_greedy_and_gumbel_sampled(tiny):
    """Our decode loop (shared prompt forward, cached steps) == transformers' generate, token for token."""
    model, tok = tiny
    prompts = [[1, 20, 21, 22, 23]] * 3 + [[1, 30]] * 4 + [[1, 40, 41]]  # repeats: the prompt forward is shared
    ids, pmask = ro.left_pad(prompts, tok.pad_token_id)
    assert sorted(ro.unique_prompts(ids, pmask)[0].tolist()) == [0, 3, 7]
    greedy = ro.SamplingConfig(max_new_tokens=7)
    mine = ro.sample(model, ids, pmask, sampling=greedy, eos_id=2, pad_id=0, do_sample=False)
    ref = _generate(model, ids, pmask, 7)
    assert torch.equal(torch.nn.functional.pad(mine, (0, 7 - mine.shape[1])), ref)
    for sampling in (ro.SamplingConfig(max_new_tokens=7),
                     ro.SamplingConfig(max_new_tokens=7, temperature=0.7, top_k=20, top_p=0.9)):
        keys = ro.row_keys(11, range(len(prompts)))
        mine = ro.sample(model, ids, pmask, sampling=sampling, eos_id=2, pad_id=0, keys=keys)
        ref = _generate(model, ids, pmask, 7, [ro._GumbelMax(keys, ids.shape[1], sampling)])
        assert torch.equal(torch.nn.functional.pad(mine, (0, 7 - mine.shape[1])), ref)
        assert len({tuple(r) for r in mine[:3].tolist()}) > 1  # copies of a prompt draw their own samples


def test_decode_loop_stops_when_every_row_ended(tiny, monkeypatch):
    model = copy.deepcopy(tiny[0])  # its head gets a bias below: keep the shared model as it is
    ids, pmask = ro.left_pad([[1, 20], [1, 30, 31]], 0)
    calls = []
    real = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        head = model(input_ids=ids, attention_mask=pmask, position_ids=ro.position_ids_of(pmask)).logits[:, -1]
    calls.clear()
    bias = torch.zeros(head.shape[-1])
    bias[2] = 1e4  # EOS wins at once in every row
    monkeypatch.setattr(model.lm_head, "bias", torch.nn.Parameter(bias))
    out = ro.sample(model, ids, pmask, sampling=ro.SamplingConfig(max_new_tokens=6), eos_id=2, pad_id=0,
                    do_sample=False)
    assert out.tolist() == [[2], [2]] and len(calls) == 1  # the prompt forward only


@pytest.mark.parametrize("temperature,checkpointing", [(1.0, False), (0.7, True)])
def test_shared_prompt_forward_equals_the_single_forward_values_and_gradients(tiny, monkeypatch, temperature,
                                                                              checkpointing):
    """A GRPO group as one row (prompt once, copies kept apart by a 4D mask) == the separate rows."""
    model = copy.deepcopy(tiny[0]).train()  # train mode and checkpointing: not on the shared model
    if checkpointing:
        model.gradient_checkpointing_enable()
    prompts = [[1, 20, 21, 22]] * 3 + [[1, 30]] * 2
    ids, pmask = ro.left_pad(prompts, 0)
    completions = torch.tensor([[40, 41, 2, 0], [42, 43, 44, 45], [2, 0, 0, 0], [50, 2, 0, 0], [51, 52, 53, 2]])
    mask, _ = ro.completion_mask(completions, eos_id=2)

    def run(share):
        monkeypatch.setattr(ro, "_shares_prompts", lambda m: share)
        model.zero_grad()
        lp, ent = ro.completion_logprobs(model, ids, pmask, completions, mask, temperature=temperature,
                                         return_entropy=True)
        (lp.sum() + 0.1 * ent.sum()).backward()
        return lp.detach(), ent.detach(), [p.grad.clone() for p in model.parameters()]

    shared, single = run(True), run(False)
    torch.testing.assert_close(shared[0], single[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared[1], single[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(shared[2], single[2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert (shared[0][mask == 0] == 0).all() and shared[0][mask == 1].abs().min() > 0
    monkeypatch.setattr(ro, "_shares_prompts", lambda m: True)
    one = ro.completion_logprobs(model, ids, pmask, completions[:, :1], mask[:, :1],  # C = 1: prompt rows only
                                 temperature=temperature)
    torch.testing.assert_close(one, single[0][:, :1], atol=1e-5, rtol=1e-5)
    g = ro.grouped_rows(ids, pmask, completions, mask, ro.unique_prompts(ids, pmask))
    assert g["input_ids"].shape == (2, 4 + 3 * 3)  # 2 distinct prompts, widest group 3 copies x 3 fed tokens
    model.gradient_checkpointing_disable()
    model.eval()


def test_sampling_stops_at_every_eos_of_the_generation_config(tiny):
    """Gemma 2 instruct ends a turn with <end_of_turn>, which its generation config lists next to the
    tokenizer's <eos>: `generate` stops at both, and so do align's rollouts and greedy evaluation."""
    from align.evaluate import greedy_completions
    from align.models import stop_token_ids

    model, tok = tiny
    model = copy.deepcopy(model)
    end_of_turn = tok.convert_tokens_to_ids("<|assistant|>")  # stands in for Gemma's <end_of_turn>
    model.generation_config.eos_token_id = [tok.eos_token_id, end_of_turn]
    assert stop_token_ids(model, tok) == [tok.eos_token_id, end_of_turn]
    model.lm_head.register_forward_hook(lambda m, a, out: out.index_add(  # the only choice: a +1e4 logit
        -1, torch.tensor([end_of_turn]), torch.full(out.shape[:-1] + (1,), 1e4)))
    out = ro.rollout(model, [[1, 20, 21], [1, 30]], sampling=ro.SamplingConfig(max_new_tokens=4),
                     eos_id=stop_token_ids(model, tok), pad_id=tok.pad_token_id, generator_seed=0)
    assert out.completion_ids[:, 0].tolist() == [end_of_turn] * 2
    assert out.lengths.tolist() == [1, 1] and out.ended.all()
    assert greedy_completions(model, tok, ["12+34="], max_new_tokens=4, batch_size=1) == {0: ""}
