"""Per-token log-probs from a causal LM without its (tokens x vocabulary) logits.

The largest tensor of a training step on a real vocabulary (128k-262k tokens) is the
logits: 4 sequences of 2,048 tokens at 151,936 entries are 5 GB per fp32 copy, and the
plain path holds two or three copies (logits, log-softmax, gradient). Every stage only
needs the log-prob of ONE token per position (the target), plus the entropy where it
logs it, so here:

1. `head_forward` runs the model with its output layer (lm_head) swapped for a capture:
   the forward goes through the wrapper as usual (DDP, PEFT, accelerate), the decoder's
   last hidden states (B, T, H) come back, and no logits are computed;
2. the caller selects the positions it scores (hidden states are H wide, not V);
3. `OutputHead.token_logprobs` computes log p(target) (and the entropy) in chunks of
   `chunk_tokens` positions: logits of one chunk at a time, only their log-sum-exp kept;
   the backward recomputes each chunk's logits and forms d/dlogits = g (onehot - p)
   directly, so no chunk's logits outlive its step (`_ChunkedLogprobs`). Two cases need no
   recompute: a loss that weighs every scored token alike (SFT) gets the head's gradient
   formed in the forward (`_Grads`), and a frozen head (LoRA) each position's hidden-state
   gradient (`_TokenGrads`). When the whole input fits in one chunk the probabilities are
   kept instead of recomputed.

Temperature, Gemma's final logit soft-capping and the Cohere/Granite logit scales are
applied as the model applies them. The head's reconstruction is checked once per model
against the model's own logits on a 2-token input; a head it cannot reproduce (a LoRA
on lm_head, an unknown post-processing) and DeepSpeed ZeRO-3 (a partitioned lm_head)
fall back, with one warning, to the plain path: the model's logits, then
`losses.token_logprobs`. `model.chunked_logprobs: false` chooses the plain path; `auto`
(the default) the plain path for a forward whose whole logits fit in one chunk (nothing
to save: the tiny models keep the plain path's exact numbers), else the chunked one.

    >>> import torch
    >>> head = OutputHead(weight=torch.eye(3), chunk_tokens=2)
    >>> hidden = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    >>> [round(x, 4) for x in head.token_logprobs(hidden, torch.tensor([0, 0, -100])).tolist()]
    [-1.0986, -0.2395, 0.0]
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from align.losses import entropy_from_logits, token_logprobs

CHUNK_ELEMENTS = 2 ** 24
"""Logit entries per chunk (64 MiB in fp32): ~110 positions at a 151,936 vocabulary; the whole batch of a
tiny model. It bounds the transient at about two chunk copies. A head-only A/B on this 2-core CPU (4,096
positions, V = 151,936; chunks of 110, 441 and 1,024 positions; every round throttled) showed no size
clearly faster, so the smallest bound was kept; not yet timed on a GPU."""


def default_chunk_tokens(vocab: int) -> int:
    return max(16, CHUNK_ELEMENTS // max(vocab, 1))


def chunk_positions(setting, tokens: int, vocab: int, chunk_tokens: int | None = None) -> int | None:
    """Positions per chunk for a forward of `tokens` positions under `model.chunked_logprobs` = `setting`, or
    None where the plain path runs (false; auto with the whole forward's logits within one chunk). The
    fallbacks of `output_head` (hooks, wrappers, ZeRO-3) come on top."""
    if setting is False or (setting == "auto" and tokens * vocab <= CHUNK_ELEMENTS):
        return None
    return chunk_tokens or default_chunk_tokens(vocab)


# ---------------------------------------------------------------------------
# the output head as a function of hidden states
# ---------------------------------------------------------------------------
@dataclass
class OutputHead:
    """logits = post(hidden @ weight.T + bias) / temperature, computed `chunk_tokens` positions at a time.

    `weight` None: the inputs are the model's logits already (the plain path).
    """

    weight: torch.Tensor | None
    bias: torch.Tensor | None = None
    softcap: float | None = None
    scale: float = 1.0
    chunk_tokens: int = 4096

    @property
    def plain(self) -> bool:
        return self.weight is None

    def logits(self, hidden: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Full float32 logits (..., V): for the few places that need the distribution (sampling)."""
        if self.plain:
            return hidden.float() / temperature if temperature != 1.0 else hidden.float()
        return _post(F.linear(hidden, self.weight, self.bias), self.softcap, self.scale, temperature)[0]

    def token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                       with_entropy: bool = False, uniform: bool = False):
        """log p(targets) (...,) of hidden states (..., H) [or logits (..., V)]; targets -100 give 0.

        With `with_entropy`, also each position's entropy (...,) — at every position, masked
        or not, as `losses.entropy_from_logits` gives. `uniform`: the caller's loss weighs
        every scored log-prob alike (a summed NLL), so the gradient is formed in the forward
        (see `_ChunkedLogprobs`); a hint, checked in the backward.
        """
        if self.plain:
            logits = hidden.float() / temperature if temperature != 1.0 else hidden
            logps = token_logprobs(logits, targets)
            return (logps, entropy_from_logits(logits)) if with_entropy else logps
        shape = targets.shape
        flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        logps, entropy = _ChunkedLogprobs.apply(flat_h, self.weight, self.bias, flat_t, float(temperature),
                                                self.softcap, self.scale, self.chunk_tokens, with_entropy,
                                                uniform and torch.is_grad_enabled())
        logps = logps.view(shape)
        return (logps, entropy.view(shape)) if with_entropy else logps


def _post(raw: torch.Tensor, softcap, scale, temperature):
    """Raw head output (n, V) -> (float32 logits / temperature, tanh of the soft-cap or None)."""
    z = raw.float()
    if scale != 1.0:
        z = z * scale
    t = None
    if softcap:
        t = torch.tanh(z / softcap)
        z = t * softcap
    if temperature != 1.0:
        z = z / temperature
    return z, t


class _ChunkedLogprobs(torch.autograd.Function):
    """log p(target) and entropy per row of hidden (N, H), one chunk of rows' logits at a time.

    Gradient per chunk, with z the logits, p = softmax(z), H the entropy:
    dlogp/dz = onehot(target) - p;  dH/dz = -p (log p + H); then through 1/temperature,
    the soft-cap (1 - tanh^2) and the scale to the raw head output, then to hidden and weight.

    Where the loss is the same multiple of every scored log-prob (SFT's summed NLL: `uniform`),
    the forward also forms the gradients for a weight of 1 per scored token (Liger's fused
    linear cross-entropy does the same) and the backward only scales them: no recompute, the
    plain path's three head matmuls. Otherwise (or if the weights turn out not to be equal)
    the backward recomputes each chunk's logits.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, softcap, scale, chunk, with_entropy, uniform):
        ctx.set_materialize_grads(False)  # an output the loss does not use (a logged entropy) costs nothing
        N = hidden.shape[0]
        valid = targets != -100
        safe = targets.clamp(min=0)
        logps = hidden.new_zeros(N, dtype=torch.float32)
        entropy = hidden.new_zeros(N if with_entropy else 0, dtype=torch.float32)
        lse = hidden.new_zeros(N, dtype=torch.float32)
        needs = ctx.needs_input_grad[:3]
        token = _TokenGrads(hidden, with_entropy) if needs[0] and not any(needs[1:]) else None  # a frozen head
        eager = _Grads(hidden, weight, bias, needs) if uniform and not with_entropy and any(needs) else None
        eager = None if token is not None else eager
        kept = ()
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            z, t = _post(F.linear(hidden[s:e], weight, bias), softcap, scale, temperature)
            lse[s:e] = torch.logsumexp(z, -1)
            logp = z.sub_(lse[s:e, None])  # in place: log p
            logps[s:e] = logp.gather(-1, safe[s:e, None]).squeeze(-1)
            if with_entropy:
                p = logp.exp()
                entropy[s:e] = -(p * logp).sum(-1)
            if token is not None:
                token.add(s, e, logp, entropy[s:e] if with_entropy else None, valid[s:e], safe[s:e],
                          lambda g, t=t: _grad_raw(g, t, scale, temperature), weight)
            elif eager is not None:  # d(sum of scored logp)/dz = onehot - p on scored rows
                g = logp.exp_().neg_().mul_(valid[s:e, None])
                g.scatter_add_(-1, safe[s:e, None], valid[s:e, None].to(g.dtype))
                eager.add(s, e, _grad_raw(g, t, scale, temperature))
            elif N <= chunk:  # one chunk: keep p (and the soft-cap's tanh) rather than recompute
                kept = (p if with_entropy else logp.exp_(),) + (() if t is None else (t,))
        logps = logps.masked_fill(~valid, 0.0)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy, *kept)
        ctx.eager, ctx.token = eager, token
        ctx.settings = (temperature, softcap, scale, chunk, with_entropy)
        device = hidden.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy):
        hidden, weight, bias, targets, lse, entropy, *kept = ctx.saved_tensors
        temperature, softcap, scale, chunk, with_entropy = ctx.settings
        valid = targets != -100
        g_lp = (torch.zeros_like(lse) if grad_logps is None else grad_logps) * valid
        use_entropy = with_entropy and grad_entropy is not None
        if ctx.token is not None:
            grad_h = ctx.token.grad(g_lp, grad_entropy if use_entropy else None).to(hidden.dtype)
            return (grad_h, None, None, None, None, None, None, None, None, None)
        factor = _uniform_weight(g_lp, valid) if ctx.eager is not None and not use_entropy else None
        if factor is not None:
            eager, ctx.eager = ctx.eager, None  # scaled in place: a second backward recomputes instead
            return (*eager.scaled(factor), None, None, None, None, None, None, None)
        grads = _Grads(hidden, weight, bias, ctx.needs_input_grad[:3])
        head = () if kept else _as_forward_ran(ctx.autocast, hidden, weight, bias)
        for s in range(0, hidden.shape[0], chunk):
            e = min(s + chunk, hidden.shape[0])
            if kept:
                p, t = kept[0], (kept[1] if softcap else None)
                logp = torch.log(p.clamp(min=1e-45)) if use_entropy else None
            else:
                z, t = _post(F.linear(head[0][s:e], *head[1:]), softcap, scale, temperature)
                logp = z.sub_(lse[s:e, None])
                p = logp.exp() if use_entropy else logp.exp_()
            if use_entropy:
                g = (p * (logp + entropy[s:e, None])).mul_(-grad_entropy[s:e, None])
                g.sub_(p * g_lp[s:e, None])
            else:
                g = p.mul_(-g_lp[s:e, None]) if not kept else p * (-g_lp[s:e, None])
            g.scatter_add_(-1, targets[s:e].clamp(min=0)[:, None], g_lp[s:e, None])
            grads.add(s, e, _grad_raw(g, t, scale, temperature))
        return (*grads.scaled(None), None, None, None, None, None, None, None)


def _as_forward_ran(autocast, hidden, weight, bias):
    """(hidden, weight, bias) in the dtype the forward's autocast ran the head in (as autocast casts a
    linear's inputs), cast once for every chunk the backward recomputes: an autocast region per chunk
    would cast the (V, H) weight again for each chunk, its cast cache lasting one region."""
    _, dtype, enabled = autocast
    if not enabled:
        return hidden, weight, bias
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


class _TokenGrads:
    """A frozen head (LoRA, or a frozen lm_head): d/dh_t of any loss is local to position t,
    g_t a_t + g^H_t b_t with a_t = (onehot_t - p_t) W and b_t = -(p_t (log p_t + H_t)) W (through
    the temperature and soft-cap), so the forward forms a_t (and b_t) and the backward only weighs
    them: exact for any weights, no recompute, two head matmuls as on the plain path."""

    def __init__(self, hidden, with_entropy: bool):
        self.a = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        self.b = torch.zeros_like(self.a) if with_entropy else None

    def add(self, s, e, logp, entropy, valid, safe, chain, weight) -> None:
        """From one chunk's log p (n, V): its rows of a (and b)."""
        p = logp.exp()
        with torch.autocast(p.device.type, enabled=False):
            if self.b is not None:
                self.b[s:e] = chain(-(p * (logp + entropy[:, None]))).to(weight.dtype) @ weight
            g = p.neg_().mul_(valid[:, None])
            g.scatter_add_(-1, safe[:, None], valid[:, None].to(g.dtype))
            self.a[s:e] = chain(g).to(weight.dtype) @ weight

    def grad(self, g_lp, g_entropy):
        out = self.a * g_lp[:, None]
        return out if g_entropy is None else out + self.b * g_entropy[:, None]


class _Grads:
    """Gradients of hidden, weight and bias accumulated chunk by chunk from d/d(raw head output)."""

    def __init__(self, hidden, weight, bias, needs):
        self.hidden, self.weight, self.bias = hidden, weight, bias
        need_h, need_w, need_b = needs
        self.h = torch.zeros_like(hidden) if need_h else None
        self.w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        self.b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None

    def add(self, s: int, e: int, g: torch.Tensor) -> None:
        with torch.autocast(g.device.type, enabled=False):  # as a backward runs: in the tensors' own dtypes
            if self.h is not None:
                self.h[s:e] = g.to(self.weight.dtype) @ self.weight
            if self.w is not None:
                self.w.addmm_(g.t(), self.hidden[s:e].float())
            if self.b is not None:
                self.b += g.sum(0)

    def scaled(self, factor):
        """(grad hidden, grad weight, grad bias) in their tensors' dtypes, times `factor` (None: 1)."""
        out = []
        for grad, like in ((self.h, self.hidden), (self.w, self.weight), (self.b, self.bias)):
            if grad is not None:
                grad = (grad.mul_(factor) if factor is not None else grad).to(like.dtype)
            out.append(grad)
        return out


def _uniform_weight(g_lp: torch.Tensor, valid: torch.Tensor):
    """The loss's common weight of every scored log-prob, or None where they differ."""
    scored = g_lp[valid]
    if scored.numel() == 0:
        return g_lp.new_zeros(())
    return scored[0] if bool((scored == scored[0]).all()) else None


def _grad_raw(g, t, scale, temperature):
    """Chain the logits' gradient back through 1/temperature, the soft-cap and the scale."""
    if temperature != 1.0:
        g = g / temperature
    if t is not None:
        g = g * (1 - t * t)
    if scale != 1.0:
        g = g * scale
    return g


PLAIN = OutputHead(weight=None)
"""The head of the plain path: its inputs are the model's logits."""


# ---------------------------------------------------------------------------
# the model's forward up to its last hidden states
# ---------------------------------------------------------------------------
def forward_hidden(model, **inputs) -> tuple[torch.Tensor, OutputHead]:
    """model(**inputs) -> (last hidden states (B, T, H), its OutputHead), no logits computed.

    `model` may be wrapped (DDP, accelerate, PEFT): the forward goes through the wrapper.
    Where the head cannot be reproduced (see the module doc) or `model.chunked_logprobs`
    is off: (the model's logits (B, T, V), a plain OutputHead), the same calls after it.
    """
    lm = unwrap(model)
    head = output_head(lm)
    ids = inputs.get("input_ids")
    # auto with logits no larger than one chunk (the tiny models): chunking saves nothing, the model's own logits
    if head.plain or (ids is not None and chunk_positions(getattr(lm, "align_chunked_logprobs", "auto"),
                                                          ids.numel(), head.weight.shape[0]) is None):
        return model(**inputs).logits, PLAIN
    return _hidden_through(model, lm.get_output_embeddings(), **inputs), head


def _hooked(layer) -> bool:
    """A hook on the output layer (a user's logit processor) sees the logits only on the plain path."""
    return layer is not None and bool(layer._forward_hooks or layer._forward_pre_hooks)


def _hidden_through(model, layer, **inputs) -> torch.Tensor:
    """Run model(**inputs) with `layer` (its lm_head) returning a 1-wide slice of its input; -> that input."""
    box = []

    def capture(hidden):
        box.append(hidden)
        return hidden[..., :1]  # what the model does after its head (soft-cap, .float()) then costs nothing

    layer.forward = capture  # the instance attribute shadows nn.Linear.forward, for this call only
    try:
        model(**inputs)
    finally:
        del layer.forward
    return box[-1]


def configure(lm, *, chunked: bool | str = "auto", chunk_tokens: int | None = None) -> None:
    """Choose the chunked (True), the plain (False) or the size-dependent ("auto") path for a causal LM (the
    loader does it from `model.chunked_logprobs`)."""
    lm = unwrap(lm)
    lm.align_chunked_logprobs, lm.align_logprob_chunk_tokens = chunked, chunk_tokens
    lm.__dict__.pop("_align_output_head", None)


def output_head(lm) -> OutputHead:
    """The OutputHead of a causal LM (unwrapped), decided once per model and kept on it (hooks: every call)."""
    if _hooked(lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None):
        return PLAIN
    cached = lm.__dict__.get("_align_output_head")
    if cached is not None:
        return cached
    head = _plain_head(lm) or _checked_head(lm)
    lm.__dict__["_align_output_head"] = head
    return head


def _plain_head(lm) -> OutputHead | None:
    """The plain OutputHead where the chunked one is off or impossible (with one warning), else None."""
    if getattr(lm, "align_chunked_logprobs", "auto") is False:
        return PLAIN
    layer = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    why = None
    if type(layer) is not torch.nn.Linear:
        why = f"its output layer is a {type(layer).__name__}, not a plain Linear (a LoRA or other wrapper on lm_head)"
    elif hasattr(layer.weight, "ds_id"):
        why = "DeepSpeed ZeRO-3 partitions its output layer"
    if why is None:
        return None
    warnings.warn(f"log-probs from the full logits (the plain path): {why}", stacklevel=3)
    return PLAIN


def _checked_head(lm) -> OutputHead:
    """The chunked head, if it reproduces the model's logits on a 2-token input; else plain, with a warning."""
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    layer = lm.get_output_embeddings()
    scale = float(getattr(config, "logit_scale", None) or 1.0)  # Cohere multiplies
    if getattr(config, "logits_scaling", None):  # Granite divides
        scale /= float(config.logits_scaling)
    head = OutputHead(weight=layer.weight, bias=layer.bias, softcap=getattr(config, "final_logit_softcapping", None),
                      scale=scale, chunk_tokens=getattr(lm, "align_logprob_chunk_tokens", None)
                      or default_chunk_tokens(layer.weight.shape[0]))
    ids = torch.tensor([[0, 1]], device=layer.weight.device)
    modes = [(m, m.training) for m in lm.modules()]
    lm.eval()  # dropout off for the comparison; every module's mode restored after
    try:
        with torch.no_grad():
            expected = lm(input_ids=ids, use_cache=False).logits.float()
            got = head.logits(_hidden_through(lm, layer, input_ids=ids, use_cache=False))
        tolerance = 1e-3 * max(1.0, expected.abs().max().item())
        if got.shape == expected.shape and (got - expected).abs().max().item() <= tolerance:
            return head
    except Exception:  # noqa: BLE001  (any failure to reproduce the head means the plain path)
        pass
    finally:
        for m, training in modes:
            m.training = training
    warnings.warn("log-probs from the full logits (the plain path): this model's logits are not its output layer "
                  "applied to its last hidden states (an unknown post-processing)", stacklevel=3)
    return PLAIN


def unwrap(model):
    """The causal LM inside DDP / accelerate / DeepSpeed wrappers (PEFT models answer for their base)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model
