"""Offline preference optimisation: DPO (sigmoid, IPO, hinge, robust), SimPO and ORPO.

One stage class serves `stage: dpo`, `stage: simpo` and `stage: orpo`; the objective
comes from `OBJECTIVES` (a table, not a branch chain) and the formulas from
`align.losses` (`dpo_loss`, `simpo_loss`, `orpo_loss`).

Per micro-batch, chosen and rejected go through ONE forward. By default
(`data.shared_prompt: true`) each pair is ONE row [prompt, chosen, rejected]
(`collate_shared_pairs`; prefix sharing, Wang et al. 2024, "Accelerating Direct
Preference Optimization with Prefix Sharing"): the prompt is computed once, and a 4D
attention mask keeps the rejected tokens from seeing the chosen ones, so every
log-prob equals that of the separate rows. It falls back to the concatenated 2B rows
(`collate_pairs`: [chosen_1..chosen_B, rejected_1..rejected_B]) when the model's
attention implementation cannot take a custom 4D mask (flash_attention_2/3,
flex_attention: see `preference_data.supports_shared_prompt`), or with
`data.shared_prompt: false`. The loss of a
step is the sum of per-pair losses divided by the global number of pairs (the engine
normalises: `_weight` = pairs), so the update does not depend on accumulation or the
number of processes.

The reference model (DPO only) costs no memory during training: its summed
completion log-probs are computed ONCE before the first step and stored with each
pair. Without `dpo.ref_model` the reference is the starting policy itself (for LoRA,
its initial adapter, which equals the base model for a new adapter), so nothing else
is loaded; with `dpo.ref_model` that model is loaded, scored and freed. For a LoRA
run `dpo.precompute_ref_logps: false` instead scores the reference at every step from
the same weights with the adapter disabled (`model.disable_adapter()`). SimPO and
ORPO are reference-free and load none.

The NLL term: `rpo_alpha` > 0 (DPO, SimPO) adds rpo_alpha * NLL of the chosen answer,
the token mean over its completion tokens per pair (RPO, Pang et al. 2024; TRL's
`loss_type=["sigmoid", "sft"]` with `loss_weights=[1, rpo_alpha]` takes one token mean
over the batch instead: identical when completions have equal length). ORPO's NLL is
the same per-pair token mean over the chosen completion, or over prompt + completion
with `orpo.nll_on_prompt: true` (TRL's ORPOTrainer, which again takes a batch token mean).

Metrics (TRL's names): `rewards/chosen`, `rewards/rejected`, `rewards/accuracies`,
`rewards/margins`, `logps/chosen`, `logps/rejected` (summed for DPO, length-averaged for
SimPO/ORPO, as TRL logs them), `nll_loss`; evaluation: `eval/loss`,
`eval/pair_accuracy` (implicit reward of chosen > rejected on held-out pairs), `eval/pair_ties` (the
share of held-out pairs whose implicit rewards tie: all of them before DPO's first step),
`eval/rewards/margins`, and `eval/task_accuracy` (greedy exact match of the held-out
prompts against their chosen answer, when the eval rows have an explicit prompt).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, replace
from typing import Callable

import torch

from align import evaluate, models
from align.data import load_eval_rows, load_rows, split_by_token_budget, without_causal_padding_mask
from align.device import micro_batch_tokens
from align.errors import AlignError
from align.logprobs import forward_hidden
from align.losses import dpo_loss, orpo_loss, simpo_loss
from align.preference_data import (
    CHOSEN,
    PROMPT,
    REJECTED,
    collate_pairs,
    collate_shared_pairs,
    is_shared_batch,
    pair_length,
    pair_truncation,
    shared_pair_width,
    supports_shared_prompt,
    tokenize_preferences,
)
from align.recipe import Recipe
from align.stage_settings import DPOArgs, ORPOArgs, SimPOArgs  # noqa: F401  (re-exported)
from align.stages.base import OfflineBatches, tensors_only


# ---------------------------------------------------------------------------
# settings (one section per stage name)
# ---------------------------------------------------------------------------
# ---------------------------------------------------------------------------
# objectives: per-pair (losses, chosen_rewards, rejected_rewards) from the pair's log-probs
# ---------------------------------------------------------------------------
def _dpo(args: DPOArgs, lp: dict):
    return dpo_loss(lp["chosen"], lp["rejected"], lp["ref_chosen"], lp["ref_rejected"], beta=args.beta,
                    loss_type=args.loss_type, label_smoothing=args.label_smoothing,
                    chosen_lengths=lp["chosen_n"], rejected_lengths=lp["rejected_n"])


def _simpo(args: SimPOArgs, lp: dict):
    return simpo_loss(lp["chosen"] / lp["chosen_n"], lp["rejected"] / lp["rejected_n"], beta=args.beta,
                      gamma=args.gamma, label_smoothing=args.label_smoothing)


def _orpo(args: ORPOArgs, lp: dict):
    return orpo_loss(lp["chosen"] / lp["chosen_n"], lp["rejected"] / lp["rejected_n"], lp["chosen_nll"],
                     lam=args.lam)


@dataclass(frozen=True)
class Objective:
    pair_loss: Callable[[object, dict], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    needs_reference: bool
    averaged_logps: bool
    """Whether logps/* metrics are length-averaged (SimPO, ORPO) or summed (DPO)."""


OBJECTIVES = {
    "dpo": Objective(_dpo, needs_reference=True, averaged_logps=False),
    "simpo": Objective(_simpo, needs_reference=False, averaged_logps=True),
    "orpo": Objective(_orpo, needs_reference=False, averaged_logps=True),
}


# ---------------------------------------------------------------------------
# the concatenated forward
# ---------------------------------------------------------------------------
def pair_logps(model, batch: dict, *, nll_on_prompt: bool = False) -> dict[str, torch.Tensor]:
    """One forward of a pair batch -> per-pair (B,) log-prob statistics.

    chosen / rejected: summed completion log-probs; chosen_n / rejected_n: completion
    token counts; chosen_nll: token-mean NLL of the chosen completion (or of prompt +
    completion with `nll_on_prompt`, every token but the first).

    The batch is either a shared-prompt batch (`collate_shared_pairs`: B rows [prompt,
    chosen, rejected]) or the (2B, T) concatenated batch of `collate_pairs`; both give the
    same statistics.
    """
    if is_shared_batch(batch):
        return _shared_pair_logps(model, batch, nll_on_prompt=nll_on_prompt)
    # right-padded rows need no mask under causal attention (see data.without_causal_padding_mask)
    inputs = without_causal_padding_mask({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    hidden, head = forward_hidden(model, **inputs, use_cache=False)  # (2B, T, H): no logits (align.logprobs)
    targets = batch["labels"][:, 1:]  # (2B, T-1) completion tokens, -100 elsewhere
    completion = targets != -100
    if nll_on_prompt:
        scored = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    else:
        scored = targets
    token_lp = head.token_logprobs(hidden[:, :-1], scored)  # (2B, T-1)
    sums = (token_lp * completion).sum(-1)
    counts = completion.sum(-1).to(sums.dtype)
    B = sums.shape[0] // 2
    chosen_tok = token_lp[:B]
    nll_mask = (scored[:B] != -100)
    out = {"chosen": sums[:B], "rejected": sums[B:], "chosen_n": counts[:B], "rejected_n": counts[B:],
           "chosen_nll": -chosen_tok.sum(-1) / nll_mask.sum(-1).clamp(min=1)}
    if "ref_chosen_logps" in batch:
        out["ref_chosen"], out["ref_rejected"] = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    return out


def _shared_pair_logps(model, batch: dict, *, nll_on_prompt: bool) -> dict[str, torch.Tensor]:
    """`pair_logps` of a shared-prompt batch (Wang et al. 2024, prefix sharing).

    Position t predicts token t+1 as usual for the prompt and chosen tokens and for every
    rejected token but the first; the first rejected token follows the prompt, so it is
    predicted from the last prompt position (`prompt_last`) — an explicit gather. With an
    empty prompt there is no such position and the first rejected token is not scored, as
    the first chosen token is not: what a row of its own gives (`rejected_n` counts it so).
    """
    hidden, head = forward_hidden(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  position_ids=batch["position_ids"], use_cache=False)  # (B, T, H)
    ids, seg = batch["input_ids"], batch["segments"]  # (B, T)
    target_seg = seg[:, 1:]  # (B, T-1): segment of the token position t predicts
    chosen_m = target_seg == CHOSEN
    rejected_m = (target_seg == REJECTED) & (seg[:, :-1] == REJECTED)  # the first rejected token is not t+1's
    nll_m = chosen_m | (target_seg == PROMPT) if nll_on_prompt else chosen_m
    scored = ids[:, 1:].masked_fill(~(nll_m | rejected_m), -100)
    token_lp = head.token_logprobs(hidden[:, :-1], scored)  # (B, T-1)
    rows = torch.arange(ids.shape[0], device=ids.device)
    first = ids[rows, batch["chosen_last"] + 1]  # (B,) the first rejected token
    # an empty prompt (no BOS, no shared beginning) leaves nothing to predict the first answer token from,
    # as in a row of its own: it is not scored (the chosen side's first token is not either)
    has_prompt = batch["prompt_last"] >= 0  # (B,)
    first_lp = head.token_logprobs(hidden[rows, batch["prompt_last"].clamp(min=0)], first)  # (B,)
    first_lp = torch.where(has_prompt, first_lp, torch.zeros_like(first_lp))  # (B,)
    chosen = (token_lp * chosen_m).sum(-1)
    out = {"chosen": chosen, "rejected": (token_lp * rejected_m).sum(-1) + first_lp,
           "chosen_n": chosen_m.sum(-1).to(chosen.dtype),
           "rejected_n": (rejected_m.sum(-1) + has_prompt).to(chosen.dtype),
           "chosen_nll": -(token_lp * nll_m).sum(-1) / nll_m.sum(-1).clamp(min=1)}
    if "ref_chosen_logps" in batch:
        out["ref_chosen"], out["ref_rejected"] = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    return out


@torch.no_grad()
def summed_pair_logps(model, examples: list[dict], pad_id: int, *, batch_size: int, accelerator=None,
                      shared_prompt: bool = False, max_tokens: int | None = None) -> torch.Tensor:
    """Summed completion log-probs of every pair under `model`: (N, 2) [chosen, rejected].

    Pairs are scored in length-sorted batches of `batch_size`, each cut again into forwards
    of at most `max_tokens` padded tokens when set (train.micro_batch_tokens: the reference
    pass then peaks no higher than a training step; bench/profile_memory.py), as shared-prompt
    rows with `shared_prompt` (`collate_shared_pairs`), else as 2B rows; under several
    processes each scores every n-th pair and the results are summed over processes (exact:
    zeros elsewhere).
    """
    n = len(examples)
    out = torch.zeros(n, 2, dtype=torch.float64)
    processes = 1 if accelerator is None else accelerator.num_processes
    collate, width = (collate_shared_pairs, shared_pair_width) if shared_prompt else (collate_pairs, pair_length)
    mine = sorted(evaluate.shard(n, accelerator), key=lambda i: width(examples[i]))
    chunks = [mine[start: start + batch_size] for start in range(0, len(mine), batch_size)]
    if max_tokens is not None:
        widths = {i: width(examples[i]) for i in mine}
        chunks = [c for chunk in chunks for c in split_by_token_budget(chunk, widths, max_tokens,
                                                                       rows_per_example=1 if shared_prompt else 2)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for chunk in chunks:
        batch = collate([examples[i] for i in chunk], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with accelerator.autocast() if accelerator is not None else torch.autocast("cpu", enabled=False):
            lp = pair_logps(model, batch)
        out[chunk, 0] = lp["chosen"].double().cpu()
        out[chunk, 1] = lp["rejected"].double().cpu()
    model.train(was_training)
    if processes > 1:
        out = accelerator.reduce(out.to(accelerator.device), reduction="sum").cpu()
    return out


# ---------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------
class PreferenceStage:
    def __init__(self, recipe: Recipe, accelerator):
        self.recipe, self.accelerator = recipe, accelerator
        self.args = recipe.stage_args
        self.objective = OBJECTIVES[recipe.stage]
        self.nll_on_prompt = getattr(self.args, "nll_on_prompt", False)
        self.rpo_alpha = getattr(self.args, "rpo_alpha", 0.0)
        data = recipe.data
        self.tokenizer = models.load_tokenizer(recipe.model)
        self.pad_id = self.tokenizer.pad_token_id
        train_set = self._tokenize(load_rows(data.train, key="data.train"), "data.train")
        self.examples = train_set.examples
        self.eval_examples, self.eval_prompts, self.eval_references = [], [], []
        rows = load_eval_rows(data)
        if rows is not None:
            self.eval_examples = self._tokenize(rows, "data.eval").examples
            if all("prompt" in r and "chosen" in r for r in rows.rows):
                self.eval_prompts = [r["prompt"] for r in rows.rows]
                self.eval_references = [r["chosen"] for r in rows.rows]
        self.model = models.load_model(recipe.model, self.tokenizer, seed=recipe.seed)
        models.check_positions(self.model, max(map(pair_length, self.examples + self.eval_examples)),
                               f"data.max_length={data.max_length}")
        self.shared_prompt = data.shared_prompt and supports_shared_prompt(self.model)
        if data.shared_prompt and not self.shared_prompt:
            accelerator.print(f"data.shared_prompt: attention {self.model.config._attn_implementation!r} cannot take "
                              f"a custom 4D mask; pairs go as 2 rows each (chosen, rejected)")
        self.ref_every_step = False
        if self.objective.needs_reference:
            self._prepare_reference()
        # widths: padded tokens of a pair in its layout (one row P+C+R, or two rows of P+max(C,R))
        width = shared_pair_width if self.shared_prompt else pair_length
        self.batches = OfflineBatches(
            self.examples, [width(e) for e in self.examples], batch_size=recipe.train.batch_size,
            grad_accum=recipe.train.grad_accum, process=accelerator.process_index,
            processes=accelerator.num_processes, seed=recipe.seed, group_by_length=data.group_by_length,
            collate_fn=self._collate, weight_fn=lambda e: 1, max_tokens=micro_batch_tokens(recipe),
            rows_per_example=1 if self.shared_prompt else 2)

    # -- data and reference ------------------------------------------------------------
    def _tokenize(self, rows, key):
        tokenized = tokenize_preferences(rows, self.tokenizer, max_length=self.recipe.data.max_length, key=key,
                                         prompt_truncation=pair_truncation(self.recipe))
        if tokenized.dropped_identical or tokenized.dropped_empty or tokenized.truncated or tokenized.empty_prompts:
            self.accelerator.print(f"{key}: {tokenized.summary()}")
        return tokenized

    def _collate(self, examples: list[dict]) -> dict:
        batch = (collate_shared_pairs if self.shared_prompt else collate_pairs)(examples, self.pad_id)
        if "ref_chosen_logps" in examples[0]:
            batch["ref_chosen_logps"] = torch.tensor([e["ref_chosen_logps"] for e in examples], dtype=torch.float32)
            batch["ref_rejected_logps"] = torch.tensor([e["ref_rejected_logps"] for e in examples],
                                                       dtype=torch.float32)
        return batch

    def _prepare_reference(self):
        args = self.args
        if not args.precompute_ref_logps:
            if not models.is_peft(self.model) or args.ref_model is not None:
                raise AlignError("dpo.precompute_ref_logps: false needs a LoRA run (model.lora.enabled) and no "
                                 "dpo.ref_model: the reference is then the same weights with the adapter disabled")
            if models._adapter_base(self.recipe.model.name_or_path):
                raise AlignError("dpo.precompute_ref_logps: false with an existing adapter folder would use the base "
                                 "model as reference; precompute instead (the default)")
            self.ref_every_step = True
            return
        if args.ref_model is None:
            reference = self.model  # the starting policy: nothing else is loaded
        else:
            ref_cfg = replace(self.recipe.model, name_or_path=args.ref_model, from_recipe=None,
                              lora=replace(self.recipe.model.lora, enabled=False))
            ref_tokenizer = models.load_tokenizer(ref_cfg)
            if ref_tokenizer.get_vocab() != self.tokenizer.get_vocab():
                raise AlignError(f"dpo.ref_model: {args.ref_model!r} has a different tokenizer from model.name_or_path "
                                 f"{self.recipe.model.name_or_path!r} ({len(ref_tokenizer)} vs {len(self.tokenizer)} "
                                 f"tokens); the reference must score the same token ids")
            reference = models.load_model(ref_cfg, ref_tokenizer, seed=self.recipe.seed, trainable=False)
        if not models.is_zero3_sharded(reference):  # (a ZeRO-3 sharded policy already sits on its device)
            reference.to(self.accelerator.device)
        with models.gathered(reference) as whole:  # ZeRO-3: the starting policy gathered for the scoring
            for examples in (self.examples, self.eval_examples):
                if not examples:
                    continue
                scores = summed_pair_logps(whole, examples, self.pad_id,
                                           batch_size=args.ref_batch_size or self.recipe.train.batch_size,
                                           accelerator=self.accelerator,
                                           shared_prompt=self.shared_prompt and supports_shared_prompt(whole),
                                           max_tokens=micro_batch_tokens(self.recipe))
                for e, (c, r) in zip(examples, scores.tolist()):
                    e["ref_chosen_logps"], e["ref_rejected_logps"] = c, r
        if reference is not self.model:
            del reference  # freed before training starts
            gc.collect()

    # -- the loss ----------------------------------------------------------------------
    def _pair_losses(self, model, batch: dict):
        lp = pair_logps(model, batch, nll_on_prompt=self.nll_on_prompt)
        if self.ref_every_step:
            unwrapped = self.accelerator.unwrap_model(model)
            with torch.no_grad(), unwrapped.disable_adapter():
                ref = pair_logps(unwrapped, batch)
            lp["ref_chosen"], lp["ref_rejected"] = ref["chosen"], ref["rejected"]
        losses, chosen_rewards, rejected_rewards = self.objective.pair_loss(self.args, lp)
        if self.rpo_alpha:
            losses = losses + self.rpo_alpha * lp["chosen_nll"]
        return losses, chosen_rewards, rejected_rewards, lp

    def micro_batches(self, step: int) -> list[dict]:
        return self.batches(step)

    def loss(self, model, batch):
        batch = tensors_only(batch)
        losses, chosen_rewards, rejected_rewards, lp = self._pair_losses(model, batch)
        n = losses.shape[0]
        chosen_lp, rejected_lp = lp["chosen"].detach(), lp["rejected"].detach()
        if self.objective.averaged_logps:
            chosen_lp, rejected_lp = chosen_lp / lp["chosen_n"], rejected_lp / lp["rejected_n"]
        metrics = {
            "rewards/chosen": (chosen_rewards.sum().item(), n),
            "rewards/rejected": (rejected_rewards.sum().item(), n),
            "rewards/accuracies": ((chosen_rewards > rejected_rewards).sum().item(), n),
            "rewards/margins": ((chosen_rewards - rejected_rewards).sum().item(), n),
            "logps/chosen": (chosen_lp.sum().item(), n),
            "logps/rejected": (rejected_lp.sum().item(), n),
        }
        if self.rpo_alpha or self.recipe.stage == "orpo":
            metrics["nll_loss"] = (lp["chosen_nll"].detach().sum().item(), n)
        return losses.sum(), metrics

    def after_step(self, step: int) -> None:
        pass

    # -- evaluation --------------------------------------------------------------------
    @torch.no_grad()
    def _pair_metrics(self, model) -> dict:
        """eval/loss, eval/pair_accuracy and eval/rewards/margins over the held-out pairs."""
        acc = self.accelerator
        with models.gathered(model, acc) as unwrapped:  # ZeRO-3: gathered once, shards may differ by one pair
            return self._pair_metrics_of(unwrapped)

    def _pair_metrics_of(self, unwrapped) -> dict:
        acc = self.accelerator
        was_training = unwrapped.training
        unwrapped.eval()
        device = next(unwrapped.parameters()).device
        width = shared_pair_width if self.shared_prompt else pair_length
        mine = sorted(evaluate.shard(len(self.eval_examples), acc), key=lambda i: width(self.eval_examples[i]))
        bs = self.recipe.eval.batch_size
        loss, correct, ties, margin = 0.0, 0.0, 0.0, 0.0
        for start in range(0, len(mine), bs):
            batch = self._collate([self.eval_examples[i] for i in mine[start: start + bs]])
            batch = {k: v.to(device) for k, v in batch.items()}
            with acc.autocast():
                losses, chosen_rewards, rejected_rewards, _ = self._pair_losses(unwrapped, batch)
            loss += losses.sum().item()
            correct += (chosen_rewards > rejected_rewards).sum().item()
            ties += (chosen_rewards == rejected_rewards).sum().item()
            margin += (chosen_rewards - rejected_rewards).sum().item()
        unwrapped.train(was_training)
        loss, correct, ties, margin, count = evaluate._reduce_sum(acc, [loss, correct, ties, margin, float(len(mine))])
        count = max(count, 1.0)
        # before the first step of DPO the policy is the reference: every implicit reward is 0, every pair a tie
        # (pair_accuracy counts a tie as wrong: 0 then means "no preference yet", not "all wrong")
        return {"eval/loss": loss / count, "eval/pair_accuracy": correct / count, "eval/pair_ties": ties / count,
                "eval/rewards/margins": margin / count}

    def evaluate(self, model) -> dict:
        ev = self.recipe.eval
        metrics = self._pair_metrics(model) if self.eval_examples else {}
        metrics.update(evaluate.task_metrics(model, self.tokenizer, self.eval_prompts, self.eval_references, ev,
                                             self.accelerator))
        return metrics

    def save(self, out_dir, accelerator) -> None:
        models.save_pretrained(self.model, self.tokenizer, out_dir, accelerator)
