"""The built-in task: integer addition, answers checkable exactly.

A problem is a prompt `"47+85="` whose completion is the sum `"132"`. With two-digit
operands there are 10,000 problems; a fixed, seeded split holds out 2,000 of them
as evaluation prompts that no training file contains, so `eval/task_accuracy`
measures generalisation (learning to add), not memorisation.

Files are written by `data/make_data.py` (see `data/README.md`); this module is the
one source of truth for the format, the split and the answer check.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DIGITS = 2
EVAL_SIZE = 2000
SPLIT_SEED = 1234


def prompt_of(a: int, b: int) -> str:
    return f"{a}+{b}="


def answer_of(a: int, b: int) -> str:
    return str(a + b)


def all_pairs(digits: int = DIGITS) -> list[tuple[int, int]]:
    top = 10**digits
    return [(a, b) for a in range(top) for b in range(top)]


def split_pairs(digits: int = DIGITS, eval_size: int = EVAL_SIZE, seed: int = SPLIT_SEED):
    """(train_pairs, eval_pairs): a seeded partition of all problems, no overlap."""
    pairs = all_pairs(digits)
    random.Random(seed).shuffle(pairs)
    return pairs[eval_size:], pairs[:eval_size]


def wrong_answers(a: int, b: int, rng: random.Random, n: int = 1) -> list[str]:
    """Plausible wrong sums: a dropped or extra carry, an off-by-one digit, swapped digits."""
    right = a + b
    candidates = {right + 10, right - 10, right + 1, right - 1, right + 100, right - 100}
    text = str(right)
    if len(text) > 1:
        candidates.add(int(text[::-1]))
    # a forgotten carry: add digit by digit without carrying
    no_carry = int("".join(str((int(x) + int(y)) % 10) for x, y in zip(f"{a:0{DIGITS}d}", f"{b:0{DIGITS}d}")))
    candidates.add(no_carry)
    candidates = sorted(c for c in candidates if c >= 0 and c != right)
    rng.shuffle(candidates)
    return [str(c) for c in candidates[:n]]


def error_kind(a: int, b: int, wrong: str) -> str:
    """Which plausible mistake `wrong` is (the `subset` column of the preference files, so
    `align eval-rm` breaks accuracy down by it)."""
    right, value = a + b, int(wrong)
    if abs(value - right) in (1, 10, 100):
        return f"off by {abs(value - right)}"
    if len(str(right)) > 1 and wrong == str(right)[::-1]:
        return "digits reversed"
    return "carry dropped"


def preference_row(a: int, b: int, wrong: str) -> dict:
    return {"prompt": prompt_of(a, b), "chosen": answer_of(a, b), "rejected": wrong, "subset": error_kind(a, b, wrong)}


def is_correct(prompt: str, completion: str) -> bool:
    """Exact match of the completion (whitespace stripped) against the true sum."""
    left = prompt.rstrip().rstrip("=")
    try:
        a, b = (int(x) for x in left.split("+"))
    except ValueError:
        return False
    return completion.strip() == answer_of(a, b)


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def make_files(out_dir: str | Path, seed: int = 0) -> dict[str, int]:
    """Write the built-in task's files into `out_dir`; returns row counts by file name."""
    out_dir = Path(out_dir)
    rng = random.Random(seed)
    train, held_out = split_pairs()
    files = {
        "sft_train.jsonl": [{"prompt": prompt_of(a, b), "completion": answer_of(a, b)} for a, b in train],
        "sft_eval.jsonl": [{"prompt": prompt_of(a, b), "completion": answer_of(a, b)} for a, b in held_out],
        "prefs_train.jsonl": [
            preference_row(a, b, wrong_answers(a, b, rng)[0]) for a, b in train
        ],
        "prefs_eval.jsonl": [
            preference_row(a, b, wrong_answers(a, b, rng)[0]) for a, b in held_out
        ],
    }
    for name, rows in files.items():
        write_jsonl(out_dir / name, rows)
    return {name: len(rows) for name, rows in files.items()}
