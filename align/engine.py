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
import sys
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml

from align.errors import AlignError
from align.io_utils import JsonlLog, atomic_write_json, atomic_write_text
from align.recipe import Recipe, TrainConfig, recipe_to_dict

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")


# ---------------------------------------------------------------------------
# accelerator, optimizer, schedule
# ---------------------------------------------------------------------------
def make_accelerator(train: TrainConfig, output_dir: str):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    mixed = resolve_mixed_precision(train.mixed_precision)
    forget_other_precision(mixed)
    trackers = [t for t in train.report_to if t != "none"]
    check_trackers(trackers)
    # several CPU processes talk over gloo (with a DeepSpeed plugin each rank would otherwise think it is alone)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = [InitProcessGroupKwargs(backend="gloo")] if distributed and not torch.cuda.is_available() else []
    accelerator = Accelerator(mixed_precision=mixed, log_with=trackers or None, project_dir=output_dir,
                              kwargs_handlers=handlers)
    warn_if_world_size_differs(accelerator)
    return accelerator


def resolve_mixed_precision(setting: str) -> str:
    """`train.mixed_precision: auto`: the launcher's choice under `accelerate launch` (its
    --mixed_precision or config file), else bf16 where the machine computes bf16 natively, else
    fp32. An explicit recipe value always wins."""
    if setting != "auto":
        return setting
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launched:
        return launched
    return "bf16" if native_bf16() else "no"


def native_bf16() -> bool:
    """Does this machine compute bf16 natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX?

    There `auto` trains under bf16 autocast, as TRL's default `bf16=True` does (measured on an
    AVX512-BF16 CPU: a 6M-parameter Llama's forward/backward 1.5-1.7x faster than fp32).
    """
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def forget_other_precision(mixed: str) -> None:
    """Accelerate keeps one AcceleratorState per process and refuses a second Accelerator with
    another mixed precision; runs done one after another in one process (a pipeline, eval-rm
    after training, tests) each get their own. The process group (PartialState) is kept."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and str(state.get("_mixed_precision", mixed)) != mixed:
        AcceleratorState._reset_state(reset_partial_state=False)


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


def check_trackers(trackers: list[str]) -> None:
    import importlib.util

    for name in trackers:
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            raise AlignError(f"train.report_to: {name} is not installed; pip install {TRACKER_PACKAGES[name]}")


def distributed_state():
    """Accelerate's process state, set up as `make_accelerator` sets it up (CPU mode, gloo).

    For code that needs ranks without an Accelerator (generate, the pipeline driver). A
    plain `PartialState()` under `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu`
    would see one process and leave the Accelerator made later undistributed.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    kwargs = {"backend": "gloo"} if distributed and not torch.cuda.is_available() else {}
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), **kwargs)


def requested_processes() -> int | None:
    """The --num_processes of the `accelerate launch` that started us, when visible (Linux)."""
    try:
        args = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    return num_processes_in_launch_args([a.decode(errors="replace") for a in args])


def num_processes_in_launch_args(args: list[str]) -> int | None:
    """`--num_processes N` from an `accelerate launch` command line (None when not one)."""
    if not any("accelerate" in a for a in args[:3]):
        return None
    for i, arg in enumerate(args):
        for flag in ("--num_processes", "--num-processes"):
            if arg == flag and i + 1 < len(args) and args[i + 1].isdigit():
                return int(args[i + 1])
            if arg.startswith(flag + "="):
                return int(arg.split("=", 1)[1])
    return None


def warn_if_world_size_differs(accelerator) -> None:
    """Stop when a launcher started several processes that each run alone; warn on other mismatches."""
    from accelerate.utils import DistributedType

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and (accelerator.num_processes == 1 or accelerator.distributed_type == DistributedType.NO):
        raise AlignError(
            f"the launcher started {launched} processes (WORLD_SIZE={launched}) but accelerate set up no "
            f"distributed training (gradients would not be synchronised); on CPU set ACCELERATE_USE_CPU=true "
            f"(ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes {launched} -m align ...)")
    asked = requested_processes()
    if asked is not None and asked != accelerator.num_processes:
        print(f"\n*** WARNING: accelerate launch asked for {asked} processes but this run has "
              f"{accelerator.num_processes}. On CPU start several processes with\n"
              f"***   ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes {asked} -m align ...\n"
              f"*** (`--cpu --num_processes N` starts only one process).\n", file=sys.stderr, flush=True)


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
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    if train.lr_scheduler == "constant":
        return 1.0
    span = max(1, train.max_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
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
def run(recipe: Recipe) -> dict:
    """Build the accelerator and the recipe's stage, then train it."""
    from accelerate.utils import set_seed

    from align.policy_pairs import ensure_policy_pairs
    from align.stages import STAGES

    ensure_model(recipe.model, seed=recipe.seed)
    ensure_policy_pairs(recipe.data.from_policy, seed=recipe.seed)
    out = Path(recipe.output_dir)
    finished = _finished_metrics(out, recipe.train.max_steps)
    if finished is not None:
        print(f"{out}: already trained to step {finished['train/steps']}; nothing to do "
              f"(raise train.max_steps or use another output_dir to train more)")
        return finished
    accelerator = make_accelerator(recipe.train, recipe.output_dir)
    set_seed(recipe.seed)
    stage = STAGES[recipe.stage].cls(recipe, accelerator)
    return train(stage, recipe, accelerator)


def ensure_model(model_cfg, seed: int | None = None) -> None:
    """Run `model.from_recipe` first when the folder it should produce holds no finished model yet.

    `seed`: the seed of the recipe that needs the model; the upstream recipe runs with it, so
    `seed=N` on a command line (or an `align pipeline ... seed=N`) seeds every model the run trains."""
    if model_cfg.from_recipe is None or (Path(model_cfg.name_or_path) / "config.json").is_file() \
            or (Path(model_cfg.name_or_path) / "adapter_config.json").is_file():
        return
    from align.recipe import load_recipe

    overrides = [f"output_dir={model_cfg.name_or_path}"] + ([] if seed is None else [f"seed={seed}"])
    upstream = load_recipe(model_cfg.from_recipe, overrides)
    print(f"model.name_or_path {model_cfg.name_or_path} does not exist yet: training it with {model_cfg.from_recipe}")
    run(upstream)


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
    return metrics if metrics.get("train/steps", -1) >= max_steps else None


def train(stage, recipe: Recipe, accelerator) -> dict:
    """Train `stage` as `recipe` says; returns the final metrics (also in metrics.json)."""
    from tqdm.auto import tqdm

    out = Path(recipe.output_dir)
    tcfg = recipe.train
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))

    model = stage.model
    optimizer = make_optimizer(model, tcfg)
    deepspeed = uses_deepspeed(accelerator)
    if deepspeed:
        configure_deepspeed(accelerator, tcfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    # train mode: from_pretrained returns eval mode, where dropout and gradient checkpointing are silently off
    model.train()
    stage.model = model

    # -- resume ------------------------------------------------------------
    start_step, start_metrics = 0, None
    found = checkpoints(out)
    if found:
        step, path = found[-1]
        accelerator.load_state(str(path))
        state = _read_state(path)
        if "stage" in state and hasattr(stage, "load_checkpoint_state"):
            stage.load_checkpoint_state(state["stage"])
        start_step, start_metrics = state["step"], state.get("metrics_start")
        accelerator.print(f"resuming from {path} (step {start_step} of {tcfg.max_steps})")
    if accelerator.is_main_process:
        log = JsonlLog(out / "log.jsonl", resume_step=start_step if found else None)
    if [t for t in tcfg.report_to if t != "none"]:
        accelerator.init_trackers(out.name, config=_flat(recipe_to_dict(recipe)))

    # -- evaluation before the first step ------------------------------------
    if start_metrics is None:
        start_metrics = stage.evaluate(model)
        if accelerator.is_main_process:
            log.write(0, start_metrics)
            accelerator.log(start_metrics, step=0)
        _print_metrics(accelerator, "before training", start_metrics)

    previous_handlers = _Stop.install()
    sums = MetricSums()
    tokens_since, time_since = 0, time.perf_counter()
    bar = tqdm(total=tcfg.max_steps, initial=start_step, disable=not (accelerator.is_main_process and tcfg.progress_bar),
               desc=f"{recipe.stage}", dynamic_ncols=True)
    step = start_step
    try:
        while step < tcfg.max_steps:
            # 1. this step's micro-batches; one all-reduce gives the global weight that normalises
            #    their loss, and whether any process was asked to stop
            micro = stage.micro_batches(step)
            global_weight, stop = _reduce_step_header(accelerator, sum(b["_weight"] for b in micro), _Stop.requested)
            if stop:
                save_checkpoint(accelerator, out, step, _trainer_state(stage, step, start_metrics),
                                tcfg.save_total_limit)
                accelerator.print(f"\nstopped by signal at step {step}; checkpoint saved, rerun the same "
                                  f"command to resume")
                raise SystemExit(143)
            if global_weight <= 0:
                raise AlignError(f"train step {step + 1}: the batch has no trainable tokens")
            scale = accelerator.num_processes / global_weight
            # 2. forward/backward each micro-batch; DDP synchronises gradients on the last one only,
            #    DeepSpeed reduces, clips and steps at the boundary the engine marks (the last one)
            lr = set_lr(optimizer, step, tcfg)
            step_loss = torch.zeros((), device=accelerator.device)
            for i, batch in enumerate(micro):
                batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                last = i == len(micro) - 1
                with (accelerator.no_sync(model) if not last and accelerator.num_processes > 1 and not deepspeed
                      else nullcontext()):
                    with accelerator.autocast():
                        loss_sum, metrics = stage.loss(model, batch)
                    if deepspeed:
                        accelerator.deepspeed_engine_wrapped.backward(loss_sum * scale, sync_gradients=last)
                    else:
                        accelerator.backward(loss_sum * scale)
                step_loss += loss_sum.detach().float()
                sums.add(metrics)
                tokens_since += batch["_tokens"]
            step_loss = step_loss.item()
            if not math.isfinite(step_loss):
                raise AlignError(f"train step {step + 1}: the loss is {step_loss} (not finite); "
                                 f"lower train.lr or check the data (last good checkpoint kept)")
            # 3. clip, step
            grad_norm = None
            if tcfg.max_grad_norm is not None:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), tcfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            stage.after_step(step)
            step += 1
            # summed over processes this is the step's loss, counted once per step
            sums.add({"train/loss": (step_loss / global_weight, 1.0 / accelerator.num_processes)})
            # 4. log, evaluate, checkpoint
            if step % tcfg.log_steps == 0 or step == tcfg.max_steps:
                elapsed = time.perf_counter() - time_since
                record = sums.read(accelerator)
                record["train/lr"] = lr
                record["train/tokens_per_second"] = tokens_since * accelerator.num_processes / max(elapsed, 1e-9)
                if grad_norm is not None:
                    record["train/grad_norm"] = float(grad_norm)
                tokens_since, time_since = 0, time.perf_counter()
                if accelerator.is_main_process:
                    log.write(step, record)
                    accelerator.log(record, step=step)
                    bar.set_postfix(loss=f"{record['train/loss']:.4f}",
                                    tok_s=f"{record['train/tokens_per_second']:.0f}")
            if recipe.eval.steps and step % recipe.eval.steps == 0 and step < tcfg.max_steps:
                evaluated = stage.evaluate(model)
                if accelerator.is_main_process:
                    log.write(step, evaluated)
                    accelerator.log(evaluated, step=step)
            bar.update(1)
            if step % tcfg.save_steps == 0 and step < tcfg.max_steps:
                save_checkpoint(accelerator, out, step, _trainer_state(stage, step, start_metrics),
                                tcfg.save_total_limit)
    finally:
        bar.close()
        _Stop.restore(previous_handlers)

    # -- final evaluation and save ---------------------------------------------
    final = stage.evaluate(model)
    _print_metrics(accelerator, "after training", final)
    metrics = dict(final)
    metrics.update({f"{k}_start": v for k, v in start_metrics.items()})
    metrics["train/steps"] = step
    if accelerator.is_main_process:
        log.write(step, final)
        accelerator.log(final, step=step)
    stage.save(out, accelerator)
    if accelerator.is_main_process:
        atomic_write_json(out / "metrics.json", metrics)
    accelerator.wait_for_everyone()
    if [t for t in tcfg.report_to if t != "none"]:
        accelerator.end_training()
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


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out


def _print_metrics(accelerator, title: str, metrics: dict) -> None:
    if metrics:
        shown = "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(metrics.items()))
        accelerator.print(f"[{title}] {shown}")
