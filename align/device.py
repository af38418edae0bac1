"""What the memory settings left at `auto` become on this machine.

Activations are the memory a training step adds, and there are two ways to bound them:
recompute each layer in the backward pass (gradient checkpointing: about a third more
compute) or run the step as several smaller forward passes (`train.micro_batch_tokens`:
the loss is normalised over the global batch, so the result is the same). Which is
cheaper depends on the device:

- on a GPU (or another accelerator), a forward pass needs many tokens to fill the device,
  so `auto` checkpoints, as TRL does, and keeps the whole per-process batch in one pass;
- on a CPU, a matmul over 1,024 rows already runs at full speed, so `auto` does not
  checkpoint and cuts each step into forward passes of at most 1,024 padded tokens.
  Measured on this project's 2-core CPU (bench/bench_sft.py part b, 5M-parameter Llama,
  batch 8 packed rows of 512 tokens, bf16 autocast, median of 3 interleaved rounds): one
  pass in 19.1 s against 23.9 s with checkpointing (1.25x), at 0.80x the added peak memory
  (364 vs 455 MB). Micro-batches of 512, 1,024 and 2,048 tokens ran at the same speed.
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch

CPU_MICRO_BATCH_TOKENS = 1024
MATMUL_CACHE_CAPACITY = 64
"""Entries each of oneDNN's and ideep's caches of CPU matmul primitives keeps (their default: 1,024)."""


def has_accelerator() -> bool:
    """A CUDA (or ROCm) GPU, an Intel XPU or an Apple MPS device is there to train on (and the run was
    not told to use the CPU: `accelerate launch --cpu` / ACCELERATE_USE_CPU=true)."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return False
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return True
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def gradient_checkpointing(setting, *, on_accelerator: bool | None = None) -> bool:
    """`model.gradient_checkpointing`: true/false as set; auto: on with an accelerator, off on a CPU.
    `on_accelerator` answers for another machine than this one (`align check` estimates for a GPU)."""
    if setting == "auto":
        return has_accelerator() if on_accelerator is None else on_accelerator
    return bool(setting)


def micro_batch_tokens(recipe) -> int | None:
    """`train.micro_batch_tokens`: as set (an int, or None for one pass per micro-batch); auto: 1,024 on a
    CPU when the model is not checkpointed, else None."""
    setting = recipe.train.micro_batch_tokens
    if setting != "auto":
        return setting
    if has_accelerator() or gradient_checkpointing(recipe.model.gradient_checkpointing):
        return None
    return CPU_MICRO_BATCH_TOKENS


def bound_matmul_caches(capacity: int = MATMUL_CACHE_CAPACITY) -> None:
    """Cap the CPU caches of matmul primitives, unless the user set them (ONEDNN_PRIMITIVE_CACHE_CAPACITY,
    LRU_CACHE_CAPACITY). Called before a run's first computation: each cache reads its capacity once, when it
    first builds a primitive, so in a process that already ran a bf16 matmul this changes nothing.

    Under bf16 autocast on a CPU, torch runs matmuls through oneDNN (and ideep), which keep a primitive
    and its buffers per shape, 1,024 of each by default. Training on variable-length batches meets a
    new shape at almost every micro-batch, so the process grew step after step: +45 MB of heap per step,
    1.3 GB added after 16 DPO steps of builtin:small on HH-RLHF, batch 8 (bench/profile_memory.py). A
    step builds a few dozen primitives and reuses them through its layers, so 64 entries keep every hit
    within a step (measured: no slower) and bound the caches to tens of MB. Numerics are unchanged.
    """
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(capacity))


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (macOS, musl)."""
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except (OSError, TypeError):  # Windows has no process-wide CDLL(None)
        return None


def release_freed_heap(device: torch.device) -> None:
    """On a CPU, hand the C heap's free pages back to the system (glibc's malloc_trim).

    A CPU step allocates and frees tensors of every size; glibc keeps what was freed in its arenas,
    fragmented, so each backward's transient landed on top of the last one's leftovers and the
    process grew step after step. Called after each micro-batch's backward and each optimizer step:
    on the real-vocabulary DPO benchmark (bench/bench_logprobs.py, 2 pairs x 2,048 tokens, 3 steps) the
    peak fell from 1,941 to 1,837 MB (an RSS trace between phases, one run each: trimming only after the
    step gave 1,884); each call takes about 0.05 ms. An accelerator's memory is not the C heap: not called there.
    """
    trim = _malloc_trim() if device.type == "cpu" else None
    if trim is not None:
        trim(0)
