"""Run several align jobs in one process group, so one `accelerate launch` serves many checks.

    ACCELERATE_USE_CPU=true python -m accelerate.commands.launch --multi_gpu --num_processes 2 \
        tests/distributed_driver.py JOBS.json

JOBS.json is a list of jobs, run in order by every process:

| kind | fields | does |
|---|---|---|
| train | recipe (a recipe as a dict) | `align.planning.run` (what `align train` does) |
| eval_rm | model, data, output | `align eval-rm` (`evaluate_reward_model`) |
| task_accuracy | model, prompts, references, output | `align.evaluate.task_accuracy`, and which prompts were completed |

(A starting `accelerate launch` costs 10+ s; the test suite pays it once for all stages.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def task_accuracy(job: dict) -> None:
    from accelerate.utils import gather_object

    from align import evaluate, models
    from align.accel import make_accelerator
    from align.io_utils import atomic_write_json
    from align.recipe import ModelConfig, TrainConfig

    accelerator = make_accelerator(TrainConfig(mixed_precision="no"), ".")
    cfg = ModelConfig(name_or_path=job["model"])
    tokenizer = models.load_tokenizer(cfg)
    model = models.load_model(cfg, tokenizer, trainable=False).to(accelerator.device)
    kwargs = dict(max_new_tokens=job["max_new_tokens"], batch_size=job["batch_size"], accelerator=accelerator)
    accuracy = evaluate.task_accuracy(model, tokenizer, job["prompts"], job["references"], **kwargs)
    completions = evaluate.greedy_completions(model, tokenizer, job["prompts"], **kwargs)
    completed = gather_object(sorted(completions.items()))
    if accelerator.is_main_process:
        atomic_write_json(Path(job["output"]), {"accuracy": accuracy, "completed": completed})
    accelerator.wait_for_everyone()


def main(jobs_path: str) -> None:
    from align import planning
    from align.evaluate_rm import evaluate_reward_model
    from align.recipe import load_recipe

    for job in json.loads(Path(jobs_path).read_text()):
        if job["kind"] == "train":
            planning.run(load_recipe(None, [], data=job["recipe"]))
        elif job["kind"] == "eval_rm":
            evaluate_reward_model(job["model"], job["data"], output=job["output"], quiet=True)
        elif job["kind"] == "task_accuracy":
            task_accuracy(job)
        else:
            raise ValueError(f"unknown job kind {job['kind']!r}")


if __name__ == "__main__":
    main(sys.argv[1])
