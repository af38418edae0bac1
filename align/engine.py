"""The one training engine, on Accelerate. Every stage trains through `train(stage)`.

A stage supplies the model, "step -> this process's micro-batches" (each carrying
`_weight`, its share of the loss normaliser: trained tokens for SFT, pairs for
preference losses, and `_tokens`, its input tokens) and "micro-batch -> (summed
loss, {metric: (sum, count)})". The engine owns the rest:

1. AdamW with a warmup + constant/linear/cosine schedule, stepped once per optimizer step.
2. Loss normalisation by the *global* weight of the step. Each optimizer step sums
   the weights of every micro-batch on every process first (one all-reduce), then
   backpropagates `loss_sum * processes / global_weight` per micro-batch: DDP
   averages gradients over processes, so the update equals that of the whole global
   batch taken at once. Batch 8, batch 2 x grad_accum 4, and 2 processes x batch 4
   therefore train identically (tested), unlike per-micro-batch means.
3. Gradient clipping, mixed precision (auto: bf16 where the machine computes it natively), DDP/DeepSpeed/
   FSDP through the `accelerate launch` config.
4. `log.jsonl`, `report_to` trackers, a progress bar with loss and tokens/s.
5. Evaluation before the first step, every `eval.steps`, and after the last.
6. Atomic checkpoints every `train.save_steps` (written to a temporary folder, then
   renamed), exact resume from the newest one (model, optimizer, scheduler, RNG,
   data position = the step), and a checkpoint on SIGTERM before exiting.
7. The final model in Hugging Face format, `metrics.json` with the final evaluation
   and the same names suffixed `_start` for the evaluation before training.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from align.accel import make_accelerator
from align.config import flat_keys
from align.device import release_freed_heap
from align.errors import AlignError
from align.io_utils import JsonlLog, atomic_write_json, atomic_write_text
from align.recipe import Recipe, TrainConfig, recipe_to_dict

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")


# ---------------------------------------------------------------------------
# optimizer, schedule
# ---------------------------------------------------------------------------
def make_optimizer(model, train: TrainConfig):
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # a ZeRO-3 partitioned parameter is an empty 1-D tensor: its real shape is ds_shape
        ndim = len(getattr(param, "ds_shape", param.shape))
        (no_decay if ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if not decay and not no_decay:
        raise AlignError("model: no trainable parameters")
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.adam_beta1, train.adam_beta2))


def uses_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def configure_deepspeed(accelerator, train: TrainConfig) -> None:
    """Fill the DeepSpeed config's "auto" entries from the recipe, before `prepare`.

    The engine owns accumulation and loss normalisation, so DeepSpeed's own
    gradient_accumulation_steps stays 1 (DeepSpeed would otherwise divide every
    micro-batch loss by it) and the engine marks the accumulation boundary itself;
    DeepSpeed still averages gradients over processes as DDP does, which the global
    normaliser expects. Clipping happens inside DeepSpeed's step, at train.max_grad_norm.
    Under ZeRO-3 the final save gathers full weights, so that gather is switched on.
    """
    plugin = accelerator.state.deepspeed_plugin
    config = plugin.deepspeed_config
    gas = config.get("gradient_accumulation_steps", "auto")
    if gas not in ("auto", 1):
        raise AlignError(f"the DeepSpeed config sets gradient_accumulation_steps={gas}; leave it out (or auto) "
                         f"and set train.grad_accum instead (the engine accumulates and normalises the loss)")
    config["gradient_accumulation_steps"] = 1
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = train.batch_size
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = train.max_grad_norm if train.max_grad_norm is not None else 0.0
    zero = config.setdefault("zero_optimization", {})
    if plugin.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None):
        # the engine's torch AdamW steps the offloaded fp32 states on the CPU (same update as every other
        # config; DeepSpeed refuses a client optimizer with offload unless told). DeepSpeedCPUAdam is faster.
        config.setdefault("zero_force_ds_cpu_optimizer", False)


def lr_factor(step: int, train: TrainConfig) -> float:
    """Multiplier of train.lr at optimizer step `step` (0-based): linear warmup, then the schedule."""
    warmup = train.warmup()
    if step < warmup:
        return (step + 1) / warmup
    if train.lr_scheduler == "constant":
        return 1.0
    span = max(1, train.max_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    floor = train.min_lr_ratio
    if train.lr_scheduler == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer, step: int, train: TrainConfig) -> float:
    lr = train.lr * lr_factor(step, train)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


# ---------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------
def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = CHECKPOINT_RE.match(child.name)
        if match and (child / "trainer_state.json").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def save_checkpoint(accelerator, output_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Write checkpoints/step-N atomically: into a temporary folder, renamed when complete."""
    root = output_dir / "checkpoints"
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / "trainer_state.json", state)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for _, old in checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ---------------------------------------------------------------------------
# metric bookkeeping
# ---------------------------------------------------------------------------
class MetricSums:
    """Sums and counts of metrics since the last log, reduced over processes when read."""

    def __init__(self):
        self.sums = defaultdict(float)
        self.counts = defaultdict(float)

    def add(self, metrics: dict) -> None:
        """Add {name: (sum, count)}; tensors stay tensors until read (no device sync per micro-batch)."""
        for name, (total, count) in metrics.items():
            self.sums[name] = self.sums[name] + (total.detach().double() if torch.is_tensor(total) else float(total))
            self.counts[name] = self.counts[name] + (count.detach().double() if torch.is_tensor(count) else float(count))

    def read(self, accelerator) -> dict:
        names = sorted(self.sums)
        if not names:
            return {}
        packed = torch.tensor([[float(self.sums[n]), float(self.counts[n])] for n in names], dtype=torch.float64,
                              device=accelerator.device)
        if accelerator.num_processes > 1:
            packed = accelerator.reduce(packed, reduction="sum")
        self.sums.clear()
        self.counts.clear()
        return {n: (s / c if c else float("nan")) for n, (s, c) in zip(names, packed.tolist())}


class _Stop:
    """Set by SIGTERM/SIGINT: the engine checkpoints at the end of the current step and exits."""

    requested = False

    @classmethod
    def install(cls):
        def handler(signum, frame):
            cls.requested = True

        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM,)}
        signal.signal(signal.SIGTERM, handler)
        return previous

    @staticmethod
    def restore(previous):
        for s, h in previous.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------
def train_recipe(recipe: Recipe) -> dict:
    """Build the accelerator and the recipe's stage, then train it (or report it finished).

    Only trains: whatever the recipe needs from other recipes (an upstream model, policy-sample
    pairs) is made and checked first by the planning layer (`align.planning.run`).
    """
    from accelerate.utils import set_seed

    from align.stages import STAGES

    # a budget in epochs is known in steps only once the stage has tokenized its data
    if recipe.train.epochs is None and (finished := _already_trained(recipe)) is not None:
        return finished
    accelerator = make_accelerator(recipe.train, recipe.output_dir)
    set_seed(recipe.seed)
    stage = STAGES[recipe.stage].cls(recipe, accelerator)
    resolve_budget(recipe, stage, accelerator)
    if recipe.train.epochs is not None and (finished := _already_trained(recipe)) is not None:
        return finished
    return train(stage, recipe, accelerator)


def resolve_budget(recipe: Recipe, stage, accelerator) -> None:
    """train.epochs -> train.max_steps from the stage's training set; warn when warmup lasts the whole run.

    max_steps = ceil(epochs x examples / global batch), examples being what train.batch_size counts
    (packed rows for SFT with data.packing). A global batch never straddles two passes (`GlobalBatches`
    drops each pass's remainder), so a fractional last pass starts a reshuffled one.
    """
    t = recipe.train
    if t.epochs is not None:
        examples, size = len(stage.batches.examples), stage.batches.global_batches.size
        t.max_steps = max(1, math.ceil(t.epochs * examples / size - 1e-9))
        accelerator.print(f"train.epochs={t.epochs:g}: {examples} training examples / global batch {size} "
                          f"(batch_size x grad_accum x processes) -> train.max_steps={t.max_steps}")
    if t.warmup() >= t.max_steps:
        accelerator.print(f"warning: warmup ({t.warmup()} steps) >= train.max_steps ({t.max_steps}): the whole run "
                          f"is warmup and the learning rate never reaches train.lr ({t.lr:g}); lower "
                          f"train.warmup_steps or use train.warmup_ratio", flush=True)


def _already_trained(recipe: Recipe) -> dict | None:
    """The metrics of a run already trained to train.max_steps in output_dir (None: there is work to do)."""
    out = Path(recipe.output_dir)
    finished = _finished_metrics(out, recipe.train.max_steps)
    if finished is not None:
        print(f"{out}: already trained to step {finished['train/steps']}; nothing to do "
              f"(raise train.max_steps or train.epochs, or use another output_dir to train more)")
    return finished


def _tracker_config(recipe: Recipe) -> dict:
    """The resolved recipe as the flat {dotted key: scalar} a tracker records (lists as text)."""
    return {k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
            for k, v in flat_keys(recipe_to_dict(recipe)).items()}


def _trainer_state(stage, step: int, start_metrics) -> dict:
    """trainer_state.json of a checkpoint; a stage with state of its own (PPO's adaptive beta) adds it as JSON."""
    state = {"step": step, "metrics_start": start_metrics}
    if hasattr(stage, "checkpoint_state"):
        state["stage"] = stage.checkpoint_state(step)
    return state


def _finished_metrics(out: Path, max_steps: int) -> dict | None:
    path = out / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    done = metrics.get("train/steps", -1) >= max_steps or metrics.get("train/stopped_at_value")
    return metrics if done else None


@dataclass
class _Loop:
    """What one training run's steps share: the prepared model and optimizer, the logs, the running sums."""

    stage: object
    recipe: Recipe
    accelerator: object
    model: object
    optimizer: object
    deepspeed: bool
    out: Path
    log: JsonlLog | None = None
    sums: MetricSums = field(default_factory=MetricSums)
    tokens_since: int = 0
    steps_since: int = 0
    time_since: float = field(default_factory=time.perf_counter)


def train(stage, recipe: Recipe, accelerator) -> dict:
    """Train `stage` as `recipe` says; returns the final metrics (also in metrics.json)."""
    from tqdm.auto import tqdm

    loop = _prepare(stage, recipe, accelerator)
    tcfg = recipe.train
    start_step, start_metrics = _resume(loop)
    if [t for t in tcfg.report_to if t != "none"]:
        accelerator.init_trackers(loop.out.name, config=_tracker_config(recipe))
    if start_metrics is None:
        start_metrics = _evaluate(loop, 0, "before training")
    previous_handlers = _Stop.install()
    bar = tqdm(total=tcfg.max_steps, initial=start_step, disable=not (accelerator.is_main_process and tcfg.progress_bar),
               desc=f"{recipe.stage}", dynamic_ncols=True)
    step = start_step
    try:
        while step < tcfg.max_steps:
            lr, step_loss, grad_norm = _optimizer_step(loop, step, start_metrics)
            step += 1
            if _after_step(loop, step, lr, step_loss, grad_norm, start_metrics, bar):
                break
    finally:
        bar.close()
        _Stop.restore(previous_handlers)
    return _finish(loop, step, start_metrics)


def _prepare(stage, recipe: Recipe, accelerator) -> _Loop:
    """Write config.yaml, build the optimizer, let accelerate wrap model and optimizer (DDP/DeepSpeed/FSDP)."""
    out = Path(recipe.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
    optimizer = make_optimizer(stage.model, recipe.train)
    deepspeed = uses_deepspeed(accelerator)
    if deepspeed:
        configure_deepspeed(accelerator, recipe.train)
    model, optimizer = accelerator.prepare(stage.model, optimizer)
    # train mode: from_pretrained returns eval mode, where dropout and gradient checkpointing are silently off
    model.train()
    stage.model = model
    return _Loop(stage, recipe, accelerator, model, optimizer, deepspeed, out)


def _resume(loop: _Loop) -> tuple[int, dict | None]:
    """Load the newest checkpoint if there is one: -> (the step to continue from, the evaluation before step 1)."""
    start_step, start_metrics = 0, None
    found = checkpoints(loop.out)
    if found:
        step, path = found[-1]
        loop.accelerator.load_state(str(path))
        state = _read_state(path)
        if "stage" in state and hasattr(loop.stage, "load_checkpoint_state"):
            loop.stage.load_checkpoint_state(state["stage"])
        start_step, start_metrics = state["step"], state.get("metrics_start")
        loop.accelerator.print(f"resuming from {path} (step {start_step} of {loop.recipe.train.max_steps})")
    if loop.accelerator.is_main_process:
        loop.log = JsonlLog(loop.out / "log.jsonl", resume_step=start_step if found else None)
    return start_step, start_metrics


def _evaluate(loop: _Loop, step: int, title: str | None = None) -> dict:
    """The stage's evaluation, written to log.jsonl and the trackers (and printed when titled)."""
    metrics = loop.stage.evaluate(loop.model)
    if loop.accelerator.is_main_process:
        loop.log.write(step, metrics)
        loop.accelerator.log(metrics, step=step)
    if title:
        _print_metrics(loop.accelerator, title, metrics)
    return metrics


def _optimizer_step(loop: _Loop, step: int, start_metrics: dict) -> tuple[float, float, float | None]:
    """One optimizer step over the step's micro-batches: -> (lr, summed loss / global weight, grad norm)."""
    acc, tcfg, model = loop.accelerator, loop.recipe.train, loop.model
    # 1. this step's micro-batches; one all-reduce gives the global weight that normalises their loss,
    #    and whether any process was asked to stop
    micro = loop.stage.micro_batches(step)
    global_weight, stop = _reduce_step_header(acc, sum(b["_weight"] for b in micro), _Stop.requested)
    if stop:
        save_checkpoint(acc, loop.out, step, _trainer_state(loop.stage, step, start_metrics), tcfg.save_total_limit)
        acc.print(f"\nstopped by signal at step {step}; checkpoint saved, rerun the same command to resume")
        raise SystemExit(143)
    if global_weight <= 0:
        raise AlignError(f"train step {step + 1}: the batch has no trainable tokens")
    scale = acc.num_processes / global_weight
    # 2. forward/backward each micro-batch; DDP synchronises gradients on the last one only,
    #    DeepSpeed reduces, clips and steps at the boundary the engine marks (the last one)
    lr = set_lr(loop.optimizer, step, tcfg)
    step_loss = torch.zeros((), device=acc.device)
    for i, batch in enumerate(micro):
        batch = {k: v.to(acc.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        last = i == len(micro) - 1
        with acc.no_sync(model) if not last and acc.num_processes > 1 and not loop.deepspeed else nullcontext():
            with acc.autocast():
                loss_sum, metrics = loop.stage.loss(model, batch)
            if loop.deepspeed:
                acc.deepspeed_engine_wrapped.backward(loss_sum * scale, sync_gradients=last)
            else:
                acc.backward(loss_sum * scale)
        release_freed_heap(acc.device)
        step_loss += loss_sum.detach().float()
        loop.sums.add(metrics)
        loop.tokens_since += batch["_tokens"]
    step_loss = step_loss.item()
    if not math.isfinite(step_loss):
        raise AlignError(f"train step {step + 1}: the loss is {step_loss} (not finite); "
                         f"lower train.lr or check the data (last good checkpoint kept)")
    # 3. clip, step
    grad_norm = None
    if tcfg.max_grad_norm is not None:
        grad_norm = float(acc.clip_grad_norm_(model.parameters(), tcfg.max_grad_norm))
    loop.optimizer.step()
    loop.optimizer.zero_grad(set_to_none=True)
    release_freed_heap(acc.device)
    loop.stage.after_step(step)
    return lr, step_loss / global_weight, grad_norm


def _after_step(loop: _Loop, step: int, lr: float, loss: float, grad_norm, start_metrics: dict, bar) -> bool:
    """Log every train.log_steps, evaluate every eval.steps, checkpoint every train.save_steps.
    -> whether the evaluation reached eval.stop_value (training stops there)."""
    tcfg, acc = loop.recipe.train, loop.accelerator
    # summed over processes this is the step's loss, counted once per step
    loop.sums.add({"train/loss": (loss, 1.0 / acc.num_processes)})
    loop.steps_since += 1
    if step % tcfg.log_steps == 0 or step == tcfg.max_steps:
        elapsed = time.perf_counter() - loop.time_since
        record = loop.sums.read(acc)
        record["train/lr"] = lr
        record["train/tokens_per_second"] = loop.tokens_since * acc.num_processes / max(elapsed, 1e-9)
        record["train/seconds_per_step"] = elapsed / max(loop.steps_since, 1)
        if grad_norm is not None:
            record["train/grad_norm"] = grad_norm
        loop.tokens_since, loop.steps_since, loop.time_since = 0, 0, time.perf_counter()
        if acc.is_main_process:
            loop.log.write(step, record)
            acc.log(record, step=step)
            bar.set_postfix(loss=f"{record['train/loss']:.4f}", tok_s=f"{record['train/tokens_per_second']:.0f}")
    ecfg, reached = loop.recipe.eval, False
    if ecfg.steps and step % ecfg.steps == 0 and step < tcfg.max_steps:
        metrics = _evaluate(loop, step)
        reached = ecfg.stop_metric is not None and metrics.get(ecfg.stop_metric, -math.inf) >= ecfg.stop_value
        if reached:
            acc.print(f"\n{ecfg.stop_metric} {metrics[ecfg.stop_metric]:.4g} >= eval.stop_value {ecfg.stop_value:g} "
                      f"at step {step}: training stops here")
    bar.update(1)
    if step % tcfg.save_steps == 0 and step < tcfg.max_steps and not reached:
        save_checkpoint(acc, loop.out, step, _trainer_state(loop.stage, step, start_metrics), tcfg.save_total_limit)
    return reached


def _finish(loop: _Loop, step: int, start_metrics: dict) -> dict:
    """Final evaluation, the model in Hugging Face format, metrics.json."""
    acc = loop.accelerator
    final = _evaluate(loop, step, "after training")
    metrics = dict(final)
    metrics.update({f"{k}_start": v for k, v in start_metrics.items()})
    metrics["train/steps"] = step
    if step < loop.recipe.train.max_steps:  # stopped by eval.stop_value: a rerun has nothing left to do
        metrics["train/stopped_at_value"] = 1
    loop.stage.save(loop.out, acc)
    if acc.is_main_process:
        atomic_write_json(loop.out / "metrics.json", metrics)
    acc.wait_for_everyone()
    if [t for t in loop.recipe.train.report_to if t != "none"]:
        acc.end_training()
    return metrics


def _read_state(path: Path) -> dict:
    return json.loads((path / "trainer_state.json").read_text())


def _reduce_step_header(accelerator, local_weight: float, stop: bool) -> tuple[float, bool]:
    """(global weight of the step, stop requested anywhere): one all-reduce per step."""
    if accelerator.num_processes == 1:
        return float(local_weight), stop
    packed = torch.tensor([float(local_weight), float(stop)], dtype=torch.float64, device=accelerator.device)
    total, stops = accelerator.reduce(packed, reduction="sum").tolist()
    return total, stops > 0


def _print_metrics(accelerator, title: str, metrics: dict) -> None:
    if metrics:
        shown = "  ".join(f"{k}={_shown(k, v, metrics)}" for k, v in sorted(metrics.items()))
        accelerator.print(f"[{title}] {shown}")


def _shown(name: str, value, metrics: dict) -> str:
    """A metric as printed; a pair accuracy where every pair ties (DPO before its first step) reads "ties"."""
    if name == "eval/pair_accuracy" and metrics.get("eval/pair_ties") == 1.0:
        return "ties"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
