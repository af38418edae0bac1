"""Pieces every offline stage (SFT, reward, preference) shares: batching a tokenized set."""

from __future__ import annotations

from align.data import GlobalBatches, split_by_token_budget, split_global_batch


class OfflineBatches:
    """Step -> this process's micro-batches of the step's global batch.

    `collate_fn(examples) -> dict` builds one micro-batch; `weight_fn(example)` is the
    example's share of the loss normaliser (its trained tokens, or 1 per pair); the
    engine reads both back as batch["_weight"] and batch["_tokens"].

    `max_tokens` (train.micro_batch_tokens) re-cuts this process's share of the step into
    micro-batches of at most that many padded tokens (`widths[i]` is example i's padded
    width, `rows_per_example` its rows: 2 for a pair). The loss is normalised by the
    global batch, so this changes peak memory and padding, never the result.
    """

    def __init__(self, examples: list[dict], lengths: list[int], *, batch_size: int, grad_accum: int,
                 process: int, processes: int, seed: int, group_by_length: bool, collate_fn, weight_fn,
                 max_tokens: int | None = None, widths: list[int] | None = None, rows_per_example: int = 1):
        self.examples, self.lengths = examples, lengths
        self.micro, self.process, self.processes = grad_accum, process, processes
        self.max_tokens, self.rows_per_example = max_tokens, rows_per_example
        self.widths = widths if widths is not None else lengths
        self.global_batches = GlobalBatches(lengths, batch_size * grad_accum * processes, seed=seed,
                                            group_by_length=group_by_length)
        self.collate_fn, self.weight_fn = collate_fn, weight_fn

    def __call__(self, step: int) -> list[dict]:
        indices = self.global_batches[step]
        chunks = split_global_batch(indices, self.lengths, micro_batches=self.micro, process=self.process,
                                    processes=self.processes)
        if self.max_tokens is not None:
            mine = [i for chunk in chunks for i in chunk]
            chunks = split_by_token_budget(mine, self.widths, self.max_tokens, rows_per_example=self.rows_per_example)
        out = []
        for chunk in chunks:
            examples = [self.examples[i] for i in chunk]
            batch = self.collate_fn(examples)
            batch["_weight"] = sum(self.weight_fn(e) for e in examples)
            batch["_tokens"] = sum(self.lengths[i] for i in chunk)
            out.append(batch)
        return out


def tensors_only(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if not k.startswith("_")}
