"""Supervised fine-tuning: next-token NLL on the completion tokens only.

The loss of a step is the sum of token NLLs over every trained token of the global
batch divided by their count (the engine normalises), so long and short samples
weigh per token, the same whether the batch is split by accumulation or processes.
Prompt tokens are never trained on (see `align.data` for how the mask is built);
`sft.completion_only_loss: false` trains on prompts too, as plain language modelling.
"""

from __future__ import annotations

from align import evaluate, models
from align.data import (
    IGNORE,
    collate,
    load_eval_rows,
    load_rows,
    pack,
    tokenize_sft,
    without_causal_padding_mask,
)
from align.device import micro_batch_tokens
from align.logprobs import forward_hidden
from align.recipe import Recipe
from align.stage_settings import SFTArgs  # noqa: F401  (re-exported)
from align.stages.base import OfflineBatches, tensors_only


class SFTStage:
    def __init__(self, recipe: Recipe, accelerator):
        self.recipe, self.accelerator = recipe, accelerator
        data = recipe.data
        self.tokenizer = models.load_tokenizer(recipe.model)
        trainset = self._tokenize(data.train, "data.train")
        self._report(trainset, "data.train")
        examples = trainset.examples
        if data.packing:
            examples = pack(examples, data.max_length)
            filled = sum(len(e["input_ids"]) for e in examples) / (len(examples) * data.max_length)
            accelerator.print(f"data.train: {len(trainset)} samples packed into {len(examples)} rows of "
                              f"data.max_length={data.max_length} tokens, {filled:.0%} full (data.packing)")
        # packed rows are collated at full width: micro-batches of one fixed shape let the allocator
        # reuse the same blocks every step (measured on one pass over bench_sft.py's HH rows, 1,024-token
        # forwards: peak RSS added 367 MB against 537 MB at each micro-batch's own width)
        fixed_width = data.max_length if data.packing and not data.padding_free else None
        self.pad_id = self.tokenizer.pad_token_id
        lengths = [len(e["input_ids"]) for e in examples]
        self.batches = OfflineBatches(
            examples, lengths, batch_size=recipe.train.batch_size,
            grad_accum=recipe.train.grad_accum, process=accelerator.process_index,
            processes=accelerator.num_processes, seed=recipe.seed, group_by_length=data.group_by_length,
            # packed rows stay (B, max_length) rows: one concatenated row would make CPU sdpa build a dense
            # (sum T)^2 block mask (2.5x slower, 1.7x the memory at 8 x 512); padding_free asks for that row
            collate_fn=lambda exs: collate(exs, self.pad_id, padding_free=data.padding_free, width=fixed_width),
            weight_fn=lambda e: sum(1 for label in e["labels"][1:] if label != IGNORE),
            max_tokens=micro_batch_tokens(recipe),
            widths=[fixed_width] * len(examples) if fixed_width else lengths,
        )
        self.eval_examples, self.eval_prompts, self.eval_references = [], [], []
        rows = load_eval_rows(data)
        if rows is not None:
            self.eval_examples = self._tokenize_rows(rows, "data.eval").examples
            if "prompt" in rows.rows[0] and "completion" in rows.rows[0]:
                self.eval_prompts = [r["prompt"] for r in rows.rows]
                self.eval_references = [r["completion"] for r in rows.rows]
        self.model = models.load_model(recipe.model, self.tokenizer, seed=recipe.seed)
        models.check_positions(self.model, max(len(e["input_ids"]) for e in trainset.examples + self.eval_examples),
                               f"data.max_length={data.max_length}")

    # -- data --------------------------------------------------------------------------
    def _tokenize(self, spec, key):
        return self._tokenize_rows(load_rows(spec, key=key), key)

    def _tokenize_rows(self, rows, key):
        data = self.recipe.data
        tokenized = tokenize_sft(rows, self.tokenizer, max_length=data.max_length, truncation=data.truncation,
                                 key=key, prompt_truncation=data.prompt_truncation)
        if not self.recipe.stage_args.completion_only_loss:
            for e in tokenized.examples:
                e["labels"] = [IGNORE] + e["input_ids"][1:]
        return tokenized

    def _report(self, tokenized, key):
        if tokenized.dropped or tokenized.truncated:
            self.accelerator.print(
                f"{key}: {tokenized.dropped} samples dropped (no trainable token within data.max_length="
                f"{self.recipe.data.max_length}), {tokenized.truncated} truncated; {len(tokenized)} kept")

    # -- engine interface ---------------------------------------------------------------
    def micro_batches(self, step: int) -> list[dict]:
        return self.batches(step)

    def loss(self, model, batch):
        batch = without_causal_padding_mask(tensors_only(batch))
        labels = batch.pop("labels")
        # use_cache=False: with a KV cache transformers would ignore packed position_ids
        hidden, head = forward_hidden(model, **batch, use_cache=False)  # (B, T, H): no logits (align.logprobs)
        loss_sum = -head.token_logprobs(hidden[:, :-1], labels[:, 1:]).sum()
        return loss_sum, {}

    def after_step(self, step: int) -> None:
        pass

    def evaluate(self, model) -> dict:
        ev = self.recipe.eval
        metrics = {}
        if self.eval_examples:
            metrics["eval/loss"] = evaluate.eval_loss(model, self.eval_examples, self.pad_id,
                                                      batch_size=ev.batch_size, accelerator=self.accelerator)
        metrics.update(evaluate.task_metrics(model, self.tokenizer, self.eval_prompts, self.eval_references, ev,
                                             self.accelerator))
        return metrics

    def save(self, out_dir, accelerator) -> None:
        models.save_pretrained(self.model, self.tokenizer, out_dir, accelerator)

