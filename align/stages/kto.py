"""KTO: Kahneman-Tversky optimisation from unpaired desirable / undesirable completions.

Ethayarajh et al. 2024 ("KTO: Model Alignment as Prospect Theoretic Optimization"), as TRL
1.16's `KTOTrainer` (`loss_type="kto"`) computes it: `align.losses.kto_loss` on summed
completion log-probs, with the reference point `kto_reference_point`.

Data (`align.preference_data.tokenize_unpaired`): rows `prompt`, `completion`, `label`
(true: desirable, false: undesirable), or preference rows (`prompt`?, `chosen`, `rejected`),
each split into two examples as TRL's `unpair_preference_dataset` does. A missing or
non-boolean label is an error naming the row; imbalanced labels print the paper's eq. 8
suggestion for `kto.desirable_weight` / `kto.undesirable_weight`.

The reference point z_0 estimates KL(pi || pi_ref) from mismatched pairs (x_j, y'_j). Each
example gets ONE mismatched completion, fixed before training (`add_kl_completions`: another
example's, with a different prompt), so its reference log-prob is precomputed with the
example's own, once, like DPO's: an example is scored as a "pair" (completion, mismatched
completion) sharing its prompt, by the preference stage's scorer (`summed_pair_logps`,
prefix sharing when the attention allows), and the reference model is never held during
training (the starting policy is the reference). Where this departs from TRL: TRL rotates
completions within each fixed per-device batch, so its y' are the batch's own completions,
and it takes z_0 per micro-batch (averaged over processes). Here z_0 is one number per
optimizer step over its WHOLE global batch: `micro_batches(step)` scores the step's
mismatched pairs under the current policy (no gradient, one forward per micro-batch, as TRL
spends) and all-reduces the sum and count, so the update does not depend on
`train.grad_accum` or the number of processes. The loss of a step is the sum of per-example
losses over the global number of examples (`_weight` = 1 per example): TRL's batch mean.

Metrics (TRL's names): `rewards/chosen`, `rewards/rejected` (mean implicit reward beta * rho
of desirable / undesirable examples), `logps/chosen`, `logps/rejected`, `kl` (z_0);
evaluation: `eval/loss`, `eval/kl`, and where the held-out rows are preference pairs,
`eval/pair_accuracy` and `eval/rewards/margins` (implicit reward of chosen vs rejected), and
`eval/task_accuracy` (greedy exact match against the desirable completions).
"""

from __future__ import annotations

import torch

from align import evaluate, models
from align.data import load_eval_rows, load_rows, without_causal_padding_mask
from align.device import micro_batch_tokens
from align.logprobs import forward_hidden
from align.losses import kto_loss, kto_reference_point
from align.preference_data import (
    add_kl_completions,
    collate_pairs,
    kto_pair_view,
    label_balance_warning,
    pair_length,
    supports_shared_prompt,
    tokenize_unpaired,
)
from align.recipe import Recipe
from align.stage_settings import KTOArgs  # noqa: F401  (re-exported)
from align.stages.base import OfflineBatches, tensors_only
from align.stages.preference import summed_pair_logps


def completion_sums(model, batch: dict, rows: slice) -> torch.Tensor:
    """Summed completion log-probs (R,) of `rows` of a `collate_pairs` batch (right-padded rows)."""
    inputs = without_causal_padding_mask({"input_ids": batch["input_ids"][rows],
                                          "attention_mask": batch["attention_mask"][rows]})
    hidden, head = forward_hidden(model, **inputs, use_cache=False)  # (R, T, H): no logits (align.logprobs)
    return head.token_logprobs(hidden[:, :-1], batch["labels"][rows][:, 1:]).sum(-1)


class KTOStage:
    def __init__(self, recipe: Recipe, accelerator):
        self.recipe, self.accelerator = recipe, accelerator
        self.args: KTOArgs = recipe.stage_args
        a, data = self.args, recipe.data
        self.tokenizer = models.load_tokenizer(recipe.model)
        self.pad_id = self.tokenizer.pad_token_id
        train = self._tokenize(load_rows(data.train, key="data.train"), "data.train")
        self.examples = train.examples
        add_kl_completions(self.examples, recipe.seed)
        warning = label_balance_warning(train.desirable, len(self.examples) - train.desirable, a.desirable_weight,
                                        a.undesirable_weight)
        if warning:
            accelerator.print(f"warning: {warning}")
        self.eval_examples, self.eval_prompts, self.eval_references = [], [], []
        rows = load_eval_rows(data)
        if rows is not None:
            self.eval_examples = self._tokenize(rows, "data.eval").examples
            add_kl_completions(self.eval_examples, recipe.seed + 1)
            for row in rows.rows:
                if row.get("prompt") not in (None, "") and ("chosen" in row or row.get("label") is True):
                    self.eval_prompts.append(row["prompt"])
                    self.eval_references.append(row["chosen"] if "chosen" in row else row["completion"])
        self.model = models.load_model(recipe.model, self.tokenizer, seed=recipe.seed)
        self.shared_prompt = data.shared_prompt and supports_shared_prompt(self.model)
        self._precompute_reference()
        views = [kto_pair_view(e) for e in self.examples]
        self.batches = OfflineBatches(
            self.examples, [pair_length(v) for v in views], batch_size=recipe.train.batch_size,
            grad_accum=recipe.train.grad_accum, process=accelerator.process_index,
            processes=accelerator.num_processes, seed=recipe.seed, group_by_length=data.group_by_length,
            collate_fn=self._collate, weight_fn=lambda e: 1, max_tokens=micro_batch_tokens(recipe),
            rows_per_example=2)

    # -- data and reference ------------------------------------------------------------
    def _tokenize(self, rows, key):
        tokenized = tokenize_unpaired(rows, self.tokenizer, max_length=self.recipe.data.max_length, key=key)
        self.accelerator.print(f"{key}: {tokenized.summary()}")
        return tokenized

    def _collate(self, examples: list[dict]) -> dict:
        """Rows [completion_1..B, mismatched completion_1..B] (`collate_pairs`), labels and reference log-probs."""
        batch = collate_pairs([kto_pair_view(e) for e in examples], self.pad_id)
        batch["label"] = torch.tensor([e["label"] for e in examples], dtype=torch.bool)
        batch["ref_logps"] = torch.tensor([e["ref_logps"] for e in examples], dtype=torch.float32)
        batch["ref_kl_logps"] = torch.tensor([e["ref_kl_logps"] for e in examples], dtype=torch.float32)
        return batch

    def _score(self, model, examples: list[dict], batch_size: int) -> torch.Tensor:
        """(N, 2) summed log-probs [completion, mismatched completion] of every example, on every process."""
        return summed_pair_logps(model, [kto_pair_view(e) for e in examples], self.pad_id, batch_size=batch_size,
                                 accelerator=self.accelerator,
                                 shared_prompt=self.shared_prompt and supports_shared_prompt(model))

    def _precompute_reference(self):
        """The starting policy's log-probs of every (prompt, completion) and mismatched pair, once."""
        reference = self.model
        if not models.is_zero3_sharded(reference):
            reference.to(self.accelerator.device)
        batch_size = self.args.ref_batch_size or self.recipe.train.batch_size
        with models.gathered(reference) as whole:
            for examples in (self.examples, self.eval_examples):
                if examples:
                    for e, (lp, kl) in zip(examples, self._score(whole, examples, batch_size).tolist()):
                        e["ref_logps"], e["ref_kl_logps"] = lp, kl

    def _all_reduce(self, stats: torch.Tensor) -> torch.Tensor:
        acc = self.accelerator
        if acc.num_processes == 1:
            return stats
        return acc.reduce(stats.to(acc.device), reduction="sum").cpu()

    # -- engine interface ---------------------------------------------------------------
    def micro_batches(self, step: int) -> list[dict]:
        """The step's micro-batches, each carrying the step's reference point z_0 (`_kl`) over the GLOBAL batch."""
        batches = self.batches(step)
        device = self.accelerator.device
        kl_logps = []
        with torch.no_grad(), self.accelerator.autocast():
            for b in batches:
                n = b["label"].shape[0]
                on_device = {k: b[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
                kl_logps.append(completion_sums(self.model, on_device, slice(n, 2 * n)).float().cpu())
        ref_kl = torch.cat([b["ref_kl_logps"] for b in batches]) if batches else torch.zeros(0)
        z = kto_reference_point(torch.cat(kl_logps) if kl_logps else torch.zeros(0), ref_kl, reduce=self._all_reduce)
        for b in batches:
            b["_kl"] = z
        return batches

    def loss(self, model, batch):
        a = self.args
        z = batch["_kl"]
        batch = tensors_only(batch)
        n = batch["label"].shape[0]
        logps = completion_sums(model, batch, slice(0, n))  # (B,) the examples' own completions
        losses, rewards = kto_loss(logps, batch["ref_logps"], batch["label"], z, beta=a.beta,
                                   desirable_weight=a.desirable_weight, undesirable_weight=a.undesirable_weight)
        good, bad = batch["label"], ~batch["label"]
        lp = logps.detach()
        metrics = {
            "rewards/chosen": (rewards[good].sum().item(), int(good.sum())),
            "rewards/rejected": (rewards[bad].sum().item(), int(bad.sum())),
            "logps/chosen": (lp[good].sum().item(), int(good.sum())),
            "logps/rejected": (lp[bad].sum().item(), int(bad.sum())),
            "kl": (float(z), 1),
        }
        return losses.sum(), metrics

    def after_step(self, step: int) -> None:
        pass

    # -- evaluation --------------------------------------------------------------------
    def _eval_metrics(self, model) -> dict:
        acc, a, examples = self.accelerator, self.args, self.eval_examples
        with models.gathered(model, acc) as unwrapped:
            scores = self._score(unwrapped, examples, self.recipe.eval.batch_size)  # (N, 2)
        ref = torch.tensor([[e["ref_logps"], e["ref_kl_logps"]] for e in examples], dtype=scores.dtype)
        labels = torch.tensor([e["label"] for e in examples])
        z = kto_reference_point(scores[:, 1], ref[:, 1])
        losses, rewards = kto_loss(scores[:, 0], ref[:, 0], labels, z, beta=a.beta,
                                   desirable_weight=a.desirable_weight, undesirable_weight=a.undesirable_weight)
        metrics = {"eval/loss": losses.mean().item(), "eval/kl": float(z)}
        sides: dict[int, dict[bool, float]] = {}
        for e, r in zip(examples, rewards.tolist()):
            if e["pair"] is not None:
                sides.setdefault(e["pair"], {})[e["label"]] = r
        margins = [s[True] - s[False] for s in sides.values() if len(s) == 2]
        if margins:
            metrics["eval/pair_accuracy"] = sum(m > 0 for m in margins) / len(margins)
            metrics["eval/rewards/margins"] = sum(margins) / len(margins)
        return metrics

    def evaluate(self, model) -> dict:
        metrics = self._eval_metrics(model) if self.eval_examples else {}
        metrics.update(evaluate.task_metrics(model, self.tokenizer, self.eval_prompts, self.eval_references,
                                             self.recipe.eval, self.accelerator))
        return metrics

    def save(self, out_dir, accelerator) -> None:
        models.save_pretrained(self.model, self.tokenizer, out_dir, accelerator)
