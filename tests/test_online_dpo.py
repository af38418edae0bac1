"""The online DPO stage: pairing and ranking, TRL's loss on the stage's own pairs, split invariance,
resume, bad input, and a run that learns (2 processes: tests/test_distributed.py)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from align.errors import AlignError
from align.planning import run
from align.recipe import load_recipe

from helpers import REPO, grads_of, max_relative_difference, weights


def digit_share(prompts, completions, **_) -> list[float]:
    """A dense reward a random model gets signal from: the share of digits in the completion."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def online_recipe(output_dir, train=None, **section) -> dict:
    return {
        "stage": "online_dpo", "output_dir": str(output_dir), "seed": 0,
        "model": {"name_or_path": "builtin:tiny"},
        "data": {"train": {"path": str(REPO / "data/arith/sft_train.jsonl"), "take": 64},
                 "eval": {"path": str(REPO / "data/arith/sft_eval.jsonl"), "take": 16}, "max_length": 32},
        "train": {"max_steps": 8, "batch_size": 16, "lr": 3e-3, "lr_scheduler": "constant", "save_steps": 1000,
                  "log_steps": 1, "progress_bar": False, **(train or {})},
        "online_dpo": {"max_new_tokens": 6, "temperature": 1.0, "eval_kl_prompts": 8,
                       "reward_funcs": ["test_online_dpo:digit_share"], **section},
        "eval": {"max_new_tokens": 6},
    }


def build(tmp_path, train=None, **section):
    from accelerate import Accelerator

    from align.stages.online_dpo import OnlineDPOStage

    return OnlineDPOStage(load_recipe(None, data=online_recipe(tmp_path, train, **section)), Accelerator(cpu=True))


def test_pairs_rank_the_two_samples_of_a_prompt():
    from align.rollout import Rollout
    from align.stages.online_dpo import pair_up

    ids = torch.tensor([[5, 6, 2], [7, 2, 0], [8, 2, 0], [9, 9, 2], [4, 2, 0], [4, 2, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 0]])
    out = Rollout(torch.zeros(6, 1, dtype=torch.long), torch.ones(6, 1, dtype=torch.long), ids, mask,
                  torch.ones(6, dtype=torch.bool))
    pairs = pair_up([[1], [1, 3], [1, 4]], out, torch.tensor([0.0, 1.0, 2.0, 0.5, 1.0, 1.0]), skip_ties=True)
    assert [p["chosen_ids"] for p in pairs] == [[7, 2], [8, 2], [4, 2]]  # the higher score; the first on a tie
    assert [p["rejected_ids"] for p in pairs] == [[5, 6, 2], [9, 9, 2], [4, 2]]  # up to the EOS, pads dropped
    assert [p["prompt_ids"] for p in pairs] == [[1], [1, 3], [1, 4]]
    assert [p["informative"] for p in pairs] == [1.0, 1.0, 0.0]
    assert pair_up([[1], [1, 3], [1, 4]], out, torch.tensor([0.0, 1.0, 2.0, 0.5, 1.0, 1.0]),
                   skip_ties=False)[2]["informative"] == 1.0  # TRL: a tie is trained, the first sample chosen


def _trl_loss(model, ref, batch_pairs, beta):
    """TRL 1.16 OnlineDPOTrainer.training_step's sigmoid loss, from a plain forward of each [prompt, completion]
    row (its `_forward`: no temperature, log-probs summed over the completion)."""
    def summed(m, prompt, completion):
        ids = torch.tensor([prompt + completion])
        logits = m(input_ids=ids).logits[0, len(prompt) - 1: -1]
        return logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).sum()

    losses = []
    for p in batch_pairs:
        pi = summed(model, p["prompt_ids"], p["chosen_ids"]) - summed(model, p["prompt_ids"], p["rejected_ids"])
        with torch.no_grad():
            r = summed(ref, p["prompt_ids"], p["chosen_ids"]) - summed(ref, p["prompt_ids"], p["rejected_ids"])
        losses.append(-F.logsigmoid(beta * (pi - r)))
    return torch.stack(losses)


def test_the_loss_is_trls_on_the_stages_own_pairs(tmp_path):
    """After a few updates (so the policy differs from the reference) the stage's per-pair losses equal TRL's
    formula computed by a plain forward of each row, through the shared-prompt pair forward."""
    stage = build(tmp_path, skip_ties=False, beta=0.5)
    with torch.no_grad():  # move the policy off the reference
        for p in stage.model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    pairs, _ = stage.make_pairs(0)
    assert any(p["chosen_ids"] != p["rejected_ids"] for p in pairs)
    batch = stage._reference(stage._collate(pairs))
    loss_sum, metrics = stage.loss(stage.model, batch)
    expected = _trl_loss(stage.model, stage.ref_model, pairs, 0.5)
    torch.testing.assert_close(loss_sum, expected.sum(), atol=1e-5, rtol=1e-5)


def test_a_step_is_invariant_to_micro_batch_splits_and_ties_carry_no_gradient(tmp_path):
    whole = build(tmp_path / "whole", train={"batch_size": 20})
    split = build(tmp_path / "split", train={"batch_size": 5, "grad_accum": 4})  # the same 20 prompts: 5, 5, 5, 5
    with torch.no_grad():
        for p in list(whole.model.parameters()) + list(split.model.parameters()):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    a, b = whole.micro_batches(0), split.micro_batches(0)
    assert len(a) == 1 and len(b) == 4
    assert torch.equal(a[0]["informative"], torch.cat([x["informative"] for x in b]))
    assert 0 < a[0]["informative"].sum() < 20  # some ties among the 20 pairs
    torch.testing.assert_close(grads_of(split, b), grads_of(whole, a), atol=1e-6, rtol=1e-4)
    tied = dict(a[0], informative=torch.zeros(20))
    assert grads_of(whole, [tied]).abs().max() == 0


def test_online_dpo_raises_the_reward_and_logs_its_pairs(tmp_path):
    """8 steps of 16 prompts on the random built-in model: the digit-share reward of its samples goes up."""
    metrics = run(load_recipe(None, data=online_recipe(tmp_path)))
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    train = [r for r in log if "train/reward" in r]
    first = sum(r["train/reward"] for r in train[:2]) / 2
    last = sum(r["train/reward"] for r in train[-2:]) / 2
    assert last > first + 0.1, (first, last)
    assert all(r["train/reward_chosen"] >= r["train/reward_rejected"] for r in train)
    for key in ("rewards/margins", "rewards/accuracies", "objective/kl", "train/tied_pairs", "logps/chosen"):
        assert key in train[0], key
    assert metrics["eval/reward"] > metrics["eval/reward_start"]
    assert metrics["eval/kl"] > 0 and "eval/task_accuracy" in metrics


def test_a_killed_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from align.stages.online_dpo import OnlineDPOStage

    run(load_recipe(None, data=online_recipe(tmp_path / "straight", train={"max_steps": 4})))
    resumed = online_recipe(tmp_path / "resumed", train={"max_steps": 4, "save_steps": 2})

    def crash(self, step):
        if step == 2:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(OnlineDPOStage, "after_step", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(load_recipe(None, data=resumed))
    monkeypatch.undo()
    run(load_recipe(None, data=resumed))
    assert max_relative_difference(weights(tmp_path / "straight"), weights(tmp_path / "resumed")) < 1e-6


def test_bad_settings_are_one_line(tmp_path):
    with pytest.raises(AlignError, match="online_dpo.loss_type"):
        load_recipe(None, data=online_recipe(tmp_path, loss_type="hinge"))
    with pytest.raises(AlignError, match="online_dpo.beta"):
        load_recipe(None, data=online_recipe(tmp_path, beta=0))
    with pytest.raises(AlignError, match="reward function 'no_such'"):
        build(tmp_path, reward_funcs=["no_such"])
    recipe = online_recipe(tmp_path)
    recipe["data"]["train"] = str(tmp_path / "no_prompt.jsonl")
    (tmp_path / "no_prompt.jsonl").write_text(json.dumps({"text": "1+2=3"}) + "\n")
    with pytest.raises(AlignError, match="no_prompt.jsonl row 1"):
        run(load_recipe(None, data=recipe))


def test_trl_names_reach_the_section(tmp_path):
    recipe = online_recipe(tmp_path)
    recipe["online_dpo"].update({"reward_model_path": "runs/x"})
    loaded = load_recipe(None, data=recipe)
    assert loaded.stage_args.reward_model == "runs/x"


def test_align_check_counts_the_pairs_and_the_reference(tmp_path):
    """`align check`: a micro-batch of B prompts trains 2B rows (a pair each) and the frozen reference is resident;
    a new LoRA adapter needs no second copy (the adapter disabled is the reference)."""
    from align.check import check

    report = check(None, data=online_recipe(tmp_path), print_fn=None)
    assert not report.warnings, report.warnings
    assert report.estimate.rows == 2 * 16
    assert report.estimate.parts["frozen models (reference / reward)"] > 0
    lora = online_recipe(tmp_path)
    lora["model"]["lora"] = {"enabled": True}
    assert "frozen models (reference / reward)" not in check(None, data=lora, print_fn=None).estimate.parts


def test_a_new_lora_adapter_is_scored_against_its_base_model(tmp_path):
    from accelerate import Accelerator

    from align.stages.online_dpo import OnlineDPOStage

    recipe = online_recipe(tmp_path)
    recipe["model"]["lora"] = {"enabled": True}
    stage = OnlineDPOStage(load_recipe(None, data=recipe), Accelerator(cpu=True))
    assert stage.ref_model is None
    (batch,) = stage.micro_batches(0)
    _, metrics = stage.loss(stage.model, batch)
    assert abs(metrics["objective/kl"][0]) < 1e-4  # a new adapter (B = 0) is its base: every log-ratio 0
    assert batch["ref_chosen_logps"].abs().sum() > 0
