"""Held-out greedy accuracy of saved models, split into the flawed teacher's habit and the rest.

    OMP_NUM_THREADS=1 python bench/habit_split.py runs/tiny/teacher-sft [more model folders ...]

For each model: overall accuracy on data/arith/sft_eval.jsonl (the true sums), accuracy on the held-out problems
of the teacher's habit (`align.task.in_teacher_habit`: a units carry with a units digit 7-9), the share of those
answered 10 too small (the habit itself), and accuracy on the other problems. A perfect imitator of the teacher
gets 0 / 1 / 1: imitation's ceiling is the share of problems off the habit (0.6075). How the plateau of
recipes/tiny/teacher-sft.yaml was diagnosed (its header).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from align.evaluate import greedy_completions
from align.models import load_model, load_tokenizer
from align.recipe import ModelConfig
from align.task import answer_of, in_teacher_habit

EVAL = Path(__file__).resolve().parents[1] / "data" / "arith" / "sft_eval.jsonl"


def split(model_path: str, problems: list[tuple[int, int]]) -> dict[str, float]:
    cfg = ModelConfig(name_or_path=model_path)
    tokenizer = load_tokenizer(cfg, padding_side="left")
    model = load_model(cfg, tokenizer, trainable=False)
    answers = greedy_completions(model, tokenizer, [f"{a}+{b}=" for a, b in problems], max_new_tokens=6,
                                 batch_size=256)
    habit = [i for i, (a, b) in enumerate(problems) if in_teacher_habit(a, b)]
    rest = sorted(set(range(len(problems))) - set(habit))

    def share(indices, wanted):
        return sum(answers[i].strip() == wanted(*problems[i]) for i in indices) / len(indices)

    return {"accuracy": share(range(len(problems)), answer_of), "habit right": share(habit, answer_of),
            "habit 10 too small": share(habit, lambda a, b: str(a + b - 10)), "rest right": share(rest, answer_of)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    args = parser.parse_args()
    torch.set_num_threads(1)
    problems = [tuple(int(x) for x in json.loads(line)["prompt"].rstrip("=").split("+"))
                for line in EVAL.read_text().splitlines()]
    for path in args.models:
        figures = split(path, problems)
        print(path + ": " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items()), flush=True)


if __name__ == "__main__":
    main()
