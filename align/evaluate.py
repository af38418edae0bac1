"""Evaluation shared by the stages: held-out loss and task accuracy by greedy generation.

Under several processes each process takes every n-th item (no padding of the last
batch, so nothing is counted twice) and the sums are reduced once.
"""

from __future__ import annotations

import torch

from align.data import IGNORE, collate, encode_prompt, without_causal_padding_mask
from align.logprobs import forward_hidden
from align.models import gathered, stop_token_ids


def _reduce_sum(accelerator, values: list[float]) -> list[float]:
    if accelerator is None or accelerator.num_processes == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(t, reduction="sum").tolist()


def shard(n: int, accelerator) -> range:
    """This process's items of n: every num_processes-th from its index (all of them without one)."""
    if accelerator is None:
        return range(n)
    return range(accelerator.process_index, n, accelerator.num_processes)


@torch.no_grad()
def eval_loss(model, examples: list[dict], pad_id: int, *, batch_size: int, accelerator=None) -> float:
    """Token-mean NLL over the trained tokens of `examples` (exact over processes)."""
    # ZeRO-3: parameters gathered once, so processes may run different numbers of forwards
    with gathered(model, accelerator) as whole:
        return _eval_loss(whole, examples, pad_id, batch_size=batch_size, accelerator=accelerator)


def _eval_loss(model, examples: list[dict], pad_id: int, *, batch_size: int, accelerator=None) -> float:
    was_training = model.training
    model.eval()
    mine = [examples[i] for i in shard(len(examples), accelerator)]
    mine.sort(key=lambda e: len(e["input_ids"]))
    total, count = 0.0, 0.0
    device = next(model.parameters()).device
    for start in range(0, len(mine), batch_size):
        batch = without_causal_padding_mask(collate(mine[start: start + batch_size], pad_id))
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        hidden, head = forward_hidden(model, **batch, use_cache=False)
        total -= head.token_logprobs(hidden[:, :-1], labels[:, 1:]).sum().item()
        count += (labels[:, 1:] != IGNORE).sum().item()
    model.train(was_training)
    total, count = _reduce_sum(accelerator, [total, count])
    return total / max(count, 1.0)


@torch.no_grad()
def greedy_completions(model, tokenizer, prompts: list, *, max_new_tokens: int, batch_size: int,
                       accelerator=None) -> dict[int, str]:
    """Greedy completions of this process's share of `prompts`, as {prompt index: text}."""
    # ZeRO-3: gathered once for the whole generation, so no process waits for another (synced_gpus=False)
    with gathered(model, accelerator) as whole:
        return _greedy_completions(whole, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   accelerator=accelerator)


def _greedy_completions(model, tokenizer, prompts: list, *, max_new_tokens: int, batch_size: int,
                        accelerator=None) -> dict[int, str]:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    indices = list(shard(len(prompts), accelerator))
    encoded = {i: encode_prompt(tokenizer, prompts[i]) for i in indices}
    indices.sort(key=lambda i: len(encoded[i]))
    out = {}
    for start in range(0, len(indices), batch_size):
        chunk = indices[start: start + batch_size]
        width = max(len(encoded[i]) for i in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(chunk):  # left padding: generation continues from the right edge
            n = len(encoded[i])
            ids[row, width - n:] = torch.tensor(encoded[i])
            mask[row, width - n:] = 1
        generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                   max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=stop_token_ids(model, tokenizer), synced_gpus=False,
                                   use_cache=True)  # the loader sets config.use_cache=False with checkpointing
        for row, i in enumerate(chunk):
            out[i] = tokenizer.decode(generated[row, width:], skip_special_tokens=True)
    model.train(was_training)
    return out


def task_accuracy(model, tokenizer, prompts: list, references: list[str], *, max_new_tokens: int,
                  batch_size: int, accelerator=None) -> float:
    """Share of prompts whose greedy completion equals the reference (whitespace stripped)."""
    completions = greedy_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, accelerator=accelerator)
    correct = sum(completions[i].strip() == _text(references[i]).strip() for i in completions)
    correct, total = _reduce_sum(accelerator, [float(correct), float(len(completions))])
    return correct / max(total, 1.0)


def task_metrics(model, tokenizer, prompts: list, references: list, eval_cfg, accelerator=None) -> dict:
    """{"eval/task_accuracy": …} for the generative stages, or {} when there is nothing to generate."""
    if not prompts or not eval_cfg.generate:
        return {}
    return {"eval/task_accuracy": task_accuracy(model, tokenizer, prompts, references,
                                                max_new_tokens=eval_cfg.max_new_tokens,
                                                batch_size=eval_cfg.batch_size, accelerator=accelerator)}


def _text(reference) -> str:
    """A reference completion as text: a string, or the content of a message list."""
    if isinstance(reference, list):
        return "".join(m.get("content", "") for m in reference)
    return str(reference)
