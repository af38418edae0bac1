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


def masked_moments(x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, variance) of the masked entries of `x` (population variance)."""
    mean = masked_mean(x, mask)
    return mean, masked_mean((x - mean) ** 2, mask)


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, *, shift_mean: bool = True, eps: float = 1e-8,
           moments=masked_moments) -> torch.Tensor:
    """(x - mean) / std over the masked entries; with `shift_mean=False` the mean is kept.

    A separate step from GAE on purpose: callers choose whether to whiten advantages
    (per batch, per minibatch, or not at all). `moments(x, mask) -> (mean, var)` gives the
    statistics: of `x` itself by default, or of every process's batch (LLM PPO passes one
    that all-reduces, so the update does not depend on how the batch is split).
    """
    mean, var = moments(x, mask)
    out = (x - mean) * torch.rsqrt(torch.as_tensor(var + eps, dtype=x.dtype))
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


def explained_variance(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, *,
                       moments=masked_moments) -> float:
    """1 - Var[target - predicted] / Var[target]; nan when the target is constant (`moments` as in `whiten`)."""
    var_target = float(moments(target, mask)[1])
    var_resid = float(moments(target - predicted, mask)[1])
    return float("nan") if var_target == 0 else 1.0 - var_resid / var_target


# ---------------------------------------------------------------------------
# reward model
# ---------------------------------------------------------------------------
def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: torch.Tensor | None = None, *, center_coefficient: float | None = None,
                       reduction: str = "mean") -> torch.Tensor:
    """Bradley–Terry pairwise loss of a reward model, per pair (B,) reduced by `reduction`.

        loss_i = -log σ(r_chosen_i - r_rejected_i - margin_i) + c · (r_chosen_i + r_rejected_i)²

    Bradley & Terry (1952); as a reward-model loss, Ouyang et al. 2022 (InstructGPT, eq. 1).
    `margin` (Llama 2, Touvron et al. 2023, eq. 2) asks the chosen reward to win by at least
    that much. `center_coefficient` c (Eisenstein et al. 2023, "Helping or herding?", eq. 2)
    pulls the rewards towards mean zero. With reduction="mean" this is exactly TRL
    RewardTrainer's loss (-mean log σ(...) + c · mean((r_c + r_r)²)); "sum" serves the engine,
    which normalises by the number of pairs in the global batch; "none" returns (B,).
    """
    delta = chosen_rewards - rejected_rewards
    if margin is not None:
        delta = delta - margin
    losses = -F.logsigmoid(delta)
    if center_coefficient is not None:
        losses = losses + center_coefficient * (chosen_rewards + rejected_rewards) ** 2
    try:
        return _REDUCTIONS[reduction](losses)
    except KeyError:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {sorted(_REDUCTIONS)}") from None


_REDUCTIONS = {"mean": torch.mean, "sum": torch.sum, "none": lambda x: x}


# ---------------------------------------------------------------------------
# offline preference optimisation: DPO family, SimPO, ORPO
# ---------------------------------------------------------------------------
def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs and completion token counts: (B, T, V), (B, T) -> (B,), (B,).

    `labels` are aligned with the inputs (not shifted; -100 where not scored): position
    t's logits score labels[t + 1]. Divide the sum by the count for the length-averaged
    log-prob SimPO and ORPO use.
    """
    targets = labels[:, 1:]
    return token_logprobs(logits[:, :-1], targets).sum(-1), (targets != -100).sum(-1)


def _dpo_sigmoid(chosen_ratios, rejected_ratios, *, beta, label_smoothing, chosen_lengths, rejected_lengths):
    # label_smoothing > 0: conservative DPO (Mitchell 2023), a mixture with the flipped label
    logits = beta * (chosen_ratios - rejected_ratios)
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def _dpo_hinge(chosen_ratios, rejected_ratios, *, beta, label_smoothing, chosen_lengths, rejected_lengths):
    return torch.relu(1 - beta * (chosen_ratios - rejected_ratios))


def _dpo_ipo(chosen_ratios, rejected_ratios, *, beta, label_smoothing, chosen_lengths, rejected_lengths):
    if chosen_lengths is None or rejected_lengths is None:
        raise ValueError("loss_type='ipo' needs chosen_lengths and rejected_lengths (completion token counts)")
    delta = chosen_ratios / chosen_lengths.clamp(min=1) - rejected_ratios / rejected_lengths.clamp(min=1)
    return (delta - 1 / (2 * beta)) ** 2


def _dpo_robust(chosen_ratios, rejected_ratios, *, beta, label_smoothing, chosen_lengths, rejected_lengths):
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"loss_type='robust' needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    logits = beta * (chosen_ratios - rejected_ratios)
    clean = -(1 - label_smoothing) * F.logsigmoid(logits)
    flipped = -label_smoothing * F.logsigmoid(-logits)
    return (clean - flipped) / (1 - 2 * label_smoothing)


DPO_LOSSES = {
    "sigmoid": _dpo_sigmoid,  # Rafailov et al. 2023, eq. 7
    "hinge": _dpo_hinge,  # SLiC (Zhao et al. 2023) on the DPO log-ratios
    "ipo": _dpo_ipo,  # Azar et al. 2023, eq. 17, on per-token log-ratios as TRL does
    "robust": _dpo_robust,  # Chowdhury et al. 2024, unbiased under label flips with rate label_smoothing
}
"""loss_type -> per-pair loss of the policy/reference log-ratios. Each takes the same keywords."""


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, *, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct preference optimisation and its variants, per pair: all inputs (B,) -> three (B,) tensors.

    Log-probs are SUMMED over the completion tokens (TRL's convention). With the
    log-ratios rho_c = logp_c - ref_c and rho_r = logp_r - ref_r:

        sigmoid: -log sigma(beta (rho_c - rho_r))          [label_smoothing e > 0: conservative DPO,
                                                            -(1-e) log sigma(x) - e log sigma(-x)]
        hinge:   max(0, 1 - beta (rho_c - rho_r))
        ipo:     (rho_c / n_c - rho_r / n_r - 1 / (2 beta))^2   (n: completion token counts)
        robust:  ((1-e)(-log sigma(x)) - e(-log sigma(-x))) / (1 - 2e),  x = beta (rho_c - rho_r)

    Returns (losses, chosen_rewards, rejected_rewards); the rewards are the implicit
    rewards beta * rho, detached. `losses.mean()` equals TRL 1.16 `DPOTrainer`'s loss for
    the same `loss_type` (which no longer applies label_smoothing to sigmoid: parity
    holds at 0). Worked example: beta 0.1, rho_c = 2, rho_r = -3 (sigmoid) ->
    -log sigma(0.5) = 0.4741.
    """
    try:
        variant = DPO_LOSSES[loss_type]
    except KeyError:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {sorted(DPO_LOSSES)}") from None
    chosen_ratios = chosen_logps - ref_chosen_logps
    rejected_ratios = rejected_logps - ref_rejected_logps
    losses = variant(chosen_ratios, rejected_ratios, beta=beta, label_smoothing=label_smoothing,
                     chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    return losses, beta * chosen_ratios.detach(), beta * rejected_ratios.detach()


def simpo_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, *, beta: float = 2.0,
               gamma: float = 0.5, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al. 2024, eq. 6), reference-free, per pair: (B,), (B,) -> three (B,) tensors.

        x = beta * (avg_logp_c - avg_logp_r) - gamma
        loss = -(1 - e) log sigma(x) - e log sigma(-x)      (e = label_smoothing, 0 in the paper)

    on LENGTH-AVERAGED completion log-probs; gamma is the target reward margin (TRL's
    `simpo_gamma`). Rewards are beta * avg_logp. Equals TRL's CPO with loss_type="simpo"
    and cpo_alpha=0. Worked example: beta 2, gamma 0.5, avg_c = -0.5, avg_r = -1.5 ->
    -log sigma(1.5) = 0.2014.
    """
    x = beta * (chosen_avg_logps - rejected_avg_logps) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(x) - label_smoothing * F.logsigmoid(-x)
    return losses, beta * chosen_avg_logps.detach(), beta * rejected_avg_logps.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (Maechler 2012: switch at -log 2)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, chosen_nll: torch.Tensor, *,
              lam: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO (Hong et al. 2024, eqs. 4-7), reference-free, per pair: three (B,) -> three (B,) tensors.

        log_odds(y) = avg_logp(y) - log(1 - exp(avg_logp(y)))
        loss = chosen_nll - lam * log sigma(log_odds(y_c) - log_odds(y_r))

    on LENGTH-AVERAGED completion log-probs. `chosen_nll` is the caller's NLL of the
    chosen answer (a token mean per pair); TRL's ORPOTrainer takes one token mean over
    prompt + chosen of the whole batch, which is what `chosen_nll` equal to that scalar
    reproduces (lam is TRL's `beta`). Rewards are lam * avg_logp (TRL's logging).
    """
    chosen_avg_logps, rejected_avg_logps = chosen_avg_logps.float(), rejected_avg_logps.float()
    log_odds = (chosen_avg_logps - rejected_avg_logps) - (log1mexp(chosen_avg_logps) - log1mexp(rejected_avg_logps))
    losses = chosen_nll - lam * F.logsigmoid(log_odds)
    return losses, lam * chosen_avg_logps.detach(), lam * rejected_avg_logps.detach()


# ---------------------------------------------------------------------------
# KTO: unpaired desirable / undesirable completions
# ---------------------------------------------------------------------------
def kto_reference_point(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, *, reduce=None) -> torch.Tensor:
    """KTO's reference point z_0 (Ethayarajh et al. 2024, eq. 6 and sec. 4.1), a detached scalar.

        z_0 = max(0, mean_j [log pi(y'_j | x_j) - log pi_ref(y'_j | x_j)])

    over MISMATCHED pairs (x_j, y'_j): a prompt with another example's completion, so y' is a
    sample of the completions' marginal and the mean estimates KL(pi(y|x) || pi_ref(y|x)) up to
    the shift the paper accepts. Summed completion log-probs (B,), (B,). `reduce` maps the
    statistics tensor [sum, count] to the global one (an all-reduce over processes, a sum over
    micro-batches): the estimate then covers the whole step's batch however it is split. No
    gradient flows through z_0 (TRL 1.16 `KTOTrainer`: `.detach()` and `clamp(min=0)` after the
    mean over processes).

    >>> kto_reference_point(torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -5.5])).item()
    0.75
    >>> kto_reference_point(torch.tensor([-3.0]), torch.tensor([-2.0])).item()  # clamped at 0
    0.0
    """
    ratios = (kl_logps - ref_kl_logps).detach().float()
    stats = torch.stack([ratios.sum(), ratios.new_tensor(float(ratios.numel()))])
    if reduce is not None:
        stats = reduce(stats)
    return (stats[0] / stats[1].clamp(min=1.0)).clamp(min=0.0)


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, reference_point: torch.Tensor, *,
             beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024, eq. 7) per example: (B,) summed log-probs, (B,) bool -> (losses, rewards).

    With rho = logp - ref_logp (SUMMED over the completion tokens, TRL's convention) and z_0 the
    detached reference point (`kto_reference_point`):

        desirable:    lambda_D * (1 - sigma(beta * (rho - z_0)))
        undesirable:  lambda_U * (1 - sigma(beta * (z_0 - rho)))

    lambda_D / lambda_U are TRL's `desirable_weight` / `undesirable_weight` (the paper's eq. 8
    asks lambda_D n_D / (lambda_U n_U) in [1, 4/3] when the labels are imbalanced). The paper
    writes the loss as lambda_y - v(x, y); the constant lambda_y is dropped, as TRL does. Rewards
    are beta * rho, detached. `losses.mean()` over a batch equals TRL 1.16 `KTOTrainer`'s
    `loss_type="kto"` loss for the same z_0.

    Worked example: beta 0.1, rho = 2, z_0 = 1, desirable -> 1 - sigma(0.1) = 0.4750:

    >>> losses, _ = kto_loss(torch.tensor([-3.0, -3.0]), torch.tensor([-5.0, -5.0]), torch.tensor([True, False]),
    ...                      torch.tensor(1.0))
    >>> [round(x, 4) for x in losses.tolist()]
    [0.475, 0.525]
    """
    rho = logps - ref_logps
    z = torch.as_tensor(reference_point, dtype=rho.dtype, device=rho.device).detach()
    desirable = desirable.to(torch.bool)
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (rho - z))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z - rho))))
    return losses, beta * rho.detach()


# ---------------------------------------------------------------------------
# GRPO: group-relative advantages and token aggregation
# ---------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, group_size: int, *, scale_rewards: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantages (Shao et al. 2024, DeepSeekMath, sec. 4.1.2): (B,) -> (B,), B = groups x G.

    Rows of one prompt are contiguous: rows [g*G, (g+1)*G) are group g. Each reward minus
    its group's mean, divided by

        "group": the group's std (unbiased, + eps): TRL's default and the paper's
        "batch": the std of all B rewards (unbiased, + eps) (Liu et al. 2025's fix for the
                 difficulty bias of per-group scaling, kept as TRL's `scale_rewards="batch"`)
        "none":  nothing (Dr. GRPO, Liu et al. 2025)

    A group whose rewards are all equal gets advantage 0 everywhere: it contributes no
    policy gradient (`zero_std_groups` counts them).

    Worked example (G = 2): rewards [1, 0, 1, 1] -> group means [0.5, 1], group stds
    [0.7071, 0] -> "group": [0.7070, -0.7070, 0, 0]; "none": [0.5, -0.5, 0, 0].
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"group_advantages: rewards must be (groups x group_size,), got {tuple(rewards.shape)} "
                         f"with group_size {group_size}")
    grouped = rewards.view(-1, group_size)  # (groups, G)
    centred = (grouped - grouped.mean(-1, keepdim=True)).view(-1)  # (B,)
    try:
        scale = _REWARD_SCALES[scale_rewards]
    except KeyError:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}; expected one of {sorted(_REWARD_SCALES)}") from None
    return centred / (scale(rewards, grouped) + eps) if scale is not None else centred


_REWARD_SCALES = {
    "group": lambda rewards, grouped: grouped.std(-1, keepdim=True).expand_as(grouped).reshape(-1),
    "batch": lambda rewards, grouped: rewards.std() if rewards.numel() > 1 else rewards.new_zeros(()),
    "none": None,
}


def rloo_advantages(rewards: torch.Tensor, group_size: int, *, scale_rewards: str = "none",
                    eps: float = 1e-4) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024, eq. 6): (B,) -> (B,), B = groups x G.

    Rows of one prompt are contiguous, as in `group_advantages`. Each completion's baseline
    is the mean reward of the OTHER G - 1 completions of its group:

        A_i = r_i - (sum_{j in group} r_j - r_i) / (G - 1)  =  G / (G - 1) * (r_i - mean_group(r))

    scale_rewards "none" (TRL's default `normalize_advantages=False`) returns that; "batch"
    (TRL's `normalize_advantages=True`) then whitens over all B rows: (A - mean A) / (unbiased
    std A + eps). A group's advantages sum to zero, so the batch mean is 0 up to rounding.
    Equals TRL 1.16 `RLOOTrainer`'s advantages (no reward KL: TRL puts RLOO's KL into the
    reward, align's GRPO stage keeps it in the loss).

    Worked example (G = 3): baselines [0, 0.5, 0.5]:

    >>> rloo_advantages(torch.tensor([1.0, 0.0, 0.0]), 3).tolist()
    [1.0, -0.5, -0.5]
    """
    if rewards.dim() != 1 or rewards.numel() % group_size or group_size < 2:
        raise ValueError(f"rloo_advantages: rewards must be (groups x group_size,) with group_size >= 2, got "
                         f"{tuple(rewards.shape)} with group_size {group_size}")
    grouped = rewards.view(-1, group_size)  # (groups, G)
    baseline = (grouped.sum(-1, keepdim=True) - grouped) / (group_size - 1)  # (groups, G)
    advantages = (grouped - baseline).view(-1)  # (B,)
    if scale_rewards == "none":
        return advantages
    if scale_rewards == "batch":
        std = advantages.std() if advantages.numel() > 1 else advantages.new_zeros(())
        return (advantages - advantages.mean()) / (std + eps)
    raise ValueError(f"rloo_advantages: scale_rewards {scale_rewards!r}; expected 'none' or 'batch' (the "
                     f"leave-one-out baseline is not scaled per group)")


def reinforce_pp_advantages(rewards: torch.Tensor, lengths: torch.Tensor | None = None, *,
                            eps: float = 1e-8) -> torch.Tensor:
    """REINFORCE++ advantages (Hu 2025, eq. 10): no baseline, one normalisation over the GLOBAL batch.

    rewards: (B,) sequence rewards of EVERY process's rollouts (gather first); lengths: (B,)
    completion token counts (None: 1 each). REINFORCE++ gives each token t the return
    G_t = r - beta * sum_{s >= t} KL_s (gamma = 1) and normalises those token advantages over
    the batch. In align the KL stays in the loss (as GRPO's), so every token of completion i
    has the return r_i, and the token-level statistics over the batch are length-weighted:

        mu     = sum_i n_i r_i / sum_i n_i
        var    = sum_i n_i (r_i - mu)^2 / sum_i n_i          (population variance)
        A_i    = (r_i - mu) / sqrt(max(var, eps))

    which is OpenRLHF's `advantage_estimator=reinforce` normalisation (masked token mean and
    variance over all action tokens, rsqrt(var.clamp(min=1e-8))) for these returns. All rewards
    equal: var = 0 and every advantage is 0 (no signal), as in GRPO.

    Worked example: rewards [1, 0, 0, 1], lengths [2, 1, 1, 4] -> mu = 6/8 = 0.75,
    var = (2 x 0.0625 + 2 x 0.5625 + 4 x 0.0625) / 8 = 0.1875, sqrt 0.4330:

    >>> [round(a, 4) for a in reinforce_pp_advantages(torch.tensor([1.0, 0, 0, 1]), torch.tensor([2, 1, 1, 4])).tolist()]
    [0.5774, -1.7321, -1.7321, 0.5774]
    """
    weights = torch.ones_like(rewards) if lengths is None else lengths.to(rewards.dtype)
    total = weights.sum().clamp(min=1.0)
    mean = (weights * rewards).sum() / total
    var = (weights * (rewards - mean) ** 2).sum() / total
    return (rewards - mean) * var.clamp(min=eps).rsqrt()


ADVANTAGE_ESTIMATORS = {
    # r - group mean, scaled by scale_rewards (default "group": the group's std): Shao et al. 2024
    "grpo": lambda rewards, G, lengths, scale: group_advantages(rewards, G, scale_rewards=scale or "group"),
    # r - mean of the other G - 1 of the group (Ahmadian et al. 2024); "batch" whitens (TRL's normalize_advantages)
    "rloo": lambda rewards, G, lengths, scale: rloo_advantages(rewards, G, scale_rewards=scale or "none"),
    # no baseline, token-weighted whitening over the global batch (Hu 2025; OpenRLHF's reinforce)
    "reinforce_pp": lambda rewards, G, lengths, scale: reinforce_pp_advantages(rewards, lengths),
}
"""grpo.advantage_estimator -> f(rewards (B,), group_size, lengths (B,), scale_rewards or None) -> (B,).

Each takes the GLOBAL batch (every process's rows, groups contiguous); the GRPO stage gathers
rewards and completion lengths first, then keeps its own rows.
"""


def zero_std_groups(rewards: torch.Tensor, group_size: int) -> int:
    """Number of groups whose rewards are all equal (no learning signal): (B,) -> int."""
    grouped = rewards.view(-1, group_size)
    return int((grouped.max(-1).values == grouped.min(-1).values).sum())


def sequence_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """GSPO's sequence-level log importance weight, on every token: (B, T), (B, T) -> (B, T).

        log s_i = mean_{t in y_i} (log pi(y_i,t) - log pi_old(y_i,t)),   s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|)

    (Zheng et al. 2025, eq. 7). Broadcast to every token of the sequence, as TRL 1.16 does
    (it keeps a (B, 1) tensor): the per-token loss then has the same value on each token, and
    its gradient reaches token t as s_i * A_i * grad log pi_t / |y_i| — what GSPO-token's
    sg[s_i] * pi_t / sg[pi_t] gives under the per-sequence token mean, so no explicit
    stop-gradient is needed (checked in tests/test_grpo_losses.py).

    Worked example (the third token is padding):

    >>> sequence_log_ratio(torch.tensor([[0.3, -0.1, 9.0]]), torch.tensor([[1, 1, 0]])).tolist()
    [[0.10000000894069672, 0.10000000894069672, 0.10000000894069672]]
    """
    if mask is None:
        raise ValueError("importance_sampling_level='sequence' needs the completion mask")
    mask = mask.to(log_ratio.dtype)
    per_sequence = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)  # (B, 1)
    return per_sequence.expand_as(log_ratio)


IMPORTANCE_SAMPLING_LEVELS = {
    "token": lambda log_ratio, mask: log_ratio,  # PPO / GRPO: one ratio per token
    "sequence": sequence_log_ratio,  # GSPO (Zheng et al. 2025): one length-normalised ratio per sequence
}
"""importance_sampling_level -> f(log_ratio (B, T), mask (B, T)) -> log importance weight (B, T) (TRL's names)."""


def grpo_token_losses(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, *,
                      clip_eps: float = 0.2, clip_eps_high: float | None = None, beta: float = 0.0,
                      ref_logprobs: torch.Tensor | None = None, kl_ratio_correction: bool = False,
                      importance_sampling_level: str = "token",
                      mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GRPO's per-token loss: clipped surrogate with the sequence's advantage + beta * k3 KL.

    logprobs, old_logprobs, ref_logprobs, mask: (B, T); advantages: (B,) (one per sequence).
    Returns (losses (B, T), clipped (B, T), kl (B, T) or None). The surrogate is
    `ppo_clip_loss` (separate low/high epsilon: DAPO's clip-higher) on the importance weight
    of `importance_sampling_level` (`IMPORTANCE_SAMPLING_LEVELS`): "token", each token's
    ratio exp(logprobs - old_logprobs); "sequence", GSPO's exp(mean_t log-ratio) of the whole
    completion, clipped once per sequence (`sequence_log_ratio`; needs `mask`). The KL is
    `kl_penalty(..., estimator="k3")` to the reference, added per token inside the
    aggregation as DeepSeekMath's eq. 3 and TRL do. `kl_ratio_correction` multiplies the
    KL term by the importance weight (DeepSeek-V3.2: its gradient is then the unbiased
    gradient of the reverse KL; TRL 1.16's default `use_bias_correction_kl=True`, which uses
    the sequence weight under "sequence" too); False is DeepSeekMath's plain k3. The returned
    `kl` is the uncorrected k3 (what TRL logs).
    """
    try:
        level = IMPORTANCE_SAMPLING_LEVELS[importance_sampling_level]
    except KeyError:
        raise ValueError(f"unknown importance_sampling_level {importance_sampling_level!r}; expected one of "
                         f"{sorted(IMPORTANCE_SAMPLING_LEVELS)}") from None
    log_weight = level(logprobs - old_logprobs, mask)  # (B, T)
    losses, clipped = ppo_clip_loss(log_weight, torch.zeros_like(log_weight), advantages[:, None],
                                    clip_eps=clip_eps, clip_eps_high=clip_eps_high)
    kl = None
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("grpo_token_losses: beta > 0 needs ref_logprobs")
        kl = kl_penalty(logprobs, ref_logprobs, estimator="k3")
        weight = torch.exp(log_weight) if kl_ratio_correction else 1.0
        losses = losses + beta * weight * kl
    return losses, clipped, kl


def truncated_importance_weights(logprobs: torch.Tensor, sampling_logprobs: torch.Tensor, *,
                                 cap: float) -> torch.Tensor:
    """Truncated importance sampling (TIS) weights of tokens sampled by another engine: (B, T) -> (B, T).

        w_t = min(exp(log pi_trainer(y_t) - log pi_sampler(y_t)), C)

    The sampler (vLLM) and the trainer compute the same policy with different kernels, so the
    tokens come from pi_sampler while the loss is taken under pi_trainer; multiplying each token's
    loss by w_t corrects for that mismatch, and truncating at C bounds the variance (Yao et al.
    2025; TRL's `vllm_importance_sampling_correction`, mode token_truncate, C its clip_max). Both
    inputs are log-probs of the same tokens; the weight carries no gradient (detach the trainer's
    log-probs before calling, or pass the old ones).

    >>> truncated_importance_weights(torch.tensor([[0.0, -1.0, -2.0]]), torch.tensor([[0.0, -2.0, -1.0]]),
    ...                              cap=2.0).tolist()
    [[1.0, 2.0, 0.3678794503211975]]
    """
    return torch.exp(logprobs - sampling_logprobs).clamp(max=cap)


def _agg_grpo(losses, mask, max_completion_length):
    per_sequence = (losses * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # (B,)
    return per_sequence.sum(), float(losses.shape[0])


def _agg_dr_grpo(losses, mask, max_completion_length):
    if max_completion_length is None:
        raise ValueError("aggregation 'dr_grpo' needs max_completion_length")
    return (losses * mask).sum(), float(losses.shape[0] * max_completion_length)


def _agg_dapo(losses, mask, max_completion_length):
    return (losses * mask).sum(), float(mask.sum())


TOKEN_AGGREGATIONS = {
    # per-sequence token mean, then the mean over sequences (DeepSeekMath eq. 3). A token of a
    # long completion weighs less than one of a short one: long wrong answers are penalised
    # less per token, short right ones rewarded more (the length bias Dr. GRPO points out).
    # Weight of a micro-batch: its number of sequences.
    "grpo": _agg_grpo,
    # sum over tokens / (B x max_completion_length), a constant (Dr. GRPO, Liu et al. 2025):
    # every token weighs the same whatever its sequence's length, and the normaliser does not
    # move with the lengths sampled. Weight: sequences x max_completion_length.
    "dr_grpo": _agg_dr_grpo,
    # token-level mean over ALL completion tokens of the global batch (DAPO, Yu et al. 2025):
    # every token weighs the same; the normaliser is the batch's token count. Weight: tokens.
    "dapo": _agg_dapo,
}
"""aggregation -> f(losses (B, T), mask (B, T), max_completion_length) -> (numerator, weight).

The step's loss is sum(numerators) / sum(weights) over every micro-batch of every
process (the engine's normalisation by the global `_weight`), so each variant gives the
same update however the global batch is split. With one micro-batch it is TRL 1.16's
`GRPOTrainer` loss for the same `loss_type`.
"""


def aggregate_token_losses(losses: torch.Tensor, mask: torch.Tensor, *, aggregation: str = "grpo",
                           max_completion_length: int | None = None) -> tuple[torch.Tensor, float]:
    """(numerator, weight) of per-token `losses` (B, T) under `mask` (B, T) for `aggregation`.

    Worked example: losses [[1, 1, 0], [3, 0, 0]] with mask [[1, 1, 0], [1, 0, 0]], length 3:
    grpo (1 + 3) / 2 = 2; dr_grpo (2 + 3) / (2 x 3) = 0.8333; dapo (2 + 3) / 3 = 1.6667.
    """
    try:
        variant = TOKEN_AGGREGATIONS[aggregation]
    except KeyError:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {sorted(TOKEN_AGGREGATIONS)}") from None
    return variant(losses, mask.to(losses.dtype), max_completion_length)


# ---------------------------------------------------------------------------
# distillation: the generalised Jensen-Shannon divergence (GKD)
# ---------------------------------------------------------------------------
GKD_REDUCTIONS = ("batchmean", "sum", "mean", "none")


def generalized_jsd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         labels: torch.Tensor | None = None, *, beta: float = 0.5, temperature: float = 1.0,
                         reduction: str = "batchmean") -> torch.Tensor:
    """Generalised Jensen-Shannon divergence between student and teacher per token (GKD, Agarwal et al.
    2024, eq. 1), over the FULL vocabulary: logits (B, T, V), labels (B, T) with -100 where not trained.

        s = softmax(z_s / temperature), t = softmax(z_t / temperature), m = beta t + (1 - beta) s
        JSD_beta(t, s) = beta KL(t || m) + (1 - beta) KL(s || m)
        beta = 0: KL(t || s), the forward KL (supervised KD);  beta = 1: KL(s || t), the reverse KL

    The teacher is a target: pass its logits detached. reduction (TRL 1.16 `GKDTrainer.generalized_jsd_loss`'s):
    batchmean, the sum over the trained tokens divided by their number (TRL's default); sum; mean, the
    mean over trained tokens x V entries (TRL's elementwise mean); none, per token (B, T), 0 where not trained
    (TRL's none returns the (N, V) elements). Equals TRL's for every reduction but none (tested to 1e-6).

    Worked example: student logits [0, 0] (s = [0.5, 0.5]), teacher [log 3, 0] (t = [0.75, 0.25]):

    >>> s, t = torch.zeros(1, 1, 2), torch.tensor([[[3.0, 1.0]]]).log()
    >>> [round(generalized_jsd_loss(s, t, beta=b).item(), 4) for b in (0.0, 0.5, 1.0)]
    [0.1308, 0.0338, 0.1438]
    """
    if reduction not in GKD_REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {GKD_REDUCTIONS}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # bf16 logits: the divergence in fp32
    s_log = (student_logits.to(dtype) / temperature).log_softmax(-1)
    t_log = (teacher_logits.to(dtype) / temperature).log_softmax(-1)
    if beta == 0:
        elements = t_log.exp() * (t_log - s_log)
    elif beta == 1:
        elements = s_log.exp() * (s_log - t_log)
    else:
        b = torch.tensor(beta, dtype=s_log.dtype, device=s_log.device)
        m_log = torch.logsumexp(torch.stack([s_log + torch.log1p(-b), t_log + torch.log(b)]), dim=0)
        elements = b * t_log.exp() * (t_log - m_log) + (1 - b) * s_log.exp() * (s_log - m_log)
    mask = torch.ones(elements.shape[:-1], dtype=torch.bool, device=elements.device) if labels is None \
        else labels != -100
    per_token = elements.sum(-1) * mask  # (B, T)
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    if reduction == "mean":
        return per_token.sum() / (mask.sum() * elements.shape[-1]).clamp(min=1)
    return per_token.sum() / mask.sum().clamp(min=1)
