"""GKD's generalised Jensen-Shannon divergence (align.losses.generalized_jsd_loss): TRL parity and its limits."""

from __future__ import annotations

import json

import pytest
import torch

from align.losses import generalized_jsd_loss


def _random(seed=0, B=3, T=7, V=11):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.3] = -100
    labels[1] = -100  # a row with no trained token
    return student, teacher, labels


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generalized_jsd_matches_trl(beta, temperature, reduction):
    from trl.experimental.gkd import GKDTrainer

    student, teacher, labels = _random()
    ours = generalized_jsd_loss(student.float(), teacher.float(), labels, beta=beta, temperature=temperature,
                                reduction=reduction)
    theirs = GKDTrainer.generalized_jsd_loss(student.float(), teacher.float(), labels, beta=beta,
                                             temperature=temperature, reduction=reduction)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    # per token: TRL's "none" gives the (N, V) elements of the trained tokens; ours sums them per token
    per_token = generalized_jsd_loss(student, teacher, labels, beta=beta, temperature=temperature, reduction="none")
    elements = GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta=beta, temperature=temperature,
                                               reduction="none")
    torch.testing.assert_close(per_token[labels != -100], elements.sum(-1), atol=1e-6, rtol=1e-6)
    assert (per_token[labels == -100] == 0).all()


def test_the_ends_are_forward_and_reverse_kl_and_equal_distributions_give_zero():
    student, teacher, _ = _random(1)
    s, t = student.log_softmax(-1), teacher.log_softmax(-1)
    forward = (t.exp() * (t - s)).sum(-1).mean()
    reverse = (s.exp() * (s - t)).sum(-1).mean()
    torch.testing.assert_close(generalized_jsd_loss(student, teacher, beta=0.0).double(), forward.double())
    torch.testing.assert_close(generalized_jsd_loss(student, teacher, beta=1.0).double(), reverse.double())
    for beta in (0.0, 0.3, 1.0):
        assert generalized_jsd_loss(teacher, teacher, beta=beta).abs() < 1e-6
    # the JSD is bounded by its KLs' mixture: 0 < JSD_beta < min(forward, reverse) for a beta in between
    mid = generalized_jsd_loss(student, teacher, beta=0.5)
    assert 0 < mid < min(forward, reverse)


def test_only_the_student_gets_a_gradient_through_a_detached_teacher():
    student, teacher, labels = _random(2)
    student = student.float().requires_grad_()
    generalized_jsd_loss(student, teacher.float(), labels, beta=0.5).backward()
    assert student.grad[labels == -100].abs().max() == 0  # untrained positions get no gradient
    assert student.grad[labels != -100].abs().max() > 0


def test_unknown_reduction_is_refused():
    student, teacher, labels = _random()
    with pytest.raises(ValueError, match="unknown reduction 'avg'"):
        generalized_jsd_loss(student, teacher, labels, reduction="avg")


# ---------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------
def _teacher(folder):
    """A 2-layer, hidden-32 Llama with the built-in tokenizer (random weights: a teacher the student is not)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from align import builtin

    tok = builtin.load_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, max_position_embeddings=64, hidden_size=32,
                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # a peaked teacher: a divergence the student can close
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return _teacher(tmp_path_factory.mktemp("teacher") / "model")


def gkd_recipe(output_dir, teacher, train=None, **section) -> dict:
    from helpers import REPO

    return {
        "stage": "gkd", "output_dir": str(output_dir), "seed": 0,
        "model": {"name_or_path": "builtin:tiny"},
        "data": {"train": {"path": str(REPO / "data/arith/sft_train.jsonl"), "take": 64},
                 "eval": {"path": str(REPO / "data/arith/sft_eval.jsonl"), "take": 16}, "max_length": 32},
        "train": {"max_steps": 10, "batch_size": 16, "lr": 3e-3, "lr_scheduler": "constant", "save_steps": 1000,
                  "log_steps": 1, "progress_bar": False, **(train or {})},
        "gkd": {"teacher_model": str(teacher), "max_new_tokens": 6, "temperature": 1.0, **section},
        "eval": {"max_new_tokens": 6},
    }


def build(tmp_path, teacher, train=None, **section):
    from accelerate import Accelerator

    from align.recipe import load_recipe
    from align.stages.gkd import GKDStage

    return GKDStage(load_recipe(None, data=gkd_recipe(tmp_path, teacher, train, **section)), Accelerator(cpu=True))


@pytest.mark.parametrize("lmbda", [0.0, 1.0])
def test_the_stage_loss_is_trls_batchmean_on_dataset_and_student_completions(tmp_path, teacher, lmbda):
    from trl.experimental.gkd import GKDTrainer

    stage = build(tmp_path, teacher, lmbda=lmbda, beta=0.3)
    (batch,) = stage.micro_batches(0)
    dataset = [stage.completions[i] for i in stage.prompts.step(0)]
    completions = [[t for t, label in zip(row, labels) if label != -100]
                   for row, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist())]
    assert (completions == dataset) == (lmbda == 0.0)  # lmbda 1: the student's own samples
    loss_sum, metrics = stage.loss(stage.model, batch)
    logits = stage.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        teacher_logits = stage.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = GKDTrainer.generalized_jsd_loss(logits, teacher_logits[:, :-1], batch["labels"][:, 1:], beta=0.3)
    torch.testing.assert_close(loss_sum / batch["_weight"], expected, atol=1e-6, rtol=1e-5)
    assert metrics["train/on_policy"] == (lmbda * 16, 16)


def test_the_coin_is_lmbda_and_keyed_by_seed_and_step():
    from align.stages.gkd import on_policy_step

    coins = [on_policy_step(0, s, 0.3) for s in range(400)]
    assert 0.25 < sum(coins) / 400 < 0.35
    assert coins == [on_policy_step(0, s, 0.3) for s in range(400)]  # a resumed run draws the same
    assert coins != [on_policy_step(1, s, 0.3) for s in range(400)]
    assert not any(on_policy_step(0, s, 0.0) for s in range(50)) and all(on_policy_step(0, s, 1.0) for s in range(50))


def test_gkd_moves_the_student_towards_the_teacher(tmp_path, teacher):
    from align.planning import run
    from align.recipe import load_recipe

    metrics = run(load_recipe(None, data=gkd_recipe(tmp_path, teacher)))
    assert metrics["eval/jsd"] < 0.8 * metrics["eval/jsd_start"], metrics  # measured 0.397 -> 0.261
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    coins = [r["train/on_policy"] for r in log if "train/on_policy" in r]
    assert 0 < sum(coins) < len(coins)  # lmbda 0.5: both kinds of step happened


def test_a_killed_run_resumes_to_the_same_weights(tmp_path, teacher, monkeypatch):
    from align.planning import run
    from align.recipe import load_recipe
    from align.stages.gkd import GKDStage

    from helpers import max_relative_difference, weights

    run(load_recipe(None, data=gkd_recipe(tmp_path / "straight", teacher, train={"max_steps": 4})))
    resumed = gkd_recipe(tmp_path / "resumed", teacher, train={"max_steps": 4, "save_steps": 2})

    def crash(self, step):
        if step == 2:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(GKDStage, "after_step", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(load_recipe(None, data=resumed))
    monkeypatch.undo()
    run(load_recipe(None, data=resumed))
    assert max_relative_difference(weights(tmp_path / "straight"), weights(tmp_path / "resumed")) < 1e-6


def test_bad_teacher_or_data_is_one_line(tmp_path, teacher):
    from align.errors import AlignError
    from align.planning import run
    from align.recipe import load_recipe

    from helpers import REPO

    with pytest.raises(AlignError, match="gkd.lmbda"):
        load_recipe(None, data=gkd_recipe(tmp_path, teacher, lmbda=1.5))
    prompts_only = gkd_recipe(tmp_path / "run", teacher)
    prompts_only["data"]["train"] = str(REPO / "data/arith/prefs_train.jsonl")
    with pytest.raises(AlignError, match="completion"):
        run(load_recipe(None, data=prompts_only))
    with pytest.raises(AlignError, match="gkd.teacher_model"):
        run(load_recipe(None, data=gkd_recipe(tmp_path / "run2", tmp_path / "no_such_teacher")))


def test_seq_kd_trains_off_policy_steps_on_the_teachers_samples(tmp_path, teacher):
    stage = build(tmp_path, teacher, lmbda=0.0, seq_kd=True)
    (batch,) = stage.micro_batches(0)
    completions = [[t for t, label in zip(row, labels) if label != -100]
                   for row, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist())]
    prompt_ids = [stage.prompts.prompt_ids[i] for i in stage.prompts.step(0)]
    assert completions == stage._sampled(stage.teacher, prompt_ids, 0)
    assert completions != stage._sampled(stage.model, prompt_ids, 0)
    assert completions != [stage.completions[i] for i in stage.prompts.step(0)]


@pytest.mark.slow
def test_gkd_recipe_distils_the_perfect_world_model_about_as_well_as_sft(tmp_path):
    """recipes/tiny/gkd.yaml against its control recipes/tiny/distill-sft.yaml, both from the micro student's
    500-step start, teacher recipes/tiny/sft.yaml (both trained first in tmp_path). Measured seed 0: GKD 0.839,
    control 0.8315, teacher 0.981, GKD's held-out JSD 0.127 -> 0.045. Pinned: GKD no more than 2 points below
    the control, its JSD to the teacher at least halved.

        OMP_NUM_THREADS=1 pytest -m slow tests/test_gkd.py
    """
    from align.planning import run
    from align.recipe import load_recipe

    from helpers import REPO

    common = ["train.progress_bar=false", f"model.name_or_path={tmp_path / 'start'}"]
    gkd = run(load_recipe(REPO / "recipes/tiny/gkd.yaml", [f"output_dir={tmp_path / 'gkd'}", *common,
                                                           f"gkd.teacher_model={tmp_path / 'teacher'}"]))
    control = run(load_recipe(REPO / "recipes/tiny/distill-sft.yaml", [f"output_dir={tmp_path / 'sft'}", *common]))
    assert gkd["eval/task_accuracy"] >= control["eval/task_accuracy"] - 0.02, (gkd, control)
    assert gkd["eval/task_accuracy"] > gkd["eval/task_accuracy_start"] + 0.1, gkd
    assert gkd["eval/jsd"] < 0.5 * gkd["eval/jsd_start"], gkd
