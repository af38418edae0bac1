"""Rollouts shared by the online stages (GRPO, PPO): sample completions, score their tokens.

A rollout of B prompts is

1. **left-padded prompts** (`left_pad`): generation continues from the right edge of
   every row, so all rows share one KV cache and one position of the next token;
2. **batched sampling with a KV cache** (`sample`): Hugging Face `generate` with
   temperature, top-p, top-k and max_new_tokens, stopping at EOS. Rows that finished
   early are filled with the pad token by `generate`;
3. a **completion mask that ends at the first EOS** (`completion_mask`), the EOS
   included: tokens after it (pads, or anything sampled once pad == eos) are never
   trained or scored. `ended` says whether the row produced an EOS at all (the
   missing-EOS penalty of `align.rewards` reads it);
4. **log-probs of the sampled tokens recomputed by a forward pass** (`completion_logprobs`)
   under the policy and, when there is one, under the reference model: a real forward
   over prompt + completion with the positions generation used (left padding shifts
   them), NOT the scores `generate` returns (those come from the cached incremental
   pass and, with top-k/top-p, from the warped distribution). Logits are divided by
   the sampling temperature before the softmax, as TRL does, so the log-probs are those
   of the distribution the tokens were drawn from. Dropout is the caller's business:
   the online stages switch it off in the policy (TRL's `disable_dropout`), so the
   rollout-time log-probs and the training forward see the same function.

ZeRO-3 (design; verified only where a GPU and DeepSpeed are available). Under ZeRO
stage 3 every parameter is sharded across processes and materialised by forward hooks
one module at a time. That is correct but slow for `generate`, which calls the model
once per new token: every token would all-gather every layer again. `generation_model`
therefore gathers all parameters ONCE for the whole `generate` call
(`deepspeed.zero.GatheredParameters(params, modifier_rank=None)`, read-only) and hands
back the unwrapped module; the log-prob forward passes go through the engine itself
(its hooks gather as usual). Every process must enter `generation_model` together (the
gather is a collective), which `sample` guarantees by generating the same number of
batches on every process. This is the approach of TRL's `unwrap_model_for_generation`
(gather_deepspeed3_params=True). Models too large to hold whole on one device need a
vLLM-style engine instead, which is out of scope here.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from align.losses import token_logprobs


# ---------------------------------------------------------------------------
# padding and masks
# ---------------------------------------------------------------------------
def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists: -> input_ids (B, P), attention_mask (B, P).

    >>> ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    >>> ids.tolist(), mask.tolist()
    ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
    """
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # (B, P)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids, mask


def completion_mask(completion_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1 up to and including the first EOS of each row, 0 after: (B, C) -> mask (B, C), ended (B,).

    A row without EOS (cut by max_new_tokens) keeps every token and has ended False.
    Found from the first EOS, never from the pad id, so pad == eos is safe.

    >>> mask, ended = completion_mask(torch.tensor([[4, 2, 0], [4, 4, 4], [2, 2, 2]]), eos_id=2)
    >>> mask.tolist(), ended.tolist()
    ([[1, 1, 0], [1, 1, 1], [1, 0, 0]], [True, False, True])
    """
    is_eos = completion_ids == eos_id  # (B, C)
    ended = is_eos.any(-1)
    C = completion_ids.shape[1]
    first = torch.where(ended, is_eos.int().argmax(-1), torch.full_like(ended, C, dtype=torch.long))  # (B,)
    positions = torch.arange(C, device=completion_ids.device).expand_as(completion_ids)
    return (positions <= first[:, None]).long(), ended


def position_ids_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions as `generate` assigns them to a left-padded row: count of real tokens before, (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# ---------------------------------------------------------------------------
# the model to generate with (ZeRO-3 aware)
# ---------------------------------------------------------------------------
def is_zero3(model, accelerator=None) -> bool:
    """True when `model` is a DeepSpeed engine (or runs under a DeepSpeed plugin) with ZeRO stage 3."""
    stage = getattr(model, "zero_optimization_stage", None)
    if callable(stage):
        return stage() == 3
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    return plugin is not None and getattr(plugin, "zero_stage", None) == 3


@contextmanager
def generation_model(model, accelerator=None):
    """The bare module to call `generate` on, with its parameters gathered once under ZeRO-3.

    Collective under ZeRO-3: every process must enter it. Elsewhere it only unwraps
    DDP / accelerate wrappers.
    """
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    if is_zero3(model, accelerator):
        import deepspeed

        params = list(unwrapped.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield unwrapped
    else:
        yield unwrapped


# ---------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------
@dataclass
class SamplingConfig:
    """How completions are drawn (Hugging Face generate's names)."""

    max_new_tokens: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k (transformers' default would otherwise be 50)."""
    batch_size: int = 256
    """Rows per `generate` call."""


@torch.no_grad()
def sample(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, sampling: SamplingConfig, eos_id: int,
           pad_id: int, accelerator=None, do_sample: bool = True) -> torch.Tensor:
    """Sample completions for left-padded prompts (B, P) -> completion ids (B, C), C <= max_new_tokens.

    Pads after a row's EOS. `do_sample=False` is greedy decoding.
    """
    chunks = []
    with generation_model(model, accelerator) as gen:
        was_training = gen.training
        gen.eval()
        device = next(gen.parameters()).device
        width = prompt_ids.shape[1]
        for start in range(0, prompt_ids.shape[0], sampling.batch_size):
            ids = prompt_ids[start: start + sampling.batch_size].to(device)
            mask = prompt_mask[start: start + sampling.batch_size].to(device)
            kwargs = dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=sampling.top_k) if do_sample else dict(do_sample=False)
            out = gen.generate(input_ids=ids, attention_mask=mask, max_new_tokens=sampling.max_new_tokens,
                               eos_token_id=eos_id, pad_token_id=pad_id, use_cache=True, **kwargs)
            chunks.append(out[:, width:].cpu())
        gen.train(was_training)
    C = max(c.shape[1] for c in chunks)
    return torch.cat([torch.nn.functional.pad(c, (0, C - c.shape[1]), value=pad_id) for c in chunks])  # (B, C)


# ---------------------------------------------------------------------------
# log-probs of given completions, by a real forward
# ---------------------------------------------------------------------------
def completion_logprobs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                        mask: torch.Tensor, *, temperature: float = 1.0,
                        return_entropy: bool = False):
    """log p(completion token | everything before) for each completion position: -> (B, C), 0 where mask is 0.

    One forward of prompt (B, P, left-padded) + completion (B, C) with generation's
    positions; logits divided by `temperature`. Differentiable when called with grad
    enabled (the training loss uses it too). With `return_entropy`, also the entropy of
    each position's distribution (B, C).
    """
    P = prompt_ids.shape[1]
    input_ids = torch.cat([prompt_ids, completion_ids], 1)  # (B, P + C)
    attention_mask = torch.cat([prompt_mask, mask.to(prompt_mask.dtype)], 1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_of(attention_mask), use_cache=False).logits  # (B, P + C, V)
    logits = logits[:, P - 1: -1].float()  # (B, C, V): position P-1+t predicts completion token t
    if temperature != 1.0:
        logits = logits / temperature
    labels = completion_ids.masked_fill(mask == 0, -100)
    logps = token_logprobs(logits, labels)  # (B, C)
    if not return_entropy:
        return logps
    from align.losses import entropy_from_logits

    return logps, entropy_from_logits(logits) * mask


@torch.no_grad()
def score_logprobs(model, prompt_ids, prompt_mask, completion_ids, mask, *, temperature: float = 1.0,
                   batch_size: int = 256) -> torch.Tensor:
    """`completion_logprobs` without grad, in eval mode, in chunks of `batch_size` rows: (B, C) on CPU."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for s in range(0, prompt_ids.shape[0], batch_size):
            part = [t[s: s + batch_size].to(device) for t in (prompt_ids, prompt_mask, completion_ids, mask)]
            out.append(completion_logprobs(model, *part, temperature=temperature).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


# ---------------------------------------------------------------------------
# one rollout batch
# ---------------------------------------------------------------------------
@dataclass
class Rollout:
    """B sampled completions with everything the losses need (tensors on CPU)."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    completion_ids: torch.Tensor  # (B, C) pads after the first EOS
    completion_mask: torch.Tensor  # (B, C) 1 up to and including the first EOS
    ended: torch.Tensor  # (B,) bool: the completion produced an EOS
    logprobs: torch.Tensor | None = None  # (B, C) under the policy at sampling time
    ref_logprobs: torch.Tensor | None = None  # (B, C) under the reference

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)

    def texts(self, tokenizer) -> list[str]:
        """Completions as text, up to the first EOS (special tokens dropped)."""
        return [tokenizer.decode(ids[: int(n)].tolist(), skip_special_tokens=True)
                for ids, n in zip(self.completion_ids, self.lengths)]


def rollout(model, prompts: list[list[int]], *, sampling: SamplingConfig, eos_id: int, pad_id: int,
            accelerator=None, ref_model=None, policy_logprobs: bool = True, generator_seed: int | None = None,
            do_sample: bool = True) -> Rollout:
    """Sample one completion per prompt (repeat a prompt G times for a group) and score it.

    `policy_logprobs=False` skips the policy forward (on-policy GRPO with one update per
    rollout uses the training forward's detached log-probs as the old ones, as TRL does).
    `generator_seed` makes the sampling reproducible (the global RNG is restored after).
    """
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    seeded = torch.random.fork_rng(devices=devices) if generator_seed is not None else nullcontext()
    with seeded:
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        completion_ids = sample(model, prompt_ids, prompt_mask, sampling=sampling, eos_id=eos_id, pad_id=pad_id,
                                accelerator=accelerator, do_sample=do_sample)
    mask, ended = completion_mask(completion_ids, eos_id)
    completion_ids = completion_ids.masked_fill(mask == 0, pad_id)
    out = Rollout(prompt_ids, prompt_mask, completion_ids, mask, ended)
    args = (prompt_ids, prompt_mask, completion_ids, mask)
    if policy_logprobs:
        out.logprobs = score_logprobs(model, *args, temperature=sampling.temperature, batch_size=sampling.batch_size)
    if ref_model is not None:
        out.ref_logprobs = score_logprobs(ref_model, *args, temperature=sampling.temperature,
                                          batch_size=sampling.batch_size)
    return out
