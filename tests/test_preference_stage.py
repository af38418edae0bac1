"""The dpo / simpo / orpo stages on the built-in tiny model: learning direction, reference handling, bad input."""

import json

import pytest

from align.errors import AlignError
from align.planning import run
from align.recipe import load_recipe

PAIRS = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 10)}
         for a, b in [(12, 7), (33, 41), (5, 80), (27, 27), (64, 3), (18, 49), (70, 11), (2, 95)]]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _recipe(tmp_path, stage, *overrides, name="run"):
    data = _write(tmp_path / "pairs.jsonl", PAIRS)
    base = [f"stage={stage}", f"output_dir={tmp_path / name}", "model.name_or_path=builtin:tiny",
            f"data.train={data}", f"data.eval={data}", "data.max_length=16", "train.batch_size=8",
            "train.lr=3.0e-3", "train.lr_scheduler=constant", "train.progress_bar=false", "train.log_steps=1",
            "train.max_steps=12", "eval.generate=false"]
    return load_recipe(None, base + list(overrides))


def _log(tmp_path, name="run"):
    return [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stage", ["dpo", "simpo", "orpo"])
def test_stage_learns_the_preference(tmp_path, stage):
    metrics = run(_recipe(tmp_path, stage))
    assert metrics["eval/pair_accuracy"] == 1.0
    assert metrics["eval/loss"] < metrics["eval/loss_start"]
    assert metrics["eval/rewards/margins"] > metrics["eval/rewards/margins_start"]
    steps = [r for r in _log(tmp_path) if "rewards/accuracies" in r]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"} <= set(steps[0])
    assert steps[-1]["rewards/accuracies"] == 1.0
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_dpo_reference_is_precomputed_from_the_starting_policy(tmp_path):
    run(_recipe(tmp_path, "dpo", "train.max_steps=1"))
    first = _log(tmp_path)[1]
    # before the first update the policy equals the reference: every implicit reward is 0
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    assert first["train/loss"] == pytest.approx(0.6931, abs=1e-4)


def test_lora_reference_from_disabled_adapter_each_step(tmp_path):
    metrics = run(_recipe(tmp_path, "dpo", "model.lora.enabled=true", "model.lora.r=4",
                          "dpo.precompute_ref_logps=false", "train.max_steps=6", "train.lr=2.0e-2"))
    first = _log(tmp_path)[1]
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # new adapter: policy == base
    assert metrics["eval/rewards/margins"] > 0
    assert (tmp_path / "run" / "adapter_config.json").is_file()


def test_nll_term_raises_the_chosen_log_probs(tmp_path):
    plain = run(_recipe(tmp_path, "dpo", "train.max_steps=8", name="plain"))
    rpo = run(_recipe(tmp_path, "dpo", "train.max_steps=8", "dpo.rpo_alpha=1.0", name="rpo"))
    last_plain = [r for r in _log(tmp_path, "plain") if "logps/chosen" in r][-1]
    last_rpo = [r for r in _log(tmp_path, "rpo") if "logps/chosen" in r][-1]
    assert last_rpo["logps/chosen"] > last_plain["logps/chosen"]
    assert "nll_loss" in last_rpo and "nll_loss" not in last_plain
    assert plain["eval/pair_accuracy"] == rpo["eval/pair_accuracy"] == 1.0


def test_grad_accum_gives_the_same_update(tmp_path):
    one = run(_recipe(tmp_path, "simpo", "train.max_steps=2", name="one"))
    split = run(_recipe(tmp_path, "simpo", "train.max_steps=2", "train.batch_size=4", "train.grad_accum=2",
                        name="split"))
    assert split["eval/loss"] == pytest.approx(one["eval/loss"], rel=1e-4)


def test_reference_with_another_tokenizer_is_an_error(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from align import builtin

    tokenizer = builtin.build_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    ref = tmp_path / "ref"
    LlamaForCausalLM(config).save_pretrained(ref)
    tokenizer.save_pretrained(ref)
    with pytest.raises(AlignError, match="different tokenizer"):
        run(_recipe(tmp_path, "dpo", f"dpo.ref_model={ref}"))


def test_separate_reference_model_is_used(tmp_path):
    """dpo.ref_model other than the start: the implicit rewards differ from 0 before the first update."""
    from align import builtin, models
    from align.recipe import ModelConfig

    cfg = ModelConfig(name_or_path="builtin:tiny")
    tokenizer = builtin.load_tokenizer()
    models.save_pretrained(models.load_model(cfg, tokenizer, seed=7), tokenizer, tmp_path / "ref")
    run(_recipe(tmp_path, "dpo", f"dpo.ref_model={tmp_path / 'ref'}", "train.max_steps=1"))
    assert abs(_log(tmp_path)[1]["rewards/chosen"]) > 1e-3


def test_bad_preference_rows(tmp_path, capsys):
    missing = _write(tmp_path / "missing.jsonl", [{"prompt": "1+1=", "chosen": "2"}])
    with pytest.raises(AlignError, match="missing column 'rejected'"):
        run(load_recipe(None, ["stage=dpo", f"output_dir={tmp_path / 'x'}", f"data.train={missing}"]))
    rows = PAIRS + [{"prompt": "10+10=", "chosen": "20", "rejected": "21"}]
    data = _write(tmp_path / "trunc.jsonl", rows)
    # max_length 8 leaves one completion token for "10+10=" (bos + 6 chars): "2" vs "2" become identical
    # (keep_start: only the answers are cut; the default keep_end would shorten the prompt instead)
    recipe = load_recipe(None, ["stage=orpo", f"output_dir={tmp_path / 'y'}", f"data.train={data}",
                                "data.max_length=8", "data.prompt_truncation=keep_start", "train.max_steps=1", "train.progress_bar=false",
                                "eval.generate=false"])
    run(recipe)
    assert "1 dropped as identical after truncation" in capsys.readouterr().out


def test_pair_logps_without_mask_equals_masked_forward():
    """Right-padded rows are scored without the attention mask: the real tokens' log-probs are unchanged."""
    import torch

    from align import builtin, models
    from align.losses import sequence_logps
    from align.preference_data import collate_pairs
    from align.recipe import ModelConfig
    from align.stages.preference import pair_logps

    tokenizer = builtin.load_tokenizer()
    model = models.load_model(ModelConfig(name_or_path="builtin:tiny"), tokenizer, seed=0)
    examples = [{"prompt_ids": [1] + [10 + i % 50 for i in range(n)], "chosen_ids": [20, 21, 2],
                 "rejected_ids": [22] * k + [2]} for n, k in [(12, 1), (30, 9), (5, 3)]]
    batch = collate_pairs(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        lp = pair_logps(model, batch)
        masked = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    sums, counts = sequence_logps(masked, batch["labels"])
    torch.testing.assert_close(torch.cat([lp["chosen"], lp["rejected"]]), sums, atol=1e-5, rtol=1e-5)
    assert torch.cat([lp["chosen_n"], lp["rejected_n"]]).tolist() == counts.tolist()


def test_long_dialogues_keep_their_end_in_every_pair_stage(tmp_path, capsys):
    """data.prompt_truncation (default keep_end) cuts a too-long prompt from its beginning, so the answers
    survive; keep_start cuts only the answers, and a prompt longer than max_length leaves none (dropped)."""
    long_prompt = "Human: " + "tell me more about it. " * 4 + "Assistant:"
    rows = [{"prompt": long_prompt + f" {i}", "chosen": " yes", "rejected": " no"} for i in range(8)]
    data = _write(tmp_path / "long.jsonl", rows)
    kept = run(_recipe(tmp_path, "dpo", f"data.train={data}", f"data.eval={data}", "data.max_length=24",
                       "train.max_steps=1", name="end"))
    assert kept["eval/pair_accuracy_start"] is not None
    assert "8 pairs kept" in capsys.readouterr().out
    with pytest.raises(AlignError, match="no usable pair"):
        run(_recipe(tmp_path, "dpo", f"data.train={data}", f"data.eval={data}", "data.max_length=24",
                    "data.prompt_truncation=keep_start", "train.max_steps=1", name="start"))


def test_reward_prompt_truncation_is_a_deprecated_alias(tmp_path, capsys):
    recipe = _recipe(tmp_path, "reward", "reward.prompt_truncation=keep_start", "train.max_steps=1")
    from align.preference_data import pair_truncation

    assert pair_truncation(recipe) == "keep_start"
    run(recipe)
    assert "reward.prompt_truncation is deprecated: use data.prompt_truncation" in capsys.readouterr().out
