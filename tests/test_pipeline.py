"""`align pipeline`: steps chained by ${steps.X.output_dir}, resumable, failing loudly, with a report."""

import json

import pytest
import yaml

from align.cli import main
from align.errors import AlignError
from align.pipeline import load_pipeline, run_pipeline

from helpers import REPO


def _pipeline(tmp_path, steps):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), "steps": steps}))
    return path


def _steps(sft_steps=6):
    data = str(REPO / "data/arith")
    return [
        {"name": "sft", "recipe": str(REPO / "recipes/tiny/sft.yaml"),
         "set": {"train.max_steps": sft_steps, "train.batch_size": 16, "data.eval_limit": 32,
                 "data.train": {"path": f"{data}/sft_train.jsonl", "take": 256}}},
        {"name": "reward", "recipe": str(REPO / "recipes/tiny/reward.yaml"),
         "set": {"model.name_or_path": "${steps.sft.output_dir}", "train.max_steps": 3, "train.batch_size": 8,
                 "data.train": {"path": f"{data}/prefs_train.jsonl", "take": 64}, "data.eval_limit": 32}},
        {"name": "rm-eval", "eval_rm": {"model": "${steps.reward.output_dir}", "data": {"path": f"{data}/prefs_eval.jsonl", "take": 64}}},
        {"name": "dpo", "recipe": str(REPO / "recipes/tiny/dpo.yaml"),
         "set": {"model.name_or_path": "${steps.sft.output_dir}", "train.max_steps": 3, "train.batch_size": 8,
                 "data.train": {"path": f"{data}/prefs_train.jsonl", "take": 64}, "data.eval_limit": 32}},
    ]


def test_pipeline_runs_in_order_resumes_and_reports(tmp_path, capsys):
    path = _pipeline(tmp_path, _steps())
    overrides = ["all.train.progress_bar=false", "all.train.log_steps=1", "all.train.save_steps=2"]
    rows = run_pipeline(path, overrides)
    run = tmp_path / "run"
    assert [r["step"] for r in rows] == ["sft", "reward", "rm-eval", "dpo"]
    # each step started from the one it names
    assert yaml.safe_load((run / "reward/config.yaml").read_text())["model"]["name_or_path"] == str(run / "sft")
    assert json.loads((run / "rm-eval/eval_rm.json").read_text())["n"] == 64
    assert rows[0]["eval/task_accuracy"] is not None and rows[2]["eval/pair_accuracy"] is not None
    report = (run / "report.md").read_text()
    assert "| sft | sft |" in report and "| rm-eval | eval-rm |" in report
    assert (run / "sft_loss.png").is_file() and (run / "sft/samples.jsonl").is_file()
    assert "| step | stage | task accuracy" in capsys.readouterr().out
    # rerun: every step is finished, nothing retrains
    stamp = (run / "dpo/model.safetensors").stat().st_mtime_ns
    run_pipeline(path, overrides)
    assert (run / "dpo/model.safetensors").stat().st_mtime_ns == stamp
    # a longer SFT resumes that step from its checkpoint; later steps are already done
    run_pipeline(path, overrides + ["sft.train.max_steps=8"])
    assert json.loads((run / "sft/metrics.json").read_text())["train/steps"] == 8
    assert "resuming from" in capsys.readouterr().out


def test_bad_input_of_a_later_step_stops_the_pipeline_before_any_step_runs(tmp_path, capsys):
    """Every step's inputs are checked before the first one trains (before the planning layer, the missing file
    of the last step was found only after the SFT step had trained)."""
    steps = _steps(sft_steps=2)[:1] + [{"name": "broken", "recipe": {"stage": "sft", "output_dir": "x",
                                                                     "data": {"train": str(tmp_path / "none.jsonl")}}}]
    assert main(["pipeline", str(_pipeline(tmp_path, steps)), "all.train.progress_bar=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: step broken: data.train: file") and "none.jsonl not found" in err
    assert not (tmp_path / "run/sft/model.safetensors").exists()


def test_failing_step_names_itself_and_keeps_earlier_results(tmp_path, capsys):
    """A step that fails while it runs (here: every sample longer than max_length, dropped) names itself;
    the steps before it keep their results."""
    broken = {"name": "broken", "recipe": {"stage": "sft", "output_dir": "x",
                                           "data": {"train": str(REPO / "data/arith/sft_train.jsonl"),
                                                    "max_length": 3, "truncation": "drop"}}}
    assert main(["pipeline", str(_pipeline(tmp_path, _steps(sft_steps=2)[:1] + [broken])),
                 "all.train.progress_bar=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: pipeline step broken failed:") and "data.max_length" in err
    assert (tmp_path / "run/sft/model.safetensors").is_file()


def test_bad_pipelines_fail_before_running(tmp_path):
    bad_ref = [{"name": "a", "recipe": str(REPO / "recipes/tiny/sft.yaml"),
                "set": {"model.name_or_path": "${steps.later.output_dir}"}}]
    with pytest.raises(AlignError, match="names no earlier step"):
        load_pipeline(_pipeline(tmp_path, bad_ref))
    with pytest.raises(AlignError, match="step a: unknown key train.lrr"):
        load_pipeline(_pipeline(tmp_path, [{"name": "a", "recipe": str(REPO / "recipes/tiny/sft.yaml"),
                                            "set": {"train.lrr": 1}}]))
    with pytest.raises(AlignError, match="did you mean sft"):
        load_pipeline(_pipeline(tmp_path, _steps()[:1]), ["sfx.train.max_steps=3"])
    with pytest.raises(AlignError, match="used twice"):
        load_pipeline(_pipeline(tmp_path, _steps()[:1] * 2))
    assert not (tmp_path / "run").exists()


def test_shipped_pipeline_validates():
    pipeline, plan = load_pipeline(REPO / "recipes/tiny/pipeline.yaml")
    assert [s.name for s, _ in plan] == ["sft", "reward", "rm-eval", "dpo", "reward-policy", "ppo", "grpo"]
    sft_dir = str(REPO / "runs/tiny/pipeline/sft") if pipeline.output_dir.startswith("/") else "runs/tiny/pipeline/sft"
    assert all(job.model.name_or_path == sft_dir
               for s, job in plan if s.name in ("reward", "dpo", "reward-policy", "ppo", "grpo"))
    jobs = {s.name: job for s, job in plan}
    # PPO's reward model is the one trained on the SFT policy's own samples, written inside the pipeline
    assert jobs["ppo"].stage_args.reward_model.endswith("reward-policy")
    assert jobs["reward-policy"].data.from_policy.policy == sft_dir
    assert jobs["reward-policy"].data.train == jobs["reward-policy"].data.from_policy.train.output


def test_pipeline_under_two_cpu_processes(tmp_path):
    """`accelerate launch` runs every step on both processes; one table, one report, no duplicated pairs."""
    import os
    import socket
    import subprocess
    import sys

    data = str(REPO / "data/arith")
    steps = [
        {"name": "sft", "recipe": str(REPO / "recipes/tiny/sft.yaml"),
         "set": {"train.max_steps": 2, "train.batch_size": 8, "data.eval_limit": 16,
                 "data.train": {"path": f"{data}/sft_train.jsonl", "take": 64}}},
        {"name": "rm-eval-of-nothing", "eval_rm": {"model": "${steps.sft.output_dir}",
                                                   "data": {"path": f"{data}/prefs_eval.jsonl", "take": 33}}},
    ]
    path = _pipeline(tmp_path, steps)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), "-m", "align", "pipeline", str(path), "all.train.progress_bar=false"]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("| step | stage |") == 1  # the table is printed once
    run = tmp_path / "run"
    assert json.loads((run / "rm-eval-of-nothing/eval_rm.json").read_text())["n"] == 33  # odd n: no padding
    assert len((run / "sft/samples.jsonl").read_text().splitlines()) == 5
    assert (run / "report.md").is_file()
