"""SAC: soft actor-critic for continuous actions, twin Q, automatic entropy tuning.

Haarnoja et al. 2018, "Soft Actor-Critic Algorithms and Applications" (the version
with twin Q-networks, target networks and a learned temperature alpha), laid out as
CleanRL's `sac_continuous_action.py`. The policy is a tanh-squashed Gaussian scaled to
the action bounds; its log-probability includes the tanh change of variables.

Deviations: one environment, small MLPs; one gradient step per environment step
after `learning_starts` random steps; the target bootstraps through time-limit
truncations (Pendulum only ever truncates).

Loop per environment step:
 1. act: a ~ pi(.|s) (uniform random before learning_starts); store in the replay buffer;
 2. critics: y = r + gamma * (1 - terminated) * (min_i Q_target_i(s', a') - alpha * log pi(a'|s')),
    a' ~ pi(.|s'); minimise sum_i (Q_i(s, a) - y)^2;
 3. actor: minimise alpha * log pi(a|s) - min_i Q_i(s, a), a ~ pi(.|s) (reparameterised);
 4. temperature: minimise -log_alpha * (log pi(a|s) + target_entropy), target -|A|;
 5. targets: Q_target <- tau * Q + (1 - tau) * Q_target.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from align.config import in_range, positive
from align.rl.common import Evaluator, RunConfig, RunLog, mlp, require, seed_everything, step_into_buffer
from align.rl.dqn import ReplayBuffer
from align.rl.envs import is_discrete, make_env, obs_dim

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


@dataclass
class SACConfig(RunConfig):
    algo: Literal["sac"] = "sac"
    env: str = "Pendulum-v1"
    total_steps: int = field(default=20_000, metadata=positive("total_steps"))
    buffer_size: int = field(default=100_000, metadata=positive("buffer_size"))
    learning_starts: int = field(default=1_000, metadata=positive("learning_starts"))
    batch_size: int = field(default=256, metadata=positive("batch_size"))
    gamma: float = field(default=0.99, metadata=in_range(0.0, 1.0, "gamma"))
    tau: float = field(default=0.005, metadata=in_range(0.0, 1.0, "tau"))
    policy_lr: float = field(default=1e-3, metadata=positive("policy_lr"))
    q_lr: float = field(default=1e-3, metadata=positive("q_lr"))
    alpha: float = field(default=0.2, metadata=positive("alpha"))
    """Entropy temperature; the initial value when autotune is on."""
    autotune: bool = True
    """Learn alpha so the policy's entropy tracks target_entropy = -action_dim."""
    hidden: int = field(default=128, metadata=positive("hidden"))


class Actor(nn.Module):
    """Tanh-squashed Gaussian policy scaled to [low, high]."""

    def __init__(self, n_obs: int, n_act: int, hidden: int, low: np.ndarray, high: np.ndarray):
        super().__init__()
        self.net = mlp(n_obs, 2 * n_act, hidden)
        self.register_buffer("scale", torch.as_tensor((high - low) / 2.0, dtype=torch.float32))  # (A,)
        self.register_buffer("center", torch.as_tensor((high + low) / 2.0, dtype=torch.float32))  # (A,)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised sample: (B, obs) -> action (B, A), log pi(action | obs) (B,)."""
        mean, log_std = self.net(obs).chunk(2, dim=-1)  # (B, A) each
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(log_std) + 1.0)
        std = log_std.exp()
        u = mean + std * torch.randn_like(mean)  # (B, A) pre-squash sample
        squashed = torch.tanh(u)
        # log N(u; mean, std) - log |d action / d u|, summed over action dimensions
        logp = (-0.5 * ((u - mean) / std) ** 2 - log_std - 0.5 * np.log(2 * np.pi)).sum(-1)
        logp = logp - torch.log(self.scale * (1.0 - squashed.pow(2)) + 1e-6).sum(-1)
        return squashed * self.scale + self.center, logp

    def deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        mean, _ = self.net(obs).chunk(2, dim=-1)
        return torch.tanh(mean) * self.scale + self.center  # (B, A)


class TwinQ(nn.Module):
    """Two independent Q(s, a) networks (clipped double-Q, Fujimoto et al. 2018)."""

    def __init__(self, n_obs: int, n_act: int, hidden: int):
        super().__init__()
        self.q1 = mlp(n_obs + n_act, 1, hidden)
        self.q2 = mlp(n_obs + n_act, 1, hidden)

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([obs, act], dim=-1)  # (B, obs + A)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)  # (B,), (B,)


def deterministic_policy(actor: Actor):
    def act(obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return actor.deterministic(torch.as_tensor(obs, dtype=torch.float32)).numpy()
    return act


def train(cfg: SACConfig) -> dict:
    seed_everything(cfg.seed)
    env = make_env(cfg.env)
    require(not is_discrete(env.action_space), f"algo sac: {cfg.env} has discrete actions; this SAC is for "
            "continuous actions (Pendulum-v1); use dqn or ppo")
    env.action_space.seed(cfg.seed)
    n_obs, n_act = obs_dim(env.observation_space), int(np.prod(env.action_space.shape))
    low, high = env.action_space.low, env.action_space.high

    actor = Actor(n_obs, n_act, cfg.hidden, low, high)
    critic = TwinQ(n_obs, n_act, cfg.hidden)
    critic_target = copy.deepcopy(critic).requires_grad_(False)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=cfg.policy_lr)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=cfg.q_lr)
    log_alpha = torch.tensor(float(np.log(cfg.alpha)), requires_grad=cfg.autotune)
    alpha_opt = torch.optim.Adam([log_alpha], lr=cfg.q_lr) if cfg.autotune else None
    target_entropy = -float(n_act)
    buffer = ReplayBuffer(min(cfg.buffer_size, cfg.total_steps), n_obs, cfg.seed, action_dim=n_act)
    evaluator = Evaluator(cfg.env, cfg.eval_episodes, cfg.seed)
    log = RunLog(cfg)

    obs, _ = env.reset(seed=cfg.seed)
    ep_return = 0.0
    metrics = {}
    for step in range(1, cfg.total_steps + 1):
        # 1. act and store
        if step <= cfg.learning_starts:
            action = env.action_space.sample()
        else:
            with torch.no_grad():
                action = actor(torch.as_tensor(obs, dtype=torch.float32)[None])[0][0].numpy()
        obs, ep_return = step_into_buffer(env, obs, action, buffer, log, step, ep_return)

        if step > cfg.learning_starts:
            b_obs, b_act, b_rew, b_next, b_term = buffer.sample(cfg.batch_size)
            alpha = log_alpha.exp().detach()
            # 2. critics
            with torch.no_grad():
                next_act, next_logp = actor(b_next)
                q1_t, q2_t = critic_target(b_next, next_act)
                target = b_rew + cfg.gamma * (1.0 - b_term) * (torch.min(q1_t, q2_t) - alpha * next_logp)  # (B,)
            q1, q2 = critic(b_obs, b_act)
            q_loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
            critic_opt.zero_grad(set_to_none=True)
            q_loss.backward()
            critic_opt.step()
            # 3. actor (critic gradients are not needed here)
            new_act, logp = actor(b_obs)
            critic.requires_grad_(False)
            q1_pi, q2_pi = critic(b_obs, new_act)
            critic.requires_grad_(True)
            actor_loss = (alpha * logp - torch.min(q1_pi, q2_pi)).mean()
            actor_opt.zero_grad(set_to_none=True)
            actor_loss.backward()
            actor_opt.step()
            # 4. temperature
            if cfg.autotune:
                alpha_loss = -(log_alpha * (logp.detach() + target_entropy)).mean()
                alpha_opt.zero_grad(set_to_none=True)
                alpha_loss.backward()
                alpha_opt.step()
            # 5. polyak-averaged targets
            with torch.no_grad():
                for p_t, p in zip(critic_target.parameters(), critic.parameters()):
                    p_t.lerp_(p, cfg.tau)
            if step % 1000 == 0:
                metrics = {"losses/qf_loss": q_loss.item(), "losses/actor_loss": actor_loss.item(),
                           "losses/alpha": alpha.item(), "losses/entropy": -logp.mean().item()}

        if step % 200 == 0:
            log.advance(step)
        if step % cfg.eval_every == 0:
            log.advance(step)
            log.log(step, metrics)
            log.evaluate(step, lambda: evaluator(deterministic_policy(actor)))
            if log.should_stop():
                break
    log.advance(step)
    return log.finish_with(deterministic_policy(actor))
