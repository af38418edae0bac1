"""`align rl` recipes: loading, bad input, and what a run writes."""

import json
from pathlib import Path

import pytest

from align.errors import AlignError
from align.rl import runner

RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("recipes", "rl").glob("*.yaml"))


def test_the_issue_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {"gridworld-q", "frozenlake-vi", "cliffwalking-sarsa", "cartpole-dqn", "cartpole-reinforce",
            "cartpole-a2c", "cartpole-ppo", "pendulum-sac"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads(path):
    cfg = runner.load_config(str(path))
    assert cfg.algo in runner.ALGOS
    assert cfg.output_dir.startswith("runs/rl/")
    assert cfg.total_steps > 0 and cfg.eval_episodes >= 10


@pytest.mark.parametrize("overrides, message", [
    (["algo=ppoo"], "did you mean ppo"),
    (["lrr=0.1"], "did you mean lr"),
    (["env=CartPole-v0"], "did you mean CartPole-v1"),
    (["env=Taxi-v3"], "Taxi-v4"),
    (["lr=0"], "lr > 0"),
    (["num_minibatches=3"], "divisible"),
    (["eval_episodes=5"], "eval_episodes >= 10"),
    (["total_steps=ten"], "expected an integer"),
])
def test_bad_input_is_an_align_error(overrides, message):
    with pytest.raises(AlignError, match=message):
        runner.load_config(str(RECIPES[0].parent / "cartpole-ppo.yaml"), overrides)


def test_missing_algo_and_mismatched_env(tmp_path):
    with pytest.raises(AlignError, match="missing key algo"):
        runner.load_config(None, data={"env": "CartPole-v1"})
    for algo, env in [("sac", "CartPole-v1"), ("ppo", "Pendulum-v1"), ("q_learning", "CartPole-v1"),
                      ("dqn", "FrozenLake-v1")]:
        with pytest.raises(AlignError, match=f"algo {algo}"):
            runner.ALGOS[algo][1](runner.load_config(None, [f"output_dir={tmp_path}"],
                                                     data={"algo": algo, "env": env, "progress": False}))


def test_gridworld_recipe_run_writes_its_outputs(tmp_path):
    out = tmp_path / "gw"
    recipe = str(RECIPES[0].parent / "gridworld-q.yaml")
    metrics = runner.run(recipe, [f"output_dir={out}", "progress=false"])
    assert metrics["eval/return_mean"] == pytest.approx(0.95)  # the seed's optimum
    assert metrics["eval/return_exact"] == pytest.approx(metrics["eval/return_optimal"])
    assert metrics["solve/steps"] is not None and metrics["eval/episodes"] >= 10
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["eval/return_mean"] == pytest.approx(0.95)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records and all("step" in r for r in records)
    assert any("eval/return_mean" in r for r in records)
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "config.json").read_text())["algo"] == "q_learning"
    # same recipe, same seed: the same numbers
    again = runner.run(recipe, [f"output_dir={tmp_path / 'gw2'}", "progress=false"])
    assert _untimed(again) == _untimed(metrics)


def _untimed(metrics):
    return {k: v for k, v in metrics.items() if "seconds" not in k}


def test_dp_recipe_frozenlake_vi(tmp_path):
    metrics = runner.run(str(RECIPES[0].parent / "frozenlake-vi.yaml"), [f"output_dir={tmp_path}", "progress=false"])
    assert metrics["eval/return_exact"] == pytest.approx(metrics["eval/return_optimal"], abs=0.01)
    assert abs(metrics["eval/return_mean"] - metrics["eval/return_exact"]) < 0.05  # 1000 sampled episodes


def test_module_entry_point_reports_bad_input(capsys, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("algo: dqnn\nenv: CartPole-v1\n")
    assert runner.main([str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean dqn" in err[0]
