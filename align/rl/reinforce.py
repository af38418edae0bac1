"""REINFORCE with a learned state-value baseline (Monte Carlo policy gradient).

Williams 1992, "Simple statistical gradient-following algorithms for connectionist
reinforcement learning"; the baseline version of Sutton & Barto 2018, section 13.4:

    grad J(theta) = E[ sum_t (G_t - b(s_t)) * grad log pi_theta(a_t | s_t) ],   b(s) = V_w(s)

G_t are full-episode discounted returns (`align.losses.discounted_returns`). No
bootstrapping anywhere: the update waits for whole episodes.

Deviations: `episodes_per_batch` episodes run side by side (one batched forward per
step) and are averaged into one update; the advantages G_t - V(s_t) are whitened over
the batch (`normalize_advantages`); Adam instead of plain SGD. An episode cut by the
time limit is treated as ended (Monte Carlo has nothing to bootstrap from).

Loop: 1. play a batch of episodes; 2. returns and advantages; 3. one policy step and
one baseline step; 4. log, evaluate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn as nn

from align.config import in_range, non_negative, positive
from align.losses import discounted_returns, entropy_from_logits, masked_mean, whiten
from align.rl.common import Evaluator, RunConfig, RunLog, mlp, seed_everything
from align.rl.envs import make_env, obs_dim
from align.rl.ppo import check_discrete_control, greedy_policy


@dataclass
class ReinforceConfig(RunConfig):
    algo: Literal["reinforce"] = "reinforce"
    total_steps: int = field(default=300_000, metadata=positive("total_steps"))
    eval_every: int = field(default=10_000, metadata=positive("eval_every"))
    episodes_per_batch: int = field(default=8, metadata=positive("episodes_per_batch"))
    lr: float = field(default=2e-3, metadata=positive("lr"))
    value_lr: float = field(default=5e-3, metadata=positive("value_lr"))
    gamma: float = field(default=0.99, metadata=in_range(0.0, 1.0, "gamma"))
    baseline: bool = True
    """Subtract the learned V(s_t) from the return (False: plain REINFORCE)."""
    normalize_advantages: bool = True
    ent_coef: float = field(default=0.0, metadata=non_negative("ent_coef"))
    max_grad_norm: float = field(default=1.0, metadata=positive("max_grad_norm"))
    hidden: int = field(default=64, metadata=positive("hidden"))


def play_episodes(envs: list, policy: nn.Module, log: RunLog) -> tuple[torch.Tensor, ...]:
    """One full episode in each env, side by side, sampling from `policy`.

    Returns obs (K, T, obs), actions (K, T), rewards (K, T), mask (K, T) and dones
    (K, T), padded to the longest episode T; mask is 1 on real steps, dones 1 on each
    episode's last step.
    """
    k = len(envs)
    obs = np.stack([env.reset()[0] for env in envs]).astype(np.float32)  # (K, obs)
    active = np.ones(k, dtype=bool)  # (K,)
    ep_return = np.zeros(k)
    obs_t, act_t, rew_t, mask_t, done_t = [], [], [], [], []
    while active.any():
        with torch.no_grad():
            probs = policy(torch.from_numpy(obs)).softmax(-1)  # (K, A)
        actions = torch.multinomial(probs, 1).squeeze(-1).numpy()  # (K,)
        rewards, dones = np.zeros(k, dtype=np.float32), np.zeros(k, dtype=np.float32)
        obs_t.append(obs.copy())
        mask_t.append(active.astype(np.float32))
        for i in np.flatnonzero(active):
            o, r, terminated, truncated, _ = envs[i].step(int(actions[i]))
            obs[i], rewards[i] = o, r
            ep_return[i] += r
            if terminated or truncated:
                active[i], dones[i] = False, 1.0
                log.episode(log.step + int(mask_t[-1].sum()), ep_return[i])
        log.advance(log.step + int(mask_t[-1].sum()))
        act_t.append(actions)
        rew_t.append(rewards)
        done_t.append(dones)
    stack = lambda xs: torch.from_numpy(np.stack(xs, axis=1))  # noqa: E731  list of T (K, ...) -> (K, T, ...)
    return stack(obs_t), stack(act_t).long(), stack(rew_t), stack(mask_t), stack(done_t)


def train(cfg: ReinforceConfig) -> dict:
    seed_everything(cfg.seed)
    probe = check_discrete_control("reinforce", cfg.env)
    n_obs, n_actions = obs_dim(probe.observation_space), int(probe.action_space.n)
    envs = [make_env(cfg.env) for _ in range(cfg.episodes_per_batch)]
    for i, env in enumerate(envs):
        env.reset(seed=cfg.seed + i)
    policy = mlp(n_obs, n_actions, cfg.hidden, nn.Tanh, out_gain=0.01)
    value = mlp(n_obs, 1, cfg.hidden, nn.Tanh, out_gain=1.0)
    pi_opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    v_opt = torch.optim.Adam(value.parameters(), lr=cfg.value_lr)
    evaluator = Evaluator(cfg.env, cfg.eval_episodes, cfg.seed)
    log = RunLog(cfg)

    while log.step < cfg.total_steps:
        # 1. a batch of complete episodes
        obs, actions, rewards, mask, dones = play_episodes(envs, policy, log)

        # 2. Monte Carlo returns G_t (K, T) and advantages G_t - V(s_t)
        returns = discounted_returns(rewards, gamma=cfg.gamma, dones=dones)  # (K, T)
        values = value(obs).squeeze(-1)  # (K, T)
        advantages = returns - values.detach() if cfg.baseline else returns
        if cfg.normalize_advantages:
            advantages = whiten(advantages, mask)

        # 3. policy gradient step, then a regression step for the baseline
        logits = policy(obs)  # (K, T, A)
        logp = logits.log_softmax(-1).gather(-1, actions[..., None]).squeeze(-1)  # (K, T)
        entropy = masked_mean(entropy_from_logits(logits), mask)
        pg_loss = -masked_mean(advantages * logp, mask) - cfg.ent_coef * entropy
        pi_opt.zero_grad(set_to_none=True)
        pg_loss.backward()
        nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        pi_opt.step()
        v_loss = masked_mean(0.5 * (values - returns) ** 2, mask)
        if cfg.baseline:
            v_opt.zero_grad(set_to_none=True)
            v_loss.backward()
            v_opt.step()

        # 4. log and evaluate
        step = log.step
        log.log(step, {"losses/policy_loss": pg_loss.item(), "losses/value_loss": v_loss.item(),
                       "losses/entropy": entropy.item()})
        if log.eval_due(step):
            log.evaluate(step, lambda: evaluator(greedy_policy(policy)))
            if log.should_stop():
                break

    return log.finish_with(greedy_policy(policy))
