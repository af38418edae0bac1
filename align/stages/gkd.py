"""GKD: generalised knowledge distillation, on-policy (Agarwal et al. 2024, "On-Policy Distillation of
Language Models: Learning from Self-Generated Mistakes"), as TRL 1.16's `GKDTrainer` computes it.

Each optimizer step draws one coin (keyed by the seed and the step, so every process and a resumed run
draw the same): with probability `gkd.lmbda` the STUDENT samples the completions of the step's prompts
(`align.rollout`, at `gkd.temperature`); otherwise the dataset's completions are used (or, with
`gkd.seq_kd`, completions the teacher samples). The frozen teacher (`gkd.teacher_model`, same
tokenizer) and the student then score every completion token over the FULL vocabulary, and the loss
is the generalised Jensen-Shannon divergence per token (`align.losses.generalized_jsd_loss`:
`gkd.beta` 0 forward KL .. 1 reverse KL, at temperature 1 as TRL's), summed over completion tokens
and divided by the step's global number of them (TRL's batchmean with `num_items_in_batch`).
GKD needs the whole distributions, so both models' logits are held for a micro-batch: the logits
of a real vocabulary (128k+) are then the largest tensor of a step; lower `train.batch_size`.

Data: rows with `prompt` and `completion` (the dataset's answer; for `eval/task_accuracy` the
held-out `completion` is the answer key of `gkd.accuracy`, exact match by default). One step =
`train.batch_size x train.grad_accum x processes` prompts; sampled completions are keyed by their
row's index in the global batch (`PromptSource.rollout_seed`), so 1 and 2 processes train alike.

Metrics: `train/jsd` (token mean of the divergence), `train/on_policy` (share of steps that
sampled from the student), `train/completion_length`; evaluation `eval/task_accuracy` and `eval/jsd`
(the divergence on the held-out dataset completions).
"""

from __future__ import annotations

import torch

from align import models, rewards
from align.data import IGNORE, collate, encode_prompt_completion, without_causal_padding_mask
from align.errors import AlignError
from align.losses import generalized_jsd_loss
from align.recipe import ModelConfig, Recipe
from align.rollout import rollout
from align.stage_settings import GKDArgs  # noqa: F401  (re-exported)
from align.stages.base import tensors_only
from align.stages.online import PromptSource, greedy_eval, sampling_config


def load_teacher(recipe: Recipe, tokenizer, device):
    """The frozen teacher, refused when its tokenizer is not the student's (the distributions are compared id
    by id)."""
    a = recipe.stage_args
    cfg = ModelConfig(name_or_path=a.teacher_model, dtype=recipe.model.dtype)  # (made by the planning layer)
    if models.load_tokenizer(cfg).get_vocab() != tokenizer.get_vocab():
        raise AlignError(f"gkd.teacher_model: {a.teacher_model!r} has a different tokenizer from model.name_or_path "
                         f"{recipe.model.name_or_path!r}; the teacher must score the same token ids")
    return models.load_model(cfg, tokenizer, trainable=False).to(device)


def sequences(prompts: list[list[int]], completions: list[list[int]], max_length: int) -> list[dict]:
    """[prompt, completion] rows for `collate`, the completion's tokens labelled, cut to `max_length`."""
    return [{"input_ids": (p + c)[:max_length], "labels": ([IGNORE] * len(p) + c)[:max_length]}
            for p, c in zip(prompts, completions)]


def on_policy_step(seed: int, step: int, lmbda: float) -> bool:
    """Step `step`'s coin, true with probability lmbda: keyed by (seed, step), so the same on every process and
    on a resumed run."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return bool(torch.rand(1, generator=g).item() < lmbda)


def token_jsd(student, teacher, batch: dict, beta: float) -> torch.Tensor:
    """Per-token generalised JSD (B, T-1) of a collated right-padded batch (0 where not a completion token)."""
    inputs = without_causal_padding_mask({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    logits = student(**inputs, use_cache=False).logits[:, :-1]
    with torch.no_grad():
        teacher_logits = teacher(**inputs, use_cache=False).logits[:, :-1]
    return generalized_jsd_loss(logits, teacher_logits, batch["labels"][:, 1:], beta=beta, reduction="none")


class GKDStage:
    def __init__(self, recipe: Recipe, accelerator):
        self.recipe, self.accelerator = recipe, accelerator
        self.args: GKDArgs = recipe.stage_args
        a, t = self.args, recipe.train
        self.prompts = PromptSource(recipe, accelerator, t.batch_size * t.grad_accum)
        self.tokenizer = self.prompts.tokenizer
        self.pad_id = self.tokenizer.pad_token_id
        self.completions = self._completions(self.prompts.rows, "data.train")
        self.eval_completions = self._completions(self.prompts.eval_rows, "data.eval")
        self.sampling = sampling_config(a)
        self.accuracy_fn = rewards.resolve(a.accuracy)
        self.model = models.load_model(recipe.model, self.tokenizer, seed=recipe.seed)
        self.prompts.check_positions(self.model, a.max_new_tokens)
        self.stop_ids = models.stop_token_ids(self.model, self.tokenizer)
        self.teacher = load_teacher(recipe, self.tokenizer, accelerator.device)
        self.teacher.eval()

    def _completions(self, rows: list[dict], key: str) -> list[list[int]]:
        out = []
        for i, row in enumerate(rows):
            if row.get("completion") in (None, ""):
                raise AlignError(f"{key}: row {i + 1} has no 'completion' (gkd trains on prompt/completion rows; "
                                 f"columns: {sorted(row)})")
            out.append(encode_prompt_completion(self.tokenizer, row["prompt"], row["completion"], f"{key}: row {i + 1}")[1])
        return out

    def on_policy(self, step: int) -> bool:
        return on_policy_step(self.recipe.seed, step, self.args.lmbda)

    def _sampled(self, model, prompt_ids: list[list[int]], step: int) -> list[list[int]]:
        out = rollout(model, prompt_ids, sampling=self.sampling, eos_id=self.stop_ids, pad_id=self.pad_id,
                      accelerator=self.accelerator, policy_logprobs=False,
                      **self.prompts.rollout_seed(step, len(prompt_ids)))
        return [ids[: int(n)].tolist() for ids, n in zip(out.completion_ids, out.lengths)]

    # -- engine interface ---------------------------------------------------------------
    def micro_batches(self, step: int) -> list[dict]:
        a, size = self.args, self.recipe.train.batch_size
        indices = self.prompts.step(step)
        prompt_ids = [self.prompts.prompt_ids[i] for i in indices]
        on_policy = self.on_policy(step)
        if on_policy or a.seq_kd:
            with self.accelerator.autocast():
                completions = self._sampled(self.model if on_policy else self.teacher, prompt_ids, step)
        else:
            completions = [self.completions[i] for i in indices]
        rows = sequences(prompt_ids, completions, self.recipe.data.max_length + a.max_new_tokens)
        batches = []
        for s in range(0, len(rows), size):
            batch = collate(rows[s: s + size], self.pad_id)
            batch["_weight"] = float((batch["labels"][:, 1:] != IGNORE).sum())
            batch["_tokens"] = int(batch["attention_mask"].sum())
            batches.append(batch)
        n = len(completions)
        batches[0]["_metrics"] = {"train/on_policy": (float(on_policy) * n, n),  # share of the step's prompts
                                  "train/completion_length": (float(sum(map(len, completions))), n)}
        return batches

    def loss(self, model, batch):
        metrics = dict(batch.get("_metrics", {}))
        batch = tensors_only(batch)
        per_token = token_jsd(model, self.teacher, batch, self.args.beta)
        total = per_token.sum()
        metrics["train/jsd"] = (total.item(), float((batch["labels"][:, 1:] != IGNORE).sum()))
        return total, metrics

    def after_step(self, step: int) -> None:
        pass

    @torch.no_grad()
    def _eval_jsd(self, model) -> float:
        from align import evaluate

        acc, bs = self.accelerator, self.recipe.eval.batch_size
        mine = list(evaluate.shard(len(self.eval_completions), acc))
        rows = sequences([self.prompts.eval_prompt_ids[i] for i in mine], [self.eval_completions[i] for i in mine],
                         self.recipe.data.max_length + self.args.max_new_tokens)
        unwrapped = acc.unwrap_model(model)
        was_training = unwrapped.training
        unwrapped.eval()
        total, tokens = 0.0, 0.0
        device = next(unwrapped.parameters()).device
        for s in range(0, len(rows), bs):
            batch = {k: v.to(device) for k, v in collate(rows[s: s + bs], self.pad_id).items()}
            with acc.autocast():
                total += token_jsd(unwrapped, self.teacher, batch, self.args.beta).sum().item()
            tokens += float((batch["labels"][:, 1:] != IGNORE).sum())
        unwrapped.train(was_training)
        total, tokens = evaluate._reduce_sum(acc, [total, tokens])
        return total / max(tokens, 1.0)

    def evaluate(self, model) -> dict:
        metrics = greedy_eval(model, self.prompts, self.accuracy_fn)
        if self.eval_completions:
            metrics["eval/jsd"] = self._eval_jsd(model)
        return metrics

    def save(self, out_dir, accelerator) -> None:
        models.save_pretrained(self.model, self.tokenizer, out_dir, accelerator)
