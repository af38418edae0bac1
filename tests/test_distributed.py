"""Two CPU processes under `accelerate launch` train every stage as one process does, and evaluate once.

The invariance guarantee (same global batch -> same update, whatever the split over
micro-batches and processes) for SFT, reward, DPO, KTO, online DPO, GKD, GRPO (and its RLOO,
REINFORCE++ and GSPO settings) and PPO: each runs a few steps on a
micro Llama (hidden 32, 2 layers) as ONE process (batch B, or B/2 x grad_accum 2) and
as TWO CPU processes (`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu
--num_processes 2`, batch B/2 each); the final weights agree to 1e-4 relative and the
logged metrics agree. For online DPO, GRPO and PPO that needs rollouts that do not depend on the
process split (per-row sampling keys, `align.rollout`), advantages whitened over the
global batch and the same global PPO minibatches (`PPOStage._minibatch_rows`).

Evaluation is counted exactly once: held-out sets of an odd size (7 pairs, 5 prompts)
give the same figures, and the same count, on two processes as on one, for the reward
stage's and DPO's eval/pair_accuracy, SFT's eval/loss and eval/task_accuracy, GRPO's eval/task_accuracy / eval/reward / eval/kl,
`align.evaluate.task_accuracy` and `align eval-rm`.

All the two-process runs share ONE `accelerate launch` (tests/distributed_driver.py runs
them in sequence), since starting one costs 10+ s.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from align import planning
from align.recipe import load_recipe

from helpers import REPO, accelerate_launch, max_relative_difference, weights

DATA = REPO / "data/arith"
MICRO = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
EVAL_PAIRS, EVAL_PROMPTS = 7, 5  # odd: two processes cannot split them evenly
NOT_COMPARED = {"train/tokens_per_second", "train/seconds_per_step"}


def _micro_model(out):
    """A 2-layer, hidden-32 Llama with the built-in tokenizer, saved as a model folder."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from align import builtin

    tok = builtin.load_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, max_position_embeddings=64, **MICRO)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _recipe(stage, out, micro, *, batch_size, grad_accum=1, max_steps=3, **sections) -> dict:
    pairs = stage in ("reward", "dpo", "kto")
    train_file, eval_file = ("prefs_train", "prefs_eval") if pairs else ("sft_train", "sft_eval")
    recipe = {
        "stage": stage, "output_dir": str(out), "seed": 0,
        "model": {"name_or_path": str(micro)},
        "data": {"train": {"path": str(DATA / f"{train_file}.jsonl"), "take": 64},
                 "eval": {"path": str(DATA / f"{eval_file}.jsonl"), "take": EVAL_PAIRS if pairs else EVAL_PROMPTS},
                 "max_length": 32},
        "train": {"max_steps": max_steps, "batch_size": batch_size, "grad_accum": grad_accum, "lr": 1e-3,
                  "lr_scheduler": "constant", "save_steps": 1000, "log_steps": 1, "progress_bar": False},
        "eval": {"generate": not pairs, "max_new_tokens": 4, "batch_size": 2},
    }
    recipe.update(sections)
    return recipe


GRPO_VARIANTS = {"rloo": {"advantage_estimator": "rloo"}, "reinforce_pp": {"advantage_estimator": "reinforce_pp"},
                 "gspo": {"importance_sampling_level": "sequence", "num_iterations": 2}}


def _stage_recipes(root, micro, processes: int) -> dict[str, dict]:
    """Each stage's recipe for one process or for two (same global batch)."""
    two = processes == 2
    out = root / f"p{processes}"
    grpo = {"num_generations": 2, "max_new_tokens": 4, "kl_coef": 0.05, "reward_funcs": ["length"],
            "missing_eos_penalty": 0.5, "eval_kl_prompts": EVAL_PROMPTS, "plot": False}
    # ties trained (the first sample chosen, as TRL): the micro model's samples rarely end, so lengths often tie
    online_dpo = {"max_new_tokens": 4, "temperature": 1.0, "reward_funcs": ["length"], "missing_eos_penalty": 0.5,
                  "skip_ties": False, "rpo_alpha": 0.5, "eval_kl_prompts": EVAL_PROMPTS}
    ppo = {"reward_model": str(root / "p1/reward"), "max_new_tokens": 4, "update_epochs": 1, "num_minibatches": 2,
           "kl_target": 0.5, "kl_horizon": 100, "eval_kl_prompts": EVAL_PROMPTS, "plot": False}
    return {
        # global batch 8 sequences: 8 x 1 process, or 4 x 2
        "sft": _recipe("sft", out / "sft", micro, batch_size=4 if two else 8),
        # global batch 8 pairs: 8 x 1 process, or 4 x 2
        "reward": _recipe("reward", out / "reward", micro, batch_size=4 if two else 8),
        # global batch 8 pairs: 4 x grad_accum 2 x 1 process, or 4 x 2 processes
        "dpo": _recipe("dpo", out / "dpo", micro, batch_size=4, grad_accum=1 if two else 2,
                       dpo={"beta": 0.1, "rpo_alpha": 0.5}),
        # global batch 8 unpaired examples (4 pairs split in two): 4 x grad_accum 2 x 1 process, or 4 x 2; KTO's
        # reference point z_0 covers the whole step's batch, so it is the same number either way
        "kto": _recipe("kto", out / "kto", micro, batch_size=4, grad_accum=1 if two else 2, kto={"beta": 0.5}),
        # global batch 8 completions = 4 prompts x G=2; RLOO's and REINFORCE++'s advantages (the latter whitened over
        # the global batch), and GSPO's sequence ratio on rollouts reused for 2 steps (4 steps = 2 rollouts)
        "grpo": _recipe("grpo", out / "grpo", micro, batch_size=4 if two else 8, grpo=grpo),
        **{f"grpo-{name}": _recipe("grpo", out / f"grpo-{name}", micro, batch_size=4 if two else 8,
                                   max_steps=4 if name == "gspo" else 3, grpo={**grpo, **variant})
           for name, variant in GRPO_VARIANTS.items()},
        # global batch 8 prompts (16 samples, 8 pairs): 4 x grad_accum 2 x 1 process, or 4 x 2
        "online_dpo": _recipe("online_dpo", out / "online_dpo", micro, batch_size=4, grad_accum=1 if two else 2,
                              online_dpo=online_dpo),
        # global batch 8 prompts; the teacher is the one-process SFT run's model; lmbda 0.5 over 4 steps draws
        # both kinds of step (student samples at steps 0 and 3, the dataset's completions at 1 and 2)
        "gkd": _recipe("gkd", out / "gkd", micro, batch_size=4, grad_accum=1 if two else 2, max_steps=4,
                       gkd={"teacher_model": str(root / "p1/sft"), "max_new_tokens": 4, "temperature": 1.0}),
        # 8 prompts per optimizer step (4 x grad_accum 2, or 4 x 2 processes); rollouts of 16 prompts
        # cut into 2 minibatches -> 4 steps = 2 rollouts
        "ppo": _recipe("ppo", out / "ppo", micro, batch_size=4, grad_accum=1 if two else 2, max_steps=4, ppo=ppo),
    }


def _launch_two_processes(jobs_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               ACCELERATE_USE_CPU="true")
    proc = accelerate_launch(["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                              "--dynamo_backend", "no", str(REPO / "tests/distributed_driver.py"), str(jobs_path)],
                             env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every stage on one process (here) and on two (one accelerate launch); eval baselines here."""
    from align import evaluate, models
    from align.evaluate_rm import evaluate_reward_model
    from align.recipe import ModelConfig

    root = tmp_path_factory.mktemp("distributed")
    micro = _micro_model(root / "micro")
    for recipe in _stage_recipes(root, micro, 1).values():
        planning.run(load_recipe(None, [], data=recipe))

    # task accuracy on an odd number of prompts, with references that make it exactly 3/5
    prompts = [json.loads(line)["prompt"] for line in (DATA / "sft_eval.jsonl").read_text().splitlines()[:EVAL_PROMPTS]]
    cfg = ModelConfig(name_or_path=str(micro))
    tokenizer = models.load_tokenizer(cfg)
    model = models.load_model(cfg, tokenizer, trainable=False)
    kwargs = dict(max_new_tokens=4, batch_size=2)
    greedy = evaluate.greedy_completions(model, tokenizer, prompts, **kwargs)
    references = [greedy[0], greedy[1], greedy[2], "no such answer", "nor this one"]
    one_accuracy = evaluate.task_accuracy(model, tokenizer, prompts, references, **kwargs)
    rm_data = {"path": str(DATA / "prefs_eval.jsonl"), "take": EVAL_PAIRS}
    one_rm = evaluate_reward_model(str(root / "p1/reward"), rm_data, quiet=True)

    jobs = [{"kind": "train", "recipe": r} for r in _stage_recipes(root, micro, 2).values()]
    jobs.append({"kind": "eval_rm", "model": str(root / "p1/reward"), "data": rm_data,
                 "output": str(root / "p2/eval_rm.json")})
    jobs.append({"kind": "task_accuracy", "model": str(micro), "prompts": prompts, "references": references,
                 "output": str(root / "p2/task_accuracy.json"), **kwargs})
    (root / "jobs.json").write_text(json.dumps(jobs))
    _launch_two_processes(root / "jobs.json")
    return {"root": root, "micro": micro, "one_accuracy": one_accuracy, "one_rm": one_rm}


def _log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _assert_same_run(one, two, *, rel=1e-4):
    """Same final weights (1e-4 relative), same log records and final metrics."""
    difference = max_relative_difference(weights(one), weights(two))
    print(f"{one.parent.name}/{one.name} vs {two.parent.name}/{two.name}: max relative weight difference "
          f"{difference:.1e}")  # the figure for reports (pytest -s)
    assert difference < rel
    log_one, log_two = _log(one), _log(two)
    assert [r["step"] for r in log_one] == [r["step"] for r in log_two]
    for a, b in zip(log_one, log_two):
        assert a.keys() == b.keys()
        for key in a.keys() - NOT_COMPARED - {"step"}:
            assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-6, nan_ok=True), (a["step"], key)
    m_one, m_two = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m_one.keys() == m_two.keys()
    for key in m_one:
        assert m_one[key] == pytest.approx(m_two[key], rel=rel, abs=1e-6, nan_ok=True), key
    return m_one, m_two


def _moved(run_dir, start_dir) -> float:
    """Largest relative change of the weights the run shares with the starting model."""
    final, start = weights(run_dir), weights(start_dir)
    shared = sorted(final.keys() & start.keys())
    assert shared
    return max_relative_difference({k: final[k] for k in shared}, {k: start[k] for k in shared})


def test_sft_two_processes_train_and_evaluate_as_one(runs):
    """Two processes x batch 4 == one process x batch 8 (batch 2 x grad_accum 4 is in test_engine.py)."""
    root = runs["root"]
    m_one, m_two = _assert_same_run(root / "p1/sft", root / "p2/sft")
    assert _moved(root / "p1/sft", runs["micro"]) > 1e-3
    losses = [r["train/loss"] for r in _log(root / "p2/sft") if "train/loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert m_one["eval/task_accuracy"] == m_two["eval/task_accuracy"]
    assert m_one["eval/loss"] == pytest.approx(m_two["eval/loss"], rel=1e-6)


def test_reward_model_two_processes_train_and_evaluate_as_one(runs):
    root = runs["root"]
    m_one, m_two = _assert_same_run(root / "p1/reward", root / "p2/reward")
    assert _moved(root / "p1/reward", runs["micro"]) > 1e-3  # training changed the weights
    assert m_two["eval/pairs"] == m_two["eval/pairs_start"] == EVAL_PAIRS
    assert 0.0 <= m_two["eval/pair_accuracy"] <= 1.0
    assert m_one["eval/pair_accuracy"] == m_two["eval/pair_accuracy"]  # a count out of 7: exact


def test_dpo_two_processes_train_and_evaluate_as_one_accumulating(runs):
    root = runs["root"]
    m_one, m_two = _assert_same_run(root / "p1/dpo", root / "p2/dpo")
    assert _moved(root / "p1/dpo", runs["micro"]) > 1e-3
    # 7 held-out pairs: a padded duplicate would make the accuracy a multiple of 1/8
    assert m_one["eval/pair_accuracy"] * EVAL_PAIRS == pytest.approx(round(m_one["eval/pair_accuracy"] * EVAL_PAIRS))
    assert m_one["eval/pair_accuracy"] == m_two["eval/pair_accuracy"]
    assert m_one["eval/loss"] == pytest.approx(m_two["eval/loss"], rel=1e-6)


def test_kto_two_processes_train_and_evaluate_as_one_accumulating(runs):
    root = runs["root"]
    m_one, m_two = _assert_same_run(root / "p1/kto", root / "p2/kto")  # includes the logged z_0 (`kl`) per step
    assert _moved(root / "p1/kto", runs["micro"]) > 1e-3
    assert any(r.get("kl", 0) > 0 for r in _log(root / "p1/kto"))  # the reference point moved off 0
    assert m_one["eval/pair_accuracy"] == m_two["eval/pair_accuracy"]


@pytest.mark.parametrize("name", ["grpo", *[f"grpo-{name}" for name in GRPO_VARIANTS]])
def test_grpo_two_processes_sample_the_same_rollouts_and_train_as_one(runs, name):
    """GRPO and its variants (RLOO, REINFORCE++, GSPO): the same rollouts, advantages and update on 2 processes."""
    root = runs["root"]
    m_one, m_two = _assert_same_run(root / "p1" / name, root / "p2" / name)
    assert _moved(root / "p1" / name, runs["micro"]) > 1e-3
    # the length reward varies within groups: advantages are not all zero
    assert any(r.get("train/reward_std", 0) > 0 for r in _log(root / "p1" / name))
    for key in ("eval/task_accuracy", "eval/reward", "eval/kl"):
        # eval/kl is a small difference of log-prob sums: float32 rounding of the terms (~1e-7) sets its tolerance
        assert m_one[key] == m_two[key] or m_one[key] == pytest.approx(m_two[key], rel=1e-5, abs=1e-6), key
    assert m_one["eval/kl"] != 0  # sampled completions scored under the trained policy and the reference


def test_online_dpo_two_processes_sample_the_same_pairs_and_train_as_one(runs):
    root = runs["root"]
    m_one, _ = _assert_same_run(root / "p1/online_dpo", root / "p2/online_dpo")
    assert _moved(root / "p1/online_dpo", runs["micro"]) > 1e-3
    assert any(r.get("train/reward_margin", 0) > 0 for r in _log(root / "p1/online_dpo"))  # pairs were ranked
    assert m_one["eval/kl"] != 0


def test_gkd_two_processes_draw_the_same_coins_and_samples_and_train_as_one(runs):
    root = runs["root"]
    m_one, _ = _assert_same_run(root / "p1/gkd", root / "p2/gkd")
    assert _moved(root / "p1/gkd", runs["micro"]) > 1e-3
    coins = [r["train/on_policy"] for r in _log(root / "p1/gkd") if "train/on_policy" in r]
    assert 0 < sum(coins) < len(coins)  # student-sampled and dataset steps both ran
    assert m_one["eval/jsd"] < m_one["eval/jsd_start"]


def test_ppo_two_processes_sample_whiten_and_minibatch_as_one(runs):
    root = runs["root"]
    _assert_same_run(root / "p1/ppo", root / "p2/ppo")
    assert max_relative_difference(weights(root / "p1/ppo/value"), weights(root / "p2/ppo/value")) < 1e-4
    assert _moved(root / "p1/ppo", runs["micro"]) > 1e-3
    betas = [r["objective/kl_coef"] for r in _log(root / "p2/ppo") if "objective/kl_coef" in r]
    assert betas[-1] != betas[0]  # the adaptive KL controller acted on the global KL


def test_task_accuracy_counts_every_prompt_once_on_two_processes(runs):
    assert runs["one_accuracy"] == pytest.approx(3 / EVAL_PROMPTS)
    two = json.loads((runs["root"] / "p2/task_accuracy.json").read_text())
    assert two["accuracy"] == pytest.approx(3 / EVAL_PROMPTS)
    assert sorted(i for i, _ in two["completed"]) == list(range(EVAL_PROMPTS))  # each prompt once


def test_eval_rm_on_two_processes_scores_every_pair_once(runs):
    one = runs["one_rm"]
    two = json.loads((runs["root"] / "p2/eval_rm.json").read_text())
    assert one["n"] == two["n"] == EVAL_PAIRS
    for key in ("accuracy", "ties", "mean_margin", "reward_chosen", "reward_rejected"):
        assert one[key] == pytest.approx(two[key], rel=1e-6), key
    assert one["length_buckets"] == two["length_buckets"]


# ---------------------------------------------------------------------------
# the sampling that makes rollouts independent of the process split (in-process, fast)
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_policy():
    from transformers import AutoModelForCausalLM, LlamaConfig

    from align import builtin

    tok = builtin.load_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), pad_token_id=0, bos_token_id=1, eos_token_id=2, **MICRO)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_a_rollout_split_over_processes_samples_what_one_process_samples(tiny_policy):
    from align import rollout as ro

    prompts = [[1, 20, 21, 22], [1, 30], [1, 40, 41]] * 3
    sampling = ro.SamplingConfig(max_new_tokens=6, temperature=0.7, top_k=20, top_p=0.9)
    kwargs = dict(sampling=sampling, eos_id=2, pad_id=0, generator_seed=5, policy_logprobs=False)
    whole = ro.rollout(tiny_policy, prompts, **kwargs).completion_ids
    first = ro.rollout(tiny_policy, prompts[:4], row_ids=range(4), **kwargs).completion_ids
    second = ro.rollout(tiny_policy, prompts[4:], row_ids=range(4, 9), **kwargs).completion_ids
    for part, rows in ((first, slice(0, 4)), (second, slice(4, 9))):
        assert torch.equal(whole[rows, : part.shape[1]], part)
        assert (whole[rows, part.shape[1]:] == 0).all()
    assert len({tuple(r) for r in whole.tolist()}) > 3  # copies of a prompt get different samples
    other_seed = ro.rollout(tiny_policy, prompts, **{**kwargs, "generator_seed": 6}).completion_ids
    assert not torch.equal(whole, other_seed)


def test_per_row_gumbel_max_draws_from_the_warped_softmax(tiny_policy):
    """First-token frequencies over 4000 rows match softmax(logits / T) (and top-k keeps only k tokens)."""
    from align import rollout as ro

    prompt = [1, 20, 21, 22]
    n, temperature = 4000, 0.7
    probs = (tiny_policy(torch.tensor([prompt])).logits[0, -1] / temperature).softmax(-1)
    out = ro.rollout(tiny_policy, [prompt] * n, sampling=ro.SamplingConfig(max_new_tokens=1, temperature=temperature),
                     eos_id=2, pad_id=0, generator_seed=1, policy_logprobs=False)
    freq = torch.bincount(out.completion_ids[:, 0], minlength=probs.numel()).double() / n
    sigma = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert ((freq - probs.double()).abs() <= 5 * sigma + 1e-3).all()
    # chi-square over the vocabulary: about V - 1 for a correct sampler
    chi2 = ((freq - probs.double()) ** 2 / probs.double()).sum().item() * n
    assert chi2 < 1.5 * probs.numel()
    top = ro.rollout(tiny_policy, [prompt] * 200, sampling=ro.SamplingConfig(max_new_tokens=1, top_k=3),
                     eos_id=2, pad_id=0, generator_seed=1, policy_logprobs=False)
    assert set(top.completion_ids[:, 0].tolist()) <= set(probs.topk(3).indices.tolist())
