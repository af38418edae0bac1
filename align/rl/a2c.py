"""A2C: synchronous advantage actor-critic on vectorised environments.

Mnih et al. 2016, "Asynchronous Methods for Deep Reinforcement Learning", in its
synchronous form (OpenAI baselines' A2C): `num_envs` copies step together, and every
`num_steps` steps one gradient step is taken on

    loss = -mean(A_t * log pi(a_t|s_t)) + vf_coef * 0.5 * mean((V(s_t) - R_t)^2) - ent_coef * H

with n-step returns R_t (GAE with lambda = `gae_lambda`, 1.0 giving the paper's n-step
returns) from `align.losses.gae_advantages`, the function PPO and the LLM PPO use.
A2C is PPO with one epoch, one minibatch and no clipping; the network and rollout
below are the CleanRL-style ones PPO used before it moved to a faster path (stacked
network, numpy acting, NEXT_STEP vectorised environments): kept here unchanged so
A2C's results stay as they were.

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
from align.rl.common import Evaluator, RunConfig, RunLog, mlp, seed_everything
from align.rl.envs import make_vector_env, obs_dim
from align.rl.ppo import check_discrete_control, greedy_policy


class ActorCritic(nn.Module):
    """Separate actor and critic MLPs (obs -> H -> H -> out, tanh), CleanRL init."""

    def __init__(self, n_obs: int, n_actions: int, hidden: int):
        super().__init__()
        self.actor = mlp(n_obs, n_actions, hidden, nn.Tanh, out_gain=0.01)
        self.critic = mlp(n_obs, 1, hidden, nn.Tanh, out_gain=1.0)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)  # (B,)

    def act(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample actions: (B, obs) -> actions (B,), log-probs (B,), values (B,)."""
        logp_all = self.actor(obs).log_softmax(-1)  # (B, A)
        actions = torch.multinomial(logp_all.exp(), 1).squeeze(-1)  # (B,)
        return actions, logp_all.gather(-1, actions[:, None]).squeeze(-1), self.value(obs)

    def evaluate_actions(self, obs: torch.Tensor, actions: torch.Tensor):
        """(B, obs), (B,) -> log-probs (B,), entropy (B,), values (B,)."""
        logits = self.actor(obs)  # (B, A)
        logp = logits.log_softmax(-1).gather(-1, actions[:, None]).squeeze(-1)
        return logp, entropy_from_logits(logits), self.value(obs)


class Rollout:
    """Preallocated rollout storage, time first: (T, N, ...)."""

    def __init__(self, num_steps: int, num_envs: int, n_obs: int):
        self.obs = torch.zeros((num_steps, num_envs, n_obs))  # (T, N, obs)
        self.actions = torch.zeros((num_steps, num_envs), dtype=torch.long)  # (T, N)
        self.logps = torch.zeros((num_steps, num_envs))  # (T, N) log pi_old(a_t | s_t)
        self.values = torch.zeros((num_steps, num_envs))  # (T, N) V(s_t)
        self.rewards = torch.zeros((num_steps, num_envs))  # (T, N) r_t (+ gamma V(final obs) if truncated)
        self.dones = torch.zeros((num_steps, num_envs))  # (T, N) 1 if the episode ended at step t


def collect_rollout(envs, model: ActorCritic, obs: torch.Tensor, rollout: Rollout, ep_return: np.ndarray,
                    gamma: float, log: RunLog) -> torch.Tensor:
    """Fill `rollout` with len(rollout.obs) steps of every environment; returns the next observation (N, obs).

    SAME_STEP autoreset: where an episode ended, `next_obs` already starts the next one
    and `info["final_obs"]` holds the last observation. A truncated (not terminated)
    episode gets gamma * V(final observation) added to its last reward: the time limit
    is not part of the MDP. `ep_return` (N,) carries running returns across calls.
    """
    num_envs = obs.shape[0]
    for t in range(rollout.obs.shape[0]):
        with torch.no_grad():
            actions, logp, values = model.act(obs)
        next_obs, reward, terminated, truncated, info = envs.step(actions.numpy())
        done = terminated | truncated
        ep_return += reward
        reward = reward.astype(np.float32)
        cut = truncated & ~terminated
        if cut.any():
            final = torch.as_tensor(np.stack(info["final_obs"][cut]), dtype=torch.float32)  # (n_cut, obs)
            with torch.no_grad():
                reward[cut] += gamma * model.value(final).numpy()
        rollout.obs[t], rollout.actions[t], rollout.logps[t], rollout.values[t] = obs, actions, logp, values
        rollout.rewards[t] = torch.from_numpy(reward)
        rollout.dones[t] = torch.from_numpy(done.astype(np.float32))
        step = log.step + num_envs
        for i in np.flatnonzero(done):
            log.episode(step, ep_return[i])
            ep_return[i] = 0.0
        log.advance(step)
        obs = torch.as_tensor(next_obs, dtype=torch.float32)
    return obs


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

    envs = make_vector_env(cfg.env, cfg.num_envs, cfg.seed)
    model = ActorCritic(n_obs, n_actions, cfg.hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, eps=1e-5)
    evaluator = Evaluator(cfg.env, cfg.eval_episodes, cfg.seed)
    log = RunLog(cfg)

    rollout = Rollout(cfg.num_steps, cfg.num_envs, n_obs)
    obs = torch.as_tensor(envs.reset(seed=cfg.seed)[0], dtype=torch.float32)  # (N, obs)
    ep_return = np.zeros(cfg.num_envs)  # (N,)
    for update in range(num_updates):
        if cfg.anneal_lr:
            optimizer.param_groups[0]["lr"] = cfg.lr * (1.0 - update / num_updates)

        # 1. roll out num_steps in every environment
        obs = collect_rollout(envs, model, obs, rollout, ep_return, cfg.gamma, log)

        # 2. n-step / GAE returns, time on the last axis (N, T)
        with torch.no_grad():
            next_value = model.value(obs)  # (N,)
        advantages, returns = gae_advantages(rollout.rewards.T, rollout.values.T, gamma=cfg.gamma,
                                             lam=cfg.gae_lambda, dones=rollout.dones.T, next_value=next_value)
        b_adv, b_ret = advantages.T.reshape(-1), returns.T.reshape(-1)  # (B,)
        if cfg.normalize_advantages:
            b_adv = whiten(b_adv)

        # 3. one gradient step on the whole batch
        logp, entropy, values = model.evaluate_actions(rollout.obs.reshape(batch_size, n_obs),
                                                       rollout.actions.reshape(-1))
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
                           "losses/explained_variance": explained_variance(rollout.values.reshape(-1), b_ret)})
        if log.eval_due(step):
            log.evaluate(step, lambda: evaluator(greedy_policy(model.actor)))
            if log.should_stop():
                break

    envs.close()
    return log.finish_with(greedy_policy(model.actor))
