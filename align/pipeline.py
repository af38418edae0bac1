"""`align pipeline`: several stages from one recipe, in order, resumable, with a report.

    output_dir: runs/tiny/pipeline
    steps:
      - name: sft
        recipe: recipes/tiny/sft.yaml           # a stage recipe (path) ...
      - name: reward
        recipe: recipes/tiny/reward.yaml
        set: {model.name_or_path: "${steps.sft.output_dir}"}
      - name: rm-eval
        eval_rm: {model: "${steps.reward.output_dir}", data: data/arith/prefs_eval.jsonl}
      - name: dpo
        recipe: {stage: dpo, ...}               # ... or an inline one

Each step writes into `output_dir/<name>/` (its recipe's own output_dir is replaced).
`${steps.NAME.output_dir}` names an earlier step's folder. A finished step is skipped
on rerun (a training step is finished when its `metrics.json` says it reached
`train.max_steps`; an eval-rm step when its JSON exists), and a half-done training step
resumes from its newest checkpoint, so rerunning the command resumes the whole pipeline.
A failing step stops the pipeline with a message naming it; earlier steps' results stay.

Command-line overrides: `output_dir=DIR`, `seed=N` (every training step's `seed`, the
sampling seed of a step's `data.from_policy`, and through them any upstream recipe a step
trains first), `NAME.key.path=value` for one step, and `all.key.path=value` for every
training step (e.g. `all.train.progress_bar=false`). An output_dir keeps the seed it was
run with: another seed needs another output_dir.

At the end `output_dir/report.md` (and the same table on the terminal) has one row per
step: task accuracy before -> after on held-out prompts, reward-model / pair accuracy,
mean reward, KL to the reference, wall time; plus training curves as PNGs. A `report:`
section adds a column of each step's final task accuracy minus a control step's
(`report.control`), and first of all one picture: held-out task accuracy against
optimizer steps for the steps `report.compare` names, with `report.baseline` (the
accuracy of fixed answers, e.g. the teacher's own on the held-out prompts) as a line.

    report:
      control: sft-control
      compare: [sft-control, dpo, ppo, grpo]
      baseline: {label: teacher, completions: data/arith/teacher_eval.jsonl, references: data/arith/sft_eval.jsonl}
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align import config as cfg
from align.errors import AlignError
from align.io_utils import atomic_write_json, atomic_write_text, read_jsonl_log

REFERENCE = re.compile(r"\$\{steps\.([A-Za-z0-9_-]+)\.output_dir\}")


@dataclass
class StepConfig:
    name: str = ""
    recipe: Any = None
    """A stage recipe: a path to a YAML file, or the recipe inline."""
    set: dict = field(default_factory=dict)
    """Overrides of the step's recipe, {key.path: value}."""
    eval_rm: dict | None = None
    """Instead of a recipe: `align eval-rm` arguments {model, data, batch_size, max_length}."""

    def validate(self):
        if not self.name or not re.fullmatch(r"[A-Za-z0-9_-]+", self.name):
            raise AlignError(f"step name {self.name!r}: expected letters, digits, - or _")
        if (self.recipe is None) == (self.eval_rm is None):
            raise AlignError(f"step {self.name}: give exactly one of recipe or eval_rm")


@dataclass
class BaselineConfig:
    label: str = "baseline"
    completions: str = ""
    """{prompt, completion} rows: fixed answers to the held-out prompts (e.g. the teacher's)."""
    references: str = ""
    """{prompt, completion} rows: the held-out prompts with their right answers (the steps' data.eval)."""


@dataclass
class ReportConfig:
    control: str | None = None
    """A step to compare every other step with: the table's "vs <control>" column is a step's final
    held-out task accuracy minus this step's."""
    compare: list[str] = field(default_factory=list)
    """Steps whose held-out task accuracy is drawn against optimizer steps on one picture, first in report.md."""
    baseline: BaselineConfig | None = None
    """A horizontal line on that picture: the exact-match accuracy of `completions` against `references`."""


@dataclass
class PipelineConfig:
    output_dir: str = ""
    seed: int | None = None
    """Every training step's seed (and its data.from_policy sampling seed); None: each recipe's own."""
    report: ReportConfig = field(default_factory=ReportConfig)
    steps: list[StepConfig] = field(default_factory=list)

    def validate(self):
        if not self.output_dir:
            raise AlignError("output_dir: required")
        if not self.steps:
            raise AlignError("steps: a pipeline needs at least one step")
        names = [s.name for s in self.steps]
        for name in names:
            if names.count(name) > 1:
                raise AlignError(f"steps: the name {name!r} is used twice")
        named = [("report.control", self.report.control)] if self.report.control else []
        named += [(f"report.compare[{i}]", n) for i, n in enumerate(self.report.compare)]
        for key, name in named:
            if name not in names:
                raise AlignError(f"{key}: no step named {name!r} (steps: {', '.join(names)})")


def _substitute(value, outputs: dict[str, str], step: str):
    """Replace ${steps.X.output_dir} in strings (recursively); X must be an earlier step."""
    if isinstance(value, str):
        def repl(match):
            name = match.group(1)
            if name not in outputs:
                raise AlignError(f"step {step}: ${{steps.{name}.output_dir}} names no earlier step "
                                 f"(earlier: {', '.join(outputs) or 'none'})")
            return outputs[name]
        return REFERENCE.sub(repl, value)
    if isinstance(value, dict):
        return {k: _substitute(v, outputs, step) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, outputs, step) for v in value]
    return value


def load_pipeline(path: str | Path, overrides: list[str] | None = None):
    """Validate the pipeline and every step's recipe before anything runs.

    Returns (config, [(step, resolved recipe or eval-rm args)]).
    """
    from align.recipe import load_recipe

    raw = cfg.read_yaml(path)
    top, per_step, everywhere = [], {}, []
    for item in overrides or []:
        key = item.split("=", 1)[0]
        head = key.split(".", 1)[0]
        if "." not in key:
            top.append(item)
        elif head == "all":
            everywhere.append(item.split(".", 1)[1])
        else:
            per_step.setdefault(head, []).append(item.split(".", 1)[1])
    pipeline = cfg.build(PipelineConfig, cfg.apply_overrides(raw, top))
    names = [s.name for s in pipeline.steps]
    if pipeline.report.baseline is not None:
        baseline_accuracy(pipeline.report.baseline)  # its files are inputs too: read them before any step runs
    for head in per_step:
        if head not in names:
            close = cfg.difflib.get_close_matches(head, names, n=1)
            raise AlignError(f"override {head}.…: no step named {head!r}"
                             + (f"; did you mean {close[0]}?" if close else f" (steps: {', '.join(names)})"))
    out = Path(pipeline.output_dir)
    outputs, plan = {}, []
    for step in pipeline.steps:
        step_out = str(out / step.name)
        if step.eval_rm is not None:
            args = _substitute(cfg.apply_overrides(dict(step.eval_rm), per_step.get(step.name, [])), outputs, step.name)
            if "model" not in args or "data" not in args:
                raise AlignError(f"step {step.name}: eval_rm needs model and data")
            plan.append((step, args))
        else:
            sets = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                    for k, v in _substitute(step.set, outputs, step.name).items()]
            seeds = [] if pipeline.seed is None else [f"seed={pipeline.seed}"]
            recipe_path = step.recipe if isinstance(step.recipe, str) else None
            data = None if recipe_path else _substitute(step.recipe, outputs, step.name)
            try:
                recipe = load_recipe(recipe_path, everywhere + sets + seeds + per_step.get(step.name, [])
                                     + [f"output_dir={step_out}"], data=data)
                if seeds and recipe.data.from_policy is not None:  # the policy's samples are part of the step
                    seeds.append(f"data.from_policy.seed={pipeline.seed}")
                    recipe = load_recipe(recipe_path, everywhere + sets + seeds + per_step.get(step.name, [])
                                         + [f"output_dir={step_out}"], data=data)
            except AlignError as err:
                raise AlignError(f"step {step.name}: {err}") from None
            plan.append((step, recipe))
        outputs[step.name] = step_out
    return pipeline, plan


def plan_steps(plan: list) -> dict[str, list]:
    """Each training step's planned steps (its own upstream recipes first), all checked together, in order,
    before anything runs: a bad input of the last step stops the pipeline before the first one trains."""
    from align.planning import EvalRMStep, check_plan
    from align.planning import plan as plan_recipe

    plans, flat, made = {}, [], frozenset()
    for step, job in plan:
        if step.eval_rm is not None:
            flat.append(EvalRMStep(job["model"], job["data"], f"step {step.name}"))
            continue
        plans[step.name] = plan_recipe(job, why=f"step {step.name}", made=made)
        flat += plans[step.name]
        made = made | {str(Path(s.recipe.output_dir)) for s in plans[step.name] if hasattr(s, "recipe")}
    check_plan(flat)
    return plans


def run_pipeline(path: str | Path, overrides: list[str] | None = None) -> list[dict]:
    from align.accel import distributed_state
    from align.evaluate_rm import evaluate_reward_model
    from align.planning import execute

    pipeline, plan = load_pipeline(path, overrides)
    plans = plan_steps(plan)  # every input of every step checked before any step runs
    state_of_run = distributed_state()  # under `accelerate launch` every process runs each step together
    main = state_of_run.is_main_process
    out = Path(pipeline.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "pipeline_state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    _check_seed(pipeline, state, out)
    if main and "pipeline.seed" not in state:
        state["pipeline.seed"] = pipeline.seed
        atomic_write_json(state_path, state)
    for i, (step, job) in enumerate(plan, 1):
        if main:
            print(f"\n=== pipeline step {i}/{len(plan)}: {step.name} ===", flush=True)
        started = time.perf_counter()
        try:
            if step.eval_rm is not None:
                target = out / step.name / "eval_rm.json"
                if target.is_file():
                    print(f"{target} exists: step done")
                else:
                    args = dict(job)
                    evaluate_reward_model(args.pop("model"), args.pop("data"), output=str(target),
                                          plot=str(out / step.name / "margins.png"), **args)
            else:
                execute(plans[step.name])
                write_samples(job, out / step.name)
        except AlignError as err:
            raise AlignError(f"pipeline step {step.name} failed: {err} (earlier steps' results are kept; rerun to "
                             f"resume)") from None
        seconds = time.perf_counter() - started
        if main and (seconds > 5 or step.name not in state):  # a skipped step keeps the time it took when it ran
            state[step.name] = {"seconds": round(seconds, 1)}
            atomic_write_json(state_path, state)
        state_of_run.wait_for_everyone()
    rows = collect_rows(pipeline, state)
    table = format_table(rows, control=pipeline.report.control)
    if main:
        print("\n" + table)
        report = write_report(pipeline, rows, table)
        print(f"\nreport: {report}")
    state_of_run.wait_for_everyone()
    return rows


def _check_seed(pipeline: PipelineConfig, state: dict, out: Path) -> None:
    """A finished step is skipped on rerun: a run asking another seed than the one output_dir holds must not
    silently reuse it."""
    if "pipeline.seed" in state and state["pipeline.seed"] != pipeline.seed:
        def name(seed):
            return "each recipe's own seed" if seed is None else f"seed={seed}"
        raise AlignError(f"{out} holds a pipeline run with {name(state['pipeline.seed'])}; for {name(pipeline.seed)} give "
                         f"another output_dir (e.g. output_dir={out}-seed{pipeline.seed})")


GENERATIVE = {"sft", "dpo", "orpo", "simpo", "kto", "online_dpo", "gkd", "ppo", "grpo"}


def write_samples(recipe, folder: Path, n: int = 5) -> None:
    """A few greedy completions of held-out prompts by the step's model, for the report (`align generate`)."""
    from align.data import load_rows
    from align.generate import generate

    target = folder / "samples.jsonl"
    if recipe.stage not in GENERATIVE or recipe.data.eval is None or target.is_file():
        return
    rows = [r for r in load_rows(recipe.data.eval, key="data.eval").rows if "prompt" in r][:n]
    if not rows:
        return
    prompts = folder / "sample_prompts.jsonl"
    atomic_write_text(prompts, "".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    generate(str(folder), str(prompts), output=str(target), max_new_tokens=recipe.eval.max_new_tokens)


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------
COLUMNS = [
    ("task accuracy", "eval/task_accuracy"),
    ("pair / RM accuracy", "eval/pair_accuracy"),
    ("mean reward", "eval/reward"),
    ("KL to reference", "eval/kl"),
]


def collect_rows(pipeline: PipelineConfig, state: dict) -> list[dict]:
    out = Path(pipeline.output_dir)
    rows = []
    for step in pipeline.steps:
        folder = out / step.name
        row = {"step": step.name, "seconds": state.get(step.name, {}).get("seconds")}
        if step.eval_rm is not None:
            summary = json.loads((folder / "eval_rm.json").read_text()) if (folder / "eval_rm.json").is_file() else {}
            row["kind"] = "eval-rm"
            row["eval/pair_accuracy"] = summary.get("accuracy")
        else:
            metrics = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file() else {}
            config = folder / "config.yaml"
            row["kind"] = _stage_of(config)
            for key in [key for _, key in COLUMNS] + ["eval/pair_ties"]:
                row[key] = metrics.get(key)
                row[key + "_start"] = metrics.get(key + "_start")
        rows.append(row)
    return rows


def _stage_of(config: Path) -> str:
    import yaml

    return yaml.safe_load(config.read_text()).get("stage", "?") if config.is_file() else "?"


def _cell(row: dict, key: str) -> str:
    after, before = row.get(key), row.get(key + "_start")
    if after is None:
        return "—"
    shown = _number(row, key, "")
    if before is None or (before == after and _number(row, key, "_start") == shown):
        return shown
    return f"{_number(row, key, '_start')} → {shown}"


def _number(row: dict, key: str, suffix: str) -> str:
    """A table value; a pair accuracy where every pair ties (DPO before its first step) reads "ties"."""
    if key == "eval/pair_accuracy" and row.get("eval/pair_ties" + suffix) == 1.0:
        return "ties"
    return f"{row[key + suffix]:.3f}"


def format_table(rows: list[dict], control: str | None = None) -> str:
    """The report's table; with `control`, a column "vs <control>": a step's final task accuracy minus the control's,
    in points."""
    header = ["step", "stage"] + [name for name, _ in COLUMNS[:1]] + ([f"vs {control}"] if control else []) \
        + [name for name, _ in COLUMNS[1:]] + ["wall time"]
    base = next((r.get("eval/task_accuracy") for r in rows if r["step"] == control), None)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        seconds = row.get("seconds")
        cells = [row["step"], row.get("kind", "?"), _cell(row, COLUMNS[0][1])]
        if control:
            after = row.get("eval/task_accuracy")
            cells.append("—" if row["step"] == control or after is None or base is None
                         else f"{100 * (after - base):+.1f} points")
        cells += [_cell(row, key) for _, key in COLUMNS[1:]]
        cells.append(f"{seconds:.0f} s" if seconds is not None else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def baseline_accuracy(baseline: BaselineConfig) -> float:
    """Exact match (whitespace stripped) of `baseline.completions` against `baseline.references`, by prompt;
    a reference prompt with no completion counts as wrong."""
    from align.data import load_rows

    if not baseline.completions or not baseline.references:
        raise AlignError("report.baseline: needs completions and references (files of prompt, completion rows)")
    sides = []
    for key in ("completions", "references"):
        rows = load_rows(getattr(baseline, key), key=f"report.baseline.{key}").rows
        bad = next((i for i, r in enumerate(rows, 1) if "prompt" not in r or "completion" not in r), None)
        if bad is not None:
            raise AlignError(f"report.baseline.{key}: row {bad} of {getattr(baseline, key)} has no prompt and "
                             f"completion columns")
        sides.append(rows)
    answers = {r["prompt"]: str(r["completion"]).strip() for r in sides[0]}
    return sum(answers.get(r["prompt"]) == str(r["completion"]).strip() for r in sides[1]) / len(sides[1])


def plot_comparison(pipeline: PipelineConfig) -> Path | None:
    """Held-out task accuracy against optimizer steps of the `report.compare` steps on one picture, with the
    baseline's accuracy as a horizontal line; None when no step logged an accuracy."""
    from align.plots import plot_curves

    out = Path(pipeline.output_dir)
    series = {}
    for name in pipeline.report.compare:
        log = [r for r in read_jsonl_log(out / name / "log.jsonl") if r.get("eval/task_accuracy") is not None]
        if log:
            series[name] = ([r["step"] for r in log], [r["eval/task_accuracy"] for r in log])
    if not series:
        return None
    lines = {}
    baseline = pipeline.report.baseline
    if baseline is not None:
        accuracy = baseline_accuracy(baseline)
        lines[f"{baseline.label} ({accuracy:.3f})"] = accuracy
    return plot_curves(out / "accuracy_vs_steps.png", series, title="held-out task accuracy",
                       xlabel="optimizer step", ylabel="task accuracy (exact match)", hlines=lines)


CURVES = {  # file suffix -> the metrics drawn on one picture
    "loss": ["train/loss", "eval/loss"],
    # for PPO/GRPO the reward-hacking picture: proxy reward vs true accuracy vs KL on one page
    "reward_accuracy_kl": ["train/reward", "train/kl", "eval/task_accuracy", "eval/reward", "eval/kl"],
    "preference": ["rewards/chosen", "rewards/rejected", "rewards/margins"],
}


def write_report(pipeline: PipelineConfig, rows: list[dict], table: str) -> Path:
    from align.plots import plot_curves, series_title

    out = Path(pipeline.output_dir)
    parts = ["# Pipeline report", ""]
    picture = plot_comparison(pipeline)
    if picture is not None:
        parts += [f"![held-out task accuracy against optimizer steps]({picture.name})", ""]
    seed = "each recipe's own seed" if pipeline.seed is None else f"seed {pipeline.seed}"
    control = (f" `vs {pipeline.report.control}`: final task accuracy minus that step's, in points."
               if pipeline.report.control else "")
    parts += [f"Output folder: `{out}` ({seed}). Values are `before → after` the step, on held-out data.{control}",
              "", table, ""]
    for step in pipeline.steps:
        log = read_jsonl_log(out / step.name / "log.jsonl")
        if not log:
            if (out / step.name / "margins.png").is_file():
                parts += [f"## {step.name}", "", f"![margins]({step.name}/margins.png)", ""]
            continue
        images = []
        for kind, keys in CURVES.items():
            series = {k: ([r["step"] for r in log if k in r and r[k] is not None],
                          [r[k] for r in log if k in r and r[k] is not None]) for k in keys}
            series = {k: v for k, v in series.items() if v[0]}
            if not series:
                continue
            png = plot_curves(out / f"{step.name}_{kind}.png", series, title=series_title(step.name, series))
            images.append(png.name)
        parts += [f"## {step.name}", ""] + [f"![{name}]({name})" for name in images] + [""]
        samples = out / step.name / "samples.jsonl"
        if samples.is_file():
            parts += ["Example completions:", "", "| prompt | completion |", "|---|---|"]
            for line in samples.read_text().splitlines()[:5]:
                r = json.loads(line)
                parts.append(f"| `{r.get('prompt')}` | `{r.get('completion')}` |")
            parts.append("")
    path = out / "report.md"
    atomic_write_text(path, "\n".join(parts))
    return path
