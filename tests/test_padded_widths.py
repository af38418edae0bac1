"""Micro-batches padded to a multiple of 64 tokens (data.PAD_TO_MULTIPLE_OF) and the reference pass cut
by the token budget: shapes repeat (oneDNN's and ideep's shape-keyed caches stop growing on a CPU under
bf16; bench/profile_memory.py) and no log-prob, loss or update changes."""

import json
import random

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from align.data import IGNORE, PAD_TO_MULTIPLE_OF, collate, round_width
from align.preference_data import PAD, collate_pairs, collate_shared_pairs
from align.stages.preference import pair_logps, summed_pair_logps


def _model(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        pad_token_id=0, eos_token_id=2, bos_token_id=1,
                                        attn_implementation="sdpa")).eval()


def _pairs(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [1] + [rng.randrange(5, 40) for _ in range(rng.randrange(1, 30))]
        chosen = [rng.randrange(5, 40) for _ in range(rng.randrange(1, 20))] + [2]
        rejected = [rng.randrange(5, 40) for _ in range(rng.randrange(1, 20))] + [3, 2]
        out.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return out


def test_round_width():
    assert [round_width(w, 64) for w in (1, 63, 64, 65, 128, 129)] == [64, 64, 64, 128, 128, 192]
    assert round_width(70) == 70  # multiple 1: unchanged


def test_collate_pads_to_the_multiple_with_pads_masked_and_ignored():
    examples = [{"input_ids": [1, 5, 6, 2], "labels": [IGNORE, 5, 6, 2]}, {"input_ids": [1, 7], "labels": [IGNORE, 7]}]
    plain, padded = collate(examples, 0), collate(examples, 0, pad_to_multiple_of=64)
    assert plain["input_ids"].shape == (2, 4) and padded["input_ids"].shape == (2, 64)
    for key, fill in (("input_ids", 0), ("labels", IGNORE), ("attention_mask", 0)):
        assert torch.equal(padded[key][:, :4], plain[key])
        assert (padded[key][:, 4:] == fill).all()


def test_padded_pair_batches_give_the_same_logps():
    """Both pair layouts, padded to 64 tokens, give the log-probs of the unpadded batch (every pad is a
    right pad: a real token never attends to one)."""
    model, pairs = _model(), _pairs(5)
    with torch.no_grad():
        for collate_fn in (collate_shared_pairs, collate_pairs):
            plain, padded = collate_fn(pairs, 0), collate_fn(pairs, 0, pad_to_multiple_of=PAD_TO_MULTIPLE_OF)
            assert padded["input_ids"].shape[1] % 64 == 0 and padded["input_ids"].shape[1] > plain["input_ids"].shape[1]
            a, b = pair_logps(model, plain), pair_logps(model, padded)
            for key in ("chosen", "rejected", "chosen_n", "rejected_n", "chosen_nll"):
                torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)
    shared = collate_shared_pairs(pairs, 0, pad_to_multiple_of=64)
    assert shared["position_ids"].max() < max(len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"]))
                                              for p in pairs)  # pads take no position past the longest pair's
    assert (shared["segments"][:, -1] == PAD).all() and shared["attention_mask"].any(-1).all()


def test_reference_pass_cut_by_the_token_budget_scores_the_same():
    model, pairs = _model(1), _pairs(9, seed=1)
    for shared in (True, False):
        whole = summed_pair_logps(model, pairs, 0, batch_size=8, shared_prompt=shared)
        cut = summed_pair_logps(model, pairs, 0, batch_size=8, shared_prompt=shared, max_tokens=64,
                                pad_to_multiple_of=64)
        torch.testing.assert_close(whole, cut, atol=1e-5, rtol=1e-5)


def test_unpacked_sft_micro_batches_come_at_multiples_of_64(tmp_path):
    """An unpacked SFT stage collates every micro-batch at a multiple of 64 tokens; a packed one keeps
    its rows at data.max_length."""
    from accelerate import Accelerator

    from align.recipe import load_recipe
    from align.stages.sft import SFTStage

    rng = random.Random(0)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": "".join(rng.choice("abcdefgh ") for _ in range(rng.randrange(5, 90)))})
                            + "\n" for _ in range(24)))
    for packing, expect in (("false", lambda w: w % 64 == 0), ("true", lambda w: w == 100)):
        recipe = load_recipe(None, ["stage=sft", f"output_dir={tmp_path / 'out'}", "model.name_or_path=builtin:tiny",
                                    f"data.train={path}", "data.max_length=100", f"data.packing={packing}",
                                    "train.batch_size=4", "train.max_steps=2", "train.micro_batch_tokens=128"])
        stage = SFTStage(recipe, Accelerator(cpu=True))
        widths = {b["input_ids"].shape[1] for step in range(3) for b in stage.micro_batches(step)}
        assert widths and all(expect(w) for w in widths), (packing, widths)
