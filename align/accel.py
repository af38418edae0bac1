"""Accelerate set-up shared by every command: the Accelerator of a run (mixed precision, trackers,
gloo between CPU processes), the process state for code that needs ranks without one, and the
checks that a launcher really started the processes it was asked for."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from align.device import bound_matmul_caches
from align.errors import AlignError
from align.recipe import TrainConfig


def make_accelerator(train: TrainConfig, output_dir: str):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    bound_matmul_caches()  # before the run's first matmul (align.device)
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
    if (launched > 1 or "ACCELERATE_MIXED_PRECISION" in os.environ) and accelerator.is_main_process:
        kind = getattr(accelerator.distributed_type, "value", accelerator.distributed_type)
        print(f"accelerate launch: world size {accelerator.num_processes} ({kind} on {accelerator.device.type}); "
              f"a global batch is train.batch_size x train.grad_accum x {accelerator.num_processes}", flush=True)
    asked = requested_processes()
    if asked is not None and asked != accelerator.num_processes:
        print(f"\n*** WARNING: accelerate launch asked for {asked} processes but this run has "
              f"{accelerator.num_processes}. On CPU start several processes with\n"
              f"***   ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes {asked} -m align ...\n"
              f"*** (`--cpu --num_processes N` starts only one process).\n", file=sys.stderr, flush=True)
