"""Shared-prompt pair batches (prefix sharing): one row [prompt, chosen, rejected] per pair gives the
same log-probs, rewards and training steps as the two-row layout it replaces."""

import json
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from align.evaluate_rm import pair_rewards, score_pairs
from align.planning import run
from align.preference_data import (
    CHOSEN,
    PAD,
    PROMPT,
    REJECTED,
    collate_pairs,
    collate_shared_pairs,
    supports_shared_prompt,
)
from align.recipe import load_recipe
from align.stages.preference import pair_logps


def _config(attn_implementation="sdpa", **extra):
    return LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       pad_token_id=0, eos_token_id=2, bos_token_id=1, attn_implementation=attn_implementation,
                       **extra)


def _random_pairs(n, seed=0):
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        prompt = [1] + [rng.randrange(5, 40) for _ in range(rng.randrange(0, 12))]
        chosen = [rng.randrange(5, 40) for _ in range(rng.randrange(0, 8))] + [2]
        rejected = chosen
        while rejected == chosen:
            rejected = [rng.randrange(5, 40) for _ in range(rng.randrange(0, 8))] + [2]
        pairs.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return pairs


def test_shared_row_layout():
    batch = collate_shared_pairs([{"prompt_ids": [1, 5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 2]},
                                  {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [9, 2]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2, 8, 9, 2], [1, 2, 9, 2, 0, 0, 0, 0]]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]
    assert batch["position_ids"][1, :4].tolist() == [0, 1, 1, 2]
    assert batch["segments"][1].tolist() == [PROMPT, CHOSEN, REJECTED, REJECTED, PAD, PAD, PAD, PAD]
    assert [batch[k].tolist() for k in ("prompt_last", "chosen_last", "rejected_last")] == [[2, 0], [4, 1], [7, 3]]
    mask = batch["attention_mask"][0, 0]  # (T, T)
    assert mask.shape == (8, 8) and mask.dtype == torch.bool
    assert mask[5].tolist() == [True, True, True, False, False, True, False, False]  # rejected: prompt + itself
    assert mask[4].tolist() == [True] * 5 + [False] * 3  # chosen: causal
    assert batch["attention_mask"].any(-1).all()  # no empty row (pads included)


def test_pads_take_no_position_past_the_longest_pair():
    """The pads of a shared-prompt row take no position past those the batch's longest pair needs
    (P + max(C, R)), so a model with a learned position table (GPT-2's n_positions) sized to
    data.max_length takes every batch. Pads used to continue to P + R + pads: a short pair batched
    with a long one indexed past the table (IndexError: HH-RLHF reward/DPO on GPT-2 at max_length 512)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    long = {"prompt_ids": [1] + list(range(5, 15)), "chosen_ids": list(range(15, 25)) + [2],
            "rejected_ids": list(range(25, 35)) + [2]}  # P 11 + max(C, R) 11 = 22 positions
    short = {"prompt_ids": [1], "chosen_ids": [7, 2], "rejected_ids": [8, 2]}
    batch = collate_shared_pairs([long, short], pad_id=0)
    assert batch["input_ids"].shape == (2, 33) and batch["position_ids"].max().item() == 21
    assert batch["position_ids"][1, :5].tolist() == [0, 1, 2, 1, 2]  # real tokens: as before
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=22, n_embd=32, n_layer=2, n_head=4,
                                       attn_implementation="sdpa")).eval()
    with torch.no_grad():
        shared, two = pair_logps(model, batch), pair_logps(model, collate_pairs([long, short], 0))
    for side in ("chosen", "rejected"):
        torch.testing.assert_close(shared[side], two[side], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_pair_logps_equal_the_two_row_layout(nll_on_prompt):
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config()).eval()
    pairs = _random_pairs(9, seed=1)
    with torch.no_grad():
        two = pair_logps(model, collate_pairs(pairs, 0), nll_on_prompt=nll_on_prompt)
        shared = pair_logps(model, collate_shared_pairs(pairs, 0), nll_on_prompt=nll_on_prompt)
    for key in ("chosen", "rejected", "chosen_n", "rejected_n", "chosen_nll"):
        torch.testing.assert_close(shared[key], two[key], atol=1e-5, rtol=1e-5, msg=key)
    # the counts are the completion lengths (IPO's lengths)
    assert shared["rejected_n"].tolist() == [len(p["rejected_ids"]) for p in pairs]


def _single_row_logp(model, prompt: list[int], completion: list[int]) -> tuple[float, int]:
    """Summed log-prob of the completion tokens given what precedes each, from an unpadded one-row forward
    of prompt + completion, and how many were scored: a row's first token has no position before it, so
    with an empty prompt the completion's first token is not scored (there is nothing to predict it from)."""
    tokens = prompt + completion
    logps = model(torch.tensor([tokens])).logits[0].log_softmax(-1)  # (T, V)
    scored = range(max(1, len(prompt)), len(tokens))
    return sum(logps[j - 1, tokens[j]].item() for j in scored), len(scored)


def test_empty_prompt_pairs_match_a_single_row_forward():
    """An implicit-prompt pair with no shared beginning and a tokenizer without BOS (Qwen, GPT-2) has an
    empty prompt. Before the fix the shared layout read the first rejected token from the row's LAST
    column (prompt_last = -1): -13.58 over 3 tokens where the two-row layout gave -9.08 over 2."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config()).eval()
    pairs = [{"prompt_ids": [], "chosen_ids": [7, 8, 9, 2], "rejected_ids": [11, 12, 2]},
             {"prompt_ids": [], "chosen_ids": [13, 2], "rejected_ids": [14, 15, 16, 17, 2]},
             {"prompt_ids": [1, 5], "chosen_ids": [6, 2], "rejected_ids": [9, 2]}]
    with torch.no_grad():
        two = pair_logps(model, collate_pairs(pairs, 0))
        shared = pair_logps(model, collate_shared_pairs(pairs, 0))
        for i, pair in enumerate(pairs):
            for side in ("chosen", "rejected"):
                expected, n = _single_row_logp(model, pair["prompt_ids"], pair[f"{side}_ids"])
                for layout in (two, shared):
                    assert layout[side][i].item() == pytest.approx(expected, abs=1e-5), (i, side)
                    assert layout[f"{side}_n"][i].item() == n, (i, side)


def test_pair_rewards_equal_the_two_row_layout():
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(_config(num_labels=1)).eval()
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    pairs = _random_pairs(9, seed=2)
    with torch.no_grad():
        two = pair_rewards(model, collate_pairs(pairs, 0))
        shared = pair_rewards(model, collate_shared_pairs(pairs, 0))
        scored = score_pairs(model, pairs, 0, batch_size=4)  # default: shared (sdpa)
    for a, b in zip(shared + scored, two + two):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (two[0] - two[1]).abs().min() > 1e-3  # the rewards really differ between sides


def test_attention_that_cannot_take_a_4d_mask_falls_back(tmp_path, capsys):
    assert supports_shared_prompt(LlamaForCausalLM(_config()))
    assert not supports_shared_prompt(LlamaForCausalLM(_config(attn_implementation="eager")))
    from transformers import MistralConfig, MistralForCausalLM

    windowed = MistralConfig(**{k: getattr(_config(), k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                                   "num_hidden_layers", "num_attention_heads")},
                             sliding_window=8, attn_implementation="sdpa")
    assert not supports_shared_prompt(MistralForCausalLM(windowed))  # a custom mask would drop the window
    _weights(tmp_path, "simpo", True, "model.attn_implementation=eager", "train.max_steps=1")
    assert "cannot take a custom 4D mask; pairs go as 2 rows each" in capsys.readouterr().out


PAIRS = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 10 * (1 + i % 3))}
         for i, (a, b) in enumerate([(12, 7), (33, 41), (5, 80), (27, 27), (64, 3), (18, 49), (70, 11), (2, 95)])]


def _weights(tmp_path, stage, shared, *extra):
    """The weights after 2 steps and the logged (loss, grad norm) of each step."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    out = tmp_path / f"{stage}-{shared}"
    run(load_recipe(None, [
        f"stage={stage}", f"output_dir={out}", "model.name_or_path=builtin:tiny", f"data.train={data}",
        "data.max_length=16", f"data.shared_prompt={str(shared).lower()}", "train.batch_size=4", "train.lr=1e-3",
        "train.max_steps=2", "train.log_steps=1", "train.progress_bar=false", 'train.mixed_precision="no"',
        "eval.generate=false", *extra]))
    from safetensors.torch import load_file

    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return load_file(out / "model.safetensors"), [(r["train/loss"], r["train/grad_norm"]) for r in logs
                                                  if "train/loss" in r]


@pytest.mark.parametrize("stage,extra", [("dpo", ["dpo.rpo_alpha=0.5"]), ("reward", [])])
def test_a_training_step_is_the_same_in_both_layouts(tmp_path, stage, extra):
    from align import builtin, models
    from align.recipe import ModelConfig

    (shared, shared_log), (two, two_log) = _weights(tmp_path, stage, True, *extra), _weights(tmp_path, stage, False,
                                                                                             *extra)
    assert len(two_log) == 2
    torch.testing.assert_close(torch.tensor(shared_log), torch.tensor(two_log), rtol=1e-5, atol=1e-6)
    # Adam's first steps are nearly sign(gradient): entries whose gradient is ~0 move by rounding noise, so
    # compare whole tensors (relative Frobenius norm), not single entries
    for name, value in two.items():
        assert (shared[name] - value).norm() <= 1e-4 * value.norm(), name
    start = models.load_model(ModelConfig(name_or_path="builtin:tiny"), builtin.load_tokenizer(), seed=0,
                              head="score" if stage == "reward" else "causal_lm").state_dict()
    assert any(not torch.equal(value, start[name]) for name, value in two.items() if name in start)


def test_empty_prompt_pairs_are_counted_and_unscorable_ones_dropped():
    """No BOS and no shared beginning: the prompt is empty. The summary says so; a pair cut to one token a
    side has nothing left to score for the DPO family (dropped) but still has a last token for a reward model."""
    from tokenizers import processors

    from align import builtin
    from align.data import Rows
    from align.errors import AlignError
    from align.preference_data import tokenize_preferences

    tok = builtin.load_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")  # no BOS
    rows = Rows([{"chosen": "Sure thing.", "rejected": "No way."}], [("pairs.jsonl", 1)])
    kept = tokenize_preferences(rows, tok, max_length=64, key="data.train")
    assert kept.examples[0]["prompt_ids"] == [] and kept.empty_prompts == 1
    assert "1 with an empty prompt" in kept.summary()
    with pytest.raises(AlignError, match="no usable pair"):
        tokenize_preferences(rows, tok, max_length=1, key="data.train")
    assert len(tokenize_preferences(rows, tok, max_length=1, key="data.train", scores_tokens=False)) == 1
