"""One source for the tiny recipes' figures: the README's stage table, docs/recipe-figures.md and each recipe
header quote docs/recipe-figures.json, the output of bench/recipe_figures.py (which rewrites all three)."""

import importlib.util
import json

import pytest

from helpers import REPO


@pytest.fixture(scope="module")
def figures():
    spec = importlib.util.spec_from_file_location("recipe_figures", REPO / "bench" / "recipe_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def results(figures):
    return json.loads(figures.OUT_JSON.read_text())


def test_every_recipe_has_seeds_0_1_2_without_failures_or_is_pending(figures, results):
    """A recipe is measured for seeds 0, 1, 2, or declared pending (with why) and then has no figures at all:
    no figure of an older version of a recipe or of its upstream is quoted."""
    for recipe in figures.HEADLINE:
        runs = figures.seed_runs(results, recipe)
        if recipe in figures.PENDING:
            assert runs == [], recipe
            continue
        assert [r["seed"] for r in runs] == [0, 1, 2], recipe
        assert not [r for r in runs if "error" in r], recipe


def test_the_readme_stage_table_quotes_the_json(figures, results):
    rows = {}
    for line in (REPO / "README.md").read_text().splitlines():
        row = figures.README_ROW.match(line)
        if row:
            rows[row["recipe"]] = line.split(" | ")[-1].removesuffix(" |")
    assert set(rows) >= set(figures.README_CELLS)
    for name in figures.README_CELLS:
        assert rows[name] == figures.readme_cell(results, name), name
    readme = (REPO / "README.md").read_text()
    assert figures.replace_between(readme, figures.PIPELINE_TABLE, figures.pipeline_table(results)) == readme


def test_each_recipe_header_and_the_table_quote_the_json(figures, results):
    for recipe in figures.HEADLINE:
        text = (REPO / "recipes" / "tiny" / f"{recipe}.yaml").read_text()
        assert text.startswith(figures.header_block(results, recipe)), recipe
    assert figures.OUT_MD.read_text() == figures.table(results)


def test_figures_render_starts_ends_gains_and_the_least_seed(figures):
    def run(seed, start, end):
        return {"recipe": "dpo", "seed": seed, "metrics": {"eval/task_accuracy": end,
                                                           "eval/task_accuracy_start": start}}

    results = [run(1, 0.5, 0.62), run(0, 0.6, 0.75)]
    assert figures.figure(results, "dpo", "eval/task_accuracy", "gain") == \
        "+15.0 / +12.0 points (min +12.0; 0.6 -> 0.75 / 0.5 -> 0.62)"
    assert figures.figure(results, "dpo", "eval/task_accuracy", "span") == "0.6 -> 0.75 / 0.5 -> 0.62 (min 0.62)"
    assert figures.figure(results, "dpo", "eval/task_accuracy", "after") == "0.75 / 0.62 (min 0.62)"
    same_start = [run(0, 0.0, 0.9), run(1, 0.0, 0.8)]
    assert figures.figure(same_start, "dpo", "eval/task_accuracy", "span") == "0 -> 0.9 / 0.8 (min 0.8)"


def test_distillation_figures_compare_each_seed_with_its_own_teacher_and_control(figures):
    def run(recipe, seed, start, end):
        return {"recipe": recipe, "seed": seed, "metrics": {"eval/task_accuracy": end,
                                                            "eval/task_accuracy_start": start}}

    results = [run("sft", 0, 0.0, 0.98), run("sft", 1, 0.0, 0.90),
               run("gkd", 0, 0.68, 0.83), run("gkd", 1, 0.60, 0.80),
               run("distill-sft", 0, 0.68, 0.86), run("distill-sft", 1, 0.60, 0.75)]
    assert figures.figure(results, "gkd", "eval/task_accuracy", "over") == "-3.0 / +5.0 points (min -3.0)"
    # (0.83 - 0.68) / (0.98 - 0.68) = 50%; (0.80 - 0.60) / (0.90 - 0.60) = 67%
    assert figures.figure(results, "gkd", "eval/task_accuracy", "closed") == "50% / 67% (min 50%)"
    assert figures.figure(results, "distill-sft", "eval/task_accuracy", "closed") == "60% / 50% (min 50%)"


def test_the_pipeline_table_gives_each_method_against_the_control_of_its_own_seed(figures):
    def run(recipe, seed, end, **more):
        return {"recipe": recipe, "seed": seed, "date": "2026-12-06", "load": "1.0, 1.0, 1.0",
                "metrics": {"eval/task_accuracy": end, **more}}

    results = [run("teacher-sft", 0, 0.61), run("teacher-sft", 1, 0.60),
               run("teacher-sft-control", 0, 0.62), run("teacher-sft-control", 1, 0.58)]
    for k, (name, _) in enumerate([(n, label) for label, n in figures.PIPELINE_COLUMNS + figures.BESIDE_PIPELINE]):
        results += [run(name, 0, 0.90 - k / 100, **{"eval/kl": 0.5}), run(name, 1, 0.80, **{"eval/kl": 0.25})]
    text = figures.pipeline_table(results)
    rows = text.splitlines()
    assert rows[2] == "| 0 | 0.61 | 0.62 | 0.9 (+28.0) | 0.89 (+27.0) | 0.88 (+26.0) | 0.50 |"
    assert rows[3] == "| 1 | 0.6 | 0.58 | 0.8 (+22.0) | 0.8 (+22.0) | 0.8 (+22.0) | 0.25 |"
    assert rows[4] == "| mean / min of the gain | | | +25.0 / +22.0 | +24.5 / +22.0 | +24.0 / +22.0 | max 0.50 |"
    assert "online DPO (`teacher-online-dpo.yaml`) +25.0 / +22.0" in " ".join(text.split())
    # a seed that lacks one of the runs is left out rather than compared with another seed's control
    partial = [r for r in results if not (r["recipe"] == "teacher-grpo" and r["seed"] == 1)]
    assert "| 1 |" not in figures.pipeline_table(partial)


def test_a_teacher_world_run_is_compared_with_the_control_of_its_own_seed(figures):
    def run(recipe, seed, end):
        return {"recipe": recipe, "seed": seed, "metrics": {"eval/task_accuracy": end}}

    results = [run("teacher-sft-control", 0, 0.62), run("teacher-sft-control", 1, 0.60),
               run("teacher-kto", 1, 0.90), run("teacher-kto", 0, 0.95)]
    assert figures.figure(results, "teacher-kto", "eval/task_accuracy", "over") == "+33.0 / +30.0 points (min +30.0)"
