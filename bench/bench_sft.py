"""SFT throughput and peak memory: align vs a plain PyTorch loop vs TRL 1.16 `SFTTrainer`.

    OMP_NUM_THREADS=1 python bench/bench_sft.py [--part a|b|all] [--rounds 2]
        [--a-steps 6 --a-warmup 2 --seq 256] [--b-rows 96 --max-length 512] [--batch 8]

Same model for everyone: `builtin:small` (Llama, hidden 256, 6 layers, ~5M parameters),
built once, saved to a folder and loaded from it by every system (TRL needs a model
path); batch 8; precision as each system says. Every measurement runs in its own process (OMP_NUM_THREADS=1,
torch.set_num_threads(1)); systems are interleaved in rounds with a 512x512 matmul probe
before and after each measurement, and a round with a probe below 60% of the best probe
seen is discarded and retried (see `bench/common.py`).

(a) Per-step cost on fixed-length unpadded batches: 8 rows x `--seq` tokens of
    HH-RLHF text (BOS + text + EOS, exactly `--seq` tokens each), every token but the
    first trained. The figure is the median time of the steps after `--a-warmup`:
    - `plain`: a plain loop on prebuilt (B, T) tensors: forward, summed cross-entropy /
      token count, backward, clip_grad_norm_(1.0), AdamW step, zero_grad, loss.item();
    - `align`: `align.planning.run(load_recipe(...))` in fp32 without checkpointing, the whole batch
      in one forward and no packing (like the plain loop), the real engine path on a JSONL
      (stage sft, its defaults + the batch, length, lr and steps); per-step time read
      from `log.jsonl` (`train.log_steps=1`: tokens / train/tokens_per_second), which
      covers all of align's per-step work: batch selection, collate, loss weights,
      forward/backward, global normalisation, clipping, the step and logging;
    - `trl`: `SFTTrainer` with `use_cpu=True, bf16=False, gradient_checkpointing=False`
      (like for like), per-step time from a callback's `on_step_end` timestamps;
    - `trl-defaults` (opt-in with `--a-systems`): TRL's own defaults (bf16 autocast,
      gradient checkpointing) + `use_cpu=True`.
(b) One pass over `--b-rows` HH-RLHF dialogues (the `chosen` transcripts as `text`,
    a seeded sample, truncated at `--max-length` tokens, one token per character),
    wall time from building the trainer/stage (model load and tokenization included)
    to the end of training (align: `planning.run`, which also writes the final model;
    TRL: `SFTTrainer(...)` + `train()`, no save), and peak resident memory:
    - `align`: align's defaults: packing (rows of max_length, one fixed shape), bf16 autocast
      where the CPU/GPU computes bf16 natively (`train.mixed_precision: auto`; this machine's CPU
      has AVX512-BF16), and `auto` memory settings, which on a CPU mean no gradient checkpointing
      and forward passes of at most 1,024 tokens (`align.device`; on a GPU: checkpointing);
    - `align-ckpt`: + `model.gradient_checkpointing=true` (TRL's way of bounding memory: recompute,
      the whole batch in one forward);
    - `align-padded`: + `data.packing=false` (padded micro-batches sorted by length, no attention
      mask for right-padded rows);
    - `align-fp32` (opt-in): `train.mixed_precision="no"`, no checkpointing;
    - `align-padding-free` (opt-in): `data.padding_free=true`;
    - `trl`: `SFTConfig` defaults (bf16 autocast, gradient checkpointing, padded
      batches) + `use_cpu=True` (required on CPU);
    - `trl-fp32` (opt-in): + `bf16=False, gradient_checkpointing=False`;
    - `trl-packing` (opt-in): `trl-fp32` + `packing=True` (TRL's BFD packing, padding-free);
    - `trl-as-align` (opt-in): TRL given align's CPU memory strategy: `packing=True`,
      `gradient_checkpointing=False`, micro-batches of 2 rows x 4 accumulation steps (bf16 as default).
    align trains ceil(rows / 8) steps of 8 (packed) rows: its epoch drops a last incomplete
    batch, so the last step takes a few rows of the next epoch (more work than TRL's partial
    last batch, never less). Tokens trained are printed.
    Peak memory: the process's resident high-water mark (VmHWM, reset after imports) —
    `peak MB` is the absolute high-water mark, `added MB` what the measured work added.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (HH, child_env, clean_rounds, emit, interleaved, machine_load, memory_after,  # noqa: E402, I001
                    print_table, reset_peak_rss, run_child, setup_child, step_stamps)

A_SYSTEMS = ["plain", "align", "trl", "trl-defaults"]
# system -> recipe overrides on top of align's defaults (part b)
FP32 = ['train.mixed_precision="no"', "model.gradient_checkpointing=false"]  # fp32, keep activations
ALIGN_B = {"align": [],  # defaults: packing; bf16 autocast where native; on a CPU no checkpointing, <= 1,024 tokens
           "align-ckpt": ["model.gradient_checkpointing=true"],
           "align-padded": ["data.packing=false"],
           "align-fp32": FP32,
           "align-padding-free": ["data.padding_free=true"]}
B_SYSTEMS = [*ALIGN_B, "trl", "trl-fp32", "trl-packing", "trl-as-align"]
# system -> SFTConfig settings on top of TRL's defaults (use_cpu is added on a CPU-only machine)
TRL_SETTINGS = {
    "trl": {"bf16": False, "gradient_checkpointing": False},  # part (a): like for like
    "trl-defaults": {},
}
TRL_B = {"trl": {}, "trl-fp32": {"bf16": False, "gradient_checkpointing": False},
         "trl-packing": {"bf16": False, "gradient_checkpointing": False, "packing": True},
         "trl-as-align": {"gradient_checkpointing": False, "packing": True, "per_device_train_batch_size": 2,
                          "gradient_accumulation_steps": 4}}
LR = 1e-4


# ---------------------------------------------------------------------------
# setup (parent)
# ---------------------------------------------------------------------------
def hh_transcripts() -> list[str]:
    with gzip.open(HH, "rt", encoding="utf-8") as handle:
        return [json.loads(line)["chosen"] for line in handle]


def prepare(work: Path, args) -> dict:
    """Save the model; write fixed.jsonl (part a) and hh.jsonl (part b); count what each system trains."""
    from align import builtin, models
    from align.data import Rows, pack, tokenize_sft
    from align.recipe import ModelConfig

    tokenizer = builtin.load_tokenizer()
    model = models.load_model(ModelConfig(name_or_path="builtin:small"), tokenizer, seed=0)
    models.save_pretrained(model, tokenizer, work / "model")
    params = sum(p.numel() for p in model.parameters())
    texts = hh_transcripts()

    # (a) rows of exactly --seq tokens: BOS + (seq - 2) printable characters + EOS
    stream = "".join(c for c in "".join(texts) if 32 <= ord(c) < 127 or c == "\n")
    width = args.seq - 2
    n_rows = (args.a_warmup + args.a_steps) * args.batch
    fixed = [stream[i * width: (i + 1) * width] for i in range(n_rows)]
    write_jsonl(work / "fixed.jsonl", [{"text": t} for t in fixed])
    lengths = {len(tokenizer(t)["input_ids"]) + 1 for t in fixed}
    assert lengths == {args.seq}, lengths

    # (b) a seeded sample of dialogues
    sample = random.Random(0).sample(texts, args.b_rows)
    write_jsonl(work / "hh.jsonl", [{"text": t} for t in sample])
    examples = tokenize_sft(Rows([{"text": t} for t in sample], [("hh", i + 1) for i in range(len(sample))]),
                            tokenizer, max_length=args.max_length, truncation="keep_start", key="data.train").examples
    packed = pack(examples, args.max_length)
    tokens = sum(len(e["input_ids"]) for e in examples)
    return {"params": params, "b_samples": len(examples), "b_tokens": tokens, "b_packed_rows": len(packed),
            "b_steps": {name: math.ceil((len(examples) if "data.packing=false" in overrides else len(packed))
                                        / args.batch) for name, overrides in ALIGN_B.items()}}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------------------
# measured runs (child processes)
# ---------------------------------------------------------------------------
def preload(system: str) -> None:
    """Import what a system uses before the baseline memory and the clock (lazy imports would be timed)."""
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    if system.startswith("align"):
        import align.engine  # noqa: F401
        import align.stages.sft  # noqa: F401
        from align.recipe import load_recipe  # noqa: F401
    elif system.startswith("trl"):
        import datasets  # noqa: F401
        import trl  # noqa: F401


def fresh(out: Path) -> Path:
    """An empty output folder (align would resume, or skip a finished run, in a used one)."""
    shutil.rmtree(out, ignore_errors=True)
    return out


def align_recipe(work: Path, out: Path, data: str, overrides: list[str]):
    from align.recipe import load_recipe

    return load_recipe(None, [
        "stage=sft", f"output_dir={out}", f"model.name_or_path={work / 'model'}", f"data.train={work / data}",
        "train.save_steps=1000000", *overrides])


def trl_config(work: Path, out: Path, settings: dict, **kw):
    import torch
    from trl import SFTConfig

    return SFTConfig(output_dir=str(out), use_cpu=not torch.cuda.is_available(), save_strategy="no",
                     report_to="none", **settings, **kw)


def trl_trainer(work: Path, data: str, config, callbacks=()):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import SFTTrainer

    rows = [json.loads(line) for line in (work / data).open()]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(work / "model"))
    model = AutoModelForCausalLM.from_pretrained(str(work / "model"), dtype=torch.float32)
    return SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                      callbacks=list(callbacks))


def child_a(system: str, work: Path, args) -> dict:
    """Per-step seconds of `system` on fixed-length batches: the steps after the warm-up."""
    steps = args.a_warmup + args.a_steps
    out = fresh(work / f"out-a-{system}")
    base = reset_peak_rss()
    if system == "plain":
        times = plain_loop(work, args, steps)
    elif system == "align":
        from align.planning import run

        run(align_recipe(work, out, "fixed.jsonl", [
            f"data.max_length={args.seq}", f"train.batch_size={args.batch}", f"train.max_steps={steps}",
            f"train.lr={LR}", "train.log_steps=1", "train.micro_batch_tokens=null", "data.packing=false", *FP32]))
        records = [json.loads(line) for line in (out / "log.jsonl").open()]
        rates = [r["train/tokens_per_second"] for r in records if "train/tokens_per_second" in r]
        times = [args.batch * args.seq / rate for rate in rates]
    else:
        stamp, stamps = step_stamps()
        config = trl_config(work, out, TRL_SETTINGS[system], per_device_train_batch_size=args.batch,
                            max_length=args.seq, max_steps=steps, learning_rate=LR, logging_steps=10,
                            disable_tqdm=False)
        trainer = trl_trainer(work, "fixed.jsonl", config, [stamp])
        assert {len(x) for x in trainer.train_dataset["input_ids"]} == {args.seq}
        trainer.train()
        times = [b - a for a, b in zip(stamps, stamps[1:])]
    assert len(times) == steps, (system, len(times))
    measured = times[args.a_warmup:]
    return {"step_s": statistics.median(measured), "mean_step_s": statistics.mean(measured),
            "first_step_s": times[0], **memory_after(base)}


def plain_loop(work: Path, args, steps: int) -> list[float]:
    """The reference: a plain PyTorch loop on prebuilt tensors (no data work in the loop)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(work / "model"))
    model = AutoModelForCausalLM.from_pretrained(str(work / "model"), dtype=torch.float32)
    model.train()
    rows = [tokenizer(json.loads(line)["text"])["input_ids"] + [tokenizer.eos_token_id]
            for line in (work / "fixed.jsonl").open()]
    batches = [torch.tensor(rows[i: i + args.batch]) for i in range(0, len(rows), args.batch)]  # (B, T)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        ids = batches[step % len(batches)]
        logits = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum") \
            / ids[:, 1:].numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - start)
    return times


def child_b(system: str, work: Path, args) -> dict:
    """Seconds to train one pass over hh.jsonl (setup included) and peak memory."""
    out = fresh(work / f"out-b-{system}")
    base = reset_peak_rss()
    start = time.perf_counter()
    if system.startswith("align"):
        from align.planning import run

        run(align_recipe(work, out, "hh.jsonl", [
            f"data.max_length={args.max_length}", f"train.batch_size={args.batch}",
            f"train.max_steps={args.b_steps}", *ALIGN_B[system]]))
        seconds = time.perf_counter() - start
        steps = args.b_steps
    else:
        settings = {"per_device_train_batch_size": args.batch, **TRL_B[system]}
        config = trl_config(work, out, settings, max_length=args.max_length, num_train_epochs=1)
        trainer = trl_trainer(work, "hh.jsonl", config)
        result = trainer.train()
        seconds = time.perf_counter() - start
        steps = result.global_step
    return {"seconds": seconds, "steps": steps, **memory_after(base)}


# ---------------------------------------------------------------------------
# the interleaved comparison (parent)
# ---------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["a", "b", "all"], default="all")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per part (each measures every system once)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256, help="(a) tokens per row")
    parser.add_argument("--a-steps", type=int, default=6, help="(a) measured steps")
    parser.add_argument("--a-warmup", type=int, default=2, help="(a) steps before the measured ones")
    parser.add_argument("--a-systems", default="plain,align,trl")
    parser.add_argument("--b-rows", type=int, default=96, help="(b) dialogues in the pass")
    parser.add_argument("--max-length", type=int, default=512, help="(b) truncation length (tokens)")
    parser.add_argument("--b-systems", default="align,align-ckpt,align-padded,trl")
    parser.add_argument("--throttle", type=float, default=0.6, help="discard rounds with a probe below this x best")
    parser.add_argument("--retries", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--b-steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        setup_child()
        part, system = args.child.split(":", 1)
        preload(system)
        result = (child_a if part == "a" else child_b)(system, Path(args.work), args)
        emit(result)
        return

    for name, allowed in (("a", A_SYSTEMS), ("b", B_SYSTEMS)):
        unknown = set(getattr(args, f"{name}_systems").split(",")) - set(allowed)
        if unknown:
            parser.error(f"--{name}-systems: unknown {sorted(unknown)}; choose from {','.join(allowed)}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        info = prepare(work, args)
        common_argv = [__file__, "--work", str(work), "--batch", str(args.batch), "--seq", str(args.seq),
                       "--a-steps", str(args.a_steps), "--a-warmup", str(args.a_warmup),
                       "--b-rows", str(args.b_rows), "--max-length", str(args.max_length)]
        print(f"builtin:small ({info['params'] / 1e6:.2f}M parameters), batch {args.batch}, "
              f"OMP_NUM_THREADS=1, one process per measurement; {machine_load()}", flush=True)

        if args.part in ("a", "all"):
            print(f"\n(a) fixed-length batches {args.batch} x {args.seq} tokens, median of {args.a_steps} steps "
                  f"after {args.a_warmup} warm-up steps", flush=True)
            rounds = interleaved(
                args.a_systems.split(","),
                lambda s: run_child([*common_argv, "--child", f"a:{s}"], child_env()),
                rounds=args.rounds, throttle=args.throttle, retries=args.retries,
                show=lambda s, r: f"{r['step_s']:.3f} s/step (mean {r['mean_step_s']:.3f})")
            baseline = "plain" if "plain" in args.a_systems.split(",") else args.a_systems.split(",")[0]
            ratios = print_table(rounds, "step_s", baseline, unit="s/step",
                                 title="(a) per-step cost (lower is better)")
            if "align" in ratios and "trl" in ratios:
                print(f"align step = {ratios['align']:.3f}x {baseline} (goal <= 1.03x); "
                      f"trl step = {ratios['trl']:.3f}x {baseline}")

        if args.part in ("b", "all"):
            print(f"\n(b) HH-RLHF `chosen` transcripts: {info['b_samples']} samples, {info['b_tokens']} tokens "
                  f"(<= {args.max_length} each; {info['b_packed_rows']} packed rows); align steps "
                  f"{info['b_steps']}", flush=True)

            def measure_b(system):
                steps = info["b_steps"].get(system, 0)
                return run_child([*common_argv, "--child", f"b:{system}", "--b-steps", str(steps)], child_env())

            rounds = interleaved(
                args.b_systems.split(","), measure_b, rounds=args.rounds, throttle=args.throttle,
                retries=args.retries,
                show=lambda s, r: f"{r['seconds']:7.2f} s ({r['steps']} steps)  peak {r['peak_mb']:.0f} MB "
                                  f"(+{r['added_mb']:.0f})")
            systems = args.b_systems.split(",")
            baseline = "trl" if "trl" in systems else systems[0]
            ratios = print_table(rounds, "seconds", baseline, unit="s", memory=True,
                                 title="(b) one pass, setup included (lower is better)")
            use = clean_rounds(rounds)
            added = {s: statistics.median(r[s]["added_mb"] for r in use if s in r) for s in ratios}
            for system in [s for s in systems if s.startswith("align") and s in ratios]:
                print(f"{system}: " + "; ".join(
                    f"{ratios[peer] / ratios[system]:.2f}x faster than {peer} at {added[system] / added[peer]:.2f}x "
                    f"its added memory" for peer in systems if peer.startswith("trl") and peer in ratios))
        print(f"\nfinished; {machine_load()}")


if __name__ == "__main__":
    main()
