"""Shared test helpers: tiny recipes and weight comparison."""

from __future__ import annotations

import pathlib

import torch
from safetensors.torch import load_file

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_sft_recipe(output_dir, **overrides) -> dict:
    """A seconds-long SFT recipe on 64 rows of the built-in task (no eval generation)."""
    recipe = {
        "stage": "sft",
        "output_dir": str(output_dir),
        "seed": 0,
        "model": {"name_or_path": "builtin:tiny"},
        "data": {"train": {"path": str(REPO / "data/arith/sft_train.jsonl"), "take": 64}, "max_length": 32},
        "train": {"max_steps": 3, "batch_size": 8, "lr": 1e-3, "lr_scheduler": "constant", "save_steps": 1000,
                  "log_steps": 1, "progress_bar": False},
        "eval": {"generate": False},
    }
    for key, value in overrides.items():
        node = recipe
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return recipe


def weights(output_dir) -> dict[str, torch.Tensor]:
    return load_file(str(pathlib.Path(output_dir) / "model.safetensors"))


def max_relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-12)).item() for k in a)
