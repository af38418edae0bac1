"""Recipe loading: strict keys, types and ranges, overrides, and every shipped recipe validates."""

import pathlib

import pytest

from align.config import apply_overrides
from align.errors import AlignError
from align.recipe import load_recipe

REPO = pathlib.Path(__file__).resolve().parents[1]
BASE = {"stage": "sft", "output_dir": "runs/x", "data": {"train": "data/arith/sft_train.jsonl"}}


def _load(**extra):
    data = {**BASE, **extra}
    return load_recipe(None, data=data)


def test_defaults_and_overrides():
    recipe = load_recipe(None, ["train.max_steps=7", "train.lr=0.5", "model.lora.target_modules=[q_proj,v_proj]"],
                         data=BASE)
    assert recipe.train.max_steps == 7
    assert recipe.train.lr == 0.5
    assert recipe.model.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.train.batch_size == 8  # the schema's default
    # PyYAML reads 1e-3 (no dot) as a string; a float field still takes it
    assert load_recipe(None, ["train.lr=1e-3"], data=BASE).train.lr == 1e-3
    # and an unquoted `no` (YAML 1.1: false) still means the word where a choice is "no"
    assert load_recipe(None, ["train.mixed_precision=no"], data=BASE).train.mixed_precision == "no"


@pytest.mark.parametrize("key, value, message", [
    ("train", {"lrr": 1e-3}, "did you mean train.lr"),
    ("trian", {"lr": 1e-3}, "did you mean train"),
    ("train", {"lr": 0}, "train.lr > 0"),
    ("train", {"lr": -1.0}, "train.lr > 0"),
    ("train", {"batch_size": 0}, "train.batch_size > 0"),
    ("train", {"max_steps": "ten"}, "expected an integer"),
    ("train", {"lr_scheduler": "cosin"}, "did you mean cosine"),
    ("model", {"lora": {"r": 0}}, "lora rank r > 0"),
    ("data", {"max_length": 1.5}, "expected an integer"),
])
def test_bad_values_fail_before_any_work(key, value, message):
    with pytest.raises(AlignError, match=message):
        _load(**{key: value})


def test_unknown_stage_and_missing_required_keys():
    with pytest.raises(AlignError, match="did you mean sft"):
        load_recipe(None, data={**BASE, "stage": "stf"})
    with pytest.raises(AlignError, match="output_dir: required"):
        load_recipe(None, data={"stage": "sft", "data": {"train": "x.jsonl"}})
    with pytest.raises(AlignError, match="data.train: required"):
        load_recipe(None, data={"stage": "sft", "output_dir": "x"})


def test_bad_override_syntax():
    with pytest.raises(AlignError, match="expected key.path=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(AlignError, match="not a section"):
        apply_overrides({"train": 3}, ["train.lr=1"])


def test_every_shipped_llm_recipe_validates():
    recipes = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "rl" not in p.relative_to(REPO / "recipes").parts[:1])
    assert recipes, "no recipes found"
    for path in recipes:
        if path.name == "pipeline.yaml":
            continue  # pipelines have their own schema
        recipe = load_recipe(path)
        assert recipe.stage and recipe.output_dir, path


def test_grpo_needs_two_completions_a_group():
    """One completion a group has no baseline: zero advantage, or NaN under scale_rewards: group."""
    with pytest.raises(AlignError, match=r"grpo.num_generations >= 2"):
        load_recipe(None, ["stage=grpo", "output_dir=x", "grpo.num_generations=1"])
    ok = load_recipe(None, ["stage=grpo", "output_dir=x", "data.train=p.jsonl", "grpo.num_generations=2"])
    assert ok.stage_args.num_generations == 2
