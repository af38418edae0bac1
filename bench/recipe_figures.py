"""The figures the README's stage table and the tiny recipes' headers state, measured from a clean folder.

    OMP_NUM_THREADS=1 python bench/recipe_figures.py --seeds 0 1 2 [--recipes sft reward ...] [--jobs 2]

Each seed runs in a fresh folder that looks like a new clone (recipes/ and data/ of this repository
linked, no runs/): the recipes one after another, each as a user types it, `align train
recipes/tiny/<recipe>.yaml seed=N`, in upstream-first order, so each recipe's upstream models
(model.from_recipe, ppo.reward_model_recipe, data.from_policy) are the ones its upstream recipe made in that
folder with the same seed (the planning layer passes it down; a recipe asked for alone trains them first).
Seeds run in parallel, `--jobs` at a time. The results go to `docs/recipe-figures.json` (every metric of every run) and
`docs/recipe-figures.md` (the table: per recipe the headline metric before -> after for each seed, mean and
min, with the date, the machine's load and each run's wall time), merged with earlier results for other
(recipe, seed) cells. The README's stage table (its "measured" cells) and each recipe header's first paragraph
are then rewritten from docs/recipe-figures.json (`--quote-only` rewrites them without running anything);
tests/test_recipe_figures.py checks that they match it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT_JSON = REPO / "docs" / "recipe-figures.json"
OUT_MD = REPO / "docs" / "recipe-figures.md"
README = REPO / "README.md"
# Recipes the JSON holds no figures for, with why: the table, the README and the header say so instead of
# quoting figures of an older version (tests/test_recipe_figures.py checks the JSON has none for them).
PENDING: dict[str, str] = {}
TASK, PAIR, KL, STEPS, JSD = "eval/task_accuracy", "eval/pair_accuracy", "eval/kl", "train/steps", "eval/jsd"

# recipe -> the metric its header and the README quote, upstream recipes before the ones that start from them
HEADLINE = {
    "sft": "eval/task_accuracy", "reward": "eval/pair_accuracy",
    "sft-short": "eval/task_accuracy", "dpo": "eval/task_accuracy", "ipo": "eval/pair_accuracy",
    "simpo": "eval/task_accuracy", "orpo": "eval/task_accuracy",
    "sft-grpo-start": "eval/task_accuracy", "grpo": "eval/task_accuracy", "reward-ppo": "eval/pair_accuracy",
    "ppo": "eval/task_accuracy",
    "micro-sft-start": "eval/task_accuracy", "gkd": "eval/task_accuracy", "distill-sft": "eval/task_accuracy",
    # the flawed-teacher world (recipes/tiny/pipeline.yaml's steps and the methods beside it)
    "teacher-sft": "eval/task_accuracy", "teacher-sft-control": "eval/task_accuracy",
    "teacher-dpo": "eval/task_accuracy", "teacher-reward": "eval/pair_accuracy", "teacher-ppo": "eval/task_accuracy",
    "teacher-grpo": "eval/task_accuracy", "teacher-online-dpo": "eval/task_accuracy",
    "teacher-kto": "eval/task_accuracy", "teacher-rloo": "eval/task_accuracy",
    "teacher-reinforce-pp": "eval/task_accuracy", "teacher-gspo": "eval/task_accuracy",
}
# The SFT control a run is compared with ("over": points over the control of the same seed, trained in the same
# folder from the same start) and, for distillation, the teacher ("closed": the share of the start's gap to the
# teacher's accuracy that the run closed).
TEACHER = {"gkd": "sft", "distill-sft": "sft"}
# The README's pipeline table: per seed, the start, the control and each alignment step of recipes/tiny/pipeline.yaml
# (each step's recipe run alone with the same seed trains the same model: the pipeline passes the seed and the
# upstream models the same way), then the methods beside it against the same control.
PIPELINE_COLUMNS = [("DPO + NLL", "teacher-dpo"), ("PPO", "teacher-ppo"), ("GRPO", "teacher-grpo")]
BESIDE_PIPELINE = [("online DPO", "teacher-online-dpo"), ("KTO", "teacher-kto"), ("RLOO", "teacher-rloo"),
                   ("REINFORCE++", "teacher-reinforce-pp"), ("GSPO", "teacher-gspo")]
TEACHER_WORLD = [name for _, name in PIPELINE_COLUMNS + BESIDE_PIPELINE]
CONTROL = {"gkd": "distill-sft", **{name: "teacher-sft-control" for name in TEACHER_WORLD}}


def run_seed(recipes: list[str], seed: int) -> list[dict]:
    """The recipes, in order, in one fresh folder with `seed=<seed>` -> each one's metrics.json and wall time."""
    results = []
    with tempfile.TemporaryDirectory(prefix=f"figures-seed{seed}-") as tmp:
        checkout = Path(tmp) / "checkout"
        checkout.mkdir()
        for name in ("recipes", "data"):
            (checkout / name).symlink_to(REPO / name)
        (Path(tmp) / "shared").symlink_to(REPO.parent / "shared")
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        for recipe in recipes:
            cmd = [sys.executable, "-m", "align", "train", f"recipes/tiny/{recipe}.yaml", f"seed={seed}",
                   "train.progress_bar=false"]
            started = time.perf_counter()
            proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
            seconds = round(time.perf_counter() - started, 1)
            if proc.returncode != 0:
                results.append({"recipe": recipe, "seed": seed, "seconds": seconds, "date": WHEN, "load": LOAD,
                                "error": proc.stderr.strip().splitlines()[-1:]})
                save(results[-1:])
                continue
            metrics = json.loads((checkout / "runs" / "tiny" / recipe / "metrics.json").read_text())
            results.append({"recipe": recipe, "seed": seed, "metrics": metrics, "seconds": seconds,
                            "date": WHEN, "load": LOAD})
            save(results[-1:])
            print(f"seed {seed} {recipe}: {HEADLINE[recipe]} {metrics.get(HEADLINE[recipe] + '_start')} -> "
                  f"{metrics[HEADLINE[recipe]]} ({seconds:.0f} s)", flush=True)
    return results


_SAVING = threading.Lock()
WHEN = datetime.date.today().isoformat()
LOAD = ", ".join(f"{x:.1f}" for x in os.getloadavg())


def save(new: list[dict]) -> None:
    """Merge results into docs/recipe-figures.json (replacing the same (recipe, seed)) and rewrite the table."""
    with _SAVING:
        old = json.loads(OUT_JSON.read_text()) if OUT_JSON.is_file() else []
        done = {(r["recipe"], r["seed"]) for r in new}
        results = [r for r in old if (r["recipe"], r["seed"]) not in done] + new
        OUT_JSON.write_text(json.dumps(results, indent=1) + "\n")
        OUT_MD.write_text(table(results))


def table(results: list[dict]) -> str:
    lines = ["# Tiny recipe figures\n\nMeasured by `bench/recipe_figures.py` (each run from a clean folder, upstream "
             "recipes trained first with the same seed); the last column gives each recipe's run date(s) and the "
             "machine's load average (1, 5, 15 min) when its seeds started.\n",
             "| recipe | metric | seed: before -> after (wall) | mean after | min after | measured (load) |",
             "|---|---|---|---|---|---|"]
    for recipe in HEADLINE:
        runs = seed_runs(results, recipe)
        if recipe in PENDING:
            lines.append(f"| {recipe} | {HEADLINE[recipe]} | {PENDING[recipe]} | — | — | — |")
        if not runs:
            continue
        key = HEADLINE[recipe]
        cells, after = [], []
        for r in runs:
            if "error" in r:
                cells.append(f"{r['seed']}: failed ({' '.join(r['error'])})")
                continue
            m = r["metrics"]
            after.append(m[key])
            cells.append(f"{r['seed']}: {m.get(key + '_start', float('nan')):.4g} -> {m[key]:.4g} ({r['seconds']:.0f} s)")
        mean = f"{statistics.mean(after):.4g}" if after else "—"
        least = f"{min(after):.4g}" if after else "—"
        when = "; ".join(sorted({f"{r['date']} ({r['load']})" for r in runs}))
        lines.append(f"| {recipe} | {key} | {'; '.join(cells)} | {mean} | {least} | {when} |")
    return "\n".join(lines) + "\n"


def seed_runs(results: list[dict], recipe: str) -> list[dict]:
    return sorted((r for r in results if r["recipe"] == recipe), key=lambda r: r["seed"])


def by_seed(results: list[dict], recipe: str) -> dict[int, dict]:
    """seed -> metrics of the recipe's runs that did not fail."""
    return {r["seed"]: r["metrics"] for r in seed_runs(results, recipe) if "error" not in r}


# What the README's stage table quotes in its "measured" cell, by the first recipe its row names:
# (label, recipe, metric, how): "span" before -> after per seed, "gain" points gained per seed, "after" the end value, "plain" the values alone.
README_CELLS = {
    "sft": [("task accuracy", "sft", TASK, "span")],
    "reward": [("held-out pair accuracy", "reward", PAIR, "span")],
    "sft-short": [("sft-short", "sft-short", TASK, "span"), ("after steps", "sft-short", STEPS, "plain"),
                  ("sft-grpo-start", "sft-grpo-start", TASK, "span"), ("after steps", "sft-grpo-start", STEPS, "plain")],
    "dpo": [("DPO+NLL task accuracy", "dpo", TASK, "gain"), ("its pair accuracy", "dpo", PAIR, "after"),
            ("IPO pair accuracy", "ipo", PAIR, "after"), ("IPO task accuracy", "ipo", TASK, "gain")],
    "simpo": [("task accuracy", "simpo", TASK, "gain"), ("pair accuracy", "simpo", PAIR, "after")],
    "orpo": [("task accuracy", "orpo", TASK, "span"), ("pair accuracy", "orpo", PAIR, "after")],
    "grpo": [("task accuracy", "grpo", TASK, "gain"), ("eval/kl", "grpo", KL, "after")],
    "ppo": [("task accuracy", "ppo", TASK, "gain"), ("eval/kl", "ppo", KL, "after"),
            ("its reward model's pair accuracy (reward-ppo)", "reward-ppo", PAIR, "after")],
    "gkd": [("GKD task accuracy", "gkd", TASK, "span"), ("SFT control (distill-sft)", "distill-sft", TASK, "span"),
            ("GKD minus control", "gkd", TASK, "over"), ("gap to the teacher (sft) closed by GKD", "gkd", TASK, "closed"),
            ("by the control", "distill-sft", TASK, "closed"), ("GKD's JSD to the teacher", "gkd", JSD, "span")],
    "teacher-kto": [("task accuracy", "teacher-kto", TASK, "span"),
                    ("minus the SFT control (teacher-sft-control)", "teacher-kto", TASK, "over"),
                    ("held-out pair accuracy", "teacher-kto", PAIR, "after")],
    "teacher-online-dpo": [("task accuracy", "teacher-online-dpo", TASK, "span"),
                           ("minus the SFT control (teacher-sft-control)", "teacher-online-dpo", TASK, "over"),
                           ("eval/kl", "teacher-online-dpo", KL, "after")],
    "teacher-rloo": [(f"{label} {what}", recipe, key, how)
                     for label, recipe in (("RLOO", "teacher-rloo"), ("REINFORCE++", "teacher-reinforce-pp"),
                                           ("GSPO", "teacher-gspo"))
                     for what, key, how in (("task accuracy", TASK, "span"), ("minus the SFT control", TASK, "over"),
                                            ("eval/kl", KL, "after"))],
    "pipeline": [("sft (teacher-sft)", "teacher-sft", TASK, "span"),
                 ("sft-control (teacher-sft-control)", "teacher-sft-control", TASK, "span"),
                 ("DPO + NLL minus the control", "teacher-dpo", TASK, "over"),
                 ("reward model pair accuracy", "teacher-reward", PAIR, "after"),
                 ("PPO minus the control", "teacher-ppo", TASK, "over"), ("PPO eval/kl", "teacher-ppo", KL, "after"),
                 ("GRPO minus the control", "teacher-grpo", TASK, "over")],
}
# What each recipe header's first paragraph quotes: its headline metric first.
HEADER_METRICS = {"sft-short": [TASK, STEPS], "sft-grpo-start": [TASK, STEPS], "dpo": [TASK, PAIR], "ipo": [PAIR, TASK], "simpo": [TASK, PAIR], "orpo": [TASK, PAIR],
                  "grpo": [TASK, KL], "ppo": [TASK, "eval/reward", KL], "gkd": [TASK, JSD, "over", "closed"],
                  "distill-sft": [TASK, "closed"],
                  "teacher-dpo": [TASK, "over", PAIR], "teacher-ppo": [TASK, "over", "eval/reward", KL],
                  "teacher-kto": [TASK, "over", PAIR],
                  **{name: [TASK, "over", KL] for name in TEACHER_WORLD
                     if name not in ("teacher-dpo", "teacher-ppo", "teacher-kto")}}


def figure(results: list[dict], recipe: str, key: str, how: str) -> str:
    """One metric of one recipe over its seeds, e.g. `0 -> 0.981 / 0.973 / 0.9845 (min 0.973)`."""
    if how in ("over", "closed"):
        return comparison_figure(results, recipe, key, how)
    runs = [r["metrics"] for r in seed_runs(results, recipe) if "error" not in r]
    after = [m[key] for m in runs]
    ends = " / ".join(f"{a:.4g}" for a in after)
    if how == "plain":
        return ends
    if how == "after":  # a KL is bounded from above: its worst seed is the largest
        return f"{ends} (max {max(after):.4g})" if key == KL else f"{ends} (min {min(after):.4g})"
    starts = [m[key + "_start"] for m in runs]
    if how == "gain":
        gains = [100 * (a - b) for a, b in zip(after, starts)]
        spans = " / ".join(f"{b:.4g} -> {a:.4g}" for a, b in zip(after, starts))
        return f"{' / '.join(f'{g:+.1f}' for g in gains)} points (min {min(gains):+.1f}; {spans})"
    if len({round(b, 6) for b in starts}) == 1:
        return f"{starts[0]:.4g} -> {ends} (min {min(after):.4g})"
    return " / ".join(f"{b:.4g} -> {a:.4g}" for a, b in zip(after, starts)) + f" (min {min(after):.4g})"


def comparison_figure(results: list[dict], recipe: str, key: str, how: str) -> str:
    """Per seed, a run against the same seed's runs: "over" its SFT control in points, "closed" (distillation) the
    share of the gap from its start to the teacher that it closed, e.g. `+0.8 / -1.2 points (min -1.2)`,
    `96% / 90% (min 90%)`."""
    runs, control = by_seed(results, recipe), by_seed(results, CONTROL.get(recipe, recipe))
    if how == "over":
        values = [100 * (runs[s][key] - control[s][key]) for s in runs if s in control]
        return f"{' / '.join(f'{v:+.1f}' for v in values)} points (min {min(values):+.1f})"
    teacher = by_seed(results, TEACHER[recipe])
    values = [100 * (runs[s][key] - runs[s][key + "_start"]) / (teacher[s][key] - runs[s][key + "_start"])
              for s in runs if s in teacher]
    return f"{' / '.join(f'{v:.0f}%' for v in values)} (min {min(values):.0f}%)"


def readme_cell(results: list[dict], row: str) -> str:
    seeds = "/".join(str(r["seed"]) for r in seed_runs(results, README_CELLS[row][0][1]))
    cells = README_CELLS[row]
    parts = [f"{label} {figure(results, recipe, key, how)}" for label, recipe, key, how in cells if recipe not in PENDING]
    pending = {}  # reason -> the labels it holds back
    for label, recipe, _, _ in cells:
        if recipe in PENDING:
            pending.setdefault(PENDING[recipe], []).append(label)
    parts += [f"{', '.join(labels)}: {why}" for why, labels in pending.items()]
    if not seeds:
        return "; ".join(parts)
    return f"seeds {seeds}: " + "; ".join(parts).replace("->", "→")


def header_block(results: list[dict], recipe: str) -> str:
    """A recipe header's first paragraph (the lines before its first bare `#`): the figures of its seeds."""
    runs = seed_runs(results, recipe)
    if recipe in PENDING:
        text = (f"Figures: {PENDING[recipe]}; `python bench/recipe_figures.py --recipes {recipe}` measures them "
                f"(its upstream recipes are trained first in each seed's clean folder).")
        return "".join(f"# {line}\n" for line in textwrap.wrap(text, 110)) + "#\n"
    dates = ", ".join(sorted({r["date"] for r in runs}))
    keys = HEADER_METRICS.get(recipe, [HEADLINE[recipe]])
    how = {TASK: "span", PAIR: "span", "eval/reward": "span", KL: "after", STEPS: "plain", JSD: "span",
           "over": "over", "closed": "closed"}
    label = {"over": f"{TASK} over the control ({CONTROL.get(recipe)})",
             "closed": f"share of the start's gap to the teacher ({TEACHER.get(recipe)}) closed"}
    text = (f"Measured for seeds {' / '.join(str(r['seed']) for r in runs)}, each from a clean folder with its "
            f"upstream recipes trained first (bench/recipe_figures.py, {dates}; docs/recipe-figures.md): "
            + "; ".join(f"{label.get(key, key)} {figure(results, recipe, TASK if key in label else key, how[key])}"
                        for key in keys) + ".")
    return "".join(f"# {line}\n" for line in textwrap.wrap(text, 110)) + "#\n"


PIPELINE_TABLE = ("<!-- pipeline table: bench/recipe_figures.py -->\n", "<!-- end of pipeline table -->\n")


def pipeline_table(results: list[dict]) -> str:
    start, control = by_seed(results, "teacher-sft"), by_seed(results, "teacher-sft-control")
    runs = {name: by_seed(results, name) for name in TEACHER_WORLD}
    seeds = sorted(s for s in start if s in control and all(s in r for r in runs.values()))
    if not seeds:
        return "(no measurement: `python bench/recipe_figures.py` writes this table)\n"

    def gain(name, seed):
        return 100 * (runs[name][seed][TASK] - control[seed][TASK])

    lines = ["| seed | sft | sft-control | " + " | ".join(f"{label} (vs control)" for label, _ in PIPELINE_COLUMNS)
             + " | PPO eval KL |", "|---" * (len(PIPELINE_COLUMNS) + 4) + "|"]
    for seed in seeds:
        cells = [f"{runs[name][seed][TASK]:.4g} ({gain(name, seed):+.1f})" for _, name in PIPELINE_COLUMNS]
        lines.append(f"| {seed} | {start[seed][TASK]:.4g} | {control[seed][TASK]:.4g} | " + " | ".join(cells)
                     + f" | {runs['teacher-ppo'][seed][KL]:.2f} |")
    lines.append("| mean / min of the gain | | | " + " | ".join(
        f"{statistics.mean(gain(name, s) for s in seeds):+.1f} / {min(gain(name, s) for s in seeds):+.1f}"
        for _, name in PIPELINE_COLUMNS) + f" | max {max(runs['teacher-ppo'][s][KL] for s in seeds):.2f} |")
    beside = "; ".join(f"{label} (`{name}.yaml`) " + " / ".join(f"{gain(name, s):+.1f}" for s in seeds)
                       for label, name in BESIDE_PIPELINE)
    when = ", ".join(sorted({f"{r['date']} (load {r['load']})" for name in ("teacher-sft", *runs)
                             for r in seed_runs(results, name)}))
    return ("\n".join(lines) + "\n\n" + textwrap.fill(
        f"Beside the pipeline, from the same start and against the same control, in points for seeds "
        f"{' / '.join(map(str, seeds))}: {beside}. Measured by `bench/recipe_figures.py` (each recipe alone, "
        f"`align train recipes/tiny/<recipe>.yaml seed=N`, in a clean folder; the same models the pipeline's steps "
        f"train): {when}.", 110) + "\n")


def replace_between(text: str, markers: tuple[str, str], body: str) -> str:
    head, rest = text.split(markers[0], 1)
    _, tail = rest.split(markers[1], 1)
    return head + markers[0] + body + markers[1] + tail


def quote(results: list[dict]) -> None:
    """Rewrite the README stage table's measured cells and each recipe header's first paragraph from `results`."""
    lines = README.read_text().splitlines(keepends=True)
    for i, line in enumerate(lines):
        row = README_ROW.match(line)
        if row and row["recipe"] in README_CELLS:
            cells = line.rstrip("\n").split(" | ")
            cells[-1] = readme_cell(results, row["recipe"]) + " |"
            lines[i] = " | ".join(cells) + "\n"
    README.write_text(replace_between("".join(lines), PIPELINE_TABLE, pipeline_table(results)))
    for recipe in HEADLINE:
        path = REPO / "recipes" / "tiny" / f"{recipe}.yaml"
        lines = path.read_text().splitlines(keepends=True)
        path.write_text(header_block(results, recipe) + "".join(lines[lines.index("#\n") + 1:]))


README_ROW = re.compile(r"^\| `[^`]+`[^|]* \| `recipes/tiny/(?P<recipe>[\w-]+)\.yaml`")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", default=list(HEADLINE), choices=list(HEADLINE))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--quote-only", action="store_true",
                        help="run nothing: rewrite the table, the README cells and the recipe headers from the JSON")
    args = parser.parse_args()
    recipes = [r for r in HEADLINE if r in args.recipes]  # upstream first
    if not args.quote_only:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda seed: run_seed(recipes, seed), args.seeds))  # each result saved as it comes
    results = json.loads(OUT_JSON.read_text())
    OUT_MD.write_text(table(results))
    quote(results)
    print(OUT_MD.read_text())


if __name__ == "__main__":
    main()
