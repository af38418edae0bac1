"""Reward model: a scalar head on a causal-LM backbone, trained with the Bradley–Terry loss.

InstructGPT (Ouyang et al. 2022, section 3.5): start from the SFT model, replace the
LM head by a linear head giving one scalar, and train on comparisons with
-log σ(r(x, y_chosen) - r(x, y_rejected)). The model is
`AutoModelForSequenceClassification` with num_labels=1 from the shared loader (full or
LoRA); loading a causal-LM folder into it keeps the backbone and initialises a new
`score` head. The saved folder loads with `AutoModelForSequenceClassification.from_pretrained`.

Per step: chosen and rejected of every pair are scored in ONE forward. By default
(`data.shared_prompt: true`) each pair is one row [prompt, chosen, rejected] with a 4D
attention mask (prefix sharing, Wang et al. 2024: the prompt is computed once; the
rejected tokens do not see the chosen ones), the rewards read at the last chosen and
the last rejected token (`align.evaluate_rm.pair_rewards`); it falls back to rows
[chosen_1..chosen_B, rejected_1..rejected_B] (`collate_pairs`, reward at the last real
token of each row, pad == eos safe) for attention implementations that cannot take a
4D mask (flash_attention_2, flex_attention) or with `data.shared_prompt: false`.
The loss sum over the micro-batch is normalised by the number of pairs in the global
batch (`_weight` = pairs), so it equals TRL RewardTrainer's mean loss per step.
Optional per-pair `margin` column and reward centering (`center_rewards_coefficient`).
"""

from __future__ import annotations

import torch

from align import models
from align.data import load_eval_rows, load_rows
from align.device import micro_batch_tokens
from align.evaluate_rm import pair_rewards, score_pairs
from align.losses import bradley_terry_loss
from align.preference_data import (
    collate_pairs,
    collate_shared_pairs,
    pair_length,
    pair_truncation,
    shared_pair_width,
    supports_shared_prompt,
    tokenize_preferences,
)
from align.recipe import Recipe
from align.stage_settings import RewardArgs  # noqa: F401  (re-exported)
from align.stages.base import OfflineBatches


def pair_tokens(example: dict) -> int:
    """Input tokens of a pair in the concatenated forward (both sides, prompt twice)."""
    return 2 * len(example["prompt_ids"]) + len(example["chosen_ids"]) + len(example["rejected_ids"])


class RewardStage:
    def __init__(self, recipe: Recipe, accelerator):
        self.recipe, self.accelerator = recipe, accelerator
        self.args: RewardArgs = recipe.stage_args
        if self.args.prompt_truncation is not None:
            accelerator.print("reward.prompt_truncation is deprecated: use data.prompt_truncation (the same rule for "
                              "every pair stage)")
        self.tokenizer = models.load_tokenizer(recipe.model)
        self.pad_id = self.tokenizer.pad_token_id
        train = self._tokenize(load_rows(recipe.data.train, key="data.train"), "data.train")
        eval_rows = load_eval_rows(recipe.data)
        self.eval_examples = [] if eval_rows is None else self._tokenize(eval_rows, "data.eval").examples
        self.model = models.load_model(recipe.model, self.tokenizer, head="score", seed=recipe.seed)
        models.check_positions(self.model, max(map(pair_length, train.examples + self.eval_examples)),
                               f"data.max_length={recipe.data.max_length}")
        self.shared_prompt = recipe.data.shared_prompt and supports_shared_prompt(self.model)
        if recipe.data.shared_prompt and not self.shared_prompt:
            accelerator.print(f"data.shared_prompt: attention {self.model.config._attn_implementation!r} cannot take "
                              f"a custom 4D mask; pairs go as 2 rows each (chosen, rejected)")
        # lengths: input tokens of a pair in its layout; widths: its padded width per row
        if self.shared_prompt:
            collate, lengths, widths, rows = collate_shared_pairs, shared_pair_width, shared_pair_width, 1
        else:
            collate, lengths, widths, rows = collate_pairs, pair_tokens, pair_length, 2
        self.batches = OfflineBatches(
            train.examples, [lengths(e) for e in train.examples], batch_size=recipe.train.batch_size,
            grad_accum=recipe.train.grad_accum, process=accelerator.process_index,
            processes=accelerator.num_processes, seed=recipe.seed, group_by_length=recipe.data.group_by_length,
            collate_fn=lambda exs: collate(exs, self.pad_id), weight_fn=lambda e: 1,
            max_tokens=micro_batch_tokens(recipe), widths=[widths(e) for e in train.examples],
            rows_per_example=rows,
        )

    def _tokenize(self, rows, key):
        pairs = tokenize_preferences(rows, self.tokenizer, max_length=self.recipe.data.max_length,
                                     key=key, prompt_truncation=pair_truncation(self.recipe), scores_tokens=False)
        self.accelerator.print(f"{key}: {pairs.summary()}")
        return pairs

    # -- engine interface ---------------------------------------------------------------
    def micro_batches(self, step: int) -> list[dict]:
        return self.batches(step)

    def loss(self, model, batch):
        chosen, rejected = pair_rewards(model, batch)  # (B,), (B,)
        loss_sum = bradley_terry_loss(chosen, rejected, batch.get("margin"),
                                      center_coefficient=self.args.center_rewards_coefficient, reduction="sum")
        return loss_sum, pair_metrics(chosen.detach(), rejected.detach(), prefix="")

    def after_step(self, step: int) -> None:
        pass

    def evaluate(self, model) -> dict:
        if not self.eval_examples:
            return {}
        chosen, rejected = score_pairs(model, self.eval_examples, self.pad_id, batch_size=self.recipe.eval.batch_size,
                                       accelerator=self.accelerator, shared_prompt=self.shared_prompt)
        margin = None
        if "margin" in self.eval_examples[0]:
            margin = torch.tensor([e.get("margin", 0.0) for e in self.eval_examples])
        n = len(self.eval_examples)
        metrics = {k: total / count for k, (total, count) in pair_metrics(chosen, rejected, prefix="eval/").items()}
        metrics["eval/pair_accuracy"] = metrics["eval/rewards/accuracies"]
        metrics["eval/ties"] = float((chosen == rejected).sum())
        metrics["eval/loss"] = bradley_terry_loss(chosen, rejected, margin,
                                                  center_coefficient=self.args.center_rewards_coefficient).item()
        metrics["eval/pairs"] = float(n)
        return metrics

    def save(self, out_dir, accelerator) -> None:
        models.save_pretrained(self.model, self.tokenizer, out_dir, accelerator)


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor, *, prefix: str) -> dict[str, tuple[float, int]]:
    """TRL's reward names as (sum, count): rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies.

    accuracies counts a tie as wrong.
    """
    n = chosen.numel()
    return {f"{prefix}rewards/chosen": (chosen.sum().item(), n),
            f"{prefix}rewards/rejected": (rejected.sum().item(), n),
            f"{prefix}rewards/margins": ((chosen - rejected).sum().item(), n),
            f"{prefix}rewards/accuracies": ((chosen > rejected).sum().item(), n)}
