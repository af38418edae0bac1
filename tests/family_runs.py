"""Tiny data and runs shared by the family tests (test_family_matrix, test_family_trl_parity): a few
rows of every data format, recipe dicts, stages built in-process, and model folders derived from a
family's (a scalar-head copy, a perturbed reference)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

# ---------------------------------------------------------------------------
# rows: a few of each format, short so every family's tokenizer keeps them under max_length
# ---------------------------------------------------------------------------
QA = [("What is 2 plus 3?", "5"), ("Name a colour.", "Blue"), ("What is 7 minus 4?", "3"),
      ("Say hello.", "Hello there"), ("What is 6 times 2?", "12"), ("Name an animal.", "A cat")]
WRONG = ["7", "Loud", "11", "Go away", "8", "A rock"]


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def rows_prompt_completion():
    """Strings; the completion starts with a space, as a word after a question does in running text."""
    return [{"prompt": q, "completion": " " + a} for q, a in QA]


def rows_chat_prompt_completion():
    return [{"prompt": user(q), "completion": assistant(a)} for q, a in QA]


def rows_messages():
    """Two-turn conversations: both assistant turns are trained."""
    return [{"messages": user(q) + assistant(a) + user("And again?") + assistant(a)} for q, a in QA]


def rows_pairs():
    return [{"prompt": q, "chosen": " " + a, "rejected": " " + w} for (q, a), w in zip(QA, WRONG)]


def rows_chat_pairs():
    return [{"prompt": user(q), "chosen": assistant(a), "rejected": assistant(w)} for (q, a), w in zip(QA, WRONG)]


def rows_implicit_chat_pairs():
    """No prompt column: the shared leading messages are the prompt."""
    return [{"chosen": user(q) + assistant(a), "rejected": user(q) + assistant(w)} for (q, a), w in zip(QA, WRONG)]


def rows_chat_prompts():
    """Prompts with the reference `answer` that exact_match reads."""
    return [{"prompt": user(q), "answer": a} for q, a in QA]


DATA = {"prompt_completion": rows_prompt_completion, "chat_prompt_completion": rows_chat_prompt_completion,
        "messages": rows_messages, "pairs": rows_pairs, "chat_pairs": rows_chat_pairs,
        "implicit_chat_pairs": rows_implicit_chat_pairs, "chat_prompts": rows_chat_prompts}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ---------------------------------------------------------------------------
# recipes and stages
# ---------------------------------------------------------------------------
def recipe_dict(stage: str, model_dir, rows: list[dict], tmp_path: Path, overrides: dict) -> dict:
    """A recipe of `stage` from `model_dir` on `rows` (eval: the last two), 2 steps, fp32; dotted overrides."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe = {"stage": stage, "output_dir": str(tmp_path / "out"), "seed": 0,
              "model": {"name_or_path": str(model_dir)},
              "data": {"train": write_jsonl(tmp_path / "train.jsonl", rows),
                       "eval": write_jsonl(tmp_path / "eval.jsonl", rows[-2:]), "max_length": 64},
              "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "lr_scheduler": "constant",
                        "mixed_precision": "no", "save_steps": 1000, "log_steps": 1, "progress_bar": False},
              "eval": {"generate": False, "batch_size": 8}}
    for key, value in overrides.items():
        node = recipe
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return recipe


def build_stage(recipe: dict):
    """The recipe's stage as `align.planning.run` builds it (accelerator, seed), before any step."""
    from accelerate.utils import set_seed

    from align import accel
    from align.recipe import load_recipe
    from align.stages import STAGES

    loaded = load_recipe(None, data=recipe)
    accelerator = accel.make_accelerator(loaded.train, loaded.output_dir)
    set_seed(loaded.seed)
    return STAGES[loaded.stage].cls(loaded, accelerator), loaded


# ---------------------------------------------------------------------------
# model folders derived from a family's (built once per session and family)
# ---------------------------------------------------------------------------
_DERIVED: dict = {}


def _derived(kind: str, start: Path, make) -> Path:
    key = (kind, str(start))
    if key not in _DERIVED:
        out = start.parent / f"{start.name}-{kind}"
        make(out)
        _DERIVED[key] = out
    return _DERIVED[key]


def score_model(start: Path) -> Path:
    """The family's weights under a scalar head (a reward model for PPO, the start of reward parity).

    The new head is drawn at unit scale (a fresh head is ~0.02 and would score every text alike)."""
    def make(out):
        from align import models
        from align.evaluate_rm import score_head
        from align.recipe import ModelConfig

        cfg = ModelConfig(name_or_path=str(start))
        model = models.load_model(cfg, models.load_tokenizer(cfg), head="score", trainable=False)
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(1)
            score_head(model).weight.normal_(0.0, 1.0)
        shutil.copytree(start, out)  # the family's tokenizer files as they are
        model.save_pretrained(out)

    return _derived("score", start, make)


def perturbed_model(start: Path) -> Path:
    """The family's model with every weight moved by N(0, 0.02^2): a reference that is not the policy,
    so DPO/GRPO losses at step 0 depend on the log-probs of both (with reference == policy DPO's loss
    is log 2 whatever the tokens)."""
    def make(out):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(start)
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(2)
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        shutil.copytree(start, out)
        model.save_pretrained(out)

    return _derived("perturbed", start, make)
