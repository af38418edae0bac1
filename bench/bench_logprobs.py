"""Real vocabulary: peak memory and step time of align's chunked log-probs vs its plain path vs TRL 1.16.

    OMP_NUM_THREADS=1 python bench/bench_logprobs.py [--stages sft,dpo] [--seq 2048] [--batch 2] [--steps 3]
        [--rounds 1] [--hidden 256] [--layers 2] [--systems align,align-plain,trl]

A Qwen2.5-like model with the real vocabulary (151,936 entries; Qwen2 architecture, tied embeddings,
random weights, `--layers` layers of width `--hidden`, so the logits dominate), saved to a folder that
every system loads. Text: HH-RLHF transcripts from ../shared/data, one token per character (align's
built-in tokenizer: ids below 110, but every softmax runs over all 151,936 entries).

- SFT: `--batch` rows of exactly `--seq` tokens, every token but the first trained;
- DPO: `--batch` pairs whose prompt + answer is `--seq` tokens (prompt half of it, both answers the other half).

Systems, each with its own defaults on this CPU (align: bf16 autocast where the CPU has it natively, no
checkpointing, forwards of at most 1,024 tokens, `align.device`; TRL: bf16 autocast and gradient
checkpointing, its reference model run every DPO step):
- `align`: `model.chunked_logprobs: true` (the default);
- `align-plain`: `model.chunked_logprobs: false` (the model's full logits);
- `trl`: `SFTTrainer` / `DPOTrainer` with `use_cpu=True`.
Step time: the median over the steps after the first (align: `train/seconds_per_step` from `log.jsonl`
with `train.log_steps=1`; TRL: `on_step_end` timestamps). Peak memory: the process's resident high-water
mark (VmHWM) reset after imports and model loading are done by nobody: it includes loading the model. Each
measurement in its own process; systems interleaved in rounds with a matmul probe around each (bench/common.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (child_env, emit, interleaved, machine_load, memory_after, print_table,  # noqa: E402, I001
                    reset_peak_rss, run_child, setup_child, step_stamps)
from bench_sft import hh_transcripts, write_jsonl  # noqa: E402

VOCAB = 151_936
SYSTEMS = ["align", "align-plain", "trl"]
LR = 1e-5


def prepare(work: Path, args) -> dict:
    """The model folder and the SFT / DPO rows (one character per token)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from align import builtin

    tokenizer = builtin.load_tokenizer()
    if args.model != "qwen-like":
        (work / "model").write_text(args.model)  # align loads the name itself (the tiny-size A/B of align alone)
        return {"params": float("nan")}
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4 * args.seq, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    return {"params": sum(p.numel() for p in model.parameters())}


def write_rows(work: Path, args) -> None:
    """The SFT / DPO rows (one character per token)."""
    stream = "".join(c for c in "".join(hh_transcripts()) if 32 <= ord(c) < 127)
    n = args.batch * args.steps
    width = args.seq - 2  # BOS + text + EOS
    write_jsonl(work / "sft.jsonl", [{"text": stream[i * width: (i + 1) * width]} for i in range(n)])
    half = args.seq // 2
    answer = args.seq - half - 2  # BOS + prompt + answer + EOS = seq
    pairs = []
    for i in range(n):
        chunk = stream[i * args.seq * 2:]
        pairs.append({"prompt": chunk[:half], "chosen": chunk[half: half + answer],
                      "rejected": chunk[half + answer: half + 2 * answer]})
    write_jsonl(work / "dpo.jsonl", pairs)


def child(system: str, stage: str, work: Path, args) -> dict:
    setup_child()
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: F401
    from transformers.models.qwen2 import modeling_qwen2  # noqa: F401

    if system.startswith("align"):
        import align.engine  # noqa: F401
        from align.planning import run
        from align.recipe import load_recipe
    else:
        import trl  # noqa: F401
    base = reset_peak_rss()
    out = work / f"out-{stage}-{system}-{time.time_ns()}"
    if system.startswith("align"):
        model = work / "model"
        model = model.read_text() if model.is_file() else model
        overrides = [f"stage={stage}", f"output_dir={out}", f"model.name_or_path={model}",
                     f"data.train={work / (stage + '.jsonl')}", f"data.max_length={2 * args.seq}",
                     f"train.batch_size={args.batch}", f"train.max_steps={args.steps}", f"train.lr={LR}",
                     "train.log_steps=1", "train.save_steps=1000000", "train.progress_bar=false",
                     "eval.generate=false", f"model.chunked_logprobs={str(system == 'align').lower()}"]
        if stage == "sft":
            overrides.append("data.packing=false")
        run(load_recipe(None, overrides))
        records = [json.loads(line) for line in (out / "log.jsonl").open()]
        times = [r["train/seconds_per_step"] for r in records if "train/seconds_per_step" in r]
    else:
        times = trl_run(stage, work, out, args)
    return {"step_s": statistics.median(times[1:] or times), "first_step_s": times[0], "steps": len(times),
            **memory_after(base)}


def trl_run(stage: str, work: Path, out: Path, args) -> list[float]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    stamp, stamps = step_stamps()

    rows = [json.loads(line) for line in (work / f"{stage}.jsonl").open()]
    common = dict(output_dir=str(out), use_cpu=not torch.cuda.is_available(), save_strategy="no", report_to="none",
                  per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=LR,
                  logging_steps=1000, disable_tqdm=True, dataloader_num_workers=0)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(work / "model"))
    model = AutoModelForCausalLM.from_pretrained(str(work / "model"), dtype=torch.float32)
    if stage == "sft":
        trainer = SFTTrainer(model=model, args=SFTConfig(max_length=args.seq, **common),
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[stamp])
    else:
        trainer = DPOTrainer(model=model, args=DPOConfig(max_length=2 * args.seq, **common),
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[stamp])
    trainer.train()
    return [b - a for a, b in zip(stamps, stamps[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="sft,dpo")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--model", default="qwen-like", help="qwen-like, or an align model name (builtin:tiny) "
                        "for an A/B of align's two paths alone (--systems align,align-plain)")
    parser.add_argument("--child", nargs=2, metavar=("SYSTEM", "STAGE"))
    parser.add_argument("--work")
    args = parser.parse_args()
    if args.child:
        emit(child(args.child[0], args.child[1], Path(args.work), args))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        info = prepare(work, args)
        write_rows(work, args)
        model = (f"Qwen2-like, vocabulary {VOCAB:,}, hidden {args.hidden}, {args.layers} layers, tied "
                 f"({info['params'] / 1e6:.1f}M parameters)" if args.model == "qwen-like" else args.model)
        print(f"{model}; batch {args.batch} x {args.seq} tokens, {args.steps} steps; {machine_load()}", flush=True)
        same = ["--model", args.model, "--seq", str(args.seq), "--batch", str(args.batch), "--steps", str(args.steps),
                "--hidden", str(args.hidden), "--layers", str(args.layers), "--work", str(work)]
        for stage in args.stages.split(","):
            systems = args.systems.split(",")
            rounds = interleaved(systems, lambda system, s=stage: run_child(
                [__file__, "--child", system, s, *same], env=child_env()), rounds=args.rounds,
                show=lambda system, r: f"{r['step_s']:.2f} s/step, peak {r['peak_mb']:.0f} MB")
            baseline = "trl" if "trl" in systems else systems[-1]
            print_table(rounds, "step_s", baseline, memory=True, title=f"{stage.upper()} step time ({machine_load()})")
            peaks = {s: statistics.median(r[s]["peak_mb"] for r in rounds if s in r) for s in systems}
            print(f"peak memory vs {baseline}: " + ", ".join(f"{s} {peaks[s] / peaks[baseline]:.2f}x"
                                                              for s in systems), flush=True)


if __name__ == "__main__":
    main()
