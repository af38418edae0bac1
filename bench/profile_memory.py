"""Where the memory of a small CPU run goes: one DPO step and one unpacked SFT step, by kind.

    OMP_NUM_THREADS=1 python bench/profile_memory.py [--part imports,dpo,sft,malloc] [--pairs 128]
        [--rows 96] [--max-length 512] [--batch 8] [--steps 16]

Sizes of issue 18's outside measurement: `builtin:small` (~5.6M parameters, saved to a
folder), HH-RLHF harmless-base dialogues from ../shared/data (DPO: explicit
prompt/chosen/rejected pairs that fit `--max-length`, as bench/bench_dpo.py; SFT: the
`chosen` transcripts truncated at `--max-length`, as bench/bench_sft.py part b), batch
8, align's defaults (bf16 autocast where the CPU computes bf16 natively, no
checkpointing and forwards of at most 1,024 tokens on a CPU; SFT with
`data.packing=false`). Every part runs in fresh child processes.

1. `imports`: resident memory after each tool's imports (torch; + transformers' Llama;
   + align's engine and stages; + datasets; + trl): part of every whole-process peak.
2. `dpo`, `sft`: one training run in-process; the resident set (VmRSS) and its
   high-water mark (VmHWM, reset before each phase) after each phase (imports, stage
   set-up: tokenization, model, DPO's reference precompute; each step), then one step
   taken apart: live tensors by kind (weights, gradients, AdamW state, the micro-batch's
   tensors by key (the (B, 1, T, T) shared-prompt masks), tensors autograd saved for the
   backward by module kind at the end of each forward (activations; the head's
   log-probs)), and glibc's heap (mallinfo2: bytes in use, free inside the arenas, mmapped).
   `--unbounded` profiles the caches as they were before align capped them (1,024 entries).
3. `malloc`: the whole run's peak resident set and wall time under glibc settings
   (MALLOC_ARENA_MAX, MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_) as env variables,
   to compare against the default.
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import child_env, emit, machine_load, reset_peak_rss, rss_mb, run_child  # noqa: E402, I001

MB = 2 ** 20
IMPORT_STEPS = {
    "python": "",
    "+ torch": "import torch",
    "+ transformers Llama": "from transformers import AutoModelForCausalLM; "
                            "from transformers.models.llama import modeling_llama",
    "+ align engine, stages": "import align.planning, align.engine, align.stages.sft, align.stages.preference",
    "+ datasets": "import datasets",
    "+ trl": "import trl; from trl import DPOTrainer, SFTTrainer",
}
MALLOC_SETTINGS = {
    "default": {},
    "ARENA_MAX=1": {"MALLOC_ARENA_MAX": "1"},
    "TRIM=128K MMAP=128K": {"MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_MMAP_THRESHOLD_": "131072"},
    "MMAP=1M": {"MALLOC_MMAP_THRESHOLD_": "1048576"},
}


# ---------------------------------------------------------------------------
# glibc heap
# ---------------------------------------------------------------------------
class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def heap() -> dict:
    """glibc's view: in use (sbrk/arena chunks in use + mmapped), free inside the arenas, mmapped, in MB."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
        m = libc.mallinfo2()
    except (OSError, AttributeError):
        return {}
    return {"in_use_mb": (m.uordblks + m.hblkhd) / MB, "arena_free_mb": m.fordblks / MB, "mmapped_mb": m.hblkhd / MB,
            "mmapped_blocks": m.hblks}


# ---------------------------------------------------------------------------
# data (the benches' own preparation)
# ---------------------------------------------------------------------------
def prepare(work: Path, args) -> None:
    import bench_dpo
    import bench_sft

    bench_dpo.prepare(work, args.pairs, args.max_length)
    ns = argparse.Namespace(seq=256, a_warmup=0, a_steps=1, batch=args.batch, b_rows=args.rows,
                            max_length=args.max_length)
    bench_sft.prepare(work, ns)


def recipe_of(kind: str, work: Path, args, out: Path, extra: list[str]):
    from align.recipe import load_recipe

    common = [f"output_dir={out}", f"model.name_or_path={work / 'model'}", f"data.max_length={args.max_length}",
              f"train.batch_size={args.batch}", "train.save_steps=100000", "train.log_steps=1",
              "train.progress_bar=false", "eval.generate=false"]
    if kind == "dpo":
        n = sum(1 for _ in (work / "pairs.jsonl").open())
        return load_recipe(None, ["stage=dpo", f"data.train={work / 'pairs.jsonl'}", "train.lr=1e-6",
                                  f"train.max_steps={min(args.steps, n // args.batch)}", "train.warmup_steps=0",
                                  *common, *extra])
    return load_recipe(None, ["stage=sft", f"data.train={work / 'hh.jsonl'}", "train.lr=1e-4", "data.packing=false",
                              f"train.max_steps={args.steps}", *common, *extra])


# ---------------------------------------------------------------------------
# 2. one run taken apart (child)
# ---------------------------------------------------------------------------
class SavedTensors:
    """Bytes autograd saves for the backward, by the innermost module kind running when saved (deduplicated
    by storage): the activations a step holds at the end of its forward."""

    def __init__(self):
        self.stack: list[str] = []
        self.storages: dict[int, tuple[str, int]] = {}

    def pack(self, t):
        if t.is_floating_point() or t.dtype == torch_bool():
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key and key not in self.storages and not isinstance(t, _param_type()):
                self.storages[key] = (self.stack[-1] if self.stack else "(outside modules)", storage.nbytes())
        return t

    def by_kind(self) -> dict[str, float]:
        out = defaultdict(float)
        for kind, nbytes in self.storages.values():
            out[kind] += nbytes / MB
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def torch_bool():
    import torch

    return torch.bool


def _param_type():
    import torch

    return torch.nn.Parameter


def tensor_mb(tensors) -> float:
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total / MB


def profiled_run(kind: str, work: Path, args, extra: list[str]) -> dict:
    """Run the recipe in-process, phase by phase, and take step `args.inspect` apart."""
    import torch

    import align.engine as engine
    from align.accel import make_accelerator
    from align.stages import STAGES

    phases = {}
    base = reset_peak_rss()
    phases["after imports"] = {"rss": base, "peak": rss_mb("VmHWM")}
    recipe = recipe_of(kind, work, args, Path(tempfile.mkdtemp(dir=work)), extra)
    start = time.perf_counter()
    accelerator = make_accelerator(recipe.train, recipe.output_dir)
    reset_peak_rss()
    stage = STAGES[recipe.stage].cls(recipe, accelerator)
    phases["stage set-up (tokenize, model" + (", reference precompute)" if kind == "dpo" else ")")] = \
        {"rss": rss_mb(), "peak": rss_mb("VmHWM")}
    loop = engine._prepare(stage, recipe, accelerator)
    loop.log = None
    taken = {}
    original_loss = stage.loss

    def inspected_loss(model, batch):
        saved = SavedTensors()
        def enter(module, args):
            saved.stack.append(type(module).__name__)

        def leave(module, args, output):
            saved.stack.pop()

        hooks = [torch.nn.modules.module.register_module_forward_pre_hook(enter),
                 torch.nn.modules.module.register_module_forward_hook(leave)]
        try:
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
                out = original_loss(model, batch)
        finally:
            for h in hooks:
                h.remove()
        shapes = {k: (tuple(v.shape), str(v.dtype).replace("torch.", ""), v.untyped_storage().nbytes() / MB)
                  for k, v in batch.items() if torch.is_tensor(v)}
        taken.setdefault("micro", []).append({"batch": shapes, "saved": saved.by_kind(),
                                              "rss_after_forward": rss_mb(), "heap_after_forward": heap()})
        return out

    stage_peaks, step_heaps = [], []
    for step in range(recipe.train.max_steps):
        reset_peak_rss()
        inspect = step == args.inspect
        stage.loss = inspected_loss if inspect else original_loss
        engine._optimizer_step(loop, step, {})
        stage_peaks.append(rss_mb("VmHWM"))
        step_heaps.append(heap())
        if inspect:
            model, opt = loop.model, loop.optimizer
            taken["weights_mb"] = tensor_mb(p for p in model.parameters())
            taken["buffers_mb"] = tensor_mb(b for b in model.buffers())
            taken["grads_after_step_mb"] = tensor_mb(p.grad for p in model.parameters())
            taken["grads_mb"] = taken["weights_mb"]  # live from the first backward to zero_grad
            taken["adam_mb"] = tensor_mb(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
            taken["step_peak"] = rss_mb("VmHWM")
            taken["rss_after_step"] = rss_mb()
            taken["heap_after_step"] = heap()
    seconds = time.perf_counter() - start
    phases["training steps (max over steps)"] = {"rss": rss_mb(), "peak": max(stage_peaks)}
    return {"phases": phases, "taken": taken, "step_peaks": stage_peaks, "step_heaps": step_heaps, "seconds": seconds,
            "process_peak": max(p["peak"] for p in phases.values())}


def print_profile(kind: str, r: dict, args) -> None:
    print(f"\n== {kind}: phases (resident MB; peak = high-water mark within the phase) ==")
    for name, p in r["phases"].items():
        print(f"  {name:48s} rss {p['rss']:7.0f}   peak {p['peak']:7.0f}")
    print(f"  per-step peaks: {' '.join(f'{x:.0f}' for x in r['step_peaks'])}")
    in_use = " ".join(f"{h.get('in_use_mb', 0):.0f}" for h in r["step_heaps"])
    free = " ".join(f"{h.get('arena_free_mb', 0):.0f}" for h in r["step_heaps"])
    print(f"  glibc heap in use after each step: {in_use}; free inside the arenas: {free}")
    print("  (live tensors are the same after every step: a heap in use that grows is not tensors; under bf16 "
          "autocast on a CPU it is oneDNN's and ideep's caches of matmul primitives, one per new shape)")
    t = r["taken"]
    print(f"\n== {kind}: step {args.inspect} taken apart (MB) ==")
    print(f"  weights {t['weights_mb']:.1f}, gradients {t['grads_mb']:.1f}, AdamW state {t['adam_mb']:.1f}, "
          f"buffers {t['buffers_mb']:.1f}")
    for i, m in enumerate(t["micro"]):
        batch = ", ".join(f"{k} {'x'.join(map(str, s))} {d} {mb:.1f}" for k, (s, d, mb) in m["batch"].items())
        print(f"  micro-batch {i}: {batch}")
        saved = m["saved"]
        print(f"    saved for backward {sum(saved.values()):.1f}: " +
              ", ".join(f"{k} {v:.1f}" for k, v in saved.items() if v >= 0.05))
        h = m["heap_after_forward"]
        print(f"    after its forward: rss {m['rss_after_forward']:.0f}; heap in use {h.get('in_use_mb', 0):.0f}, "
              f"free in arenas {h.get('arena_free_mb', 0):.0f}, mmapped {h.get('mmapped_mb', 0):.0f}")
    h = t["heap_after_step"]
    known = t["weights_mb"] + t["adam_mb"] + t["grads_after_step_mb"]
    print(f"  heap in use after the step {h.get('in_use_mb', 0):.0f} MB, of which weights + AdamW + gradients "
          f"{known:.0f}; the rest: libraries, tokenized data, primitive caches")
    print(f"  after the step: rss {t['rss_after_step']:.0f} (step peak {t['step_peak']:.0f}); heap in use "
          f"{h.get('in_use_mb', 0):.0f}, free in arenas {h.get('arena_free_mb', 0):.0f}, "
          f"mmapped {h.get('mmapped_mb', 0):.0f}")


# ---------------------------------------------------------------------------
# 1. imports, 3. allocator settings (children)
# ---------------------------------------------------------------------------
def import_rss() -> list[tuple[str, float]]:
    out, code = [], []
    for name, stmt in IMPORT_STEPS.items():
        if stmt:
            code.append(stmt)
        prog = "; ".join(code + ["from pathlib import Path",
                                 "print([l for l in Path('/proc/self/status').read_text().splitlines() "
                                 "if l.startswith('VmRSS')][0].split()[1])"])
        proc = subprocess.run([sys.executable, "-c", prog], env=child_env(), capture_output=True, text=True)
        out.append((name, int(proc.stdout.split()[-1]) / 1024 if proc.returncode == 0 else float("nan")))
    return out


def whole_run(kind: str, work: Path, args, extra: list[str]) -> dict:
    from align.planning import run

    recipe = recipe_of(kind, work, args, Path(tempfile.mkdtemp(dir=work)), extra)
    start = time.perf_counter()
    run(recipe)
    return {"seconds": time.perf_counter() - start, "peak": rss_mb("VmHWM")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="imports,dpo,sft,malloc")
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12, help="steps of the profiled runs (malloc: a whole pass)")
    parser.add_argument("--inspect", type=int, default=1, help="the step taken apart")
    parser.add_argument("--override", action="append", default=[], help="extra recipe override (both stages)")
    parser.add_argument("--unbounded", action="store_true", help="as before the fix: the CPU matmul primitive "
                        "caches at their default 1,024 entries (align.device.bound_matmul_caches keeps a user's setting)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(1)
        what, kind = args.child.split(":")
        emit(profiled_run(kind, Path(args.work), args, args.override) if what == "profile"
             else whole_run(kind, Path(args.work), args, args.override))
        return

    parts = args.part.split(",")
    cache_env = {}
    if args.unbounded:
        cache_env = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024", "LRU_CACHE_CAPACITY": "1024"}
    print(f"builtin:small, batch {args.batch}, max length {args.max_length}, OMP_NUM_THREADS=1; {machine_load()}")
    if "imports" in parts:
        print("\n== resident MB after imports (each line adds to the one above) ==")
        for name, mb in import_rss():
            print(f"  {name:28s} {mb:7.0f}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, args)
        argv = [__file__, "--work", str(work), "--pairs", str(args.pairs), "--rows", str(args.rows),
                "--max-length", str(args.max_length), "--batch", str(args.batch), "--steps", str(args.steps),
                "--inspect", str(args.inspect), *[f"--override={o}" for o in args.override]]
        for kind in ("dpo", "sft"):
            if kind in parts:
                r = run_child([*argv, "--child", f"profile:{kind}"], child_env(**cache_env))
                if r:
                    print_profile(kind, r, args)
        if "malloc" in parts:
            print("\n== whole runs under glibc settings: process peak MB, seconds ==")
            for kind in ("dpo", "sft"):
                for name, env in MALLOC_SETTINGS.items():
                    r = run_child([*argv, "--child", f"whole:{kind}"], child_env(**cache_env, **env))
                    if r:
                        print(f"  {kind} {name:22s} peak {r['peak']:7.0f}  {r['seconds']:6.1f} s", flush=True)
    print(f"\nfinished; {machine_load()}")


if __name__ == "__main__":
    main()
