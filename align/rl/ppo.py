"""PPO for discrete actions on vectorised Gymnasium environments.

Schulman et al. 2017, "Proximal Policy Optimization Algorithms", with the details of
CleanRL's `ppo.py` (Huang et al. 2022, "The 37 Implementation Details of PPO"):
orthogonal init, separate actor and critic MLPs, advantage whitening per minibatch,
optional value clipping, gradient-norm clipping, linear LR annealing.

The math is imported, not re-derived: GAE (`gae_advantages`), the clipped surrogate
(`ppo_clip_loss`) and the clipped value loss (`clipped_value_loss`) come from
`align.losses`, the same functions the LLM PPO stage calls.

Deviations from CleanRL: truncated episodes (CartPole's 500-step limit) are
bootstrapped with gamma * V(final observation) added to the last reward, as
Stable-Baselines3 does, because the time limit is not part of the MDP; the
`target_kl` early stop is checked once per epoch; the entropy term is left out of
the graph when `ent_coef` is 0.

Speed (the network is tiny, so the cost is per-op overhead, not arithmetic): the actor
and critic run as one stacked network (`ActorCritic`, one batched matmul per hidden
layer for both); acting is a numpy forward over views of the same weights; the
environments use NEXT_STEP autoreset (`align.rl.envs.make_next_step_vector_env`:
Gymnasium's numpy-vectorised CartPole); tanh goes through sigmoid (`Tanh`); the
parameters live in one flat tensor for a fused Adam and one-op gradient clipping
(`flatten_parameters`); per-minibatch statistics stay tensors until the update ends.

Environment steps are counted as real transitions: the reset step NEXT_STEP inserts
after an episode ends (its action is ignored) is neither counted nor trained on.

Loop per update:
 1. roll out `num_steps` steps in each of `num_envs` environments (numpy, no torch);
 2. GAE over the rollout, bootstrapping from V(s_T); keep the real transitions;
 3. `update_epochs` passes over shuffled minibatches: clipped surrogate + value loss
    (- entropy bonus), one Adam step each;
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
from align.rl.common import Evaluator, RunConfig, RunLog, require, seed_everything
from align.rl.envs import is_discrete, make_env, make_next_step_vector_env, obs_dim


@dataclass
class PPOConfig(RunConfig):
    algo: Literal["ppo"] = "ppo"
    num_envs: int = field(default=8, metadata=positive("num_envs"))
    """Environments stepped side by side (one process, `make_next_step_vector_env`)."""
    num_steps: int = field(default=32, metadata=positive("num_steps"))
    """Rollout length per environment; batch = num_envs * num_steps (less the reset steps)."""
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
        if batch % self.num_minibatches or self.num_minibatches > batch // 2:
            raise AlignError(f"num_envs * num_steps = {batch} must be divisible by num_minibatches = "
                             f"{self.num_minibatches}, and at least twice it (NEXT_STEP reset steps are dropped)")


class Tanh(torch.autograd.Function):
    """tanh(x) computed as 2 * sigmoid(2x) - 1 (the same function), gradient 1 - tanh(x)^2.

    torch 2.13's CPU tanh kernel is the slowest op of an update here: 80-180 us on a
    (2, 256, 64) tensor against about 30 us this way (measured on this 2-core host)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = torch.sigmoid(2 * x).mul_(2).sub_(1)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(grad, y)  # grad * (1 - y^2), one kernel


class ActorCritic(nn.Module):
    """CleanRL's two MLPs, obs -> H -> H -> A logits (actor) and obs -> H -> H -> 1 (critic), tanh.

    No weight is shared, but the hidden layers of both are stacked on a leading axis of
    size 2 (0: actor, 1: critic) so that each is one batched matmul for both networks:
    the same function and gradients as two `nn.Sequential`s with half the ops. Init as
    CleanRL: orthogonal, gain sqrt(2) in the hidden layers, 0.01 on the actor's output
    and 1 on the critic's; zero biases.
    """

    def __init__(self, n_obs: int, n_actions: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(2, n_obs, hidden))  # (2, obs, H), x @ w
        self.b1 = nn.Parameter(torch.zeros(2, 1, hidden))  # (2, 1, H)
        self.w2 = nn.Parameter(torch.empty(2, hidden, hidden))  # (2, H, H)
        self.b2 = nn.Parameter(torch.zeros(2, 1, hidden))  # (2, 1, H)
        self.actor_head = nn.Linear(hidden, n_actions)
        self.critic_head = nn.Linear(hidden, 1)
        with torch.no_grad():
            for w in (self.w1, self.w2):
                for net in range(2):  # orthogonal in nn.Linear's (out, in) layout, as CleanRL draws it
                    w[net] = nn.init.orthogonal_(torch.empty(w.shape[2], w.shape[1]), np.sqrt(2)).T
        for head, gain in ((self.actor_head, 0.01), (self.critic_head, 1.0)):
            nn.init.orthogonal_(head.weight, gain)
            nn.init.zeros_(head.bias)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, obs) -> logits (B, A), values (B,)."""
        h = Tanh.apply(torch.baddbmm(self.b1, obs.expand(2, *obs.shape), self.w1))  # (2, B, H)
        h = Tanh.apply(torch.baddbmm(self.b2, h, self.w2))  # (2, B, H)
        return self.actor_head(h[0]), self.critic_head(h[1]).squeeze(-1)

    def actor(self, obs: torch.Tensor) -> torch.Tensor:
        """(B, obs) -> logits (B, A), for `greedy_policy`."""
        return self(obs)[0]

    def evaluate_actions(self, obs: torch.Tensor, actions: torch.Tensor):
        """(B, obs), (B,) -> log pi(a|s) (B,), logits (B, A), values (B,)."""
        logits, values = self(obs)
        return logits.log_softmax(-1).gather(-1, actions[:, None]).squeeze(-1), logits, values

    def numpy_forward(self):
        """`forward` in numpy, for acting on a few observations at a time (torch's per-op
        overhead is most of the cost there). It reads views of the parameters, which the
        optimizer updates in place, so it always acts with the current weights."""
        w1, b1, w2, b2, wa, ba, wc, bc = (p.detach().numpy() for p in
                                          (self.w1, self.b1, self.w2, self.b2, *self.actor_head.parameters(),
                                           *self.critic_head.parameters()))

        def forward(obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """(N, obs) float32 -> logits (N, A), values (N,)."""
            h = np.tanh(obs @ w1 + b1)  # (2, N, H)
            h = np.tanh(h @ w2 + b2)  # (2, N, H)
            return h[0] @ wa.T + ba, h[1] @ wc[0] + bc[0]
        return forward


def flatten_parameters(module: nn.Module) -> nn.Parameter:
    """Make `module`'s parameters views into one flat parameter, and their gradients views
    into its `.grad` (P,), P = all parameters.

    The optimizer and the gradient clipping then see one tensor instead of eight: a step
    is a handful of ops, not a Python loop over parameters. Backward still writes each
    parameter's gradient, adding into the view in place (so zero `flat.grad` with
    `zero_()` and never set it to None). The numbers are those of per-parameter Adam.
    """
    params = list(module.parameters())
    flat = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]))  # (P,)
    flat.grad = torch.zeros_like(flat)
    start = 0
    for p in params:
        p.data = flat.data[start:start + p.numel()].view_as(p)
        p.grad = flat.grad[start:start + p.numel()].view_as(p)
        start += p.numel()
    return flat


def sampler(model: ActorCritic, rng: np.random.Generator):
    """Acting policy: obs (N, obs) -> actions (N,), log pi(a|s) (N,), V(s) (N,), all numpy.

    Samples the categorical by the Gumbel-max trick: argmax(logits + Gumbel noise)."""
    forward = model.numpy_forward()

    def act(obs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        logits, values = forward(obs)  # (N, A), (N,)
        logp_all = logits - logits.max(-1, keepdims=True)
        logp_all -= np.log(np.exp(logp_all).sum(-1, keepdims=True))  # log_softmax
        actions = (logits + rng.gumbel(size=logits.shape)).argmax(-1)  # (N,)
        return actions, np.take_along_axis(logp_all, actions[:, None], -1)[:, 0], values
    return act


def greedy_policy(actor):
    """Deterministic evaluation policy: argmax of `actor(obs)` (logits or Q-values)."""
    def act(obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return actor(torch.as_tensor(obs, dtype=torch.float32)).argmax(-1).numpy()
    return act


class Rollout:
    """Preallocated numpy rollout storage, time first: (T, N, ...)."""

    def __init__(self, num_steps: int, num_envs: int, n_obs: int):
        self.obs = np.zeros((num_steps, num_envs, n_obs), dtype=np.float32)  # (T, N, obs)
        self.actions = np.zeros((num_steps, num_envs), dtype=np.int64)  # (T, N)
        self.logps = np.zeros((num_steps, num_envs), dtype=np.float32)  # (T, N) log pi_old(a_t | s_t)
        self.values = np.zeros((num_steps, num_envs), dtype=np.float32)  # (T, N) V(s_t)
        self.rewards = np.zeros((num_steps, num_envs), dtype=np.float32)  # (T, N) r_t
        self.terminated = np.zeros((num_steps, num_envs), dtype=bool)  # (T, N) episode ended in the MDP
        self.truncated = np.zeros((num_steps, num_envs), dtype=bool)  # (T, N) episode cut by the time limit
        self.real = np.zeros((num_steps, num_envs), dtype=bool)  # (T, N) False on a NEXT_STEP reset step

    def gae_inputs(self, next_value: np.ndarray, *, gamma: float) -> dict[str, torch.Tensor]:
        """`gae_advantages`' keyword inputs, time last: rewards, values, dones (N, T), next_value (N,).

        NEXT_STEP: the step after an episode ends takes that episode's final observation
        as input, so `values[t + 1]` (or `next_value` after the last step) is V(final
        observation): a truncated (not terminated) step gets gamma times it added to its
        reward. `dones` cuts the recursion after every end, so the reset step's own
        (meaningless) advantage reaches no real step; `real_transitions` drops it.
        """
        next_values = np.concatenate([self.values[1:], next_value[None]])  # (T, N) V(s_{t+1})
        rewards = self.rewards + gamma * next_values * (self.truncated & ~self.terminated)  # (T, N)
        dones = (self.terminated | self.truncated).astype(np.float32)  # (T, N)
        return {"rewards": torch.from_numpy(rewards.T), "values": torch.from_numpy(self.values.T),
                "dones": torch.from_numpy(dones.T), "next_value": torch.from_numpy(next_value)}

    def real_transitions(self, advantages: torch.Tensor, returns: torch.Tensor) -> dict[str, torch.Tensor]:
        """The real (not reset) steps as flat tensors (B,) / (B, obs), with advantages and returns (N, T)."""
        real = torch.from_numpy(self.real.reshape(-1))  # (T*N,) in (T, N) order
        flat = {"obs": self.obs.reshape(-1, self.obs.shape[-1]), "actions": self.actions.reshape(-1),
                "logps": self.logps.reshape(-1), "values": self.values.reshape(-1)}
        batch = {k: torch.from_numpy(v)[real] for k, v in flat.items()}
        batch["advantages"], batch["returns"] = advantages.T.reshape(-1)[real], returns.T.reshape(-1)[real]
        return batch


def collect_rollout(envs, act, obs: np.ndarray, resetting: np.ndarray, rollout: Rollout, ep_return: np.ndarray,
                    log: RunLog) -> tuple[np.ndarray, np.ndarray]:
    """Fill `rollout` with len(rollout.obs) steps of every environment (NEXT_STEP autoreset).

    `resetting` (N,) marks environments whose previous step ended an episode: this step
    only resets them. Returns the next observation (N, obs) and `resetting`;
    `ep_return` (N,) carries running returns across calls.
    """
    for t in range(len(rollout.obs)):
        actions, logps, values = act(obs)
        next_obs, reward, terminated, truncated, _ = envs.step(actions)
        rollout.obs[t], rollout.actions[t], rollout.logps[t], rollout.values[t] = obs, actions, logps, values
        rollout.rewards[t], rollout.terminated[t], rollout.truncated[t] = reward, terminated, truncated
        rollout.real[t] = real = ~resetting
        ep_return += reward
        step = log.step + int(real.sum())
        resetting = terminated | truncated
        for i in np.flatnonzero(resetting):
            log.episode(step, ep_return[i])
            ep_return[i] = 0.0
        log.advance(step)
        obs = next_obs
    return obs, resetting


def check_discrete_control(algo: str, env_id: str):
    """The probe environment, after checking it has vector observations and discrete actions."""
    probe = make_env(env_id)
    require(is_discrete(probe.action_space), f"algo {algo}: {env_id} has continuous actions; {algo} here is for "
            "discrete actions (use algo sac for Pendulum-v1)")
    require(not is_discrete(probe.observation_space),
            f"algo {algo}: {env_id} has discrete states; use a tabular algo (q_learning, sarsa, value_iteration)")
    return probe


def minibatches(advantages: torch.Tensor, k: int) -> list[tuple[torch.Tensor | slice, torch.Tensor]]:
    """`k` shuffled minibatches over the rows: (row indices, advantages whitened over those rows).

    With k = 1 this is all rows in order, the same every epoch: call it once per update."""
    if k == 1:
        return [(slice(None), whiten(advantages))]
    return [(mb, whiten(advantages[mb])) for mb in torch.randperm(len(advantages)).tensor_split(k)]


def train(cfg: PPOConfig) -> dict:
    seed_everything(cfg.seed)
    probe = check_discrete_control("ppo", cfg.env)
    n_obs, n_actions = obs_dim(probe.observation_space), int(probe.action_space.n)
    num_updates = max(1, cfg.total_steps // (cfg.num_envs * cfg.num_steps))

    envs = make_next_step_vector_env(cfg.env, cfg.num_envs)
    model = ActorCritic(n_obs, n_actions, cfg.hidden)
    flat = flatten_parameters(model)  # before numpy_forward takes views of the parameters
    optimizer = torch.optim.Adam([flat], lr=cfg.lr, eps=1e-5, fused=True)
    act, value = sampler(model, np.random.default_rng(cfg.seed)), model.numpy_forward()
    evaluator = Evaluator(cfg.env, cfg.eval_episodes, cfg.seed)
    log = RunLog(cfg)

    rollout = Rollout(cfg.num_steps, cfg.num_envs, n_obs)
    obs = envs.reset(seed=cfg.seed)[0].astype(np.float32)  # (N, obs)
    resetting = np.zeros(cfg.num_envs, dtype=bool)  # (N,)
    ep_return = np.zeros(cfg.num_envs)  # (N,) running undiscounted returns
    for update in range(num_updates):
        if cfg.anneal_lr:
            optimizer.param_groups[0]["lr"] = cfg.lr * (1.0 - update / num_updates)

        # 1. rollout
        obs, resetting = collect_rollout(envs, act, obs, resetting, rollout, ep_return, log)

        # 2. advantages: GAE over the rollout (time last), then its real transitions (B,)
        advantages, returns = gae_advantages(**rollout.gae_inputs(value(obs)[1], gamma=cfg.gamma), gamma=cfg.gamma,
                                             lam=cfg.gae_lambda)
        b = rollout.real_transitions(advantages, returns)
        step = log.step

        # 3. clipped-surrogate epochs over minibatches
        clipfracs, whole = [], minibatches(b["advantages"], 1) if cfg.num_minibatches == 1 else None
        for _epoch in range(cfg.update_epochs):
            for mb, adv in whole or minibatches(b["advantages"], cfg.num_minibatches):
                new_logp, logits, new_val = model.evaluate_actions(b["obs"][mb], b["actions"][mb])  # (M,), (M, A), (M,)
                pg_losses, clipped = ppo_clip_loss(new_logp, b["logps"][mb], adv, clip_eps=cfg.clip_coef)
                v_loss = clipped_value_loss(new_val, b["values"][mb], b["returns"][mb], clip_eps=cfg.vf_clip).mean()
                pg_loss = pg_losses.mean()
                loss = pg_loss + cfg.vf_coef * v_loss
                if cfg.ent_coef:
                    loss = loss - cfg.ent_coef * entropy_from_logits(logits).mean()
                flat.grad.zero_()
                loss.backward()
                nn.utils.clip_grad_norm_(flat, cfg.max_grad_norm)
                optimizer.step()
                clipfracs.append(clipped.mean())
            kl = approx_kl(new_logp.detach(), b["logps"][mb]).mean()  # last minibatch, before its step
            if cfg.target_kl is not None and kl.item() > cfg.target_kl:
                break

        # 4. log and evaluate
        log.log(step, {"losses/policy_loss": pg_loss.item(), "losses/value_loss": v_loss.item(),
                       "losses/entropy": entropy_from_logits(logits.detach()).mean().item(),
                       "losses/approx_kl": kl.item(), "losses/clipfrac": torch.stack(clipfracs).mean().item(),
                       "losses/explained_variance": explained_variance(b["values"], b["returns"]),
                       "charts/learning_rate": optimizer.param_groups[0]["lr"]})
        if log.eval_due(step):
            log.evaluate(step, lambda: evaluator(greedy_policy(model.actor)))
            if log.should_stop():
                break

    envs.close()
    return log.finish_with(greedy_policy(model.actor))
