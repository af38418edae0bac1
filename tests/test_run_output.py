"""Output a person reads: sampling progress, plot titles, DPO's ties, the world size, check's GPU, a fresh head.

(`align train` naming its output files and the warmup warning: tests/test_trl_names.py, in the one
training run there.)
"""

import json
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from align import accel, models
from align.check import assumed_gpu, check
from align.pipeline import PipelineConfig, StepConfig, format_table, write_report
from align.plots import series_title
from align.recipe import ModelConfig

from helpers import tiny_sft_recipe


# ---------------------------------------------------------------------------
# a progress bar while sampling (align generate, data.from_policy)
# ---------------------------------------------------------------------------
class _Bar:
    made = []

    def __init__(self, total=None, desc=None, disable=False, **kwargs):
        self.total, self.desc, self.disable, self.done, self.closed = total, desc, disable, 0, False
        _Bar.made.append(self)

    def update(self, n=1):
        self.done += n

    def close(self):
        self.closed = True


def test_sampling_shows_progress_in_samples(tmp_path, monkeypatch):
    from align import generate as gen

    monkeypatch.setattr(gen, "tqdm", _Bar)
    _Bar.made.clear()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{a}+1="}) + "\n" for a in range(5)))
    rows = gen.generate("builtin:tiny", str(prompts), output=str(tmp_path / "o.jsonl"), max_new_tokens=2, batch_size=2,
                    num_samples=2, temperature=1.0, progress="data.from_policy.train: sampling")
    assert len(rows) == 10
    (bar,) = _Bar.made
    # shown (tqdm itself hides it when stderr is not a terminal), counted in samples, closed
    assert bar.disable is None and bar.desc == "data.from_policy.train: sampling"
    assert bar.total == bar.done == 10 and bar.closed


# ---------------------------------------------------------------------------
# plot titles name the series drawn
# ---------------------------------------------------------------------------
@pytest.fixture
def titles(monkeypatch):
    import align.plots

    seen = {}

    def fake_plot(path, series, title="", **kwargs):
        seen[path.name] = title
        return path

    monkeypatch.setattr(align.plots, "plot_curves", fake_plot)
    return seen


def test_plot_titles_name_what_is_drawn(tmp_path, titles):
    from align.stages.online import plot_run

    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 0, "eval/task_accuracy": 0.5}, {"step": 2, "eval/task_accuracy": 0.7}]))
    plot_run(tmp_path, "grpo")
    assert titles == {"grpo_curves.png": "grpo: held-out accuracy (true)"}  # no reward logged: none named
    (tmp_path / "log.jsonl").write_text(json.dumps({"step": 1, "train/reward": 0.1, "eval/task_accuracy": 0.5}))
    plot_run(tmp_path, "grpo")
    assert titles["grpo_curves.png"] == "grpo: reward (proxy) and held-out accuracy (true)"
    assert series_title("x", {"a": ([], []), "b": ([1], [2]), "c": ([1], [2])}, words={}) == "x: b and c"


def test_pipeline_report_titles_and_dpo_ties(tmp_path, titles):
    pipeline = PipelineConfig(output_dir=str(tmp_path), steps=[StepConfig(name="sft", recipe="r.yaml")])
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 0, "eval/task_accuracy": 0.1}, {"step": 1, "train/loss": 2.0}, {"step": 2, "eval/task_accuracy": 0.5}]))
    write_report(pipeline, [], "")
    assert titles == {"sft_loss.png": "sft: training loss", "sft_reward_accuracy_kl.png": "sft: held-out accuracy (true)"}
    row = {"step": "dpo", "kind": "dpo", "eval/pair_accuracy": 0.9, "eval/pair_accuracy_start": 0.0,
           "eval/pair_ties": 0.0, "eval/pair_ties_start": 1.0}
    assert "| ties → 0.900 |" in format_table([row])


def test_dpo_before_its_first_step_shows_ties(tmp_path, capsys):
    from test_preference_stage import _recipe

    from align.planning import run

    metrics = run(_recipe(tmp_path, "dpo", "train.max_steps=1"))
    assert metrics["eval/pair_ties_start"] == 1.0 and metrics["eval/pair_accuracy_start"] == 0.0
    assert metrics["eval/pair_ties"] < 1.0
    before = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("[before training]"))
    assert "eval/pair_accuracy=ties" in before


# ---------------------------------------------------------------------------
# world size under accelerate launch; the GPU align check assumed
# ---------------------------------------------------------------------------
def test_a_launched_run_states_its_world_size(monkeypatch, capsys):
    from accelerate.utils import DistributedType

    acc = types.SimpleNamespace(num_processes=1, distributed_type=DistributedType.NO, is_main_process=True,
                                device=torch.device("cpu"))
    monkeypatch.setattr(accel, "requested_processes", lambda: None)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    accel.warn_if_world_size_differs(acc)
    assert capsys.readouterr().out == ""  # not launched: nothing to say
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    accel.warn_if_world_size_differs(acc)
    assert capsys.readouterr().out.startswith("accelerate launch: world size 1 (NO on cpu)")


def test_check_without_a_gpu_names_the_gpu_it_assumed(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert assumed_gpu(None)[0] == 80.0 and "A100 or H100 80GB" in assumed_gpu(None)[1]
    assert assumed_gpu(24.0) == (24.0, "a 24 GiB GPU (--gpu-memory)")
    report = check(None, data=tiny_sft_recipe(tmp_path / "out"), print_fn=None, rows=0, sample=8)
    line = next(x for x in report.lines if x.startswith("memory: compared with"))
    assert "80 GiB GPU (an A100 or H100 80GB): no GPU here" in line
    assert any("of 80 GiB" in x for x in report.lines)


# ---------------------------------------------------------------------------
# a reward head on a causal LM: one line, not transformers' MISSING table
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def causal_lm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("causal")
    tokenizer = models.load_tokenizer(ModelConfig())
    models.load_model(ModelConfig(), tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_fresh_score_head_is_one_line_of_explanation(causal_lm, capfd, caplog):
    tokenizer = models.load_tokenizer(ModelConfig(name_or_path=str(causal_lm)))
    capfd.readouterr()
    models.load_model(ModelConfig(name_or_path=str(causal_lm)), tokenizer, head="score")
    out, err = capfd.readouterr()
    assert "score head initialised fresh: expected for a reward/value model built from a causal LM" in out
    assert "LOAD REPORT" not in out + err + caplog.text and "MISSING" not in out + err + caplog.text


def test_other_missing_weights_keep_transformers_report(causal_lm, tmp_path, capfd, caplog):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in causal_lm.iterdir():
        if f.name != "model.safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    state = load_file(str(causal_lm / "model.safetensors"))
    save_file({k: v for k, v in state.items() if k != "model.norm.weight"}, str(broken / "model.safetensors"),
              metadata={"format": "pt"})
    tokenizer = models.load_tokenizer(ModelConfig(name_or_path=str(broken)))
    capfd.readouterr()
    models.load_model(ModelConfig(name_or_path=str(broken)), tokenizer, head="score")
    out, _ = capfd.readouterr()
    assert "LOAD REPORT" in caplog.text and "model.norm.weight" in caplog.text  # transformers' report, as it was
    assert "initialised fresh" not in out
