"""The planning layer: a recipe resolved into the steps that make its inputs, every input of every step checked
before any of them runs (one line, exit 2, nothing written), and no import cycle in align/."""

from __future__ import annotations

import ast
import json
import pathlib

import pytest

from align.cli import main
from align.errors import AlignError
from align.planning import PairsStep, TrainStep, check_plan, plan, run
from align.recipe import load_recipe

from helpers import REPO


def _dpo(tmp_path, *overrides):
    """recipes/tiny/dpo.yaml starting from a folder that recipes/tiny/sft-short.yaml would make."""
    return load_recipe(REPO / "recipes/tiny/dpo.yaml", [f"output_dir={tmp_path / 'dpo'}",
                                                        f"model.name_or_path={tmp_path / 'sft'}", *overrides])


def test_a_missing_upstream_model_is_planned_before_the_recipe(tmp_path):
    steps = plan(_dpo(tmp_path))
    assert [type(s) for s in steps] == [TrainStep, TrainStep]
    assert steps[0].upstream and steps[0].recipe.output_dir == str(tmp_path / "sft")
    assert "model.from_recipe" in steps[0].why and "sft-short.yaml" in steps[0].why
    assert not steps[1].upstream and steps[1].recipe.stage == "dpo"
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "config.json").write_text("{}")
    assert [s.recipe.stage for s in plan(_dpo(tmp_path))] == ["dpo"]  # made already: nothing upstream


def test_bad_data_of_the_last_step_stops_before_the_upstream_model_trains(tmp_path):
    with pytest.raises(AlignError, match=r"^data.train: file .*missing.jsonl not found"):
        run(_dpo(tmp_path, f"data.train={tmp_path / 'missing.jsonl'}"))
    assert not (tmp_path / "sft").exists() and not (tmp_path / "dpo").exists()


def test_wrong_columns_are_found_before_anything_trains(tmp_path):
    sft_rows = tmp_path / "sft.jsonl"
    sft_rows.write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n")
    with pytest.raises(AlignError, match=r"sft.jsonl row 1: missing columns 'chosen', 'rejected'"):
        run(_dpo(tmp_path, f"data.train={sft_rows}"))
    assert not (tmp_path / "sft").exists()


def test_bad_input_of_an_upstream_recipe_names_it(tmp_path):
    upstream = tmp_path / "upstream.yaml"
    upstream.write_text(f"stage: sft\noutput_dir: unused\ndata: {{train: {tmp_path / 'gone.jsonl'}}}\n")
    with pytest.raises(AlignError, match=r"model.from_recipe of .*upstream.yaml.*: data.train: file .*gone.jsonl"):
        run(_dpo(tmp_path, f"model.from_recipe={upstream}"))


def test_an_output_dir_that_is_a_file_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "taken").write_text("not a folder")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"stage: sft\noutput_dir: {tmp_path / 'taken'}\ndata: {{train: "
                      f"{REPO / 'data/arith/sft_train.jsonl'}}}\n")
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "output_dir:" in err and "is a file; expected a folder" in err and "Traceback" not in err


def test_policy_pairs_are_planned_after_their_policy(tmp_path):
    recipe = load_recipe(REPO / "recipes/tiny/reward-ppo.yaml", [
        f"output_dir={tmp_path / 'rm'}", f"model.name_or_path={tmp_path / 'sft'}",
        f"data.from_policy.policy={tmp_path / 'sft'}",
        f"data.from_policy.train.output={tmp_path / 'pairs/train.jsonl'}",
        f"data.from_policy.eval.output={tmp_path / 'pairs/eval.jsonl'}",
        f"data.train={tmp_path / 'pairs/train.jsonl'}", f"data.eval={tmp_path / 'pairs/eval.jsonl'}"])
    steps = plan(recipe)
    assert [type(s).__name__ for s in steps] == ["TrainStep", "PairsStep", "TrainStep"]
    assert steps[0].recipe.output_dir == str(tmp_path / "sft")
    check_plan(steps)  # the pairs files do not exist yet: an earlier step writes them, so they are not checked
    assert isinstance(steps[1], PairsStep)


def test_align_has_no_import_cycle():
    """Every `from align... import` in align/ (inside functions too) forms an acyclic graph: the schema
    (recipe.py) imports no runtime module, the engine does not orchestrate."""
    graph = {}
    for path in (REPO / "align").rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).replace(".__init__", "")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("align"):
                for alias in node.names:  # `from align import models` names the module align.models
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if (REPO / pathlib.Path(*full.split("."))).with_suffix(".py").is_file()
                             else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("align"))
        graph[name] = deps - {name}
    state = {}

    def visit(module, trail):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", "import cycle: " + " -> ".join(trail + [module])
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            if dep in graph:
                visit(dep, trail + [module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])
    schema = ("align.config", "align.errors", "align.stages", "align.stage_settings", "align.trl_names")
    assert not {d for d in graph["align.recipe"] if d not in schema}


def test_seed_reaches_the_upstream_recipes(tmp_path):
    steps = plan(_dpo(tmp_path, "seed=3"))
    assert [s.recipe.seed for s in steps] == [3, 3]


def test_an_upstream_folder_made_with_other_settings_is_reused_with_a_warning(tmp_path, capsys):
    import yaml

    from align.recipe import recipe_to_dict

    def make_sft(*overrides):
        made = load_recipe(REPO / "recipes/tiny/sft-short.yaml", [f"output_dir={tmp_path / 'sft'}", *overrides])
        (tmp_path / "sft").mkdir(exist_ok=True)
        (tmp_path / "sft" / "config.json").write_text("{}")
        (tmp_path / "sft" / "config.yaml").write_text(yaml.safe_dump(recipe_to_dict(made)))

    make_sft()
    assert [s.recipe.stage for s in plan(_dpo(tmp_path))] == ["dpo"]
    assert "warning" not in capsys.readouterr().out  # made by the recipe as it is: silent
    make_sft("train.max_steps=7")
    assert [s.recipe.stage for s in plan(_dpo(tmp_path, "seed=2"))] == ["dpo"]  # reused, not retrained
    out = capsys.readouterr().out
    assert f"warning: {tmp_path / 'sft'}" in out and "seed: 0 -> 2" in out and "train.max_steps: 7 -> 1000" in out


def test_reading_a_recipe_imports_no_runtime_module():
    """The schema (recipe, config, the stages' settings) is read and validated without importing models, data,
    stages or torch (checked in a fresh interpreter)."""
    import subprocess
    import sys

    recipes = sorted(str(p) for p in (REPO / "recipes/tiny").glob("*.yaml") if p.stem != "pipeline")
    code = ("import sys; from align.recipe import load_recipe; "
            f"[load_recipe(path) for path in {recipes!r}]; "
            "print(sorted(m for m in sys.modules if m.startswith('align') or m == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert eval(out) == ["align", "align.config", "align.errors", "align.recipe", "align.stage_settings",
                         "align.stages", "align.trl_names"]


def test_a_clean_checkout_plans_every_upstream_recipe(clean_checkout):
    """What the slow recipe tests rely on: from a folder with no runs/, the tiny PPO recipe plans its SFT start,
    the policy-sample pairs and their reward model before PPO itself, all under that folder."""
    steps = plan(load_recipe("recipes/tiny/ppo.yaml", [f"output_dir={clean_checkout / 'ppo'}"]))
    kinds = [(type(s).__name__, getattr(s, "recipe", None) and s.recipe.stage) for s in steps]
    assert kinds == [("TrainStep", "sft"), ("PairsStep", None), ("TrainStep", "reward"), ("TrainStep", "ppo")]
    assert not (clean_checkout / "runs").exists()
