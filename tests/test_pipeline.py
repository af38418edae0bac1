"""`align pipeline`: steps chained by ${steps.X.output_dir}, resumable, failing loudly, with a report."""

import json

import pytest
import yaml

from align.cli import main
from align.errors import AlignError
from align.pipeline import load_pipeline, run_pipeline

from helpers import REPO, accelerate_launch, tiny_sft_recipe


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
    """The flawed-teacher world: SFT and its control imitate the teacher; DPO and the reward model learn from
    truth-labelled pairs; GRPO's exact match checks the true sums; every alignment step starts from `sft`."""
    pipeline, plan = load_pipeline(REPO / "recipes/tiny/pipeline.yaml")
    assert [s.name for s, _ in plan] == ["sft", "sft-control", "dpo", "reward", "rm-eval", "ppo", "grpo"]
    sft_dir = str(REPO / "runs/tiny/pipeline/sft") if pipeline.output_dir.startswith("/") else "runs/tiny/pipeline/sft"
    assert all(job.model.name_or_path == sft_dir
               for s, job in plan if s.name in ("sft-control", "dpo", "reward", "ppo", "grpo"))
    jobs = {s.name: job for s, job in plan}
    assert jobs["sft"].data.train == jobs["sft-control"].data.train == "data/arith/teacher_train.jsonl"
    assert jobs["dpo"].data.train == jobs["reward"].data.train == "data/arith/teacher_prefs_train.jsonl"
    assert jobs["grpo"].data.train == jobs["ppo"].data.train == "data/arith/sft_train.jsonl"  # prompts, true sums
    assert jobs["grpo"].stage_args.reward_funcs == ["exact_match"]
    assert all(jobs[n].data.eval == "data/arith/sft_eval.jsonl" for n in ("sft", "sft-control", "ppo", "grpo"))
    assert jobs["ppo"].stage_args.reward_model == jobs["reward"].output_dir  # the reward model of this run
    assert pipeline.report.control == "sft-control" and pipeline.report.compare == ["sft-control", "dpo", "ppo", "grpo"]
    assert jobs["sft-control"].train.max_steps >= max(jobs[n].train.max_steps for n in ("dpo", "ppo", "grpo"))


def test_pipeline_under_two_cpu_processes(tmp_path):
    """`accelerate launch` runs every step on both processes; one table, one report, no duplicated pairs."""
    import os

    data = str(REPO / "data/arith")
    steps = [
        {"name": "sft", "recipe": str(REPO / "recipes/tiny/sft.yaml"),
         "set": {"train.max_steps": 2, "train.batch_size": 8, "data.eval_limit": 16,
                 "data.train": {"path": f"{data}/sft_train.jsonl", "take": 64}}},
        {"name": "rm-eval-of-nothing", "eval_rm": {"model": "${steps.sft.output_dir}",
                                                   "data": {"path": f"{data}/prefs_eval.jsonl", "take": 33}}},
    ]
    path = _pipeline(tmp_path, steps)
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = accelerate_launch(["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                              "--dynamo_backend", "no", "-m", "align", "pipeline", str(path),
                              "all.train.progress_bar=false"], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("| step | stage |") == 1  # the table is printed once
    run = tmp_path / "run"
    assert json.loads((run / "rm-eval-of-nothing/eval_rm.json").read_text())["n"] == 33  # odd n: no padding
    assert len((run / "sft/samples.jsonl").read_text().splitlines()) == 5
    assert (run / "report.md").is_file()


def test_seed_reaches_every_step_and_the_upstream_recipes_they_train(tmp_path):
    """`align pipeline P seed=N`: every training step runs with seed N, a step's data.from_policy samples with it,
    and a model a step trains first (model.from_recipe) is trained with it too; the output_dir keeps its seed."""
    upstream = tmp_path / "upstream.yaml"
    upstream.write_text(yaml.safe_dump(tiny_sft_recipe(tmp_path / "unused", **{"train.max_steps": 2})))
    steps = [
        {"name": "first", "recipe": tiny_sft_recipe("x", **{"model.name_or_path": str(tmp_path / "start"),
                                                             "model.from_recipe": str(upstream)})},
        {"name": "second", "recipe": tiny_sft_recipe("x", **{"seed": 7}),
         "set": {"model.name_or_path": "${steps.first.output_dir}"}},
    ]
    path = _pipeline(tmp_path, steps)
    _, plan = load_pipeline(path, ["seed=5"])
    assert [job.seed for _, job in plan] == [5, 5]  # the pipeline's seed wins over a recipe's own
    _, plan = load_pipeline(REPO / "recipes/tiny/pipeline.yaml", ["seed=3"])
    jobs = [job for s, job in plan if s.eval_rm is None]
    assert jobs and all(job.seed == 3 for job in jobs)
    assert all(job.data.from_policy.seed == 3 for job in jobs if job.data.from_policy is not None)
    run_pipeline(path, ["seed=5"])
    seeds = {name: yaml.safe_load((folder / "config.yaml").read_text())["seed"]
             for name, folder in [("upstream", tmp_path / "start"), ("first", tmp_path / "run/first"),
                                  ("second", tmp_path / "run/second")]}
    assert seeds == {"upstream": 5, "first": 5, "second": 5}
    with pytest.raises(AlignError, match="holds a pipeline run with seed=5"):
        run_pipeline(path, ["seed=6"])
    run_pipeline(path, ["seed=5"])  # the same seed resumes (here: every step is done)


def test_report_compares_with_the_control_and_draws_accuracy_against_steps(tmp_path, capsys):
    """report.control adds a "vs" column; report.compare draws held-out accuracy against optimizer steps on one
    picture, first in report.md, with report.baseline as a line; the run ends saying where report.md is."""
    data = str(REPO / "data/arith")
    common = {"data.eval": {"path": f"{data}/sft_eval.jsonl", "take": 32}, "eval.generate": True,
              "eval.max_new_tokens": 4, "eval.steps": 2, "train.max_steps": 4}
    steps = [{"name": "sft", "recipe": tiny_sft_recipe("x", **common)},
             {"name": "control", "recipe": tiny_sft_recipe("x", **common),
              "set": {"model.name_or_path": "${steps.sft.output_dir}"}},
             {"name": "other", "recipe": tiny_sft_recipe("x", **common, **{"train.lr": 3e-3}),
              "set": {"model.name_or_path": "${steps.sft.output_dir}"}}]
    path = tmp_path / "pipeline.yaml"
    baseline = {"label": "teacher", "completions": f"{data}/teacher_eval.jsonl", "references": f"{data}/sft_eval.jsonl"}
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), "steps": steps,
                                    "report": {"control": "control", "compare": ["control", "other"],
                                               "baseline": baseline}}))
    rows = run_pipeline(path)
    out = capsys.readouterr().out
    assert f"report: {tmp_path / 'run' / 'report.md'}" in out.strip().splitlines()[-1]
    report = (tmp_path / "run/report.md").read_text()
    assert report.index("accuracy_vs_steps.png") < report.index("| step | stage | task accuracy | vs control |")
    assert (tmp_path / "run/accuracy_vs_steps.png").is_file()
    acc = {r["step"]: r["eval/task_accuracy"] for r in rows}
    assert f"| {100 * (acc['other'] - acc['control']):+.1f} points |" in report
    from align.pipeline import BaselineConfig, baseline_accuracy

    assert baseline_accuracy(BaselineConfig(**baseline)) == pytest.approx(0.6875)  # the teacher on held-out sums
    bad = yaml.safe_load(path.read_text())
    bad["report"]["compare"] = ["contrl"]
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(AlignError, match=r"report.compare\[0\]: no step named 'contrl'"):
        load_pipeline(path)


def test_online_dpo_gkd_kto_and_gspo_run_as_pipeline_steps(tmp_path):
    """The newer stages and settings as steps: online DPO from the SFT step's model (ranked by exact match), GKD
    distilling the SFT step's model into builtin:micro, KTO on truth-labelled pairs split unpaired, GRPO with RLOO
    advantages and GSPO's sequence ratio; the report has a row and a task accuracy for each."""
    data = str(REPO / "data/arith")
    prompts = {"path": f"{data}/sft_train.jsonl", "take": 64}
    steps = _steps()[:1] + [
        {"name": "online-dpo", "recipe": str(REPO / "recipes/tiny/teacher-online-dpo.yaml"),
         "set": {"model.name_or_path": "${steps.sft.output_dir}", "model.from_recipe": None, "train.max_steps": 2,
                 "train.batch_size": 8, "data.train": prompts, "data.eval_limit": 16, "online_dpo.eval_kl_prompts": 8}},
        {"name": "gkd", "recipe": str(REPO / "recipes/tiny/gkd.yaml"),
         "set": {"gkd.teacher_model": "${steps.sft.output_dir}", "gkd.teacher_model_recipe": None,
                 "model.name_or_path": "builtin:micro", "model.from_recipe": None,
                 "train.max_steps": 2, "train.batch_size": 8, "data.train": prompts, "data.eval_limit": 16}},
        {"name": "kto", "recipe": str(REPO / "recipes/tiny/teacher-kto.yaml"),
         "set": {"model.name_or_path": "${steps.sft.output_dir}", "model.from_recipe": None, "train.max_steps": 2,
                 "train.batch_size": 8, "data.train": {"path": f"{data}/teacher_prefs_train.jsonl", "take": 32},
                 "data.eval_limit": 16}},
        {"name": "gspo", "recipe": str(REPO / "recipes/tiny/teacher-gspo.yaml"),
         "set": {"model.name_or_path": "${steps.sft.output_dir}", "model.from_recipe": None, "train.max_steps": 2,
                 "train.batch_size": 16, "data.train": prompts, "data.eval_limit": 16, "grpo.eval_kl_prompts": 8,
                 "grpo.advantage_estimator": "rloo", "grpo.plot": False}},
    ]
    rows = run_pipeline(_pipeline(tmp_path, steps), ["all.train.progress_bar=false"])
    assert [r["step"] for r in rows] == ["sft", "online-dpo", "gkd", "kto", "gspo"]
    assert all(r["eval/task_accuracy"] is not None for r in rows)
    report = (tmp_path / "run/report.md").read_text()
    assert "| online-dpo | online_dpo |" in report and "| gkd | gkd |" in report
    assert "| kto | kto |" in report and "| gspo | grpo |" in report
