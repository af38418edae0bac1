"""TRL's names for recipe keys: what a TRL user types works, with a one-line note.

TRL (and transformers' `TrainingArguments`) call `train.lr` `learning_rate`,
`train.batch_size` `per_device_train_batch_size`, and so on. `TRL_NAMES` maps each such
name to align's key; a name whose meaning depends on the stage (`beta` is `dpo.beta` but
`ppo.kl_coef`) maps per stage. A TRL name is accepted

- at the top level of a recipe (a flat, TRL-style config: `learning_rate: 1e-5`),
- in `train:` (where TrainingArguments' names all belong: `train: {learning_rate: 1e-5}`),
- in the section of the key it stands for (`data: {max_length: ...}` is align's own name,
  `eval: {eval_steps: 50}` is TRL's),

unless align has a key of that name there. Each use prints
`note: train.learning_rate is TRL's name; align's is train.lr (accepted)`. Giving both a
TRL name and the key it stands for is an error naming both. An unknown key is told the
closest name among align's keys and these names (`train.lerning_rate` -> `train.lr`).

The recipe schema (`align.recipe`) calls `apply_names` before it validates anything; this
module knows only dicts and the field names it is given.
"""

from __future__ import annotations

import json
import os
import sys

import yaml

from align import config as cfg
from align.errors import AlignError

# TRL / transformers name -> align's key, or {stage: align's key} where it depends on the stage
TRL_NAMES: dict[str, str | dict[str, str]] = {
    # TrainingArguments
    "learning_rate": "train.lr",
    "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "max_steps": "train.max_steps",
    "num_train_epochs": "train.epochs",
    "warmup_ratio": "train.warmup_ratio",
    "warmup_steps": "train.warmup_steps",
    "lr_scheduler_type": "train.lr_scheduler",
    "max_grad_norm": "train.max_grad_norm",
    "weight_decay": "train.weight_decay",
    "adam_beta1": "train.adam_beta1",
    "adam_beta2": "train.adam_beta2",
    "logging_steps": "train.log_steps",
    "save_steps": "train.save_steps",
    "save_total_limit": "train.save_total_limit",
    "report_to": "train.report_to",
    "bf16": "train.mixed_precision",
    "fp16": "train.mixed_precision",
    "eval_steps": "eval.steps",
    "per_device_eval_batch_size": "eval.batch_size",
    "seed": "seed",
    "output_dir": "output_dir",
    "gradient_checkpointing": "model.gradient_checkpointing",
    # TRL's ModelConfig
    "model_name_or_path": "model.name_or_path",
    "model_revision": "model.revision",
    "dtype": "model.dtype",
    "torch_dtype": "model.dtype",
    "attn_implementation": "model.attn_implementation",
    "trust_remote_code": "model.trust_remote_code",
    "use_peft": "model.lora.enabled",
    "lora_r": "model.lora.r",
    "lora_alpha": "model.lora.alpha",
    "lora_dropout": "model.lora.dropout",
    "lora_target_modules": "model.lora.target_modules",
    # the trainers' configs
    "max_length": "data.max_length",
    "packing": "data.packing",
    "padding_free": "data.padding_free",
    "completion_only_loss": {"sft": "sft.completion_only_loss"},
    "beta": {"dpo": "dpo.beta", "simpo": "simpo.beta", "orpo": "orpo.lam", "grpo": "grpo.kl_coef",
             "ppo": "ppo.kl_coef", "online_dpo": "online_dpo.beta", "gkd": "gkd.beta"},
    "loss_type": {"dpo": "dpo.loss_type", "grpo": "grpo.aggregation", "online_dpo": "online_dpo.loss_type"},
    "label_smoothing": {"dpo": "dpo.label_smoothing", "simpo": "simpo.label_smoothing"},
    "rpo_alpha": {"dpo": "dpo.rpo_alpha"},
    "precompute_ref_log_probs": {"dpo": "dpo.precompute_ref_logps"},
    "simpo_gamma": {"simpo": "simpo.gamma"},
    "cpo_alpha": {"simpo": "simpo.rpo_alpha"},
    "center_rewards_coefficient": {"reward": "reward.center_rewards_coefficient"},
    "num_generations": {"grpo": "grpo.num_generations"},
    "max_completion_length": {"grpo": "grpo.max_new_tokens", "ppo": "ppo.max_new_tokens"},
    "max_new_tokens": {"online_dpo": "online_dpo.max_new_tokens", "gkd": "gkd.max_new_tokens"},
    "response_length": {"ppo": "ppo.max_new_tokens"},
    "temperature": {"grpo": "grpo.temperature", "ppo": "ppo.temperature", "online_dpo": "online_dpo.temperature",
                    "gkd": "gkd.temperature"},
    "teacher_model_name_or_path": {"gkd": "gkd.teacher_model"},
    "reward_model_path": {"online_dpo": "online_dpo.reward_model"},
    "epsilon": {"grpo": "grpo.clip_coef"},
    "epsilon_high": {"grpo": "grpo.clip_coef_high"},
    "num_iterations": {"grpo": "grpo.num_iterations"},
    "scale_rewards": {"grpo": "grpo.scale_rewards"},
    "missing_eos_penalty": {"grpo": "grpo.missing_eos_penalty", "ppo": "ppo.missing_eos_penalty",
                            "online_dpo": "online_dpo.missing_eos_penalty"},
        "cliprange": {"ppo": "ppo.clip_coef"},
    "cliprange_value": {"ppo": "ppo.vf_clip"},
    "vf_coef": {"ppo": "ppo.vf_coef"},
    "num_ppo_epochs": {"ppo": "ppo.update_epochs"},
    "num_mini_batches": {"ppo": "ppo.num_minibatches"},
    # GRPOConfig's vLLM settings (`use_vllm: true` is align's rollout.backend: vllm)
    "vllm_importance_sampling_correction": {"grpo": "rollout.importance_sampling_correction",
                                            "ppo": "rollout.importance_sampling_correction"},
    "vllm_importance_sampling_cap": {"grpo": "rollout.importance_sampling_cap", "ppo": "rollout.importance_sampling_cap"},
    "vllm_importance_sampling_clip_max": {"grpo": "rollout.importance_sampling_cap",
                                          "ppo": "rollout.importance_sampling_cap"},
    "vllm_gpu_memory_utilization": {"grpo": "rollout.gpu_memory_utilization",
                                    "ppo": "rollout.gpu_memory_utilization"},
    "vllm_mode": {"grpo": "rollout.mode", "ppo": "rollout.mode"},
    "vllm_enable_sleep_mode": {"grpo": "rollout.sleep", "ppo": "rollout.sleep"},
    "vllm_server_host": {"grpo": "rollout.server_host", "ppo": "rollout.server_host"},
    "vllm_server_port": {"grpo": "rollout.server_port", "ppo": "rollout.server_port"},
    "vllm_server_timeout": {"grpo": "rollout.server_timeout", "ppo": "rollout.server_timeout"},
}

# align's own former names (deprecated; accepted with a note): the PPO family now speaks CleanRL's vocabulary, as
# `align rl` does, and the KL weight is kl_coef in both PPO and GRPO
OLD_NAMES: dict[str, dict[str, str]] = {
    "clip_eps": {"grpo": "grpo.clip_coef", "ppo": "ppo.clip_coef"},
    "clip_eps_high": {"grpo": "grpo.clip_coef_high"},
    "clip_eps_value": {"ppo": "ppo.vf_clip"},
    "lam": {"ppo": "ppo.gae_lambda"},
    "ppo_epochs": {"ppo": "ppo.update_epochs"},
    "target_kl": {"ppo": "ppo.kl_target"},
}

# TRL's precision flags are booleans; align's key is one choice. `false` is weak: `bf16: false, fp16: true` is fp16.
_FLAGS = {"bf16": "bf16", "fp16": "fp16"}

# keys of which a recipe sets at most one; an override of one replaces the other from the recipe file
EXCLUSIVE = [("train.epochs", "train.max_steps"), ("train.warmup_ratio", "train.warmup_steps")]


def target_of(name: str, stage: str | None) -> str | None:
    """align's key for TRL name (or former align name) `name` under `stage` (None: neither, or not this stage's)."""
    target = TRL_NAMES.get(name, OLD_NAMES.get(name))
    return target.get(stage) if isinstance(target, dict) else target


def _note(where: str, shown: str) -> str:
    name = where.rsplit(".", 1)[-1]
    if name in OLD_NAMES and name not in TRL_NAMES:
        return f"note: {where} is deprecated; align's name is now {shown} (accepted)"
    return f"note: {where} is TRL's name; align's is {shown} (accepted)"


def names_at(level: str, stage: str | None, native: set[str]) -> dict[str, str]:
    """{TRL name: align's key} accepted in section `level` ("" the top level), except align's own names there."""
    out = {}
    for name in list(TRL_NAMES) + [n for n in OLD_NAMES if n not in TRL_NAMES]:
        target = target_of(name, stage)
        if target is None or name in native:
            continue
        if level in ("", "train") or target.rsplit(".", 1)[0] == level:
            out[name] = target
    return out


def _value(name: str, value):
    """(align's value, weak) of TRL's value: a precision flag becomes a mixed_precision choice, one tracker
    a list of one, TRL's constant_with_warmup align's constant (whose warmup is train.warmup_steps)."""
    if name in _FLAGS and isinstance(value, bool):
        return (_FLAGS[name] if value else "no"), not value
    if name == "report_to" and isinstance(value, str):
        return [value], False
    if name == "lr_scheduler_type" and value == "constant_with_warmup":
        return "constant", False
    return value, False


def _join(level: str, key: str) -> str:
    return f"{level}.{key}" if level else key


def _get(raw: dict, path: str):
    node = raw
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None, False
        node = node[part]
    return node, True


def _set(raw: dict, path: str, value) -> None:
    parts = path.split(".")
    node = raw
    for part in parts[:-1]:
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise AlignError(f"{part}: expected a mapping, got {type(node[part]).__name__} {node[part]!r}")
        node = node[part]
    node[parts[-1]] = value


def _pop(raw: dict, path: str) -> None:
    parent, found = _get(raw, path.rsplit(".", 1)[0]) if "." in path else (raw, True)
    if found and isinstance(parent, dict):
        parent.pop(path.rsplit(".", 1)[-1], None)


def resolve(raw: dict, stage: str | None, sections: dict[str, set[str]]) -> tuple[dict, list[str]]:
    """Move TRL names in `raw` to align's keys -> (a new dict, the notes to print).

    `sections` maps each section checked here ("" the top level, "train", ..., the stage's
    section) to align's field names in it. A key there that is neither align's nor an
    accepted TRL name fails with the closest name among both.
    """
    raw = cfg._deep_copy(raw)
    moves = []  # (where it was written, align's key, value, weak)
    for level, native in sections.items():
        node = raw if level == "" else raw.get(level)
        if not isinstance(node, dict):
            continue
        accepted = names_at(level, stage, native)
        for key in list(node):
            if key in native:
                continue
            if key in accepted:
                value, weak = _value(key, node.pop(key))
                moves.append((_join(level, key), accepted[key], value, weak))
                continue
            raise AlignError(_unknown(key, level, stage, native, accepted, sections))
    set_by: dict[str, tuple[str, object, bool]] = {}
    notes = []
    for where, target, value, weak in moves:
        if target in set_by:
            other, other_value, other_weak = set_by[target]
            if other_value == value or weak:
                continue
            if not other_weak:
                raise AlignError(f"{other} and {where} are both set and both mean {target}; keep one")
        elif _get(raw, target)[1]:
            raise AlignError(f"{where} and {target} are both set: {where} is another name for {target}; keep one")
        set_by[target] = (where, value, weak)
    for where, target, value, _ in moves:
        if set_by.get(target, (None,))[0] == where:
            _set(raw, target, value)
            shown = f"{target}: {value}" if where.rsplit(".", 1)[-1] in _FLAGS else target
            notes.append(_note(where, shown))
    return raw, notes


def _unknown(key, level, stage, native, accepted, sections) -> str:
    per_stage = TRL_NAMES.get(key)
    if isinstance(per_stage, dict) and stage not in per_stage:
        where = ", ".join(f"{s} ({t})" for s, t in per_stage.items())
        return f"{_join(level, key)}: TRL's {key} is a setting of stage {where}; this recipe's stage is {stage}"
    homes = [s for s, fields in sections.items() if s and key in fields] if level == "" else []
    if homes:  # a section's key at the top level (`lr:`): the section it belongs in
        return f"unknown key {key}; did you mean {homes[0]}.{key}? (valid keys here: {', '.join(sorted(native))})"
    return cfg.unknown_key_message(key, sorted(native), level, accepted)


def translate_override(item: str, stage: str | None, sections: dict[str, set[str]]) -> tuple[str, str | None]:
    """A `key.path=value` override written with a TRL name -> (align's override, its note or None)."""
    if "=" not in item:
        return item, None
    key, text = item.split("=", 1)
    level, _, name = key.strip().rpartition(".")
    if level not in sections or name in sections[level]:
        return item, None
    target = names_at(level, stage, sections[level]).get(name)
    if target is None:
        return item, None
    parsed = yaml.safe_load(text) if text else text
    value, _ = _value(name, parsed)
    if value != parsed:
        text = json.dumps(value)
    shown = f"{target}: {value}" if name in _FLAGS else target
    return f"{target}={text}", _note(key, shown)


def apply_names(raw: dict, overrides: list[str], stage: str | None, sections: dict[str, set[str]]) -> dict:
    """The recipe `raw` with TRL names moved to align's keys, then `overrides` applied (also in either name).

    An override of one of an EXCLUSIVE pair (`train.epochs=2`) replaces the other (`train.max_steps`)
    from the recipe; a recipe that sets both fails.
    """
    raw, notes = resolve(raw, stage, sections)
    translated = []
    for item in overrides:
        item, note = translate_override(item, stage, sections)
        translated.append(item)
        if note:
            notes.append(note)
    for item in translated:
        key = item.split("=", 1)[0].strip()
        for a, b in EXCLUSIVE:
            if key in (a, b):
                _pop(raw, b if key == a else a)
    raw = cfg.apply_overrides(raw, translated)
    for a, b in EXCLUSIVE:
        if _get(raw, a)[1] and _get(raw, a)[0] is not None and _get(raw, b)[1]:
            raise AlignError(f"{a} and {b} are both set; give one ({a} is the alternative to {b})")
    if notes and int(os.environ.get("RANK", "0")) == 0:
        for note in notes:
            print(note, file=sys.stderr)
    return raw
