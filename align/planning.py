"""The planning layer: a recipe resolved into the steps that make what it needs, every input of every
step checked before any of them runs, then the steps run in order. `align train` and `align pipeline`
both go through it; the engine only trains.

A recipe can need what other recipes make:

- `model.from_recipe`: its starting model, trained by another recipe when `model.name_or_path` holds
  no model yet (that recipe may name another one in turn);
- `ppo.reward_model_recipe` / `online_dpo.reward_model_recipe`: the reward model, likewise;
- `gkd.teacher_model_recipe`: GKD's teacher, likewise;
- `data.from_policy`: preference pairs sampled from a policy (which `policy_recipe` may have to train
  first), written to the files `data.train` / `data.eval` name.

`plan(recipe)` lists those as steps, upstream first, the recipe itself last. `check_plan(steps)`
validates each step's inputs before anything runs: the recipe (already validated when loaded),
its local data files and their columns, vLLM where a colocated engine samples, the model it starts
from (a folder, a built-in model, a hub id, or the output of an earlier step), and its output folder
(not a file, writable). A bad input
of the last step is thus reported in seconds, not after an upstream model has trained for minutes:
one line, exit 2, nothing written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from align import builtin
from align.config import flat_keys
from align.data import SFT_FORMATS, is_local, load_rows
from align.errors import AlignError
from align.policy_pairs import ensure_policy_pairs, missing_sources
from align.recipe import ModelConfig, PolicyPairsConfig, Recipe, load_recipe, recipe_to_dict
from align.stage_settings import vllm_missing

# columns each stage reads from its data rows (any one of the alternatives)
STAGE_COLUMNS = {
    "sft": tuple(SFT_FORMATS.values()),
    "reward": (("chosen", "rejected"),),
    "dpo": (("chosen", "rejected"),),
    "simpo": (("chosen", "rejected"),),
    "orpo": (("chosen", "rejected"),),
    "kto": (("prompt", "completion", "label"), ("chosen", "rejected")),
    "grpo": (("prompt",),),
    "ppo": (("prompt",),),
    "online_dpo": (("prompt",),),
    "gkd": (("prompt", "completion"),),
    "generate": (("prompt",), ("messages",)),  # the prompts data.from_policy samples from
}


@dataclass
class TrainStep:
    recipe: Recipe
    why: str
    """What the step is for: "the recipe itself", a pipeline step's name, or which key of which recipe needs
    its model."""
    upstream: bool = False
    """Trained because another recipe needs its model (`model.from_recipe` and the like)."""


@dataclass
class PairsStep:
    config: PolicyPairsConfig
    why: str


@dataclass
class EvalRMStep:
    """A pipeline's `eval_rm` step: a reward model's accuracy on a preference set."""

    model: str
    data: object
    why: str


def has_model(path: str) -> bool:
    folder = Path(path)
    return (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()


def plan(recipe: Recipe, *, why: str = "the recipe itself", made: frozenset[str] = frozenset(),
         _seen: tuple[str, ...] = ()) -> list:
    """The steps that make `recipe`'s inputs (upstream first), then `recipe` itself.

    `made`: model folders that earlier steps of a pipeline will have written by then (no recipe is
    planned for them).
    """
    steps: list = []
    where = f"{recipe.output_dir}"
    needed = [(recipe.model, "model.from_recipe")]
    if recipe.stage in ("ppo", "online_dpo") and recipe.stage_args.reward_model is not None:
        a = recipe.stage_args
        needed.append((ModelConfig(name_or_path=a.reward_model, from_recipe=a.reward_model_recipe),
                       f"{recipe.stage}.reward_model_recipe"))
    if recipe.stage == "gkd":
        a = recipe.stage_args
        needed.append((ModelConfig(name_or_path=a.teacher_model, from_recipe=a.teacher_model_recipe),
                       "gkd.teacher_model_recipe"))
    pairs = recipe.data.from_policy
    if pairs is not None and missing_sources(pairs):
        needed.append((ModelConfig(name_or_path=pairs.policy, from_recipe=pairs.policy_recipe),
                       "data.from_policy.policy_recipe"))
    for model, key in needed:
        if model.from_recipe is None or str(Path(model.name_or_path)) in made:
            continue
        if model.from_recipe in _seen:
            raise AlignError(f"{key} of {where}: {model.from_recipe} needs itself "
                             f"({' -> '.join(_seen + (model.from_recipe,))})")
        # the upstream recipe trains with this recipe's seed: `seed=N` reaches every model a run makes
        upstream = load_recipe(model.from_recipe, [f"output_dir={model.name_or_path}", f"seed={recipe.seed}"])
        if has_model(model.name_or_path):
            warn_if_made_otherwise(upstream, f"{key} of {where}")
            continue
        steps += plan(upstream, why=f"{key} of {where} ({model.from_recipe} -> {model.name_or_path})", made=made,
                      _seen=_seen + (model.from_recipe,))
        made = made | {str(Path(model.name_or_path))}
    if pairs is not None and missing_sources(pairs):
        steps.append(PairsStep(pairs, f"data.from_policy of {where}"))
    steps.append(TrainStep(recipe, why, upstream=bool(_seen)))
    return steps


# ---------------------------------------------------------------------------
# checks, before anything runs
# ---------------------------------------------------------------------------
def check_plan(steps: list) -> None:
    """Validate every step's inputs, given what the earlier steps will make; raise AlignError on the first bad one."""
    made_models: set[str] = set()
    made_files: set[str] = set()
    for step in steps:
        if isinstance(step, PairsStep):
            _check_pairs(step, made_models)
            made_files.update(str(Path(s.output)) for _, s in missing_sources(step.config))
        elif isinstance(step, EvalRMStep):
            _check_model(step.model, made_models, f"{step.why}: model")
            _check_data(step.data, "reward", made_files, f"{step.why}: data")
        else:
            _check_train(step, made_models, made_files)
            made_models.add(str(Path(step.recipe.output_dir)))


# the models a stage loads besides its own (`section.key`: a folder, a built-in model or a hub id)
STAGE_MODELS = {"ppo": ("reward_model",), "online_dpo": ("reward_model",), "gkd": ("teacher_model",)}


def _check_train(step: TrainStep, made_models: set[str], made_files: set[str]) -> None:
    recipe = step.recipe
    prefix = "" if step.why == "the recipe itself" else f"{step.why}: "
    _check_output_dir(recipe.output_dir, prefix)
    missing = vllm_missing(recipe.rollout)
    if missing:
        raise AlignError(prefix + missing)
    _check_model(recipe.model.name_or_path, made_models, f"{prefix}model.name_or_path")
    for key in STAGE_MODELS.get(recipe.stage, ()):
        if getattr(recipe.stage_args, key) is not None:
            _check_model(getattr(recipe.stage_args, key), made_models, f"{prefix}{recipe.stage}.{key}")
    for key in ("train", "eval"):
        spec = getattr(recipe.data, key)
        if spec is not None:
            _check_data(spec, recipe.stage, made_files, f"{prefix}data.{key}")


def _check_pairs(step: PairsStep, made_models: set[str]) -> None:
    config = step.config
    _check_model(config.policy, made_models, f"{step.why}: policy")
    for key, source in missing_sources(config):
        if not source.output or source.prompts is None:
            raise AlignError(f"{step.why}: {key} needs prompts (a data source) and output (the pairs .jsonl to write)")
        _check_data(source.prompts, "generate", set(), f"{key}.prompts")
        _check_writable(Path(source.output).parent, f"{key}.output")


def _check_output_dir(output_dir: str, prefix: str) -> None:
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise AlignError(f"{prefix}output_dir: {output_dir} exists and is a file; expected a folder (or a new path)")
    _check_writable(out, f"{prefix}output_dir")


def _check_writable(folder: Path, key: str) -> None:
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise AlignError(f"{key}: {folder} cannot be made: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise AlignError(f"{key}: {folder} cannot be written ({existing} is not writable)")


def _check_model(name: str, made_models: set[str], key: str) -> None:
    if builtin.is_builtin(name) or has_model(name) or str(Path(name)) in made_models:
        return
    if Path(name).exists():
        raise AlignError(f"{key}: {name} holds no model (no config.json or adapter_config.json) and no recipe "
                         "makes it (model.from_recipe)")
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise AlignError(f"{key}: {name} does not exist, is not a hub id (owner/name), and no recipe makes it "
                         "(model.from_recipe)")
    # owner/name: a hub id, loaded by transformers when the run starts (not checked offline)


def _check_data(spec, stage: str, made_files: set[str], key: str) -> None:
    """Local data files exist and their rows have the columns the stage reads (a hub dataset is loaded by
    the stage itself); files an earlier step writes are taken on trust."""
    specs = spec if isinstance(spec, list) else [spec]
    for one in specs:
        path = str(one.get("path")) if isinstance(one, dict) else str(one)
        if str(Path(path)) in made_files or not is_local(path):
            continue
        rows = load_rows(one, key=key)
        alternatives = STAGE_COLUMNS[stage]
        for i, row in enumerate(rows.rows):
            if not any(all(c in row for c in columns) for columns in alternatives):
                raise AlignError(f"{key}: {rows.where(i)}: {_missing_columns(row, alternatives)} (columns "
                                 f"{sorted(row)}; the {stage} stage reads {' or '.join('/'.join(c) for c in alternatives)})")


def _missing_columns(row: dict, alternatives) -> str:
    """"missing column 'rejected'" for the alternative the row comes closest to."""
    closest = min(alternatives, key=lambda columns: sum(c not in row for c in columns))
    missing = [c for c in closest if c not in row]
    return f"missing column{'s' if len(missing) > 1 else ''} " + ", ".join(repr(c) for c in missing)


def warn_if_made_otherwise(upstream: Recipe, why: str) -> list[str]:
    """Say so when the model folder `upstream` would make exists but was made with other settings (an older
    version of the recipe, another seed): it is reused as it is. Returns the differing keys."""

    made = Path(upstream.output_dir) / "config.yaml"
    if not made.is_file():
        return []
    try:
        before = flat_keys(recipe_to_dict(load_recipe(made)))
    except AlignError:  # written by a version whose keys this one no longer reads
        before = {}
    now = flat_keys(recipe_to_dict(upstream))
    differ = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k) and not k.startswith("train.progress"))
    if differ:
        shown = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in differ[:4])
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        print(f"warning: {upstream.output_dir} ({why}) was made with other settings than the recipe gives now "
              f"({shown}{more}); reusing it as it is; delete the folder (or point model.name_or_path elsewhere) "
              f"to train it again", flush=True)
    return differ


# ---------------------------------------------------------------------------
# running the steps
# ---------------------------------------------------------------------------
def run(recipe: Recipe) -> dict:
    """Plan `recipe`, check every step, run the steps; returns the recipe's own final metrics."""
    steps = plan(recipe)
    check_plan(steps)
    return execute(steps)


def execute(steps: list) -> dict:
    from align.engine import train_recipe

    metrics: dict = {}
    for step in steps:
        if isinstance(step, PairsStep):
            ensure_policy_pairs(step.config)
            continue
        if step.upstream:
            print(f"{step.recipe.output_dir} has no model yet: training it ({step.why})")
        metrics = train_recipe(step.recipe)
    return metrics
