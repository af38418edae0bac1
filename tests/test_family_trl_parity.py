"""Step-0 loss parity with TRL 1.16 on every model family: SFT, DPO (sigmoid, IPO), reward, GRPO.

For each family (tests/families.py) align builds the stage from a recipe as a run does and
computes the loss of its first optimizer step (its micro-batches' summed losses over their global
weight, as the engine normalises); TRL builds its trainer on the same model folder and the same
rows, collates them with its own collator and calls `compute_loss` (GRPO: `_compute_loss` on
align's rollout). Both run in fp32 on the CPU, in eval mode (GPT-2's 0.1 dropouts off: TRL's
`disable_dropout`, which SFTTrainer lacks). Each test first checks that both tokenized the rows
into the same tokens (TRL's own dataset preparation against align's data layer), then that the
losses agree to ~1e-5.

Conventions, where align's and TRL's differ, and how each test makes them meet:

- SFT on conversational prompt/completion rows: both render the prompt with the generation
  prompt and train every token the full conversation adds (TRL's default completion_only_loss).
  Not compared: "messages" rows, where TRL trains every token unless `assistant_only_loss` (which
  needs `{% generation %}` markers in the template) and align trains the assistant turns.
- DPO on string pairs: TRL appends EOS as text and tokenizes prompt + completion as ONE string;
  align tokenizes the completion on its own and appends the EOS id. The rows' completions start
  with a space (a pre-token boundary), where the two agree; asserted token for token.
- Reward: align reads the score at the last real token (found from the attention mask, so the
  EOS when pad == EOS); transformers' sequence-classification pooling, which TRL uses, reads the
  last token that is not the pad token: the one BEFORE the final EOS on GPT-2, Mistral and Phi-3
  (pad == EOS). TRL is given a pad token that ends no row for those families, so both read the
  EOS. (A user scoring align's reward model with plain transformers on such a family reads the
  token before EOS, which the model was not trained at.)
- GRPO: TRL's training forward passes no position_ids, so a left-padded prompt would be read at
  shifted positions (align uses generation's); the rollout uses one prompt, unpadded. TRL is fed
  align's rollout (prompt, completions, advantages, reference log-probs of a perturbed reference,
  old log-probs moved off-policy so the clip acts).
- MoE (qwen3_moe): TRL adds the router load-balancing loss (config.router_aux_loss_coef x
  aux_loss) by default; align trains without it. TRL runs with `router_aux_loss_coef=0`.
- DPO's reference: with reference == policy the step-0 loss is log 2 whatever the tokens, so both
  use the same perturbed copy of the family's model as reference.
"""

from __future__ import annotations

import os

import pytest
import torch
from families import FAMILIES
from family_runs import (
    build_stage,
    perturbed_model,
    recipe_dict,
    rows_chat_pairs,
    rows_chat_prompt_completion,
    rows_pairs,
    score_model,
    user,
)

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl")

ROWS = 6


def align_stage(stage: str, model_dir, rows, tmp_path, **overrides):
    """The stage with all rows in one step, split into micro-batches only by batch_size."""
    built, _ = build_stage(recipe_dict(stage, model_dir, rows, tmp_path, {
        "train.batch_size": len(rows), "train.micro_batch_tokens": None, "data.packing": False, **overrides}))
    built.model.eval()
    return built


@torch.no_grad()
def step0_loss(stage, batches=None) -> float:
    """The engine's first-step loss: summed micro-batch losses over the step's global weight."""
    batches = stage.micro_batches(0) if batches is None else batches
    total = sum(stage.loss(stage.model, b)[0] for b in batches)
    return (total / sum(b["_weight"] for b in batches)).item()


def trl_args(config_cls, tmp_path, **kw):
    """TRL arguments for an fp32 CPU comparison (TRL defaults to bf16 and gradient checkpointing)."""
    kw = {"per_device_train_batch_size": ROWS, **kw}
    return config_cls(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, gradient_checkpointing=False,
                      report_to="none", disable_tqdm=True, **kw)


@torch.no_grad()
def trl_loss(trainer) -> float:
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    return trainer.compute_loss(trainer.model, dict(trainer.data_collator(examples))).item()


def causal_lm(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def tokenizer_of(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def as_lists(examples, keys) -> list:
    return sorted(tuple(tuple(e[k]) for k in keys) for e in examples)


# ---------------------------------------------------------------------------
# SFT
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_sft_step0_loss_matches_trl(family, family_dir, tmp_path):
    """Completion-only NLL of conversational prompt/completion rows: same tokens, same mean token loss."""
    from trl import SFTConfig, SFTTrainer

    start, rows = family_dir(family), rows_chat_prompt_completion()
    stage = align_stage("sft", start, rows, tmp_path)
    trainer = SFTTrainer(model=causal_lm(start), processing_class=tokenizer_of(start),
                         args=trl_args(SFTConfig, tmp_path, max_length=64, router_aux_loss_coef=0.0),
                         train_dataset=dataset(rows))
    assert as_lists(stage.batches.examples, ("input_ids", "labels")) == \
        as_lists(trainer.train_dataset, ("input_ids", "labels"))
    assert step0_loss(stage) == pytest.approx(trl_loss(trainer), rel=1e-5)


def dataset(rows):
    from datasets import Dataset

    return Dataset.from_list(rows)


# ---------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------
DPO_CASES = [pytest.param(rows, loss, id=f"{rows.__name__[5:]}-{loss}")
             for rows, loss in [(rows_chat_pairs, "sigmoid"), (rows_chat_pairs, "ipo"), (rows_pairs, "sigmoid")]]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("make_rows,loss_type", DPO_CASES)
def test_dpo_step0_loss_matches_trl(family, make_rows, loss_type, family_dir, tmp_path):
    """DPO / IPO against a perturbed reference: same pair tokens, same loss (align: shared-prompt rows
    where the family allows them; TRL: two rows)."""
    from trl import DPOConfig, DPOTrainer

    start, rows = family_dir(family), make_rows()
    reference = perturbed_model(start)
    stage = align_stage("dpo", start, rows, tmp_path, **{"dpo.ref_model": str(reference),
                                                        "dpo.loss_type": loss_type, "dpo.beta": 0.1})
    trainer = DPOTrainer(model=causal_lm(start), ref_model=causal_lm(reference), processing_class=tokenizer_of(start),
                         args=trl_args(DPOConfig, tmp_path, max_length=64, beta=0.1, loss_type=[loss_type],
                                       router_aux_loss_coef=0.0),
                         train_dataset=dataset(rows))
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    assert as_lists(stage.examples, keys) == as_lists(trainer.train_dataset, keys)
    assert step0_loss(stage) == pytest.approx(trl_loss(trainer), rel=2e-5)


# ---------------------------------------------------------------------------
# reward
# ---------------------------------------------------------------------------
def pad_ending_no_row(tokenizer, sequences) -> str:
    """A special token (else any token) that ends none of `sequences`: TRL's pad when pad == EOS."""
    last = {s[-1] for s in sequences}
    specials = [t for t in tokenizer.all_special_tokens if tokenizer.convert_tokens_to_ids(t) not in last]
    if specials:
        return specials[0]
    return next(t for t, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]) if i not in last)


@pytest.mark.parametrize("family", FAMILIES)
def test_reward_step0_loss_matches_trl(family, family_dir, tmp_path):
    """Bradley-Terry loss of conversational pairs: same sequences, same loss (both read the last real token)."""
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    start, rows = score_model(family_dir(family)), rows_chat_pairs()
    stage = align_stage("reward", start, rows, tmp_path)
    sequences = [e["prompt_ids"] + e[side] for e in stage.batches.examples for side in ("chosen_ids", "rejected_ids")]
    tokenizer = tokenizer_of(start)
    model = AutoModelForSequenceClassification.from_pretrained(start).eval()
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.pad_token = pad_ending_no_row(tokenizer, sequences)
        model.config.pad_token_id = tokenizer.pad_token_id
    trainer = RewardTrainer(model=model, processing_class=tokenizer, train_dataset=dataset(rows),
                            args=trl_args(RewardConfig, tmp_path, max_length=64))
    ours = sorted((e["prompt_ids"] + e["chosen_ids"], e["prompt_ids"] + e["rejected_ids"])
                  for e in stage.batches.examples)
    assert ours == sorted((e["chosen_ids"], e["rejected_ids"]) for e in trainer.train_dataset)
    assert step0_loss(stage) == pytest.approx(trl_loss(trainer), rel=1e-5)


# ---------------------------------------------------------------------------
# GRPO
# ---------------------------------------------------------------------------
G, C = 4, 5


def grpo_batches(stage, reference_dir):
    """Step 0's micro-batches of a rollout scored against `reference_dir`, completions cut to ragged
    lengths (a random model rarely samples EOS; the aggregations differ only on ragged rows), old
    log-probs moved off-policy."""
    from align import models
    from align.recipe import ModelConfig
    from align.rollout import completion_logprobs
    from align.stages.grpo import batch_weight

    ref_cfg = ModelConfig(name_or_path=str(reference_dir))
    stage.ref_model = models.load_model(ref_cfg, stage.tokenizer, trainable=False)
    batches = stage.micro_batches(0)
    noise = torch.Generator().manual_seed(0)
    for b in batches:
        lengths = torch.arange(b["completion_mask"].shape[0]) % C + 1  # 1, 2, ..., C, 1, ...
        b["completion_mask"] = b["completion_mask"] * (torch.arange(C)[None] < lengths[:, None])
        b["_weight"] = batch_weight(b["completion_mask"], stage.args.aggregation, C)
        with torch.no_grad():
            current = completion_logprobs(stage.model, b["prompt_ids"], b["prompt_mask"], b["completion_ids"],
                                          b["completion_mask"])
        b["old_logprobs"] = current + 0.3 * torch.randn(current.shape, generator=noise) * b["completion_mask"]
    return batches


@torch.no_grad()
def trl_grpo_loss(trainer, batches) -> float:
    tokens = sum(b["completion_mask"].sum() for b in batches)
    return sum(trainer._compute_loss(trainer.model, {
        "prompt_ids": b["prompt_ids"], "prompt_mask": b["prompt_mask"], "completion_ids": b["completion_ids"],
        "completion_mask": b["completion_mask"], "advantages": b["advantages"],
        "old_per_token_logps": b["old_logprobs"], "ref_per_token_logps": b["ref_logprobs"],
        "num_items_in_batch": tokens}).item() for b in batches)


@pytest.mark.parametrize("family", FAMILIES)
def test_grpo_step0_loss_matches_trl(family, family_dir, tmp_path):
    """Clipped surrogate + k3 KL (ratio-corrected) on align's rollout, under the three token aggregations."""
    from trl import GRPOConfig, GRPOTrainer

    start = family_dir(family)
    rows = [{"prompt": user("What is 2 plus 3?"), "answer": "5"}] * 2
    trainer = GRPOTrainer(model=causal_lm(start), processing_class=tokenizer_of(start),
                          reward_funcs=lambda prompts, completions, **_: [0.0] * len(completions),
                          args=trl_args(GRPOConfig, tmp_path, per_device_train_batch_size=G, num_generations=G,
                                        max_completion_length=C, beta=0.04, router_aux_loss_coef=0.0),
                          train_dataset=dataset(rows))
    trainer.current_gradient_accumulation_steps = 1
    for aggregation in ("grpo", "dr_grpo", "dapo"):
        stage = align_stage("grpo", start, rows, tmp_path / aggregation, **{
            "train.batch_size": G, "grpo.num_generations": G, "grpo.max_new_tokens": C, "grpo.beta": 0.04,
            "grpo.reward_funcs": ["length"], "grpo.aggregation": aggregation})
        batches = grpo_batches(stage, perturbed_model(start))
        assert batches[0]["advantages"].abs().sum() > 0
        trainer.loss_type = aggregation
        assert step0_loss(stage, batches) == pytest.approx(trl_grpo_loss(trainer, batches), rel=1e-5, abs=1e-6), \
            aggregation
