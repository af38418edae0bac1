"""What a TRL user types works: TRL's names for recipe keys, a budget in epochs, warmup as a ratio."""

import json

import pytest
import yaml

from align.cli import main
from align.engine import lr_factor
from align.errors import AlignError
from align.recipe import load_recipe

from helpers import tiny_sft_recipe

BASE = {"stage": "sft", "output_dir": "runs/x", "data": {"train": "data/arith/sft_train.jsonl"}}


def _load(overrides=(), **extra):
    return load_recipe(None, list(overrides), data={**BASE, **extra})


def test_a_flat_trl_config_is_accepted_with_one_note_per_name(capsys):
    recipe = _load(learning_rate=3e-3, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=7,
                   warmup_ratio=0.1, lr_scheduler_type="linear", max_grad_norm=0.5, logging_steps=5, save_steps=50,
                   eval_steps=20, max_length=64, bf16=True, gradient_checkpointing=True)
    t = recipe.train
    assert (t.lr, t.batch_size, t.grad_accum, t.max_steps, t.warmup_ratio, t.lr_scheduler, t.max_grad_norm,
            t.log_steps, t.save_steps) == (3e-3, 4, 2, 7, 0.1, "linear", 0.5, 5, 50)
    assert recipe.eval.steps == 20 and recipe.data.max_length == 64 and t.mixed_precision == "bf16"
    assert recipe.model.gradient_checkpointing is True
    notes = capsys.readouterr().err.splitlines()
    assert "note: learning_rate is TRL's name; align's is train.lr (accepted)" in notes
    assert "note: bf16 is TRL's name; align's is train.mixed_precision: bf16 (accepted)" in notes
    assert len(notes) == 13


def test_trl_names_inside_their_section_and_in_train(capsys):
    recipe = _load(train={"learning_rate": 1e-3, "num_train_epochs": 2, "seed": 5}, eval={"eval_steps": 9})
    assert (recipe.train.lr, recipe.train.epochs, recipe.seed, recipe.eval.steps) == (1e-3, 2.0, 5, 9)
    assert "note: train.learning_rate is TRL's name; align's is train.lr (accepted)" in capsys.readouterr().err


@pytest.mark.parametrize("stage, extra, key, value", [
    ("dpo", {}, "beta", 0.3),
    ("simpo", {}, "beta", 0.3),
    ("orpo", {}, "lam", 0.3),
    ("grpo", {"num_generations": 4, "max_completion_length": 16}, "beta", 0.3),
    ("ppo", {"max_completion_length": 16}, "kl_coef", 0.3),
])
def test_beta_is_the_stages_own_kl_weight(stage, extra, key, value):
    recipe = _load(stage=stage, beta=0.3, **extra)
    assert getattr(recipe.stage_args, key) == value
    for name, got in extra.items():
        assert getattr(recipe.stage_args, {"num_generations": "num_generations",
                                           "max_completion_length": "max_new_tokens"}[name]) == got
    assert _load(stage="ppo", ppo={"beta": 0.2}).stage_args.kl_coef == 0.2  # in its own section too


@pytest.mark.parametrize("extra, message", [
    ({"train": {"lr": 1e-3, "learning_rate": 1e-4}}, "train.learning_rate and train.lr are both set"),
    ({"learning_rate": 1e-4, "train": {"lr": 1e-3}}, "learning_rate and train.lr are both set"),
    ({"learning_rate": 1e-4, "train": {"learning_rate": 1e-3}}, "learning_rate and train.learning_rate are both set"),
    ({"stage": "dpo", "beta": 0.2, "dpo": {"beta": 0.1}}, "beta and dpo.beta are both set"),
    ({"train": {"lerning_rate": 1e-3}}, "unknown key train.lerning_rate; did you mean train.lr"),
    ({"lerning_rate": 1e-3}, "unknown key lerning_rate; did you mean train.lr"),
    ({"lr": 1e-3}, "unknown key lr; did you mean train.lr?"),
    ({"train": {"per_device_train_batchsize": 4}}, "did you mean train.batch_size (train.per_device_train_batch_size"),
    ({"num_generations": 4}, "num_generations is a setting of stage grpo (grpo.num_generations); this recipe's "
                             "stage is sft"),
])
def test_conflicts_and_misspellings_name_both_names(extra, message):
    with pytest.raises(AlignError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        _load(**extra)


def test_overrides_in_trl_names_win_over_the_recipe(capsys):
    recipe = _load(["learning_rate=0.5", "bf16=false", "train.num_train_epochs=2"], train={"lr": 0.1, "max_steps": 9})
    assert recipe.train.lr == 0.5 and recipe.train.mixed_precision == "no" and recipe.train.epochs == 2.0
    assert "note: learning_rate is TRL's name; align's is train.lr (accepted)" in capsys.readouterr().err
    # an override of one of max_steps / epochs replaces the other from the recipe
    assert _load(["train.max_steps=3"], train={"epochs": 2}).train.epochs is None


@pytest.mark.parametrize("extra, message", [
    ({"train": {"epochs": 1, "max_steps": 10}}, "train.epochs and train.max_steps are both set"),
    ({"train": {"warmup_ratio": 0.1, "warmup_steps": 10}}, "train.warmup_ratio and train.warmup_steps are both set"),
    ({"stage": "grpo", "train": {"epochs": 1}}, "train.epochs: grpo is an online stage"),
    ({"stage": "ppo", "num_train_epochs": 1}, "train.epochs: ppo is an online stage"),
    ({"train": {"epochs": 0}}, "train.epochs > 0"),
    ({"train": {"warmup_ratio": 1.5}}, "train.warmup_ratio <= 1.0"),
])
def test_budget_settings_that_cannot_work(extra, message):
    with pytest.raises(AlignError, match=message):
        _load(**extra)


def test_warmup_ratio_is_a_fraction_of_max_steps_rounded_up():
    t = _load(train={"max_steps": 45, "warmup_ratio": 0.1, "lr_scheduler": "constant"}).train
    assert t.warmup() == 5  # ceil(4.5), as TRL
    assert [round(lr_factor(s, t), 2) for s in (0, 4, 5)] == [0.2, 1.0, 1.0]


def test_epochs_budget_resolves_max_steps_and_the_run_says_where_its_files_are(tmp_path, capsys):
    """64 rows (unpacked), global batch 8 x 2: 1.5 epochs = ceil(96 / 16) = 6 steps. Also: a warmup as long as
    the run is warned about, and the end of `align train` names the model, metrics.json, log.jsonl."""
    out = tmp_path / "run"
    recipe = tiny_sft_recipe(out, **{"data.packing": False, "train.grad_accum": 2, "train.warmup_steps": 6})
    del recipe["train"]["max_steps"]
    recipe["num_train_epochs"] = 1.5
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 0
    captured = capsys.readouterr()
    assert "train.epochs=1.5: 64 training examples / global batch 16" in captured.out
    assert "-> train.max_steps=6" in captured.out
    assert "warning: warmup (6 steps) >= train.max_steps (6)" in captured.out
    assert json.loads((out / "metrics.json").read_text())["train/steps"] == 6
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["max_steps"] == 6
    summary = captured.out[captured.out.index(f"outputs in {out}/:"):]
    for line in (f"model        {out}/", f"metrics      {out / 'metrics.json'}", f"log          {out / 'log.jsonl'}"):
        assert line in summary, summary
    # the same command again: nothing to train (the budget in steps is known once the data is read)
    assert main(["train", str(path)]) == 0
    assert "already trained to step 6" in capsys.readouterr().out
