"""A2C: synchronous advantage actor-critic on vectorised environments.

Mnih et al. 2016, "Asynchronous Methods for Deep Reinforcement Learning", in its
synchronous form (OpenAI baselines' A2C): `num_envs` copies step together, and every
`num_steps` steps one gradient step is taken on

    loss = -mean(A_t * log pi(a_t|s_t)) + vf_coef * 0.5 * mean((V(s_t) - R_t)^2) - ent_coef * H

with n-step returns R_t (GAE with lambda = `gae_lambda`, 1.0 giving the paper's n-step
returns) from `align.losses.gae_advantages`, the function PPO and the LLM PPO use.
The rollout and the network are PPO's (`align.rl.ppo`): A2C is PPO with one epoch,
one minibatch and no clipping.

Deviations: Adam instead of RMSprop; advantages whitened per batch
(`normalize_advantages`); truncated episodes bootstrapped as in PPO.

Loop: 1. roll out; 2. returns and advantages; 3. one gradient step; 4. log, evaluate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn as nn

from align.config import in_range, non_negative, positive
from align.losses import clipped_value_loss, entropy_from_logits, explained_variance, gae_advantages, whiten
from align.rl.common import Evaluator, RunConfig, RunLog, seed_everything
from align.rl.envs import make_next_step_vector_env, obs_dim
from align.rl.ppo import ActorCritic, Rollout, check_discrete_control, collect_rollout, greedy_policy, sampler


@dataclass
class A2CConfig(RunConfig):
    algo: Literal["a2c"] = "a2c"
    num_envs: int = field(default=8, metadata=positive("num_envs"))
    num_steps: int = field(default=16, metadata=positive("num_steps"))
    """Steps per environment between updates (n of the n-step return)."""
    lr: float = field(default=1e-3, metadata=positive("lr"))
    anneal_lr: bool = True
    gamma: float = field(default=0.99, metadata=in_range(0.0, 1.0, "gamma"))
    gae_lambda: float = field(default=1.0, metadata=in_range(0.0, 1.0, "gae_lambda"))
    ent_coef: float = field(default=0.0, metadata=non_negative("ent_coef"))
    vf_coef: float = field(default=0.5, metadata=non_negative("vf_coef"))
    max_grad_norm: float = field(default=0.5, metadata=positive("max_grad_norm"))
    normalize_advantages: bool = True
    hidden: int = field(default=64, metadata=positive("hidden"))


def train(cfg: A2CConfig) -> dict:
    seed_everything(cfg.seed)
    probe = check_discrete_control("a2c", cfg.env)
    n_obs, n_actions = obs_dim(probe.observation_space), int(probe.action_space.n)
    batch_size = cfg.num_envs * cfg.num_steps
    num_updates = max(1, cfg.total_steps // batch_size)

    envs = make_next_step_vector_env(cfg.env, cfg.num_envs)
    model = ActorCritic(n_obs, n_actions, cfg.hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, eps=1e-5)
    act, value = sampler(model, np.random.default_rng(cfg.seed)), model.numpy_forward()
    evaluator = Evaluator(cfg.env, cfg.eval_episodes, cfg.seed)
    log = RunLog(cfg)

    rollout = Rollout(cfg.num_steps, cfg.num_envs, n_obs)
    obs = envs.reset(seed=cfg.seed)[0].astype(np.float32)  # (N, obs)
    resetting = np.zeros(cfg.num_envs, dtype=bool)  # (N,) NEXT_STEP: this step only resets these
    ep_return = np.zeros(cfg.num_envs)  # (N,)
    for update in range(num_updates):
        if cfg.anneal_lr:
            optimizer.param_groups[0]["lr"] = cfg.lr * (1.0 - update / num_updates)

        # 1. roll out num_steps in every environment
        obs, resetting = collect_rollout(envs, act, obs, resetting, rollout, ep_return, log)

        # 2. n-step / GAE returns over the rollout (time last), then its real transitions (B,)
        advantages, returns = gae_advantages(**rollout.gae_inputs(value(obs)[1], gamma=cfg.gamma), gamma=cfg.gamma,
                                             lam=cfg.gae_lambda)
        b = rollout.real_transitions(advantages, returns)
        b_adv, b_ret = b["advantages"], b["returns"]
        if cfg.normalize_advantages:
            b_adv = whiten(b_adv)

        # 3. one gradient step on the whole batch
        logp, logits, values = model.evaluate_actions(b["obs"], b["actions"])
        entropy = entropy_from_logits(logits)  # (B,)
        pg_loss = -(b_adv * logp).mean()
        v_loss = clipped_value_loss(values, values, b_ret, clip_eps=None).mean()  # plain 0.5 * (V - R)^2
        loss = pg_loss + cfg.vf_coef * v_loss - cfg.ent_coef * entropy.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()

        # 4. log and evaluate
        step = log.step
        if update % 10 == 0:
            log.log(step, {"losses/policy_loss": pg_loss.item(), "losses/value_loss": v_loss.item(),
                           "losses/entropy": entropy.mean().item(),
                           "losses/explained_variance": explained_variance(b["values"], b_ret)})
        if log.eval_due(step):
            log.evaluate(step, lambda: evaluator(greedy_policy(model.actor)))
            if log.should_stop():
                break

    envs.close()
    return log.finish_with(greedy_policy(model.actor))
