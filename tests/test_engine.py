"""The engine: the invariance guarantee, exact resume, SIGTERM checkpoints, schedules."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from align import accel, engine, planning
from align.recipe import TrainConfig, load_recipe

from helpers import REPO, max_relative_difference, tiny_sft_recipe, weights


def _run(recipe_dict, overrides=()):
    return planning.run(load_recipe(None, list(overrides), data=recipe_dict))


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return env


def test_same_global_batch_trains_the_same_whole_or_accumulated(tmp_path):
    """Batch 8 == batch 2 x grad_accum 4 (weights to 1e-4 relative).

    Loss is normalised by the global count of trained tokens, so micro-batches with
    different token counts still add up to the whole batch's gradient. Two processes x
    batch 4 under `accelerate launch`, for every stage, is tests/test_distributed.py.
    """
    whole = tiny_sft_recipe(tmp_path / "whole", **{"train.batch_size": 8})
    accum = tiny_sft_recipe(tmp_path / "accum", **{"train.batch_size": 2, "train.grad_accum": 4})
    _run(whole)
    _run(accum)
    w_whole, w_accum = weights(tmp_path / "whole"), weights(tmp_path / "accum")
    start = weights_after_zero_steps(tmp_path)
    assert max_relative_difference(w_whole, start) > 1e-3  # training moved the weights
    assert max_relative_difference(w_whole, w_accum) < 1e-4
    # the logged step losses agree too
    def loss(d):
        return [r["train/loss"] for r in map(json.loads, (d / "log.jsonl").read_text().splitlines())
                          if "train/loss" in r]
    assert loss(tmp_path / "whole") == pytest.approx(loss(tmp_path / "accum"), rel=1e-5)


def test_token_budget_micro_batches_train_the_same_and_bound_each_forward(tmp_path, monkeypatch):
    """train.micro_batch_tokens re-cuts the step into uneven micro-batches: same weights, smaller forwards."""
    from align.stages.sft import SFTStage

    seen = []
    original = SFTStage.loss

    def spy(self, model, batch):
        seen.append(tuple(batch["input_ids"].shape))
        return original(self, model, batch)

    # unpacked rows of uneven widths (packed rows all have data.max_length = 32 > the budget)
    whole = tiny_sft_recipe(tmp_path / "whole", **{"train.batch_size": 8, "data.packing": False})
    budget = tiny_sft_recipe(tmp_path / "budget", **{"train.batch_size": 8, "train.micro_batch_tokens": 30,
                                                     "data.packing": False})
    _run(whole)
    monkeypatch.setattr(SFTStage, "loss", spy)
    _run(budget)
    assert seen and all(rows * width <= 30 for rows, width in seen)
    assert len(seen) > 3 * 2  # several forwards per step (3 steps)
    assert max_relative_difference(weights(tmp_path / "whole"), weights(tmp_path / "budget")) < 1e-4


def weights_after_zero_steps(tmp_path):
    from align import builtin, models
    from align.recipe import ModelConfig

    tok = builtin.load_tokenizer()
    model = models.load_model(ModelConfig(), tok, seed=0)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in weights(tmp_path / "whole")}


def test_killed_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    straight = tiny_sft_recipe(tmp_path / "straight", **{"train.max_steps": 6, "train.lr_scheduler": "cosine",
                                                         "train.warmup_steps": 2})
    _run(straight)
    resumed = tiny_sft_recipe(tmp_path / "resumed", **{"train.max_steps": 6, "train.lr_scheduler": "cosine",
                                                       "train.warmup_steps": 2, "train.save_steps": 2})
    from align.stages.sft import SFTStage

    def crash(self, step):
        if step == 2:  # the 4th step: the newest checkpoint is step 2
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(SFTStage, "after_step", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(resumed)
    assert (tmp_path / "resumed/checkpoints/step-2/trainer_state.json").is_file()
    assert not (tmp_path / "resumed/model.safetensors").exists()
    monkeypatch.undo()
    _run(resumed)
    assert max_relative_difference(weights(tmp_path / "straight"), weights(tmp_path / "resumed")) < 1e-6
    steps = [r["step"] for r in map(json.loads, (tmp_path / "resumed/log.jsonl").read_text().splitlines())
             if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # nothing logged twice
    # a finished run is not trained again
    before = (tmp_path / "resumed/model.safetensors").stat().st_mtime_ns
    _run(resumed)
    assert (tmp_path / "resumed/model.safetensors").stat().st_mtime_ns == before


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes(tmp_path):
    recipe = tiny_sft_recipe(tmp_path / "run", **{"train.max_steps": 100000})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = subprocess.Popen([sys.executable, "-m", "align", "train", str(path)], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run/log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and "train/loss" in log.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    saved = engine.checkpoints(tmp_path / "run")
    assert saved, "no checkpoint written on SIGTERM"
    step = saved[-1][0]
    assert "checkpoint saved" in out + err
    proc = subprocess.run([sys.executable, "-m", "align", "train", str(path), f"train.max_steps={step + 2}"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming from" in proc.stdout + proc.stderr
    assert json.loads((tmp_path / "run/metrics.json").read_text())["train/steps"] == step + 2


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = TrainConfig(max_steps=10, lr=1.0, warmup_steps=2, lr_scheduler="cosine", min_lr_ratio=0.1)
    factors = [engine.lr_factor(s, cfg) for s in range(10)]
    assert factors[:2] == [0.5, 1.0]
    assert factors[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[2:], factors[3:]))
    assert engine.lr_factor(10, cfg) == pytest.approx(0.1)
    linear = TrainConfig(max_steps=4, lr=1.0, lr_scheduler="linear")
    assert [engine.lr_factor(s, linear) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]


def test_cpu_flag_with_two_processes_warns_that_one_process_runs(monkeypatch, capsys):
    """`accelerate launch --cpu --num_processes 2` starts one process: say so loudly.

    (Seen for real: that command line prints this warning; here the launcher's
    command line is read from a stand-in.)
    """
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    monkeypatch.setattr(accel, "requested_processes", lambda: 2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    accel.warn_if_world_size_differs(SimpleNamespace(num_processes=1, distributed_type=DistributedType.NO))
    assert "asked for 2 processes but this run has 1" in capsys.readouterr().err
    assert accel.num_processes_in_launch_args(["python", "/bin/accelerate", "launch", "--num_processes=4"]) == 4
    assert accel.num_processes_in_launch_args(["python", "/bin/accelerate", "launch", "--num_processes", "3"]) == 3
    assert accel.num_processes_in_launch_args(["python", "train.py", "--num_processes", "4"]) is None


def test_report_to_tensorboard_writes_events(tmp_path):
    _run(tiny_sft_recipe(tmp_path / "tb", **{"train.report_to": ["tensorboard"], "train.max_steps": 2}))
    assert list((tmp_path / "tb").rglob("events.out.tfevents*"))


def test_two_processes_without_cpu_mode_stop_instead_of_training_unsynchronised(monkeypatch):
    """--multi_gpu on a CPU machine without ACCELERATE_USE_CPU gives processes with no DDP: refuse, with the fix.

    (Seen for real with `accelerate launch --multi_gpu --num_processes 2 -m align train …` on CPU.)
    """
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from align.errors import AlignError

    monkeypatch.setenv("WORLD_SIZE", "2")
    for alone in (SimpleNamespace(num_processes=1, distributed_type=DistributedType.NO),
                  SimpleNamespace(num_processes=2, distributed_type=DistributedType.NO)):
        with pytest.raises(AlignError, match="set ACCELERATE_USE_CPU=true"):
            accel.warn_if_world_size_differs(alone)
    monkeypatch.setattr(accel, "requested_processes", lambda: 2)
    accel.warn_if_world_size_differs(SimpleNamespace(num_processes=2, distributed_type=DistributedType.MULTI_CPU,
                                                      is_main_process=True, device=SimpleNamespace(type="cpu")))


def test_auto_mixed_precision_follows_the_launcher_then_the_hardware(monkeypatch):
    """auto: accelerate launch's --mixed_precision, else bf16 where bf16 is native, else fp32."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(accel, "native_bf16", lambda: True)
    assert accel.resolve_mixed_precision("auto") == "bf16"
    assert accel.resolve_mixed_precision("no") == "no"  # an explicit recipe value wins
    monkeypatch.setattr(accel, "native_bf16", lambda: False)
    assert accel.resolve_mixed_precision("auto") == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert accel.resolve_mixed_precision("auto") == "bf16"


def test_runs_with_different_precisions_follow_each_other_in_one_process(tmp_path):
    """Accelerate refuses a second precision in one process unless align resets its state."""
    _run(tiny_sft_recipe(tmp_path / "bf16", **{"train.mixed_precision": "bf16", "train.max_steps": 1}))
    _run(tiny_sft_recipe(tmp_path / "fp32", **{"train.mixed_precision": "no", "train.max_steps": 1}))
    assert (tmp_path / "fp32/model.safetensors").is_file()


def test_every_stage_provides_what_the_engine_needs():
    """Each registered stage class implements the Stage protocol's methods, and none subclasses another stage
    (they share by composition)."""
    import inspect

    from align.stages import STAGES, Stage

    methods = [name for name, _ in inspect.getmembers(Stage, inspect.isfunction) if not name.startswith("_")]
    assert set(methods) == {"micro_batches", "loss", "after_step", "evaluate", "save"}
    classes = {spec.cls for spec in STAGES.values()}
    for cls in classes:
        for name in methods:
            assert callable(getattr(cls, name, None)), (cls.__name__, name)
            assert list(inspect.signature(getattr(cls, name)).parameters) == list(
                inspect.signature(getattr(Stage, name)).parameters), (cls.__name__, name)
        assert not any(other in cls.__mro__[1:] for other in classes), cls.__name__


def test_training_stops_at_the_first_evaluation_that_reaches_eval_stop_value(tmp_path, capsys):
    """eval.stop_metric / eval.stop_value: the run ends at that evaluation's step, says so, and a rerun of the
    same output_dir has nothing left to do (the stopped run is finished, not interrupted)."""
    def recipe():
        return load_recipe(None, data=tiny_sft_recipe(
            tmp_path / "run", **{"train.max_steps": 8, "data.eval": {"path": str(REPO / "data/arith/sft_eval.jsonl"),
                                                                      "take": 8},
                                 "eval.generate": True, "eval.max_new_tokens": 4, "eval.steps": 2,
                                 "eval.stop_metric": "eval/task_accuracy", "eval.stop_value": 0.0}))

    metrics = planning.run(recipe())
    assert metrics["train/steps"] == 2 and metrics["train/stopped_at_value"] == 1
    assert "at step 2: training stops here" in capsys.readouterr().out
    assert planning.run(recipe())["train/steps"] == 2
    assert "already trained to step 2; nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("evaluation, message", [
    ({"stop_metric": "eval/task_accuracy"}, "eval.stop_metric and eval.stop_value go together"),
    ({"stop_metric": "eval/task_accuracy", "stop_value": 0.5}, "eval.stop_metric needs eval.steps"),
])
def test_a_half_given_stop_rule_is_one_clear_error(tmp_path, evaluation, message):
    from align.errors import AlignError

    with pytest.raises(AlignError, match=message):
        load_recipe(None, data=tiny_sft_recipe(tmp_path / "run", eval=evaluation))
