"""DQN for discrete actions: experience replay, a target network, an epsilon schedule.

Mnih et al. 2015, "Human-level control through deep reinforcement learning", with the
Double-DQN target of van Hasselt et al. 2016 (`double: true`, the default) and the
Huber loss. Structure follows CleanRL's `dqn.py`.

Deviations from the paper: one environment and small MLPs instead of Atari frames;
Adam instead of RMSprop; the target bootstraps through time-limit truncations (only
`terminated` stops it, since the time limit is not part of the MDP).

Loop per environment step:
 1. act epsilon-greedily (epsilon decays linearly over `exploration_fraction` of the run);
 2. store (s, a, r, s', terminated) in the replay buffer (breaks sample correlation);
 3. every `train_freq` steps after `learning_starts`: `gradient_steps` Huber-loss
    steps on minibatches, target y = r + gamma * (1 - terminated) * Q_target(s', a*),
    a* = argmax_a Q_online(s', a) (Double DQN) or argmax_a Q_target(s', a);
 4. every `target_update_interval` steps: Q_target <- tau * Q_online + (1 - tau) * Q_target
    (tau 1: the frozen copy of the paper).
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
from align.rl.common import Evaluator, RunConfig, RunLog, mlp, seed_everything, step_into_buffer
from align.rl.envs import make_env, obs_dim
from align.rl.ppo import check_discrete_control, greedy_policy


@dataclass
class DQNConfig(RunConfig):
    algo: Literal["dqn"] = "dqn"
    buffer_size: int = field(default=50_000, metadata=positive("buffer_size"))
    learning_starts: int = field(default=1_000, metadata=positive("learning_starts"))
    """Random-action steps that fill the buffer before the first update."""
    batch_size: int = field(default=128, metadata=positive("batch_size"))
    lr: float = field(default=2.3e-3, metadata=positive("lr"))
    gamma: float = field(default=0.99, metadata=in_range(0.0, 1.0, "gamma"))
    train_freq: int = field(default=16, metadata=positive("train_freq"))
    gradient_steps: int = field(default=4, metadata=positive("gradient_steps"))
    """Gradient steps each `train_freq` environment steps."""
    target_update_interval: int = field(default=256, metadata=positive("target_update_interval"))
    tau: float = field(default=1.0, metadata=in_range(0.0, 1.0, "tau"))
    epsilon_start: float = field(default=1.0, metadata=in_range(0.0, 1.0, "epsilon_start"))
    epsilon_end: float = field(default=0.04, metadata=in_range(0.0, 1.0, "epsilon_end"))
    exploration_fraction: float = field(default=0.16, metadata=in_range(0.0, 1.0, "exploration_fraction"))
    """Fraction of total_steps over which epsilon decays linearly."""
    double: bool = True
    """Double DQN target (online net picks a*, target net values it)."""
    max_grad_norm: float = field(default=10.0, metadata=positive("max_grad_norm"))
    hidden: int = field(default=128, metadata=positive("hidden"))


class ReplayBuffer:
    """A ring buffer of transitions in preallocated numpy arrays.

    Discrete actions are stored as int64 (C,); with `action_dim` set (SAC), as float32 (C, A).
    """

    def __init__(self, capacity: int, n_obs: int, seed: int, action_dim: int | None = None):
        self.obs = np.zeros((capacity, n_obs), dtype=np.float32)  # (C, obs)
        self.next_obs = np.zeros((capacity, n_obs), dtype=np.float32)  # (C, obs)
        self.actions = (np.zeros(capacity, dtype=np.int64) if action_dim is None  # (C,)
                        else np.zeros((capacity, action_dim), dtype=np.float32))  # (C, A)
        self.rewards = np.zeros(capacity, dtype=np.float32)  # (C,)
        self.terminated = np.zeros(capacity, dtype=np.float32)  # (C,)
        self.capacity, self.size, self.pos = capacity, 0, 0
        self.rng = np.random.default_rng(seed)

    def add(self, obs, action, reward, next_obs, terminated) -> None:
        i = self.pos
        self.obs[i], self.actions[i], self.rewards[i], self.next_obs[i], self.terminated[i] = \
            obs, action, reward, next_obs, terminated
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        idx = self.rng.integers(0, self.size, size=batch_size)  # (B,)
        return tuple(torch.from_numpy(a[idx]) for a in
                     (self.obs, self.actions, self.rewards, self.next_obs, self.terminated))


def td_loss(q_net: nn.Module, target_net: nn.Module, batch, gamma: float, double: bool) -> torch.Tensor:
    """Huber loss between Q(s, a) and the (Double) DQN target."""
    obs, actions, rewards, next_obs, terminated = batch
    with torch.no_grad():
        next_q_target = target_net(next_obs)  # (B, A)
        if double:
            best = q_net(next_obs).argmax(-1, keepdim=True)  # (B, 1)
        else:
            best = next_q_target.argmax(-1, keepdim=True)
        target = rewards + gamma * (1.0 - terminated) * next_q_target.gather(-1, best).squeeze(-1)  # (B,)
    q = q_net(obs).gather(-1, actions[:, None]).squeeze(-1)  # (B,)
    return F.smooth_l1_loss(q, target)


def train(cfg: DQNConfig) -> dict:
    seed_everything(cfg.seed)
    probe = check_discrete_control("dqn", cfg.env)
    n_obs, n_actions = obs_dim(probe.observation_space), int(probe.action_space.n)
    env = make_env(cfg.env)
    env.action_space.seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    q_net = mlp(n_obs, n_actions, cfg.hidden)
    target_net = copy.deepcopy(q_net)
    optimizer = torch.optim.Adam(q_net.parameters(), lr=cfg.lr)
    buffer = ReplayBuffer(min(cfg.buffer_size, cfg.total_steps), n_obs, cfg.seed)
    evaluator = Evaluator(cfg.env, cfg.eval_episodes, cfg.seed)
    log = RunLog(cfg)
    decay_steps = max(1, int(cfg.exploration_fraction * cfg.total_steps))

    obs, _ = env.reset(seed=cfg.seed)
    ep_return, loss = 0.0, torch.tensor(float("nan"))
    for step in range(1, cfg.total_steps + 1):
        # 1. epsilon-greedy action
        epsilon = max(cfg.epsilon_end, cfg.epsilon_start + (cfg.epsilon_end - cfg.epsilon_start) * step / decay_steps)
        if step <= cfg.learning_starts or rng.random() < epsilon:
            action = int(env.action_space.sample())
        else:
            with torch.no_grad():
                action = int(q_net(torch.as_tensor(obs, dtype=torch.float32)).argmax())
        # 2. store; the buffer keeps the true last observation even at an episode's end
        obs, ep_return = step_into_buffer(env, obs, action, buffer, log, step, ep_return)

        # 3. learn from replayed minibatches
        if step > cfg.learning_starts and step % cfg.train_freq == 0:
            for _ in range(cfg.gradient_steps):
                loss = td_loss(q_net, target_net, buffer.sample(cfg.batch_size), cfg.gamma, cfg.double)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(q_net.parameters(), cfg.max_grad_norm)
                optimizer.step()

        # 4. move the target network
        if step % cfg.target_update_interval == 0:
            with torch.no_grad():
                for p_target, p in zip(target_net.parameters(), q_net.parameters()):
                    p_target.lerp_(p, cfg.tau)

        if step % 500 == 0:
            log.advance(step)
        if step % cfg.eval_every == 0:
            log.advance(step)
            log.log(step, {"losses/td_loss": loss.item(), "charts/epsilon": epsilon})
            log.evaluate(step, lambda: evaluator(greedy_policy(q_net)))
            if log.should_stop():
                break
    log.advance(step)
    return log.finish_with(greedy_policy(q_net))
