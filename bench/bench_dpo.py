"""DPO end to end, align vs TRL 1.16 `DPOTrainer`: one epoch's wall time and peak memory.

    OMP_NUM_THREADS=1 python bench/bench_dpo.py [--pairs 64] [--batch 8] [--max-length 384] [--reps 2]

Same model (`builtin:small`, ~5M parameters, saved to a folder so both load it the same
way), same variable-length preference data (Anthropic HH-RLHF harmless-base test pairs
from ../shared/data, split into explicit prompt/chosen/rejected and kept only where
prompt + the longer answer fit `--max-length`, so neither side truncates), same batch,
beta, learning rate and fp32. Three systems, each run in its own process:

- `align`: `stage: dpo`; reference log-probs precomputed from the starting policy
  (no second model), length-grouped batches;
- `trl`: `DPOTrainer` with its defaults (a reference model loaded and run every step);
- `trl-precompute`: `DPOTrainer(precompute_ref_log_probs=True)`;
- `align-2row` (not run by default): `align` with `data.shared_prompt=false`, each pair as two
  rows [prompt, chosen], [prompt, rejected] instead of one shared-prompt row (the A/B of
  prefix sharing);
- `align-defaults`, `trl-defaults` (not run by default): each tool's own defaults instead of
  fp32 without checkpointing: bf16 autocast where native (this CPU: AVX512-BF16) on both sides;
  TRL checkpoints and runs a reference model every step; align on a CPU does not checkpoint and
  cuts each step into forwards of at most 1,024 tokens (`align/device.py`; on a GPU it checkpoints).
  `align` (fp32, no checkpointing) gets the same 1,024-token forwards on a CPU.

The epoch time is measured from building the trainer/stage (tokenization and the
reference pass included, and loading the model from its folder) to the end of training,
not counting imports (done before the clock on both sides); align's time also includes
writing the final model. Peak memory: CUDA max allocated on a GPU; on CPU the
process's peak resident set (VmHWM) minus its resident set after imports (both shown).
Runs are interleaved (the order rotates each repetition) and a 512x512 matmul probe
runs before and after each one; a run whose probes differ by more than 25% or fall
below half the best probe is flagged as throttled and left out of the ratios.
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

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
SYSTEMS = ["align", "trl", "trl-precompute", "align-2row", "align-defaults", "trl-defaults"]
LR = 1e-6






# ---------------------------------------------------------------------------
# setup (parent)
# ---------------------------------------------------------------------------
def prepare(work: Path, pairs: int, max_length: int) -> int:
    from align import builtin, models
    from align.preference_data import split_implicit_prompt
    from align.recipe import ModelConfig

    tokenizer = builtin.load_tokenizer()
    model = models.load_model(ModelConfig(name_or_path="builtin:small"), tokenizer, seed=0)
    models.save_pretrained(model, tokenizer, work / "model")
    rows = []
    with gzip.open(HH, "rt") as handle:
        for line in handle:
            row = json.loads(line)
            prompt, chosen, rejected = split_implicit_prompt(row["chosen"], row["rejected"])
            # bos + prompt + answer + eos, one token per character
            if chosen != rejected and chosen and rejected and 2 + len(prompt) + max(len(chosen), len(rejected)) \
                    <= max_length:
                rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            if len(rows) == pairs:
                break
    with (work / "pairs.jsonl").open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return len(rows)


# ---------------------------------------------------------------------------
# one measured run (child process)
# ---------------------------------------------------------------------------
def child(system: str, work: Path, batch: int, max_length: int, beta: float) -> dict:
    import torch

    # import what both sides use before the baseline and the clock (lazy imports would otherwise be timed)
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    cuda = torch.cuda.is_available()
    base = rss_mb("VmRSS")
    steps = sum(1 for _ in (work / "pairs.jsonl").open()) // batch
    if system.startswith("align"):
        from align.planning import run
        from align.recipe import load_recipe
        from align.stages import preference  # noqa: F401

        recipe = load_recipe(None, [
            "stage=dpo", f"output_dir={work / f'out-align-{os.getpid()}'}", f"model.name_or_path={work / 'model'}",
            f"data.train={work / 'pairs.jsonl'}", f"data.max_length={max_length}", f"train.batch_size={batch}",
            f"train.max_steps={steps}", f"train.lr={LR}", "train.save_steps=100000", "train.log_steps=100000",
            "train.progress_bar=false", "train.warmup_steps=0", f"dpo.beta={beta}", "eval.generate=false",
            f"data.shared_prompt={str(system != 'align-2row').lower()}",
            *([] if system == "align-defaults" else ['train.mixed_precision="no"', "model.gradient_checkpointing=false"])])
        start = time.perf_counter()
        run(recipe)
        seconds = time.perf_counter() - start
    else:
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
        from trl import DPOConfig, DPOTrainer

        rows = [json.loads(line) for line in (work / "pairs.jsonl").open()]
        config = DPOConfig(
            output_dir=str(work / f"out-{system}"), per_device_train_batch_size=batch, max_length=max_length,
            beta=beta, learning_rate=LR, num_train_epochs=1, max_steps=steps, use_cpu=not cuda,
            **({} if system == "trl-defaults" else {"bf16": False, "gradient_checkpointing": False}),
            save_strategy="no", report_to="none", logging_steps=100000,
            disable_tqdm=True, precompute_ref_log_probs=system == "trl-precompute", dataloader_num_workers=0,
            lr_scheduler_type="cosine")
        start = time.perf_counter()
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(work / "model"))
        model = AutoModelForCausalLM.from_pretrained(str(work / "model"), dtype=torch.float32)
        trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer)
        trainer.train()
        seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else rss_mb("VmHWM") - base
    return {"seconds": seconds, "peak_mb": peak, "rss_after_imports_mb": base, "peak_rss_mb": rss_mb("VmHWM"),
            "steps": steps}


# ---------------------------------------------------------------------------
# the interleaved comparison (parent)
# ---------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--systems", default=",".join(SYSTEMS[:3]))
    parser.add_argument("--child", choices=SYSTEMS)
    parser.add_argument("--work")
    args = parser.parse_args()
    if args.child:
        result = child(args.child, Path(args.work), args.batch, args.max_length, args.beta)
        emit(result)
        return

    systems = args.systems.split(",")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), TQDM_DISABLE="1",
               TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        n = prepare(work, args.pairs, args.max_length)
        print(f"{n} HH-RLHF pairs (<= {args.max_length} tokens each side), batch {args.batch}, beta {args.beta}, "
              f"builtin:small, fp32, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}")
        def argv_of(rep, system):
            env["HF_DATASETS_CACHE"] = str(work / f"hf-cache-{rep}-{system}")
            return [__file__, "--child", system, "--work", str(work), "--batch", str(args.batch),
                    "--max-length", str(args.max_length), "--beta", str(args.beta)]

        results = rotating_reps(systems, args.reps, argv_of, env, lambda system, r: (
            f"{r['seconds']:7.2f} s  peak {r['peak_mb']:7.1f} MB (process peak {r['peak_rss_mb']:.0f} MB)"))
        clean = probe_clean(results)

        print("\nsystem            epoch s (best clean)   peak MB   kept/runs")
        summary = {}
        for system, rs in results.items():
            kept = [r for r in rs if clean(r)] or rs
            if not rs:
                continue
            summary[system] = (min(r["seconds"] for r in kept), min(r["peak_mb"] for r in kept))
            print(f"{system:17s} {summary[system][0]:10.2f}            {summary[system][1]:8.1f}   "
                  f"{len([r for r in rs if clean(r)])}/{len(rs)}")
        pairs = [("align", peer) for peer in ("trl", "trl-precompute", "align-2row")]
        pairs += [("align-defaults", peer) for peer in ("trl-defaults", "trl", "trl-precompute")]
        for ours, peer in pairs:
            if ours in summary and peer in summary:
                print(f"{ours} vs {peer}: {summary[peer][0] / summary[ours][0]:.2f}x speed, "
                      f"{summary[ours][1] / summary[peer][1]:.2f}x peak memory")


if __name__ == "__main__":
    main()
