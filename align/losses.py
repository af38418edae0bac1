"""Pure loss functions: tensors in, tensors out. This module imports only torch.

No function here sees a model, a batch dict or a config object. Hyperparameters are
keyword arguments. The classic-RL algorithms in `align.rl` and the LLM stages call
the same functions (GAE, the clipped surrogate, the clipped value loss), so the math
checked on CartPole is the math that trains the LLM.

Shape letters used throughout: B batch (sequences or environments), T time steps or
tokens, G group size (GRPO), V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------
# masked reductions
# ---------------------------------------------------------------------------
def masked_sum(x: torch.Tensor, mask: torch.Tensor | None, dim=None) -> torch.Tensor:
    if mask is None:
        return x.sum() if dim is None else x.sum(dim)
    x = x * mask
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None, dim=None) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is 1 (all positions when mask is None)."""
    if mask is None:
        return x.mean() if dim is None else x.mean(dim)
    mask = mask.to(x.dtype)
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1.0)


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, *, shift_mean: bool = True,
           eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries; with `shift_mean=False` the mean is kept.

    A separate step from GAE on purpose: callers choose whether to whiten advantages
    (per batch, per minibatch, or not at all).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out if mask is None else out * mask.to(x.dtype)


# ---------------------------------------------------------------------------
# token log-probabilities and NLL
# ---------------------------------------------------------------------------
def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels) under `logits`: (B, T, V), (B, T) -> (B, T).

    Labels equal to -100 (ignored) give 0. Positions are aligned as given: shift
    before calling (logits[:, :-1] predict labels[:, 1:]).
    """
    safe = labels.clamp(min=0)
    logps = torch.gather(logits.float().log_softmax(-1), -1, safe.unsqueeze(-1)).squeeze(-1)
    return logps * (labels != -100)


def nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood over labels != -100 (already shifted).

    The sum, not the mean: the engine divides by the global count of trainable tokens
    so that a batch gives the same gradient however it is split (see `align.engine`).
    """
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=-100,
                           reduction="sum")


# ---------------------------------------------------------------------------
# advantages and returns
# ---------------------------------------------------------------------------
def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, *, gamma: float, lam: float,
                   dones: torch.Tensor | None = None,
                   next_value: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016), time on the last axis.

    rewards, values: (..., T). values[..., t] is V(s_t).
    dones: (..., T), 1 where the episode ends after step t (no bootstrapping from
        s_{t+1}); None means no step ends an episode inside the window.
    next_value: (...,) V(s_T), the bootstrap value after the last step (0 when None).

        delta_t = r_t + gamma * V(s_{t+1}) * (1 - done_t) - V(s_t)
        A_t     = delta_t + gamma * lam * (1 - done_t) * A_{t+1}

    Returns (advantages, returns) with returns = advantages + values. Whitening is a
    separate step (`whiten`). For LLM PPO, T is the response tokens and `dones` marks
    the last real token, so padding after it never leaks into the advantages.

    Worked example (gamma = lam = 1, no dones): rewards [0, 0, 1], values [0.5, 0.5, 0.5],
    next_value 0 -> deltas [0, 0, 0.5], advantages [0.5, 0.5, 0.5], returns [1, 1, 1].
    """
    T = rewards.shape[-1]
    if next_value is None:
        next_value = torch.zeros_like(values[..., 0])
    not_done = torch.ones_like(rewards) if dones is None else 1.0 - dones.to(rewards.dtype)
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(values[..., 0])
    for t in reversed(range(T)):
        following = values[..., t + 1] if t + 1 < T else next_value
        delta = rewards[..., t] + gamma * following * not_done[..., t] - values[..., t]
        running = delta + gamma * lam * not_done[..., t] * running
        advantages[..., t] = running
    return advantages, advantages + values


def discounted_returns(rewards: torch.Tensor, *, gamma: float, dones: torch.Tensor | None = None) -> torch.Tensor:
    """Monte Carlo returns G_t = r_t + gamma * G_{t+1} (reset after dones), time last.

    Worked example: rewards [1, 1, 1], gamma 0.5 -> [1.75, 1.5, 1.0].
    """
    advantages, returns = gae_advantages(rewards, torch.zeros_like(rewards), gamma=gamma, lam=1.0, dones=dones)
    return returns


# ---------------------------------------------------------------------------
# PPO
# ---------------------------------------------------------------------------
def ppo_clip_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, *,
                  clip_eps: float = 0.2, clip_eps_high: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017), per element, unreduced.

        ratio = exp(logprobs - old_logprobs)
        loss  = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)

    `clip_eps_high` (DAPO's clip-higher) defaults to `clip_eps`. Returns
    (losses, clipped) where `clipped` is 1.0 where the clipped term was chosen. The
    caller aggregates (mean over actions, or a token aggregation for LLMs).
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high)
    losses = torch.maximum(unclipped, clipped)
    return losses, (clipped > unclipped).to(losses.dtype)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, *,
                       clip_eps: float | None = 0.2) -> torch.Tensor:
    """0.5 * max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2), per element.

    With clip_eps None it is the plain 0.5 * (V - R)^2.
    """
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        return 0.5 * unclipped
    v_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    return 0.5 * torch.maximum(unclipped, (v_clipped - returns) ** 2)


def approx_kl(logprobs: torch.Tensor, old_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's low-variance KL(old || new) estimate per element: (r - 1) - log r.

    See http://joschu.net/blog/kl-approx.html.
    """
    log_ratio = logprobs - old_logprobs
    return torch.expm1(log_ratio) - log_ratio


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, *, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy.

    k1: log p - log q (unbiased, can be negative)
    k2: 0.5 * (log p - log q)^2
    k3: (q/p - 1) - log(q/p) (unbiased, non-negative; GRPO's choice)
    """
    try:
        return _KL_ESTIMATORS[estimator](logprobs - ref_logprobs)
    except KeyError:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {sorted(_KL_ESTIMATORS)}") from None


_KL_ESTIMATORS = {
    "k1": lambda log_ratio: log_ratio,
    "k2": lambda log_ratio: 0.5 * log_ratio**2,
    "k3": lambda log_ratio: torch.expm1(-log_ratio) + log_ratio,
}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution over the last axis: (..., V) -> (...)."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def explained_variance(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """1 - Var[target - predicted] / Var[target]; nan when the target is constant."""
    var_target = masked_mean((target - masked_mean(target, mask)) ** 2, mask)
    resid = target - predicted
    var_resid = masked_mean((resid - masked_mean(resid, mask)) ** 2, mask)
    return float("nan") if var_target.item() == 0 else float(1.0 - var_resid / var_target)
