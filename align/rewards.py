"""Rewards for the online stages: plain Python callables and a reward model.

A reward function is any callable

    fn(prompts: list, completions: list[str], **columns) -> list[float]

(TRL's convention for `reward_funcs`): one float per completion; `columns` are the
dataset's other columns for the same rows (e.g. `completion` or `answer`, the
reference). Functions ignore the columns they do not use (`**_`). Recipes name the
built-in ones from `REWARD_FUNCTIONS` or any `package.module:function`; several are
combined by `weighted_sum`.

`missing_eos_penalty` subtracts a fixed penalty from completions that never produced
EOS (cut by max_new_tokens), as InstructGPT-style PPO implementations do (TRL's old
PPOTrainer `missing_eos_penalty`); the rollout knows which rows ended
(`align.rollout.Rollout.ended`).

`RewardModel` scores token sequences with a reward model from the reward stage
(`AutoModelForSequenceClassification`, one scalar), read at the last real token of
each row (`align.preference_data.last_token_index`; left or right padding, pad == eos
safe).
"""

from __future__ import annotations

import importlib
import re
from typing import Callable

import torch

from align.errors import AlignError

RewardFn = Callable[..., list[float]]


# ---------------------------------------------------------------------------
# built-in reward functions
# ---------------------------------------------------------------------------
def _text(value) -> str:
    if isinstance(value, list):  # a conversational reference: the content of its messages
        return "".join(m.get("content", "") for m in value)
    return str(value)


def exact_match(prompts, completions, *, answer=None, completion=None, **_) -> list[float]:
    """1.0 where the completion (whitespace stripped) equals the reference, else 0.0.

    The reference is the `answer` column, else the `completion` column; without either,
    the built-in task's own check (`align.task.is_correct`) decides.

    >>> exact_match(["47+85=", "1+2="], ["132", " 4"])
    [1.0, 0.0]
    >>> exact_match(["q1", "q2"], ["yes", "no"], answer=["yes", "yes"])
    [1.0, 0.0]
    """
    reference = answer if answer is not None else completion
    if reference is None:
        from align.task import is_correct

        return [float(is_correct(_text(p), c)) for p, c in zip(prompts, completions)]
    return [float(c.strip() == _text(r).strip()) for c, r in zip(completions, reference)]


def format_reward(prompts, completions, *, pattern: str = r"-?\d+", **_) -> list[float]:
    """1.0 where the whole completion (whitespace stripped) matches `pattern` (default: an integer).

    >>> format_reward(["1+1="] * 3, ["2", "two", "12a"])
    [1.0, 0.0, 0.0]
    """
    regex = re.compile(pattern)
    return [float(regex.fullmatch(c.strip()) is not None) for c in completions]


def length_penalty(prompts, completions, *, max_chars: int = 32, **_) -> list[float]:
    """-(characters / max_chars), capped at -1: shorter completions score higher.

    >>> length_penalty(["p", "p"], ["abcd", "a" * 100], max_chars=8)
    [-0.5, -1.0]
    """
    return [-min(len(c) / max_chars, 1.0) for c in completions]


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_FINAL = re.compile(r"####\s*(?:" + _NUMBER.pattern + r")\s*$")  # `#### <number>` ending a completion


def final_number(text: str) -> str | None:
    r"""The final answer of a GSM8K-style solution: the first number after the last `####` if there
    is one, else the last number in the text; thousands commas and a trailing `.0…` dropped. None: no number.

    >>> final_number("48/2 = <<48/2=24>>24 clips in May.\n#### 72")
    '72'
    >>> final_number("So the total is $1,234.50, i.e. 1234.5")
    '1234.5'
    >>> final_number("#### -3.00 apples"), final_number("no digits"), final_number("answer: 5.")
    ('-3', None, '5')
    """
    text = str(text)
    tail = text.rsplit("####", 1)[1] if "####" in text else None
    found = _NUMBER.search(tail) if tail is not None else None
    if found is None:
        numbers = _NUMBER.findall(text)
        if not numbers:
            return None
        number = numbers[-1]
    else:
        number = found.group()
    number = number.replace(",", "")
    if number.lstrip("-").startswith("."):  # ".5" -> "0.5"
        number = number.replace(".", "0.", 1)
    if "." in number:
        number = number.rstrip("0").rstrip(".")
        number = "0" if number in ("", "-") else number
    return "0" if number == "-0" else number


def math_answer(prompts, completions, *, answer=None, **_) -> list[float]:
    """1.0 where the completion's final number equals the reference's (GSM8K: the number after `####`).

    Both sides go through `final_number` (after the last `####`, else the last number; commas
    stripped), as the GSM8K accuracy is usually scored (Cobbe et al. 2021; DeepSeekMath's rule-based
    reward). The reference is the `answer` column (required).

    >>> math_answer(["q"] * 4, ["... so 18 in all. #### 18", "It is 1,000", "#### 17", "no idea"],
    ...             answer=["#### 18", "#### 1000", "... #### 18", "#### 3"])
    [1.0, 1.0, 0.0, 0.0]
    """
    if answer is None:
        raise AlignError("reward function math_answer: needs an 'answer' column with the reference solution "
                         "(GSM8K: text ending with '#### <number>')")
    out = []
    for c, r in zip(completions, answer):
        ref = final_number(_text(r))
        out.append(float(ref is not None and final_number(c) == ref))
    return out


def math_format(prompts, completions, **_) -> list[float]:
    r"""1.0 where the completion states its answer as GSM8K does: `#### <number>` at the end.

    >>> math_format(["q"] * 3, ["2 + 2 = 4\n#### 4", "#### four", "4"])
    [1.0, 0.0, 0.0]
    """
    return [float(_FINAL.search(c.strip()) is not None) for c in completions]


REWARD_FUNCTIONS: dict[str, RewardFn] = {
    "exact_match": exact_match,
    "format": format_reward,
    "length": length_penalty,
    "math_answer": math_answer,
    "math_format": math_format,
}
"""Names a recipe can use in its reward list; `package.module:function` names any other callable."""


def resolve(name: str) -> RewardFn:
    """A reward function by built-in name or `package.module:function`."""
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise AlignError(f"reward function {name!r}: cannot import it ({err})") from None
        if callable(fn):
            return fn
    raise AlignError(f"reward function {name!r}: expected one of {', '.join(REWARD_FUNCTIONS)} "
                     f"or package.module:function")


def weighted_sum(functions: list[RewardFn], weights: list[float] | None = None) -> RewardFn:
    """One reward function: sum_k w_k * fn_k(...). Weights default to 1.

    >>> both = weighted_sum([exact_match, format_reward], [1.0, 0.5])
    >>> both(["2+2=", "2+2=", "2+2="], ["4", "5", "four"])
    [1.5, 0.5, 0.0]
    """
    weights = [1.0] * len(functions) if weights is None else list(weights)
    if len(weights) != len(functions):
        raise AlignError(f"reward weights: got {len(weights)} weights for {len(functions)} reward functions")

    def combined(prompts, completions, **columns) -> list[float]:
        total = [0.0] * len(completions)
        for fn, w in zip(functions, weights):
            scores = fn(prompts, completions, **columns)
            check_scores(scores, len(completions), getattr(fn, "__name__", repr(fn)))
            total = [t + w * float(s) for t, s in zip(total, scores)]
        return total

    return combined


def check_scores(scores, n: int, name: str) -> None:
    if not isinstance(scores, (list, tuple)) or len(scores) != n:
        got = len(scores) if isinstance(scores, (list, tuple)) else type(scores).__name__
        raise AlignError(f"reward function {name}: returned {got} scores for {n} completions "
                         f"(expected a list of {n} floats)")


def missing_eos_penalty(scores: torch.Tensor, ended: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """scores - penalty where the completion has no EOS (`ended` False); unchanged when penalty is None.

    >>> missing_eos_penalty(torch.tensor([1.0, 1.0]), torch.tensor([True, False]), 2.0).tolist()
    [1.0, -1.0]
    """
    if penalty is None:
        return scores
    return scores - penalty * (~ended.bool()).to(scores.dtype)


# ---------------------------------------------------------------------------
# a reward model
# ---------------------------------------------------------------------------
class RewardModel:
    """A trained reward model scoring token sequences at their last real token.

    Load it with `align.models.load_model(cfg, tokenizer, head="score", trainable=False)`;
    the policy and the reward model must share the tokenizer (token ids are scored as they are).
    """

    def __init__(self, model, batch_size: int = 256):
        self.model, self.batch_size = model, batch_size

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, T) ids and mask (left or right padded) -> (N,) float32 scores on CPU."""
        from align.evaluate_rm import sequence_rewards

        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        out = []
        try:
            for s in range(0, input_ids.shape[0], self.batch_size):
                out.append(sequence_rewards(self.model, input_ids[s: s + self.batch_size].to(device),
                                            attention_mask[s: s + self.batch_size].to(device)).cpu())
        finally:
            self.model.train(was_training)
        return torch.cat(out)

    def score_rollout(self, rollout) -> torch.Tensor:
        """Scores of a rollout's prompt + completion (up to its first EOS): (B,)."""
        ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)  # (B, P + C)
        mask = torch.cat([rollout.prompt_mask, rollout.completion_mask.to(rollout.prompt_mask.dtype)], 1)
        return self.score(ids, mask)
