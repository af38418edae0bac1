"""The flawed-teacher world of recipes/tiny/pipeline.yaml: its data, a short version of every step of the
pipeline (CI: each step moves the way it should, in seconds), and the full targets (slow).

    OMP_NUM_THREADS=1 pytest -m slow tests/test_teacher_world.py
"""

import json

import pytest

from align import task
from align.pipeline import run_pipeline
from align.planning import run
from align.recipe import load_recipe

from helpers import REPO

DATA = REPO / "data/arith"


def _rows(name):
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


def _operands(prompt):
    return tuple(int(x) for x in prompt.rstrip("=").split("+"))


def _habit(a, b):
    return a % 10 + b % 10 >= 10 and max(a % 10, b % 10) >= 7


def test_the_teacher_has_one_systematic_habit_and_the_labels_know_the_truth():
    """Demonstrations: the true sum, or (a units digit 7-9 and a units carry) the sum 10 too small. The teacher
    answers each training problem 5 times, right on a problem of its habit in exactly one of them; its answer
    to a held-out problem is its first. Preference pairs: one per problem, chosen = the truth, rejected = the
    teacher's (first) answer wherever it is wrong. The held-out prompts are the perfect-teacher eval's, and no
    training file holds one."""
    held_out = _rows("sft_eval.jsonl")
    for split, truth_file in (("train", "sft_train.jsonl"), ("eval", "sft_eval.jsonl")):
        demos = _rows("teacher_train.jsonl" if split == "train" else "teacher_eval.jsonl")
        truth = _rows(truth_file)
        rounds = task.TEACHER_ROUNDS if split == "train" else 1
        assert len(demos) == rounds * len(truth)
        passes = [demos[k * len(truth): (k + 1) * len(truth)] for k in range(rounds)]
        for demo_pass in passes:
            assert [d["prompt"] for d in demo_pass] == [t["prompt"] for t in truth]
        for d in demos:
            a, b = _operands(d["prompt"])
            assert d["completion"] == str(a + b) or (int(d["completion"]) == a + b - 10 and _habit(a, b))
        right_in = [sum(p[i]["completion"] == t["completion"] for p in passes) for i, t in enumerate(truth)]
        habit = [_habit(*_operands(t["prompt"])) for t in truth]
        if split == "train":  # right once in 5 on every problem of the habit, always elsewhere
            assert all(n == (1 if h else rounds) for n, h in zip(right_in, habit))
        else:
            assert 0.15 < sum(n for n, h in zip(right_in, habit) if h) / sum(habit) < 0.25
        prefs = _rows(f"teacher_prefs_{split}.jsonl")
        assert [p["prompt"] for p in prefs] == [t["prompt"] for t in truth]  # one pair per problem, same order
        assert all(p["chosen"] == t["completion"] != p["rejected"] for p, t in zip(prefs, truth))
        wrong_first = {d["prompt"]: d["completion"] for d, t in zip(passes[0], truth) if d["completion"] != t["completion"]}
        assert {p["prompt"]: p["rejected"] for p in prefs if p["subset"] == "teacher's habit"} == wrong_first
    accuracy = sum(task.teacher_answer(*_operands(r["prompt"])) == r["completion"] for r in held_out) / len(held_out)
    assert accuracy == 0.6875
    trained = {r["prompt"] for name in ("teacher_train.jsonl", "teacher_prefs_train.jsonl") for r in _rows(name)}
    assert not trained & {r["prompt"] for r in held_out}


# ---------------------------------------------------------------------------
# CI: the shipped pipeline in miniature
# ---------------------------------------------------------------------------
def _one_digit_slices(folder):
    """The shipped files cut to the problems with one-digit operands ("7+8="): 79 training problems a tiny
    model learns in seconds, with the teacher's habit on 16 of them."""
    slices = {}
    for name in ("teacher_train", "teacher_prefs_train", "sft_train", "sft_eval", "teacher_prefs_eval"):
        rows = [r for r in _rows(f"{name}.jsonl") if max(_operands(r["prompt"])) < 10]
        slices[name] = folder / f"{name}.jsonl"
        task.write_jsonl(slices[name], rows)
    return slices


def digits_right(prompts, completions, **_) -> list[float]:
    """Partial credit against the true sum (CI only): the share of its digits in the right place, counted from
    the units; a model that cannot add yet gets a signal exact match does not give it."""
    out = []
    for prompt, completion in zip(prompts, completions):
        truth, text = str(sum(_operands(prompt))), completion.strip()
        hits = sum(x == y for x, y in zip(reversed(truth), reversed(text)))
        out.append(hits / max(len(truth), len(text), 1))
    return out


def _small(steps, batch, **more):
    return [f"train.max_steps={steps}", f"train.batch_size={batch}", *[f"{k}={v}" for k, v in more.items()]]


def _miniature(s, run):
    """Overrides that cut every step of recipes/tiny/pipeline.yaml to seconds on the slices `s`."""
    return ["all.train.progress_bar=false", "all.train.log_steps=1", f"output_dir={run}",
            f"all.data.eval={s['sft_eval']}",
            *[f"sft.{o}" for o in _small(60, 32, **{"train.lr": 3e-3, "train.warmup_steps": 5, "eval.steps": 30,
                                                     "data.train": s["teacher_train"]})],
            *[f"sft-control.{o}" for o in _small(30, 32, **{"train.lr": 3e-3, "eval.steps": 15,
                                                            "data.train": s["teacher_train"]})],
            *[f"dpo.{o}" for o in _small(10, 16, **{"eval.steps": 5, "data.train": s["teacher_prefs_train"],
                                                    "data.eval": s["teacher_prefs_eval"]})],
            *[f"reward.{o}" for o in _small(40, 16, **{"train.lr": 2e-3, "data.train": s["teacher_prefs_train"],
                                                       "data.eval": s["teacher_prefs_eval"]})],
            f"rm-eval.data={s['teacher_prefs_eval']}",
            *[f"ppo.{o}" for o in _small(8, 16, **{"train.lr": 1e-4, "eval.steps": 4, "ppo.eval_kl_prompts": 16,
                                                   "data.train": s["sft_train"]})],
            *[f"grpo.{o}" for o in _small(10, 64, **{"train.lr": 1e-4, "eval.steps": 5, "grpo.eval_kl_prompts": 16,
                                                    "data.train": s["sft_train"],
                                                    "grpo.reward_funcs": "[test_teacher_world:digits_right]"})]]


def test_every_step_of_the_pipeline_learns_in_miniature(tmp_path):
    """recipes/tiny/pipeline.yaml as shipped, every step cut to a few seconds on the one-digit problems: SFT and
    the control lower their loss, DPO ranks held-out truth-labelled pairs better than at its start and the
    reward model separates them (held-out loss and margin), PPO raises its reward-model score and GRPO its
    verifier's reward; the report compares every step with the control. A model this short cannot add yet, so exact match would give GRPO no signal: here
    its verifier gives partial credit per right digit (`digits_right`)."""
    s = _one_digit_slices(tmp_path / "data")
    run = tmp_path / "run"
    over = _miniature(s, run)
    run_pipeline(REPO / "recipes/tiny/pipeline.yaml", over)
    tmp_path = run

    def log(step, key):
        return [r[key] for r in map(json.loads, (tmp_path / step / "log.jsonl").read_text().splitlines()) if key in r]

    def metrics(step):
        return json.loads((tmp_path / step / "metrics.json").read_text())

    sft = metrics("sft")
    assert sft["eval/loss"] < sft["eval/loss_start"] - 1.0, sft  # held-out NLL of the true sums
    losses = log("sft-control", "train/loss")
    assert sum(losses[-5:]) < sum(losses[:5]), losses
    dpo, reward = metrics("dpo"), metrics("reward")  # truth-labelled held-out pairs (18 of them here)
    assert dpo["eval/pair_accuracy"] > dpo["eval/pair_accuracy_start"], dpo  # from all ties (policy = reference)
    # the reward model starts from a random score head, whose ranking of 18 pairs is luck (0.83 once): its held-out
    # Bradley-Terry loss and mean margin say whether it learned (measured 0.69 -> 0.52 and 0.003 -> 2.4)
    assert reward["eval/loss"] < reward["eval/loss_start"] - 0.1, reward
    assert reward["eval/rewards/margins"] > reward["eval/rewards/margins_start"] + 1.0, reward
    assert metrics("ppo")["eval/reward"] > metrics("ppo")["eval/reward_start"], metrics("ppo")  # RM score, held out
    rewards = log("grpo", "train/reward")  # measured 0.06 0.05 0.10 0.10 0.14 0.06 0.16 0.15 0.17 0.09
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.03, rewards
    report = (tmp_path / "report.md").read_text()
    assert "accuracy_vs_steps.png" in report and "| vs sft-control |" in report


# ---------------------------------------------------------------------------
# slow: the full targets
# ---------------------------------------------------------------------------
@pytest.mark.slow
def test_sft_on_the_teachers_demonstrations_plateaus_below_one(tmp_path):
    """recipes/tiny/teacher-sft.yaml as shipped (1,500 steps) and three times as long: held-out accuracy stays in
    [0.55, 0.75] (the habit is learned, not averaged away), the longer run ends at imitation's ceiling (the share
    of held-out problems the habit does not touch, 0.6075) and not past it, and it is no better than the
    shipped run but for noise (one point)."""
    held_out = [_operands(r["prompt"]) for r in _rows("sft_eval.jsonl")]
    ceiling = sum(not _habit(a, b) for a, b in held_out) / len(held_out)
    accuracy = {}
    for steps in (1500, 4500):
        recipe = load_recipe(REPO / "recipes/tiny/teacher-sft.yaml", [f"output_dir={tmp_path / str(steps)}",
                                                                      f"train.max_steps={steps}",
                                                                      "train.progress_bar=false"])
        accuracy[steps] = run(recipe)["eval/task_accuracy"]
    assert all(0.55 <= a <= 0.75 for a in accuracy.values()), accuracy
    assert accuracy[4500] <= ceiling + 0.005, (accuracy, ceiling)  # measured 0.607 (ceiling 0.6075)
    assert accuracy[4500] < accuracy[1500] + 0.01, accuracy  # measured 0.6045 -> 0.607 (seed 0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pipeline_beats_its_sft_control(tmp_path, seed):
    """`align pipeline recipes/tiny/pipeline.yaml seed=N`: held-out task accuracy against the sft-control step of
    the same run: DPO +10 points, PPO +10 (eval KL under 1 nat), GRPO +15; the control had at least as many
    optimizer steps and as much wall time as every alignment step."""
    run_pipeline(REPO / "recipes/tiny/pipeline.yaml", [f"seed={seed}", f"output_dir={tmp_path}",
                                                       "all.train.progress_bar=false"])

    def metrics(step):
        return json.loads((tmp_path / step / "metrics.json").read_text())

    control = metrics("sft-control")
    state = json.loads((tmp_path / "pipeline_state.json").read_text())
    for step, points in (("dpo", 0.10), ("ppo", 0.10), ("grpo", 0.15)):
        m = metrics(step)
        assert m["eval/task_accuracy"] >= control["eval/task_accuracy"] + points, (step, m, control)
        assert control["train/steps"] >= m["train/steps"], step
        assert state["sft-control"]["seconds"] >= state[step]["seconds"], (step, state)
    assert metrics("ppo")["eval/kl"] < 1.0, metrics("ppo")


# ---------------------------------------------------------------------------
# online DPO (recipes/tiny/teacher-online-dpo.yaml), beside the pipeline
# ---------------------------------------------------------------------------
def test_online_dpo_raises_its_verifier_reward_in_miniature(tmp_path):
    """recipes/tiny/teacher-online-dpo.yaml as shipped, cut to seconds on the one-digit slices, from a 60-step SFT
    start that cannot add yet: the verifier gives partial credit per right digit (`digits_right`); the sampled
    answers' credit goes up and the greedy answers' held-out credit does not fall."""
    s = _one_digit_slices(tmp_path / "data")
    common = ["train.progress_bar=false", "train.log_steps=1", f"data.eval={s['sft_eval']}"]
    run(load_recipe(REPO / "recipes/tiny/teacher-sft.yaml", [
        f"output_dir={tmp_path / 'sft'}", *common, f"data.train={s['teacher_train']}",
        *_small(60, 32, **{"train.lr": 3e-3, "train.warmup_steps": 5, "eval.steps": 60})]))
    metrics = run(load_recipe(REPO / "recipes/tiny/teacher-online-dpo.yaml", [
        f"output_dir={tmp_path / 'online-dpo'}", f"model.name_or_path={tmp_path / 'sft'}", *common,
        f"data.train={s['sft_train']}", "online_dpo.reward_funcs=[test_teacher_world:digits_right]",
        "online_dpo.eval_kl_prompts=16", "online_dpo.accuracy=test_teacher_world:digits_right",
        *_small(20, 32, **{"train.lr": 3e-4, "eval.steps": 20})]))
    rewards = [r["train/reward"] for r in map(json.loads, (tmp_path / "online-dpo" / "log.jsonl").read_text().splitlines())
               if "train/reward" in r]  # 64 samples a step; measured 0.09 0.09 0.10 0.09 ... 0.13 0.22 0.16
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.03, rewards
    # held out: the greedy answers' credit on the 18 one-digit problems (steps of ~0.03) must not fall
    assert metrics["eval/task_accuracy"] >= metrics["eval/task_accuracy_start"], metrics


@pytest.fixture(scope="module")
def teacher_start(tmp_path_factory):
    """seed -> (folder of recipes/tiny/teacher-sft.yaml's model, metrics of recipes/tiny/teacher-sft-control.yaml
    from it), each trained once per seed from a clean folder and shared by the methods compared with the control."""
    done = {}

    def start(seed):
        if seed not in done:
            root = tmp_path_factory.mktemp(f"teacher-seed{seed}")
            control = run(load_recipe(REPO / "recipes/tiny/teacher-sft-control.yaml", [
                f"output_dir={root / 'control'}", f"seed={seed}", f"model.name_or_path={root / 'teacher-sft'}",
                "train.progress_bar=false"]))  # trains its start (model.from_recipe) first
            done[seed] = (root / "teacher-sft", control)
        return done[seed]

    return start


def _against_the_control(tmp_path, teacher_start, recipe, seed):
    """`align train recipes/tiny/RECIPE.yaml seed=N` from the seed's teacher-SFT model: (its metrics, the control's)."""
    start, control = teacher_start(seed)
    metrics = run(load_recipe(REPO / f"recipes/tiny/{recipe}.yaml", [
        f"output_dir={tmp_path / recipe}", f"seed={seed}", f"model.name_or_path={start}", "train.progress_bar=false"]))
    return metrics, control


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_online_dpo_beats_the_sft_control(tmp_path, teacher_start, seed):
    """`align train recipes/tiny/teacher-online-dpo.yaml seed=N` (its teacher-SFT start trained first) against
    recipes/tiny/teacher-sft-control.yaml from the same start: held-out accuracy +15 points at least (measured
    +38.4 / +27.5 / +37.6 for seeds 0 / 1 / 2: docs/recipe-figures.md), eval KL under 1 nat (0.57 / 0.78 / 0.68), in
    fewer optimizer steps than the control."""
    online, control = _against_the_control(tmp_path, teacher_start, "teacher-online-dpo", seed)
    assert online["eval/task_accuracy"] >= control["eval/task_accuracy"] + 0.15, (online, control)
    assert online["eval/kl"] < 1.0, online
    assert control["train/steps"] >= online["train/steps"]


# ---------------------------------------------------------------------------
# KTO, RLOO, REINFORCE++ and GSPO (recipes/tiny/teacher-{kto,rloo,reinforce-pp,gspo}.yaml), beside online DPO
# ---------------------------------------------------------------------------
GAINS = {"teacher-kto": 0.15, "teacher-rloo": 0.15, "teacher-reinforce-pp": 0.15, "teacher-gspo": 0.15}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(GAINS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kto_rloo_reinforce_pp_and_gspo_beat_the_sft_control(tmp_path, teacher_start, recipe, seed):
    """Each recipe from the seed's teacher-SFT model against recipes/tiny/teacher-sft-control.yaml from the same
    start: held-out accuracy GAINS[recipe] above the control, in fewer optimizer steps; the GRPO settings' eval KL
    (sampled held-out completions, to the start) under 1 nat. Measured for seeds 0 / 1 / 2 (each recipe's header,
    docs/recipe-figures.md): KTO +38.3 / +30.2 / +37.6 points, RLOO +35.5 / +29.0 / +37.5, REINFORCE++ +36.5 / +28.9
    / +37.8, GSPO +34.5 / +26.4 / +35.8; eval KL at most 0.77. One seed's start and control are trained once for
    all four (`teacher_start`)."""
    metrics, control = _against_the_control(tmp_path, teacher_start, recipe, seed)
    assert metrics["eval/task_accuracy"] >= control["eval/task_accuracy"] + GAINS[recipe], (metrics, control)
    assert control["train/steps"] >= metrics["train/steps"]
    if recipe != "teacher-kto":  # KTO's eval/kl is its reference point z_0, not a sampled KL
        assert metrics["eval/kl"] < 1.0, metrics
