"""PPO for discrete actions on vectorised Gymnasium environments.

Schulman et al. 2017, "Proximal Policy Optimization Algorithms", with the details of
CleanRL's `ppo.py` (Huang et al. 2022, "The 37 Implementation Details of PPO"):
orthogonal init, separate actor and critic MLPs, advantage whitening per minibatch,
value clipping, gradient-norm clipping, linear LR annealing.

The math is imported, not re-derived: GAE (`gae_advantages`), the clipped surrogate
(`ppo_clip_loss`) and the clipped value loss (`clipped_value_loss`) come from
`align.losses`, the same functions the LLM PPO stage calls.

Deviations from CleanRL: truncated episodes (CartPole's 500-step limit) are
bootstrapped with gamma * V(final observation) added to the last reward, as
Stable-Baselines3 does, because the time limit is not part of the MDP; the
`target_kl` early stop is checked per minibatch.

Loop per update:
 1. roll out `num_steps` steps in each of `num_envs` environments (no grad);
 2. GAE over the rollout, bootstrapping from V(s_T);
 3. `update_epochs` passes over shuffled minibatches: clipped surrogate + value loss
    - entropy bonus, one Adam step each;
 4. log; evaluate the greedy policy every `eval_every` environment steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn as nn

from align.config import in_range, non_negative, positive
from align.errors import AlignError
from align.losses import (
    approx_kl,
    clipped_value_loss,
    entropy_from_logits,
    explained_variance,
    gae_advantages,
    ppo_clip_loss,
    whiten,
)
from align.rl.common import Evaluator, RunConfig, RunLog, mlp, require, seed_everything
from align.rl.envs import is_discrete, make_env, make_vector_env, obs_dim


@dataclass
class PPOConfig(RunConfig):
    algo: Literal["ppo"] = "ppo"
    num_envs: int = field(default=8, metadata=positive("num_envs"))
    """Environments stepped side by side (one process, SyncVectorEnv)."""
    num_steps: int = field(default=32, metadata=positive("num_steps"))
    """Rollout length per environment; batch = num_envs * num_steps."""
    num_minibatches: int = field(default=1, metadata=positive("num_minibatches"))
    update_epochs: int = field(default=20, metadata=positive("update_epochs"))
    lr: float = field(default=1e-3, metadata=positive("lr"))
    anneal_lr: bool = True
    """Linearly decay the learning rate to 0 over total_steps."""
    gamma: float = field(default=0.98, metadata=in_range(0.0, 1.0, "gamma"))
    gae_lambda: float = field(default=0.8, metadata=in_range(0.0, 1.0, "gae_lambda"))
    clip_coef: float = field(default=0.2, metadata=positive("clip_coef"))
    vf_clip: float | None = field(default=0.2, metadata=positive("vf_clip"))
    """Value clipping range around the rollout's values; None turns it off."""
    ent_coef: float = field(default=0.0, metadata=non_negative("ent_coef"))
    vf_coef: float = field(default=0.5, metadata=non_negative("vf_coef"))
    max_grad_norm: float = field(default=0.5, metadata=positive("max_grad_norm"))
    target_kl: float | None = None
    """Stop the epochs of an update once approx KL exceeds this (None: never)."""
    hidden: int = field(default=64, metadata=positive("hidden"))

    def validate(self) -> None:
        super().validate()
        batch = self.num_envs * self.num_steps
        if batch % self.num_minibatches:
            raise AlignError(f"num_envs * num_steps = {batch} must be divisible by num_minibatches = "
                             f"{self.num_minibatches}")


class ActorCritic(nn.Module):
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


def greedy_policy(actor: nn.Module):
    """Deterministic evaluation policy: argmax of the logits."""
    def act(obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return actor(torch.as_tensor(obs, dtype=torch.float32)).argmax(-1).numpy()
    return act


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


def check_discrete_control(algo: str, env_id: str):
    """The probe environment, after checking it has vector observations and discrete actions."""
    probe = make_env(env_id)
    require(is_discrete(probe.action_space), f"algo {algo}: {env_id} has continuous actions; {algo} here is for "
            "discrete actions (use algo sac for Pendulum-v1)")
    require(not is_discrete(probe.observation_space),
            f"algo {algo}: {env_id} has discrete states; use a tabular algo (q_learning, sarsa, value_iteration)")
    return probe


def train(cfg: PPOConfig) -> dict:
    seed_everything(cfg.seed)
    probe = check_discrete_control("ppo", cfg.env)
    n_obs, n_actions = obs_dim(probe.observation_space), int(probe.action_space.n)
    batch_size = cfg.num_envs * cfg.num_steps
    minibatch_size = batch_size // cfg.num_minibatches
    num_updates = max(1, cfg.total_steps // batch_size)

    envs = make_vector_env(cfg.env, cfg.num_envs, cfg.seed)
    model = ActorCritic(n_obs, n_actions, cfg.hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, eps=1e-5, foreach=True)
    evaluator = Evaluator(cfg.env, cfg.eval_episodes, cfg.seed)
    log = RunLog(cfg)

    rollout = Rollout(cfg.num_steps, cfg.num_envs, n_obs)
    next_obs, _ = envs.reset(seed=cfg.seed)
    obs = torch.as_tensor(next_obs, dtype=torch.float32)  # (N, obs)
    ep_return = np.zeros(cfg.num_envs)  # (N,) running undiscounted returns
    for update in range(num_updates):
        if cfg.anneal_lr:
            optimizer.param_groups[0]["lr"] = cfg.lr * (1.0 - update / num_updates)

        # 1. rollout
        obs = collect_rollout(envs, model, obs, rollout, ep_return, cfg.gamma, log)
        step, b = log.step, rollout

        # 2. advantages: GAE with time on the last axis, (N, T)
        with torch.no_grad():
            next_value = model.value(obs)  # (N,)
        advantages, returns = gae_advantages(b.rewards.T, b.values.T, gamma=cfg.gamma, lam=cfg.gae_lambda,
                                             dones=b.dones.T, next_value=next_value)
        b_obs = b.obs.reshape(batch_size, n_obs)  # (B, obs)
        b_act, b_logp, b_val = b.actions.reshape(-1), b.logps.reshape(-1), b.values.reshape(-1)  # (B,)
        b_adv, b_ret = advantages.T.reshape(-1), returns.T.reshape(-1)  # (B,) back to (T, N) order

        # 3. clipped-surrogate epochs over minibatches
        clipfracs, kls = [], []
        for _epoch in range(cfg.update_epochs):
            perm = torch.randperm(batch_size)
            for start in range(0, batch_size, minibatch_size):
                mb = perm[start:start + minibatch_size]
                new_logp, entropy, new_val = model.evaluate_actions(b_obs[mb], b_act[mb])
                pg_losses, clipped = ppo_clip_loss(new_logp, b_logp[mb], whiten(b_adv[mb]), clip_eps=cfg.clip_coef)
                v_loss = clipped_value_loss(new_val, b_val[mb], b_ret[mb], clip_eps=cfg.vf_clip).mean()
                pg_loss, ent = pg_losses.mean(), entropy.mean()
                loss = pg_loss - cfg.ent_coef * ent + cfg.vf_coef * v_loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                with torch.no_grad():
                    kls.append(approx_kl(new_logp, b_logp[mb]).mean().item())
                clipfracs.append(clipped.mean().item())
            if cfg.target_kl is not None and kls[-1] > cfg.target_kl:
                break

        # 4. log and evaluate
        log.log(step, {"losses/policy_loss": pg_loss.item(), "losses/value_loss": v_loss.item(),
                       "losses/entropy": ent.item(), "losses/approx_kl": float(np.mean(kls)),
                       "losses/clipfrac": float(np.mean(clipfracs)),
                       "losses/explained_variance": explained_variance(b_val, b_ret),
                       "charts/learning_rate": optimizer.param_groups[0]["lr"]})
        if log.eval_due(step):
            log.evaluate(step, lambda: evaluator(greedy_policy(model.actor)))
            if log.should_stop():
                break

    envs.close()
    return log.finish_with(greedy_policy(model.actor))
