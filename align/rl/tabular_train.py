"""Recipe runs for the tabular methods in `align.rl.tabular` (`align rl recipes/rl/gridworld-q.yaml`).

- value_iteration / policy_iteration: solve the known model, then evaluate the greedy
  policy (`total_steps` caps the sweeps).
- q_learning / sarsa / expected_sarsa: `total_steps` environment steps of TD control,
  evaluating the greedy policy every `eval_every` steps.

Besides the sampled `eval/return_mean`, metrics carry the exact expected return of the
final greedy policy within the time limit (`eval/return_exact`) and the best achievable
one (`eval/return_optimal`), both from the transition table, so a result can be checked
without sampling noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from align.config import in_range, positive
from align.rl.common import Evaluator, RunConfig, RunLog, require, seed_everything
from align.rl.envs import is_discrete, make_env
from align.rl.tabular import (
    LinearSchedule,
    expected_return,
    optimal_expected_return,
    policy_iteration,
    td_control,
    value_iteration,
)


@dataclass
class DPConfig(RunConfig):
    algo: Literal["value_iteration", "policy_iteration"] = "value_iteration"
    env: str = "FrozenLake-v1"
    total_steps: int = field(default=100_000, metadata=positive("total_steps"))
    """Maximum sweeps (value iteration) or improvement rounds (policy iteration)."""
    gamma: float = field(default=0.99, metadata={"check": lambda v: 0 <= v < 1, "expect": "0 <= gamma < 1"})
    tol: float = field(default=1e-10, metadata=positive("tol"))
    """Value iteration stops when the largest change of V in a sweep is below this."""


@dataclass
class TDConfig(RunConfig):
    algo: Literal["q_learning", "sarsa", "expected_sarsa"] = "q_learning"
    env: str = "GridWorld-v0"
    alpha: float = field(default=0.1, metadata=in_range(0.0, 1.0, "alpha"))
    """Step size of the TD update."""
    gamma: float = field(default=0.99, metadata=in_range(0.0, 1.0, "gamma"))
    epsilon_start: float = field(default=1.0, metadata=in_range(0.0, 1.0, "epsilon_start"))
    epsilon_end: float = field(default=0.05, metadata=in_range(0.0, 1.0, "epsilon_end"))
    epsilon_decay_steps: int = field(default=10_000, metadata={"check": lambda v: v >= 0,
                                                                 "expect": "epsilon_decay_steps >= 0"})
    """Linear decay from epsilon_start to epsilon_end over this many steps (0: epsilon_end throughout)."""


def _check_tabular(cfg: RunConfig):
    env = make_env(cfg.env)
    require(is_discrete(env.observation_space) and hasattr(env.unwrapped, "P"),
            f"algo {cfg.algo}: {cfg.env} has no finite state table; tabular algos need GridWorld-v0, "
            "FrozenLake-v1, FrozenLake8x8-v1, CliffWalking-v1 or Taxi-v4")
    return env


def table_policy(policy: np.ndarray):
    """A batched act function for `Evaluator` from a policy table (S,)."""
    return lambda obs: policy[np.asarray(obs, dtype=np.int64)]


def _exact_metrics(env, policy: np.ndarray) -> dict:
    horizon = env.spec.max_episode_steps
    return {"eval/return_exact": expected_return(env, policy, horizon),
            "eval/return_optimal": optimal_expected_return(env, horizon)}


def train_dp(cfg: DPConfig) -> dict:
    seed_everything(cfg.seed)
    env = _check_tabular(cfg)
    log = RunLog(cfg, unit="sweep")

    def on_sweep(it, change, V):
        log.advance(it)
        log.log(it, {"dp/change": float(change), "dp/value_mean": float(V.mean())})

    if cfg.algo == "value_iteration":
        V, policy = value_iteration(env, cfg.gamma, tol=cfg.tol, max_iters=cfg.total_steps, callback=on_sweep)
    else:
        V, policy = policy_iteration(env, cfg.gamma, max_iters=cfg.total_steps, callback=on_sweep)
    evaluator = Evaluator(cfg.env, cfg.eval_episodes, cfg.seed)
    for _ in range(cfg.solve_consecutive):  # the policy is final: evaluate it as often as a solve needs
        log.evaluate(log.step, lambda: evaluator(table_policy(policy)))
    return log.finish_with(table_policy(policy), {"dp/iterations": log.step, **_exact_metrics(env, policy)})


def train_td(cfg: TDConfig) -> dict:
    seed_everything(cfg.seed)
    env = _check_tabular(cfg)
    env.action_space.seed(cfg.seed)
    log = RunLog(cfg)
    evaluator = Evaluator(cfg.env, cfg.eval_episodes, cfg.seed)
    schedule = LinearSchedule(cfg.epsilon_start, cfg.epsilon_end, cfg.epsilon_decay_steps)
    stop = StopTraining()

    def on_step(step, Q, episode_return):
        log.advance(step)
        if episode_return is not None:
            log.episode(step, episode_return)
        if step % cfg.eval_every == 0:
            log.evaluate(step, lambda: evaluator(table_policy(Q.argmax(axis=1))))
            log.log(step, {"charts/epsilon": schedule(step)})
            if log.should_stop():
                raise stop

    Q = np.zeros((env.observation_space.n, env.action_space.n))
    try:
        Q = td_control(env, method=cfg.algo, total_steps=cfg.total_steps, alpha=cfg.alpha, gamma=cfg.gamma,
                       epsilon=schedule, seed=cfg.seed, on_step=on_step, q_table=Q)
    except StopTraining:
        pass
    policy = Q.argmax(axis=1)
    return log.finish_with(table_policy(policy), _exact_metrics(env, policy))


class StopTraining(Exception):
    """Raised from the step callback to end TD control early (stop_when_solved)."""
