"""The built-in task: integer addition, answers checkable exactly.

A problem is a prompt `"47+85="` whose completion is the sum `"132"`. With two-digit
operands there are 10,000 problems; a fixed, seeded split holds out 2,000 of them
as evaluation prompts that no training file contains, so `eval/task_accuracy`
measures generalisation (learning to add), not memorisation.

Two sets of training files share that split. The perfect-teacher files demonstrate the true
sums. The flawed-teacher files (`teacher_*`) demonstrate a teacher with one systematic,
realistic habit (`teacher_answer`: it forgets the carry out of the units column whenever a
units digit is 7, 8 or 9), while their preference pairs are labelled by the truth. That is
what real alignment data looks like: demonstrations carry their writer's mistakes, a
preference label or a verifier (`is_correct`) carries what they lack.

Files are written by `data/make_data.py` (see `data/README.md`); this module is the
one source of truth for the format, the split, the teacher and the answer check.
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


TEACHER_HABIT = ("forgets the carry out of the units column when a units digit is 7, 8 or 9 (in 4 of the 5 "
                 "demonstrations it gives of each such problem)")
TEACHER_ROUNDS = 5
"""Demonstrations the teacher gives of each training problem; on a problem of its habit it remembers the carry in
exactly one of them (which one: fixed per problem)."""


def teacher_answer(a: int, b: int, demonstration: int = 0) -> str:
    """The flawed teacher's sum in its `demonstration`-th answer to the problem (0 .. TEACHER_ROUNDS - 1): right,
    except that it forgets the carry out of the units column (writes a sum 10 too small) when one of the units
    digits is 7, 8 or 9 and the units carry (47+85 = 122, 7+8 = 5), while 5+5 or 36+46 come out right. In one
    of its TEACHER_ROUNDS answers to such a problem (the one `_remembered_in` draws per problem from a seeded
    RNG) it remembers the carry (9+9 = 18).

    A rule on the digits, so a model that imitates the teacher learns it and its greedy answer reproduces it
    (about 39% of all problems come out 10 too small). The right answers the teacher still gives there are why
    its imitator SAMPLES the right answer now and then: a teacher that was never right on these problems would
    leave a policy that never samples it either (measured: 0.1% of samples at temperature 1), and no reward
    could teach it. Every problem of the habit is right in exactly 1 of its 5 demonstrations, so there is no
    problem-specific pattern for longer training to pick up: with one demonstration per problem (right on a
    fifth of the problems), the tiny model memorised which training problems the teacher got right and carried
    that to their held-out neighbours, and held-out accuracy kept climbing with more steps (seed 0: 2.8% of the
    habit's held-out problems right at 1,000 steps, 0.6155 overall; 0.6515 at 3,000) instead of staying at
    the habit. Demonstration 0 is "the teacher's answer" where one is needed (its held-out answers, the
    truth-labelled pairs): right on a fifth of the habit's problems.

    >>> teacher_answer(47, 85), teacher_answer(7, 8), teacher_answer(36, 46), teacher_answer(9, 9)
    ('122', '5', '82', '18')
    >>> sorted(teacher_answer(47, 85, k) for k in range(TEACHER_ROUNDS))
    ['122', '122', '122', '122', '132']
    """
    if in_teacher_habit(a, b) and _remembered_in(a, b) != demonstration:
        return str(a + b - 10)
    return answer_of(a, b)


def in_teacher_habit(a: int, b: int) -> bool:
    """Whether the problem is one of the teacher's habit: the units carry and one units digit is 7, 8 or 9."""
    units_a, units_b = a % 10, b % 10
    return units_a + units_b >= 10 and max(units_a, units_b) >= 7


def _remembered_in(a: int, b: int) -> int:
    """The demonstration (0 .. TEACHER_ROUNDS - 1) in which the teacher remembers the carry of this problem."""
    return int(random.Random(10_007 * a + b).random() * TEACHER_ROUNDS)


def teacher_preference_row(a: int, b: int, rng: random.Random) -> dict:
    """One truth-labelled pair for a problem: the true sum over the teacher's answer where the teacher
    is wrong (subset "teacher's habit"), else over one plausible wrong sum (`wrong_answers`). One pair
    per problem, so the held-out file's prompts are the 2,000 held-out problems once each."""
    habit = teacher_answer(a, b)
    if habit != answer_of(a, b):
        return {"prompt": prompt_of(a, b), "chosen": answer_of(a, b), "rejected": habit, "subset": "teacher's habit"}
    return preference_row(a, b, wrong_answers(a, b, rng)[0])


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
    teacher_rng = random.Random(seed + 1)  # its own stream: the perfect-teacher files above stay as they were
    files.update({
        # TEACHER_ROUNDS passes over the training problems, pass k holding every problem's k-th demonstration
        "teacher_train.jsonl": [{"prompt": prompt_of(a, b), "completion": teacher_answer(a, b, k)}
                                for k in range(TEACHER_ROUNDS) for a, b in train],
        "teacher_eval.jsonl": [{"prompt": prompt_of(a, b), "completion": teacher_answer(a, b)} for a, b in held_out],
        "teacher_prefs_train.jsonl": [teacher_preference_row(a, b, teacher_rng) for a, b in train],
        "teacher_prefs_eval.jsonl": [teacher_preference_row(a, b, teacher_rng) for a, b in held_out],
    })
    for name, rows in files.items():
        write_jsonl(out_dir / name, rows)
    return {name: len(rows) for name, rows in files.items()}
