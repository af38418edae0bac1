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
(recipe, seed) cells. A figure in the README or a recipe header is quoted from that table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT_JSON = REPO / "docs" / "recipe-figures.json"
OUT_MD = REPO / "docs" / "recipe-figures.md"

# recipe -> the metric its header and the README quote, upstream recipes before the ones that start from them
HEADLINE = {
    "sft": "eval/task_accuracy", "reward": "eval/pair_accuracy",
    "sft-short": "eval/task_accuracy", "dpo": "eval/task_accuracy", "ipo": "eval/pair_accuracy",
    "simpo": "eval/task_accuracy", "orpo": "eval/task_accuracy",
    "sft-grpo-start": "eval/task_accuracy", "grpo": "eval/task_accuracy", "reward-ppo": "eval/pair_accuracy",
    "ppo": "eval/task_accuracy",
}


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
                results.append({"recipe": recipe, "seed": seed, "seconds": seconds,
                                "error": proc.stderr.strip().splitlines()[-1:]})
                save(results[-1:])
                continue
            metrics = json.loads((checkout / "runs" / "tiny" / recipe / "metrics.json").read_text())
            results.append({"recipe": recipe, "seed": seed, "metrics": metrics, "seconds": seconds})
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
        OUT_MD.write_text(table(results, WHEN, LOAD))


def table(results: list[dict], when: str, load: str) -> str:
    lines = [f"# Tiny recipe figures\n\nMeasured {when} by `bench/recipe_figures.py` (each run from a clean folder, "
             f"upstream recipes trained first with the same seed); load average at the start: {load}.\n",
             "| recipe | metric | seed: before -> after (wall) | mean after | min after |", "|---|---|---|---|---|"]
    for recipe in HEADLINE:
        runs = sorted((r for r in results if r["recipe"] == recipe), key=lambda r: r["seed"])
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
        lines.append(f"| {recipe} | {key} | {'; '.join(cells)} | {mean} | {least} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", default=list(HEADLINE), choices=list(HEADLINE))
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()
    recipes = [r for r in HEADLINE if r in args.recipes]  # upstream first
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(lambda seed: run_seed(recipes, seed), args.seeds))  # each result saved as it comes
    print(OUT_MD.read_text())


if __name__ == "__main__":
    main()
