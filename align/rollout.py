"""Rollouts shared by the online stages (GRPO, PPO): sample completions, score their tokens.

A rollout of B prompts is

1. **left-padded prompts** (`left_pad`): generation continues from the right edge of
   every row, so all rows share one KV cache and one position of the next token;
2. **batched sampling with a KV cache** (`sample`, our own decode loop `_decode`):
   temperature, top-k, top-p (transformers' warpers, in its order) and max_new_tokens,
   stopping when every row has produced EOS; rows that finished early are filled with
   the pad token. Token for token what `generate` gives (tested), without its per-token
   machinery, and each DISTINCT prompt is forwarded once (`unique_prompts`; a GRPO
   group repeats its prompt G times), its keys/values then selected for every copy.
   The random choice is made by **per-row Gumbel-max** (see "Reproducible across world
   sizes" below), not by `torch.multinomial` on the global RNG;
3. a **completion mask that ends at the first EOS** (`completion_mask`), the EOS
   included: tokens after it (pads, or anything sampled once pad == eos) are never
   trained or scored. `ended` says whether the row produced an EOS at all (the
   missing-EOS penalty of `align.rewards` reads it);
4. **log-probs of the sampled tokens recomputed by a forward pass** (`completion_logprobs`)
   under the policy and, when there is one, under the reference model: a real forward
   over prompt + completion with the positions generation used (left padding shifts
   them; repeated prompts again run once, with gradient, see `completion_logprobs`),
   NOT the scores of the decode loop (those come from the cached incremental
   pass and, with top-k/top-p, from the warped distribution). Logits are divided by
   the sampling temperature before the softmax, as TRL does, so the log-probs are those
   of the distribution the tokens were drawn from. Dropout is the caller's business:
   the loader switches it off (`model.disable_dropout`, on by default), so the
   rollout-time log-probs and the training forward see the same function.

Reproducible across world sizes. A completion depends only on the model, its prompt,
the seed and the row's own key, never on which process sampled it or which rows
shared its batch: the decode loop picks the argmax of the warped logits (temperature, then
top-k, then top-p, transformers' order) plus Gumbel noise g = -log(-log u), which is a
draw from exactly the warped softmax (the Gumbel-max trick). The uniform u of row r,
new token t and vocabulary entry v is a counter-based hash of (key_r, t, v)
(`gumbel_noise`), computed with integer tensor ops, so it is the same on every process,
batch split and device. `rollout(..., generator_seed=s, row_ids=ids)` derives key_r
from (s, the row's GLOBAL index in the rollout batch): one process sampling rows 0..7,
or two processes sampling rows 0..3 and 4..7, draw identical completions (tested under
`accelerate launch`), which is what makes a GRPO/PPO run match across process counts.
(Logits computed in batches of different widths can differ in the last float bits; a
sample flips only if that moves one perturbed logit past another, which is negligible.)

ZeRO-3 (verified on CPU: 2 processes, DeepSpeed 0.19.8 over gloo, tests/test_deepspeed.py;
not yet on a GPU). Under ZeRO stage 3 every parameter is sharded across processes and
materialised by forward hooks one module at a time. That is correct but slow for
the decode loop, which calls the model once per new token, and the hooks are collectives, so
processes would have to generate in lockstep. `generation_model` (`align.models.gathered`)
therefore gathers all parameters ONCE for the whole decode and takes the engine's
ZeRO-3 hooks off meanwhile (TRL's `unwrap_model_for_generation` with
gather_deepspeed3_params=True does the same): nothing inside talks to other processes,
so no lockstep is needed and processes may generate different numbers
of batches. Entering and leaving is collective: every process calls `sample` together.
The log-prob forward passes go through the engine itself (its hooks gather as usual), so
every process must score the same number of `batch_size` chunks. Models too large to
hold whole on one device need a vLLM-style engine instead, which is out of scope here.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from align.data import prefix_sharing_mask
from align.logprobs import forward_hidden


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


def completion_mask(completion_ids: torch.Tensor, eos_id: int | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """1 up to and including the first EOS of each row, 0 after: (B, C) -> mask (B, C), ended (B,).

    `eos_id`: the stop token id, or several (`align.models.stop_token_ids`). A row without
    one (cut by max_new_tokens) keeps every token and has ended False. Found from the first
    stop token, never from the pad id, so pad == eos is safe.

    >>> mask, ended = completion_mask(torch.tensor([[4, 2, 0], [4, 4, 4], [2, 2, 2]]), eos_id=2)
    >>> mask.tolist(), ended.tolist()
    ([[1, 1, 0], [1, 1, 1], [1, 0, 0]], [True, False, True])
    """
    is_eos = torch.isin(completion_ids, torch.as_tensor(eos_id, device=completion_ids.device))  # (B, C)
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
    """The bare module to decode with, with its parameters gathered once under ZeRO-3.

    Collective under ZeRO-3: every process must enter it. Elsewhere it only unwraps
    DDP / accelerate wrappers.
    """
    from align.models import gathered

    with gathered(model, accelerator) as unwrapped:
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
    """Rows per decode call."""


_M32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """(x * c) mod 2**32 for x in [0, 2**32) (int64 tensor or int), without leaving 63 bits."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def mix32(x):
    """A bijective 32-bit integer hash (Wellons' lowbias32) of an int64 tensor (or int) in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_keys(seed: int, row_ids) -> torch.Tensor:
    """32-bit sampling key of each row from (seed, the row's global index): (B,) int64."""
    base = mix32(mix32(seed & _M32) ^ mix32((seed >> 32) & _M32 ^ 0x5BD1E995))
    return torch.tensor([mix32(base ^ mix32((int(r) + 0x9E3779B9) & _M32)) for r in row_ids], dtype=torch.long)


def gumbel_noise(keys: torch.Tensor, t: int, V: int) -> torch.Tensor:
    """Standard Gumbel noise for new token `t` of rows with `keys` (B,): -> (B, V) float32 on keys' device.

    u = hash(key, t, v) with 24-bit resolution in (0, 1); g = -log(-log u).
    """
    step = mix32((keys ^ mix32((t * 0x9E3779B9 + 0x632BE5AB) & _M32)) & _M32)  # (B,)
    vocab = mix32(torch.arange(V, device=keys.device, dtype=torch.long) ^ 0x27D4EB2F)  # (V,)
    bits = mix32(step[:, None] ^ vocab[None, :]) >> 8  # (B, V) in [0, 2**24)
    u = (bits.float() + 0.5) * 2.0 ** -24
    return -torch.log(-torch.log(u))


class _GumbelMax:
    """Warp (temperature, top-k, top-p, transformers' warpers and order) then add each row's Gumbel noise.

    `perturb(scores, t)` is what the decode loop calls for new token t; `__call__` makes it a
    transformers logits processor too (the tests check the loop against `generate` with it).
    """

    def __init__(self, keys: torch.Tensor, prompt_width: int, sampling: "SamplingConfig"):
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.keys, self.width = keys, prompt_width
        self.warpers = []
        if sampling.temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k:
            self.warpers.append(TopKLogitsWarper(top_k=sampling.top_k))
        if sampling.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=sampling.top_p))

    def perturb(self, scores: torch.Tensor, t: int) -> torch.Tensor:
        """Warped logits (B, V) of new token `t` plus the rows' Gumbel noise (B, V)."""
        for warp in self.warpers:
            scores = warp(None, scores)
        noise = gumbel_noise(self.keys.to(scores.device), t, scores.shape[-1])
        return scores + noise.to(scores.dtype)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.perturb(scores, input_ids.shape[1] - self.width)


def unique_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rows holding each distinct prompt once: -> (first (U,), inverse (B,)) with rows == first[inverse], or None
    when all B prompts differ (nothing to share).

    A GRPO batch repeats every prompt G times; its prompt tokens need one forward per
    distinct prompt (sampling: its cache is selected for every copy; scoring: a group is
    one row, `grouped_rows`).
    """
    rows = torch.cat([prompt_ids, prompt_mask.to(prompt_ids.dtype)], 1)  # (B, 2P)
    distinct, inverse = torch.unique(rows, dim=0, return_inverse=True)  # (U, 2P), (B,)
    if distinct.shape[0] == rows.shape[0]:
        return None
    B = rows.shape[0]
    first = torch.full((distinct.shape[0],), B, dtype=torch.long, device=rows.device)
    first = first.scatter_reduce(0, inverse, torch.arange(B, device=rows.device), reduce="amin")  # (U,)
    return first, inverse


def _prompt_pass(model, prompt_ids, prompt_mask, shared):
    """Forward the prompts (each distinct one once when `shared` = (first, inverse)) and keep their cache.

    -> (logits of the next token after each prompt (B, V) float32, the cache with B rows).
    """
    if shared is not None:
        first, inverse = shared
        prompt_ids, prompt_mask = prompt_ids[first], prompt_mask[first]  # (U, P)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids_of(prompt_mask),
                use_cache=True, logits_to_keep=1)
    logits, cache = out.logits[:, -1].float(), out.cache  # (U or B, V)
    if shared is not None:
        cache.batch_select_indices(inverse)
        logits = logits[inverse]  # (B, V)
    return logits, cache


def _decode(model, ids: torch.Tensor, mask: torch.Tensor, *, max_new_tokens: int, eos_id: int | list[int], pad_id: int,
            sampler: _GumbelMax | None) -> torch.Tensor:
    """Greedy (sampler None) or Gumbel-max decoding of left-padded prompts (B, P): -> (B, C), pads after EOS.

    `generate`'s semantics without its per-token machinery: one prompt forward (shared by
    repeated prompts), then one cached forward per new token at position "real tokens so
    far"; stops when every row has produced EOS or after max_new_tokens. The model's own
    generation_config (a hub model's repetition penalty, suppressed tokens, ...) is not
    read: only the recipe's settings shape the distribution, which is the one the
    log-prob forward scores.
    """
    logits, cache = _prompt_pass(model, ids, mask, unique_prompts(ids, mask))  # (B, V)
    B = ids.shape[0]
    position = position_ids_of(mask)[:, -1:]  # (B, 1) position of each row's last prompt token
    unfinished = torch.ones(B, dtype=torch.bool, device=ids.device)
    stops = torch.as_tensor(eos_id, device=ids.device)
    ones = torch.ones(B, 1, dtype=mask.dtype, device=mask.device)
    tokens = []
    for t in range(max_new_tokens):
        scores = logits if sampler is None else sampler.perturb(logits, t)
        token = torch.where(unfinished, scores.argmax(-1), pad_id)  # (B,)
        tokens.append(token)
        unfinished &= ~torch.isin(token, stops)
        if t + 1 == max_new_tokens or not unfinished.any():
            break
        mask, position = torch.cat([mask, ones], 1), position + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=position, cache=cache,
                    use_cache=True)
        logits, cache = out.logits[:, -1].float(), out.cache
    return torch.stack(tokens, 1)  # (B, C)


@torch.no_grad()
def sample(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, sampling: SamplingConfig,
           eos_id: int | list[int],
           pad_id: int, accelerator=None, do_sample: bool = True, keys: torch.Tensor | None = None) -> torch.Tensor:
    """Sample completions for left-padded prompts (B, P) -> completion ids (B, C), C <= max_new_tokens.

    Pads after a row's EOS. `do_sample=False` is greedy decoding. `keys` (B,) are the
    rows' sampling keys (`row_keys`); None draws them from the global torch RNG. Our own
    decode loop (`_decode`), token for token what `generate` with the `_GumbelMax`
    processor gives (tested), at a fraction of its per-token overhead.
    """
    if do_sample and keys is None:
        keys = torch.randint(0, 2 ** 32, (prompt_ids.shape[0],), dtype=torch.long)
    chunks = []
    with generation_model(model, accelerator) as gen:
        was_training = gen.training
        gen.eval()
        device = next(gen.parameters()).device
        width = prompt_ids.shape[1]
        try:
            for start in range(0, prompt_ids.shape[0], sampling.batch_size):
                part = slice(start, start + sampling.batch_size)
                ids, mask = prompt_ids[part].to(device), prompt_mask[part].to(device)
                sampler = _GumbelMax(keys[part].to(device), width, sampling) if do_sample else None
                chunks.append(_decode(gen, ids, mask, max_new_tokens=sampling.max_new_tokens, eos_id=eos_id,
                                      pad_id=pad_id, sampler=sampler).cpu())
        finally:
            gen.train(was_training)
    C = max(c.shape[1] for c in chunks)
    return torch.cat([torch.nn.functional.pad(c, (0, C - c.shape[1]), value=pad_id) for c in chunks])  # (B, C)


# ---------------------------------------------------------------------------
# log-probs of given completions, by a real forward
# ---------------------------------------------------------------------------
def _shares_prompts(model) -> bool:
    """Whether `completion_logprobs` may put a group in one row: the attention applies a custom 4D mask."""
    from align.preference_data import supports_shared_prompt

    return supports_shared_prompt(model)


def grouped_rows(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                 mask: torch.Tensor, shared: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One row per distinct prompt: [prompt, copy 1's completion, copy 2's, ...] with a 4D mask.

    Prefix sharing (as `align.preference_data.collate_shared_pairs` does for pairs): the
    completion tokens of each copy see the prompt's real tokens and their own earlier
    real tokens, never another copy's, and continue the prompt's positions, so their
    logits equal those of the separate rows [prompt, completion]. Only the first C - 1
    completion tokens are fed (the last predicts nothing).

    -> input_ids, position_ids (U, T), T = P + max group size x (C - 1); attention_mask
    (U, 1, T, T) bool, True = may attend (every query sees itself: no empty row);
    rows (B, 1) and columns (B, C): where the logits predicting each completion token sit.
    """
    first, inverse = shared
    B, P = prompt_ids.shape
    C1 = completion_ids.shape[1] - 1  # fed completion tokens per copy
    U, device = first.shape[0], prompt_ids.device
    order = torch.argsort(inverse, stable=True)  # (B,) rows grouped by prompt
    counts = torch.bincount(inverse, minlength=U)  # (U,)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(inverse)
    rank[order] = torch.arange(B, device=device) - starts[inverse[order]]  # (B,) copy index within its group
    T = P + int(counts.max()) * C1
    input_ids = torch.zeros(U, T, dtype=prompt_ids.dtype, device=device)
    input_ids[:, :P] = prompt_ids[first]
    key_ok = torch.zeros(U, T, dtype=torch.bool, device=device)  # real token: may be attended
    key_ok[:, :P] = prompt_mask[first].bool()
    segment = torch.full((U, T), -1, dtype=torch.long, device=device)  # 0 prompt, k + 1 copy k, -1 unused
    segment[:, :P] = 0
    positions = torch.zeros(U, T, dtype=torch.long, device=device)
    positions[:, :P] = position_ids_of(prompt_mask[first])
    full_mask = torch.cat([prompt_mask, mask.to(prompt_mask.dtype)], 1)  # (B, P + C)
    rows = inverse[:, None]  # (B, 1)
    cols = P + rank[:, None] * C1 + torch.arange(C1, device=device)  # (B, C1): where copy b's tokens go
    input_ids[rows, cols] = completion_ids[:, :C1]
    key_ok[rows, cols] = mask[:, :C1].bool()
    segment[rows, cols] = rank[:, None] + 1
    positions[rows, cols] = position_ids_of(full_mask)[:, P: P + C1]
    columns = torch.cat([torch.full((B, 1), P - 1, device=device), cols], 1)  # (B, C): token t read at column
    return {"input_ids": input_ids, "position_ids": positions, "attention_mask": prefix_sharing_mask(segment, key_ok),
            "rows": rows, "columns": columns}


def completion_logprobs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                        mask: torch.Tensor, *, temperature: float = 1.0,
                        return_entropy: bool = False):
    """log p(completion token | everything before) for each completion position: -> (B, C), 0 where mask is 0.

    A forward of prompt (B, P, left-padded) + completion (B, C) with generation's
    positions; logits divided by `temperature`. Differentiable when called with grad
    enabled (the training loss uses it too). With `return_entropy`, also the entropy of
    each position's distribution (B, C).

    The last completion token predicts nothing, so it is not fed. When prompts repeat (a
    GRPO group), a group goes as ONE row (`grouped_rows`: the prompt once, then every
    copy's completion, a 4D mask keeping the copies apart): the same function as the
    separate rows up to float rounding, with the prompt's compute and gradient paid once
    per group. One forward, so DDP, DeepSpeed and gradient checkpointing are unaffected;
    attention implementations that cannot take a 4D mask (`align.preference_data.
    SHARED_PROMPT_ATTENTION`) get the separate rows.
    """
    P = prompt_ids.shape[1]
    shared = unique_prompts(prompt_ids, prompt_mask) if _shares_prompts(model) else None
    if shared is None:
        attention_mask = torch.cat([prompt_mask, mask[:, :-1].to(prompt_mask.dtype)], 1)  # (B, P + C - 1)
        hidden, head = forward_hidden(model, input_ids=torch.cat([prompt_ids, completion_ids[:, :-1]], 1),
                                      attention_mask=attention_mask, position_ids=position_ids_of(attention_mask),
                                      use_cache=False)  # (B, P + C - 1, H): no logits (align.logprobs)
        hidden = hidden[:, P - 1:]  # (B, C, H): position P-1+t predicts completion token t
    else:
        g = grouped_rows(prompt_ids, prompt_mask, completion_ids, mask, shared)
        hidden, head = forward_hidden(model, input_ids=g["input_ids"], attention_mask=g["attention_mask"],
                                      position_ids=g["position_ids"], use_cache=False)  # (U, T, H)
        hidden = hidden[g["rows"], g["columns"]]  # (B, C, H)
    labels = completion_ids.masked_fill(mask == 0, -100)
    out = head.token_logprobs(hidden, labels, temperature=temperature, with_entropy=return_entropy)  # (B, C)
    if not return_entropy:
        return out
    logps, entropy = out
    return logps, entropy * mask


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
    sampling_logprobs: torch.Tensor | None = None  # (B, C) under the sampling engine (vLLM), 0 where masked

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)

    def texts(self, tokenizer) -> list[str]:
        """Completions as text, up to the first EOS (special tokens dropped)."""
        return [tokenizer.decode(ids[: int(n)].tolist(), skip_special_tokens=True)
                for ids, n in zip(self.completion_ids, self.lengths)]


def rollout(model, prompts: list[list[int]], *, sampling: SamplingConfig, eos_id: int | list[int], pad_id: int,
            accelerator=None, ref_model=None, policy_logprobs: bool = True, generator_seed: int | None = None,
            row_ids=None, do_sample: bool = True, engine=None) -> Rollout:
    """Sample one completion per prompt (repeat a prompt G times for a group) and score it.

    `policy_logprobs=False` skips the policy forward (on-policy GRPO with one update per
    rollout uses the training forward's detached log-probs as the old ones, as TRL does).
    `generator_seed` makes the sampling reproducible without touching the global RNG;
    `row_ids` (default 0..B-1) are the rows' indices in the GLOBAL rollout batch, so a
    batch split over processes samples what one process would (module docstring).
    `engine`: a `align.vllm_backend.VLLMSampler` already holding the policy's weights samples
    instead of the own decode loop (same keys, one seed per row); its sampled-token log-probs
    land in `sampling_logprobs`, the trainer's are computed as always.
    """
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    keys = None
    if generator_seed is not None or (engine is not None and do_sample):
        keys = row_keys(generator_seed or 0, range(len(prompts)) if row_ids is None else row_ids)
    sampling_logprobs = None
    if engine is None:
        completion_ids = sample(model, prompt_ids, prompt_mask, sampling=sampling, eos_id=eos_id, pad_id=pad_id,
                                accelerator=accelerator, do_sample=do_sample, keys=keys)
    else:
        completion_ids, sampling_logprobs = engine.sample(
            prompts, max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
            top_k=sampling.top_k, stop_ids=[eos_id] if isinstance(eos_id, int) else eos_id, pad_id=pad_id,
            keys=keys if do_sample else None)
    mask, ended = completion_mask(completion_ids, eos_id)
    completion_ids = completion_ids.masked_fill(mask == 0, pad_id)
    out = Rollout(prompt_ids, prompt_mask, completion_ids, mask, ended)
    if sampling_logprobs is not None:
        out.sampling_logprobs = sampling_logprobs * mask
    args = (prompt_ids, prompt_mask, completion_ids, mask)
    if policy_logprobs:
        out.logprobs = score_logprobs(model, *args, temperature=sampling.temperature, batch_size=sampling.batch_size)
    if ref_model is not None:
        out.ref_logprobs = score_logprobs(ref_model, *args, temperature=sampling.temperature,
                                          batch_size=sampling.batch_size)
    return out
