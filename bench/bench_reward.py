"""Reward-model training, align vs TRL 1.16 `RewardTrainer`: pairs/s and peak memory.

    OMP_NUM_THREADS=1 python bench/bench_reward.py [--pairs 64] [--reps 2]

Same model (`builtin:small`, ~5M parameters, with a score head, saved to a folder so
both load identical weights), same variable-length real preference data (Anthropic
HH-RLHF harmless-base test pairs from ../shared/data, implicit-prompt transcripts, kept
where both sides fit 1024 tokens so TRL's default length filter and align's
max_length=1024 both keep every pair untruncated), each tool with its defaults:

- `align`: `stage: reward` as the schema defaults it (batch 8 pairs, bf16 autocast where the
  CPU computes it natively, on a CPU no checkpointing and forwards of at most 1,024 tokens
  (`align/device.py`), chosen and rejected in one shared-prompt row);
- `trl`: `RewardConfig()` defaults (batch 8 pairs, gradient checkpointing, bf16,
  random batches), plus `use_cpu=True` on a CPU-only machine (required there);
- `trl-fp32`: the same with `bf16=False, gradient_checkpointing=False` (like for like
  with `align`);
- `align-ckpt-bf16`: align with TRL's two memory-saving defaults turned on
  (`model.gradient_checkpointing=true`, `train.mixed_precision=bf16`): like for like with `trl`;
- `align-2row` (not run by default): `align` with `data.shared_prompt=false`, each pair as two
  rows [prompt, chosen], [prompt, rejected] instead of one shared-prompt row (the A/B of
  prefix sharing).

pairs/s: one epoch over the pairs (batch 8 both: pairs/8 optimizer steps) divided by its
time from the start of training to the end of the last step (setup, tokenization and
saving excluded). A whole epoch, not a few steps: length-grouped batches differ in
length from step to step, so only the whole epoch compares the same work.
Peak memory: CUDA max allocated on a GPU; on CPU the process's peak resident set
(VmHWM, reset just before training through /proc/self/clear_refs) minus the resident
set at that moment, i.e. what training added (the absolute peak is shown too).
Each measurement runs in its own process; systems are interleaved (the order rotates
each repetition) and a 512x512 matmul probe runs before and after each one; a run
whose probes differ by more than 25% or fall below half the best probe is flagged as
throttled and left out of the ratios (all runs are used when none is clean).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import tempfile
import time
from pathlib import Path

from common import emit, probe_clean, rotating_reps, rss_mb  # shared protocol helpers (bench/common.py)
from common import reset_peak_rss as reset_peak

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
# name -> (tool, settings on top of the tool's defaults)
SYSTEMS = {
    "align": ("align", []),
    "align-ckpt-bf16": ("align", ["model.gradient_checkpointing=true", "train.mixed_precision=bf16"]),
    "align-2row": ("align", ["data.shared_prompt=false"]),
    "trl": ("trl", {}),
    "trl-fp32": ("trl", {"bf16": False, "gradient_checkpointing": False}),
}
MAX_LENGTH = 1024  # TRL's default max_length; align's default data.max_length








# ---------------------------------------------------------------------------
# setup (parent)
# ---------------------------------------------------------------------------
def prepare(work: Path, pairs: int) -> tuple[int, float]:
    from align import builtin, models
    from align.recipe import ModelConfig

    tokenizer = builtin.load_tokenizer()
    model = models.load_model(ModelConfig(name_or_path="builtin:small"), tokenizer, head="score", seed=0)
    model.config._name_or_path = str(work / "model")
    models.save_pretrained(model, tokenizer, work / "model")
    rows, tokens = [], 0
    with gzip.open(HH, "rt") as handle:
        for line in handle:
            row = json.loads(line)
            # bos + transcript + eos, one token per character
            longest = 2 + max(len(row["chosen"]), len(row["rejected"]))
            if row["chosen"] != row["rejected"] and longest <= MAX_LENGTH:
                rows.append({"chosen": row["chosen"], "rejected": row["rejected"]})
                tokens += 4 + len(row["chosen"]) + len(row["rejected"])
            if len(rows) == pairs:
                break
    with (work / "pairs.jsonl").open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return len(rows), tokens / max(len(rows), 1)


# ---------------------------------------------------------------------------
# one measured run (child process)
# ---------------------------------------------------------------------------
def child(system: str, work: Path, steps: int) -> dict:
    import torch
    import transformers  # noqa: F401

    cuda = torch.cuda.is_available()
    total = steps
    marks: list[float] = []  # perf_counter at the start of training, then at the end of each step
    state = {}
    tool, settings = SYSTEMS[system]
    if tool == "align":
        from align.accel import make_accelerator
        from align.engine import train
        from align.recipe import load_recipe
        from align.stages import STAGES

        recipe = load_recipe(None, [
            "stage=reward", f"output_dir={work / 'out-align'}", f"model.name_or_path={work / 'model'}",
            f"data.train={work / 'pairs.jsonl'}", f"train.max_steps={total}", "train.save_steps=100000",
            "train.log_steps=100000", "train.progress_bar=false", *settings])
        accelerator = make_accelerator(recipe.train, recipe.output_dir)
        stage = STAGES["reward"].cls(recipe, accelerator)
        batch = recipe.train.batch_size
        after_step = stage.after_step
        stage.after_step = lambda step: (after_step(step), marks.append(time.perf_counter()))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        state["base"] = reset_peak()
        marks.append(time.perf_counter())
        train(stage, recipe, accelerator)
    else:
        from datasets import Dataset
        from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast, TrainerCallback
        from trl import RewardConfig, RewardTrainer

        rows = [json.loads(line) for line in (work / "pairs.jsonl").open()]
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(work / "model"))
        model = AutoModelForSequenceClassification.from_pretrained(str(work / "model"))
        config = RewardConfig(output_dir=str(work / f"out-{system}"), max_steps=total, use_cpu=not cuda,
                              save_strategy="no", report_to="none", logging_steps=100000, disable_tqdm=True,
                              **settings)
        batch = config.per_device_train_batch_size

        class Marks(TrainerCallback):
            def on_train_begin(self, args, st, control, **kw):
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                state["base"] = reset_peak()
                marks.append(time.perf_counter())

            def on_step_end(self, args, st, control, **kw):
                marks.append(time.perf_counter())

        trainer = RewardTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                                processing_class=tokenizer, callbacks=[Marks()])
        trainer.train()
    assert len(marks) == total + 1, f"expected {total} steps, timed {len(marks) - 1}"
    seconds = marks[-1] - marks[0]
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else rss_mb("VmHWM") - state["base"]
    return {"pairs_per_s": batch * steps / seconds, "seconds": seconds, "peak_mb": peak,
            "peak_rss_mb": rss_mb("VmHWM"), "batch": batch}


# ---------------------------------------------------------------------------
# the interleaved comparison (parent)
# ---------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64, help="pairs in the epoch (a multiple of 8)")
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--systems", default="align,trl,align-ckpt-bf16,trl-fp32")
    parser.add_argument("--child", choices=list(SYSTEMS))
    parser.add_argument("--work")
    args = parser.parse_args()
    if args.child:
        result = child(args.child, Path(args.work), args.steps)
        emit(result)
        return

    systems = args.systems.split(",")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), TQDM_DISABLE="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        n, mean_tokens = prepare(work, args.pairs)
        steps = n // 8
        print(f"{n} HH-RLHF pairs (both sides <= {MAX_LENGTH} tokens; {mean_tokens:.0f} tokens per pair on average), "
              f"builtin:small reward model, each tool's defaults, one epoch of {steps} steps of 8 pairs, "
              f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}")
        def argv_of(rep, system):
            env["HF_DATASETS_CACHE"] = str(work / f"hf-cache-{rep}-{system}")
            return [__file__, "--child", system, "--work", str(work), "--steps", str(steps)]

        results = rotating_reps(systems, args.reps, argv_of, env, lambda system, r: (
            f"{r['pairs_per_s']:7.2f} pairs/s  peak +{r['peak_mb']:7.1f} MB (process peak {r['peak_rss_mb']:.0f} MB)"))
        clean = probe_clean(results)

        print("\nsystem     pairs/s (best clean)   peak MB   kept/runs")
        summary = {}
        for system, rs in results.items():
            if not rs:
                continue
            kept = [r for r in rs if clean(r)] or rs
            summary[system] = (max(r["pairs_per_s"] for r in kept), min(r["peak_mb"] for r in kept))
            print(f"{system:10s} {summary[system][0]:12.2f}        {summary[system][1]:9.1f}   "
                  f"{len([r for r in rs if clean(r)])}/{len(rs)}")
        for ours in [s for s in summary if SYSTEMS[s][0] == "align"]:
            for peer in [s for s in summary if SYSTEMS[s][0] == "trl" or (s == "align-2row" and ours != s)]:
                print(f"{ours} vs {peer}: {summary[ours][0] / summary[peer][0]:.2f}x pairs/s, "
                      f"{summary[ours][1] / summary[peer][1]:.2f}x peak memory")


if __name__ == "__main__":
    main()
