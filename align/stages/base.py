"""Pieces every offline stage (SFT, reward, preference) shares: batching a tokenized set."""

from __future__ import annotations

from align.data import GlobalBatches, split_global_batch


class OfflineBatches:
    """Step -> this process's micro-batches of the step's global batch.

    `collate_fn(examples) -> dict` builds one micro-batch; `weight_fn(example)` is the
    example's share of the loss normaliser (its trained tokens, or 1 per pair); the
    engine reads both back as batch["_weight"] and batch["_tokens"].
    """

    def __init__(self, examples: list[dict], lengths: list[int], *, batch_size: int, grad_accum: int,
                 process: int, processes: int, seed: int, group_by_length: bool, collate_fn, weight_fn):
        self.examples, self.lengths = examples, lengths
        self.micro, self.process, self.processes = grad_accum, process, processes
        self.global_batches = GlobalBatches(lengths, batch_size * grad_accum * processes, seed=seed,
                                            group_by_length=group_by_length)
        self.collate_fn, self.weight_fn = collate_fn, weight_fn

    def __call__(self, step: int) -> list[dict]:
        indices = self.global_batches[step]
        out = []
        for chunk in split_global_batch(indices, self.lengths, micro_batches=self.micro, process=self.process,
                                        processes=self.processes):
            examples = [self.examples[i] for i in chunk]
            batch = self.collate_fn(examples)
            batch["_weight"] = sum(self.weight_fn(e) for e in examples)
            batch["_tokens"] = sum(self.lengths[i] for i in chunk)
            out.append(batch)
        return out


def tensors_only(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if not k.startswith("_")}
