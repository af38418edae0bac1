"""Preference pairs from a policy's own samples (`data.from_policy`, align.policy_pairs)."""

from __future__ import annotations

import doctest
import json

import pytest

from align import models, policy_pairs
from align.errors import AlignError
from align.policy_pairs import PolicyPairsConfig, PolicySource, build_pairs, ensure_policy_pairs
from align.recipe import ModelConfig, load_recipe
from align.rewards import exact_match

from helpers import REPO


def test_doctests():
    assert doctest.testmod(policy_pairs).failed == 0


def test_pairs_are_correct_vs_incorrect_samples_of_prompts_that_have_both():
    rows = [{"prompt": "47+85=", "completion": "132"}, {"prompt": "1+2=", "completion": "3"},
            {"prompt": "9+9=", "completion": "18"}, {"prompt": "5+5=", "completion": "10"}]
    samples = [["132", "122", "132", "142"], ["3", "3"], ["17", "81", ""], ["10", "11", "", "12"]]
    labels = [exact_match([r["prompt"]] * len(s), s, completion=[r["completion"]] * len(s))
              for r, s in zip(rows, samples)]
    pairs = build_pairs(rows, samples, labels, pairs_per_prompt=2, seed=0)
    # all right (1+2=) or all wrong (9+9=): no pair; duplicates count once; empty samples are dropped
    assert {p["prompt"] for p in pairs} == {"47+85=", "5+5="}
    assert sum(p["prompt"] == "47+85=" for p in pairs) == 2 and sum(p["prompt"] == "5+5=" for p in pairs) == 2
    for p in pairs:
        right = next(r["completion"] for r in rows if r["prompt"] == p["prompt"])
        assert p["chosen"] == right and p["rejected"] != right and p["rejected"]
    assert len({(p["prompt"], p["rejected"]) for p in pairs}) == 4  # distinct pairs
    assert build_pairs(rows, samples, labels, pairs_per_prompt=2, seed=0) == pairs  # deterministic
    # at most every (correct, incorrect) combination
    assert len(build_pairs(rows, samples, labels, pairs_per_prompt=50, seed=1)) == 2 + 2


def odd_length(prompts, completions, **_):
    """A stand-in labeller for an untrained model's samples: odd-length completions are 'correct'."""
    return [float(len(c) % 2 == 1) for c in completions]


def test_missing_files_are_sampled_labelled_and_written_once(tmp_path):
    policy = tmp_path / "policy"
    tok = models.load_tokenizer(ModelConfig())
    models.save_pretrained(models.load_model(ModelConfig(), tok, seed=0), tok, policy)
    prompts = {"path": str(REPO / "data/arith/sft_train.jsonl"), "take": 12}
    config = PolicyPairsConfig(policy=str(policy), train=PolicySource(prompts, str(tmp_path / "pairs.jsonl")),
                               num_samples=4, max_new_tokens=4, label="test_policy_pairs:odd_length")
    ensure_policy_pairs(config)
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    samples = (tmp_path / "pairs.samples.jsonl").read_text().splitlines()
    assert len(samples) == 12 * 4 and 0 < len(pairs) <= 12
    assert all(len(p["chosen"]) % 2 == 1 and len(p["rejected"]) % 2 == 0 for p in pairs)
    before = (tmp_path / "pairs.jsonl").stat().st_mtime_ns
    ensure_policy_pairs(config)  # present: not rebuilt
    assert (tmp_path / "pairs.jsonl").stat().st_mtime_ns == before
    (tmp_path / "pairs.jsonl").unlink()
    ensure_policy_pairs(config)  # same policy, seed and data: the same file
    assert [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()] == pairs

    config.label = "exact_match"  # an untrained model never adds correctly: nothing to pair
    config.train.output = str(tmp_path / "none.jsonl")
    with pytest.raises(AlignError, match="both a correct and an incorrect sample"):
        ensure_policy_pairs(config)


def test_reward_ppo_recipe_builds_its_pairs_from_the_ppo_start_policy():
    recipe = load_recipe(REPO / "recipes/tiny/reward-ppo.yaml")
    ppo = load_recipe(REPO / "recipes/tiny/ppo.yaml")
    source = recipe.data.from_policy
    assert source.policy == ppo.model.name_or_path and source.temperature == ppo.stage_args.temperature
    assert recipe.data.train == source.train.output and recipe.data.eval == source.eval.output


@pytest.mark.slow
def test_reward_model_on_policy_pairs_ranks_the_policys_held_out_samples(tmp_path, clean_checkout):
    """recipes/tiny/reward-ppo.yaml: held-out pairs of the start policy's own samples ranked >= 0.8 (the header's
    target; docs/recipe-figures.md has each seed's figure), from near chance (the value head is untrained).

    From a fresh checkout: the start policy is trained and its pairs sampled first; ~20 min on a busy
    2-core CPU (the reward model alone 12-13 min at load 5-6)."""
    from align.planning import run

    recipe = load_recipe(REPO / "recipes/tiny/reward-ppo.yaml",
                         [f"output_dir={tmp_path / 'rm'}", "train.progress_bar=false"])
    metrics = run(recipe)
    assert metrics["eval/pair_accuracy"] >= 0.8, metrics  # seeds 0-2: 0.8937 / 0.8504 / 0.8665
    assert metrics["eval/pair_accuracy_start"] < 0.6, metrics  # seed 1 started at 0.5624 (2026-12-06)
