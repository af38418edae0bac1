"""Tabular RL: dynamic programming on a known model, TD control from samples, bandits.

Model-based (Sutton & Barto 2018, ch. 4), on a toy-text transition table
`P[s][a] = [(prob, next_state, reward, terminated), ...]`:

    Q(s, a) = sum_{s'} p * (r + gamma * (1 - terminated) * V(s'))

No bootstrapping through a terminating transition. The time limit is not part of the
MDP: it is a wrapper, and DP ignores it.

- `value_iteration`: V <- max_a Q(s, a) until the largest change is below `tol`.
- `policy_iteration`: exact evaluation (a linear solve), then greedy improvement, until
  the policy is stable.

Model-free TD control (ch. 6), epsilon-greedy behaviour with a linear decay schedule:

    Q-learning (off-policy):     target = r + gamma * (1 - term) * max_a' Q(s', a')
    SARSA (on-policy):           target = r + gamma * (1 - term) * Q(s', a'),  a' ~ behaviour
    expected SARSA:              target = r + gamma * (1 - term) * sum_a' pi(a'|s') Q(s', a')

Truncation (a time limit) still bootstraps. Bandits (ch. 2): epsilon-greedy and UCB1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from align.rl.envs import transition_table


# ---------------------------------------------------------------------------
# dynamic programming
# ---------------------------------------------------------------------------
def model_arrays(P: dict, n_states: int, n_actions: int) -> tuple[np.ndarray, np.ndarray]:
    """Dense model from a toy-text table.

    Returns T (S, A, S): probability of s' and of continuing (terminal mass removed for
    bootstrapping), and R (S, A): expected immediate reward.
    """
    T = np.zeros((n_states, n_actions, n_states))  # (S, A, S') prob * (1 - terminated)
    R = np.zeros((n_states, n_actions))  # (S, A) expected reward
    for s in range(n_states):
        for a in range(n_actions):
            for prob, s_next, reward, terminated in P[s][a]:
                R[s, a] += prob * reward
                if not terminated:
                    T[s, a, int(s_next)] += prob
    return T, R


def q_from_v(T: np.ndarray, R: np.ndarray, V: np.ndarray, gamma: float) -> np.ndarray:
    """Q(s, a) = R(s, a) + gamma * sum_s' T(s, a, s') V(s'): (S, A)."""
    return R + gamma * T @ V


def value_iteration(env, gamma: float, tol: float = 1e-10, max_iters: int = 1_000_000,
                    callback=None) -> tuple[np.ndarray, np.ndarray]:
    """Bellman optimality backups until max |V_new - V| < tol. Returns (V (S,), policy (S,)).

    `callback(iteration, delta, V)` is called after each sweep (for logging).
    """
    T, R = model_arrays(*transition_table(env))
    V = np.zeros(T.shape[0])
    for it in range(1, max_iters + 1):
        V_new = q_from_v(T, R, V, gamma).max(axis=1)
        delta = float(np.abs(V_new - V).max())
        V = V_new
        if callback is not None:
            callback(it, delta, V)
        if delta < tol:
            break
    Q = q_from_v(T, R, V, gamma)
    return V, Q.argmax(axis=1)


def evaluate_policy_exact(T: np.ndarray, R: np.ndarray, policy: np.ndarray, gamma: float) -> np.ndarray:
    """V^pi from the linear system (I - gamma * T_pi) V = R_pi. Needs gamma < 1 or a proper policy."""
    idx = np.arange(T.shape[0])
    T_pi, R_pi = T[idx, policy], R[idx, policy]  # (S, S), (S,)
    return np.linalg.solve(np.eye(T.shape[0]) - gamma * T_pi, R_pi)


def policy_iteration(env, gamma: float, max_iters: int = 10_000, callback=None) -> tuple[np.ndarray, np.ndarray]:
    """Howard's policy iteration. Returns (V (S,), policy (S,)).

    Improvement keeps the current action unless another is strictly better (by more
    than 1e-12), so ties cannot make the policy cycle.
    """
    T, R = model_arrays(*transition_table(env))
    idx = np.arange(T.shape[0])
    policy = np.zeros(T.shape[0], dtype=np.int64)
    for it in range(1, max_iters + 1):
        V = evaluate_policy_exact(T, R, policy, gamma)  # 1. evaluate
        Q = q_from_v(T, R, V, gamma)  # 2. improve
        best = Q.argmax(axis=1)
        improve = Q[idx, best] > Q[idx, policy] + 1e-12
        if callback is not None:
            callback(it, int(improve.sum()), V)
        if not improve.any():  # 3. stable: optimal
            return V, policy
        policy = np.where(improve, best, policy)
    return V, policy


def initial_distribution(env) -> np.ndarray:
    """The start-state distribution (S,) of a toy-text environment or the grid world."""
    isd = getattr(env.unwrapped, "initial_state_distrib", None)
    if isd is None:  # the grid world always starts in state 0
        isd = np.zeros(env.observation_space.n)
        isd[0] = 1.0
    return np.asarray(isd, dtype=np.float64)


def expected_return(env, policy: np.ndarray, horizon: int) -> float:
    """Exact expected undiscounted return of the deterministic `policy` (S,) within `horizon` steps.

    Averaged over the start-state distribution; no sampling noise. On FrozenLake (reward
    1 at the goal, 0 elsewhere) it is the success rate under the time limit.
    """
    T, R = model_arrays(*transition_table(env))
    idx = np.arange(T.shape[0])
    T_pi, R_pi = T[idx, policy], R[idx, policy]  # (S, S), (S,)
    V = np.zeros(T.shape[0])
    for _ in range(horizon):
        V = R_pi + T_pi @ V
    return float(initial_distribution(env) @ V)


def optimal_expected_return(env, horizon: int) -> float:
    """The best expected undiscounted return within `horizon` steps (backward induction)."""
    T, R = model_arrays(*transition_table(env))
    V = np.zeros(T.shape[0])
    for _ in range(horizon):
        V = (R + T @ V).max(axis=1)
    return float(initial_distribution(env) @ V)


# ---------------------------------------------------------------------------
# TD control
# ---------------------------------------------------------------------------
@dataclass
class LinearSchedule:
    """Linear decay from `start` to `end` over `steps` calls, then constant (`steps` 0: always `end`)."""

    start: float
    end: float
    steps: int

    def __call__(self, t: int) -> float:
        if self.steps <= 0 or t >= self.steps:
            return self.end
        return self.start + (self.end - self.start) * t / self.steps


def greedy_action(q_row: np.ndarray, rng: np.random.Generator) -> int:
    """argmax with ties broken uniformly at random (an all-zero table is not 'always action 0')."""
    best = np.flatnonzero(q_row == q_row.max())
    return int(best[0] if len(best) == 1 else rng.choice(best))


def epsilon_greedy(q_row: np.ndarray, epsilon: float, rng: np.random.Generator) -> int:
    if rng.random() < epsilon:
        return int(rng.integers(len(q_row)))
    return greedy_action(q_row, rng)


def td_target_value(method: str, q_next: np.ndarray, a_next: int, epsilon: float) -> float:
    """The value of s' each TD method bootstraps from (before discount and termination)."""
    if method == "q_learning":
        return float(q_next.max())
    if method == "sarsa":
        return float(q_next[a_next])
    if method == "expected_sarsa":
        n = len(q_next)
        best = np.flatnonzero(q_next == q_next.max())
        probs = np.full(n, epsilon / n)  # (A,) epsilon-greedy pi(a'|s'), ties share the greedy mass
        probs[best] += (1.0 - epsilon) / len(best)
        return float(probs @ q_next)
    raise ValueError(f"unknown TD method {method!r}")


TD_METHODS = ("q_learning", "sarsa", "expected_sarsa")


def td_control(env, *, method: str, total_steps: int, alpha: float, gamma: float, epsilon: LinearSchedule,
               seed: int = 0, on_step=None, q_table: np.ndarray | None = None) -> np.ndarray:
    """Q-learning / SARSA / expected SARSA for `total_steps` environment steps. Returns Q (S, A).

    1. a = epsilon-greedy(Q[s]) (SARSA picks a' before its update and then takes it)
    2. s', r, terminated, truncated = env.step(a)
    3. Q[s, a] += alpha * (r + gamma * (1 - terminated) * value(s') - Q[s, a])
    4. on episode end, reset

    `on_step(step, Q, episode_return_or_None)` is called after every step (for logging
    and periodic evaluation); the return is given on the step that ends an episode.
    `q_table` (S, A), if given, is updated in place (so a caller that stops early keeps it).
    """
    if method not in TD_METHODS:
        raise ValueError(f"unknown TD method {method!r}; expected one of {TD_METHODS}")
    rng = np.random.default_rng(seed)
    Q = np.zeros((env.observation_space.n, env.action_space.n)) if q_table is None else q_table  # (S, A)
    s, _ = env.reset(seed=seed)
    a = epsilon_greedy(Q[s], epsilon(0), rng)
    ep_return = 0.0
    for step in range(1, total_steps + 1):
        eps = epsilon(step)
        s_next, r, terminated, truncated, _ = env.step(a)
        ep_return += r
        a_next = epsilon_greedy(Q[s_next], eps, rng)  # the behaviour's next action (used by SARSA)
        target = r + (0.0 if terminated else gamma * td_target_value(method, Q[s_next], a_next, eps))
        Q[s, a] += alpha * (target - Q[s, a])
        done = terminated or truncated
        if on_step is not None:
            on_step(step, Q, ep_return if done else None)
        if done:
            s, _ = env.reset()
            a = epsilon_greedy(Q[s], eps, rng)
            ep_return = 0.0
        else:
            s, a = s_next, a_next
    return Q


def greedy_rollout(env, policy: np.ndarray, seed: int | None = None) -> tuple[float, list[int]]:
    """One episode following `policy` (S,) greedily. Returns (undiscounted return, visited states)."""
    s, _ = env.reset(seed=seed)
    states, ret, done = [int(s)], 0.0, False
    while not done:
        s, r, terminated, truncated, _ = env.step(int(policy[s]))
        states.append(int(s))
        ret += r
        done = terminated or truncated
    return ret, states


# ---------------------------------------------------------------------------
# multi-armed bandits
# ---------------------------------------------------------------------------
BANDIT_STRATEGIES = ("epsilon_greedy", "ucb")


def run_bandit(means, *, strategy: str, steps: int, epsilon: float = 0.1, c: float = 2.0, noise: float = 1.0,
               seed: int = 0) -> dict:
    """A Gaussian k-armed bandit (rewards ~ N(mean_k, noise^2)) with sample-average estimates.

    epsilon_greedy: random arm with probability epsilon, else the best estimate.
    ucb (Auer et al. 2002, UCB1 form of Sutton & Barto eq. 2.10): each arm once, then
        argmax_k  Q_k + c * sqrt(ln t / N_k).
    Returns rewards (steps,), actions (steps,), regret (steps,) cumulative expected regret.
    """
    if strategy not in BANDIT_STRATEGIES:
        raise ValueError(f"unknown bandit strategy {strategy!r}; expected one of {BANDIT_STRATEGIES}")
    means = np.asarray(means, dtype=np.float64)  # (K,)
    k = len(means)
    rng = np.random.default_rng(seed)
    counts, estimates = np.zeros(k), np.zeros(k)  # (K,), (K,)
    rewards, actions = np.zeros(steps), np.zeros(steps, dtype=np.int64)  # (steps,)
    for t in range(steps):
        if strategy == "ucb":
            if t < k:
                a = t
            else:
                a = int(np.argmax(estimates + c * np.sqrt(np.log(t + 1) / counts)))
        else:
            a = int(rng.integers(k)) if rng.random() < epsilon else greedy_action(estimates, rng)
        r = means[a] + noise * rng.standard_normal()
        counts[a] += 1
        estimates[a] += (r - estimates[a]) / counts[a]
        rewards[t], actions[t] = r, a
    regret = np.cumsum(means.max() - means[actions])
    return {"rewards": rewards, "actions": actions, "regret": regret}
