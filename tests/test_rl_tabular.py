"""Tabular foundations: the seed's grid world, DP, TD control and bandits (exact, cheap)."""

import numpy as np
import pytest

from align.rl.envs import GRID_OPTIMAL_RETURN, GridWorldEnv, make_env
from align.rl.tabular import (
    LinearSchedule,
    expected_return,
    model_arrays,
    optimal_expected_return,
    policy_iteration,
    q_from_v,
    run_bandit,
    td_control,
    value_iteration,
)

TOY_TEXT = ["GridWorld-v0", "FrozenLake-v1", "FrozenLake8x8-v1", "CliffWalking-v1", "Taxi-v4"]


def seed_step(s, a):
    """The seed's step function, verbatim in behaviour."""
    row, col = s // 4, s % 4
    dr, dc = [(-1, 0), (1, 0), (0, -1), (0, 1)][a]
    s_next = max(0, min(3, row + dr)) * 4 + max(0, min(3, col + dc))
    return s_next, (1.0 if s_next == 15 else -0.01), s_next == 15


def test_gridworld_matches_the_seed_step_function():
    env = make_env("GridWorld-v0")
    for s in range(15):
        for a in range(4):
            env.reset(seed=0)
            env.unwrapped.s = s
            s_next, r, terminated, truncated, _ = env.step(a)
            assert (s_next, r, terminated) == seed_step(s, a)
            assert not truncated


def test_gridworld_time_limit_is_100_steps():
    env = make_env("GridWorld-v0")
    env.reset(seed=0)
    for t in range(100):
        s, r, terminated, truncated, _ = env.step(0)  # up from (0,0): stays put
        assert truncated == (t == 99)
    assert (s, r, terminated, truncated) == (0, -0.01, False, True)


@pytest.mark.parametrize("env_id", TOY_TEXT)
@pytest.mark.parametrize("gamma", [0.9, 0.99])
def test_value_and_policy_iteration_agree(env_id, gamma):
    env = make_env(env_id)
    V_vi, pi_vi = value_iteration(env, gamma)
    V_pi, pi_pi = policy_iteration(env, gamma)
    np.testing.assert_allclose(V_vi, V_pi, atol=1e-8, rtol=0)
    # the two greedy policies may break ties differently but must be worth the same
    T, R = model_arrays(env.unwrapped.P, env.observation_space.n, env.action_space.n)
    Q = q_from_v(T, R, V_pi, gamma)
    idx = np.arange(len(V_pi))
    np.testing.assert_allclose(Q[idx, pi_vi], V_pi, atol=1e-7, rtol=0)


def test_bellman_fixed_point_and_no_bootstrap_through_termination():
    env = make_env("GridWorld-v0")
    V, _ = value_iteration(env, 0.99)
    T, R = model_arrays(env.unwrapped.P, 16, 4)
    np.testing.assert_allclose(q_from_v(T, R, V, 0.99).max(1), V, atol=1e-9)
    # stepping into the goal terminates: Q = 1.0 exactly, whatever V(goal) is
    assert V[15] == 0.0
    assert q_from_v(T, R, V + 100.0 * (np.arange(16) == 15), 0.99)[14, 3] == pytest.approx(1.0)
    # from (0,0): five -0.01 steps then +1, discounted
    expected = sum(-0.01 * 0.99**k for k in range(5)) + 0.99**5
    assert V[0] == pytest.approx(expected, abs=1e-9)


def test_exact_success_rate_frozenlake():
    env = make_env("FrozenLake-v1")
    _, policy = value_iteration(env, 0.99)
    best = optimal_expected_return(env, 100)
    assert 0.74 <= best <= 0.75  # the known optimum under the 100-step limit
    assert expected_return(env, policy, 100) == pytest.approx(best, abs=0.01)
    assert expected_return(env, np.zeros(16, dtype=int), 100) == 0.0  # always left never reaches the goal


def test_q_learning_greedy_policy_is_optimal_from_every_grid_state():
    env = make_env("GridWorld-v0")
    Q = td_control(env, method="q_learning", total_steps=20_000, alpha=0.1, gamma=0.99,
                   epsilon=LinearSchedule(1.0, 0.05, 10_000), seed=0)
    V_star, _ = value_iteration(env, 0.99)
    T, R = model_arrays(env.unwrapped.P, 16, 4)
    Q_star = q_from_v(T, R, V_star, 0.99)
    for s in range(15):
        a = int(Q[s].argmax())
        assert Q_star[s, a] == pytest.approx(V_star[s], abs=1e-9), f"state {s}: action {a} is not optimal"
    # and the undiscounted greedy return from the start is the seed's optimum
    assert expected_return(env, Q.argmax(1), 100) == pytest.approx(GRID_OPTIMAL_RETURN)


def cliff_path(Q):
    env = make_env("CliffWalking-v1")
    s, _ = env.reset(seed=0)
    states, ret, done = [s], 0.0, False
    while not done:
        s, r, terminated, truncated, _ = env.step(int(Q[s].argmax()))
        states.append(s)
        ret += r
        done = terminated or truncated
    return ret, [divmod(int(x), 12) for x in states]


@pytest.mark.parametrize("method", ["sarsa", "q_learning", "expected_sarsa"])
def test_cliffwalking_on_vs_off_policy(method):
    """Sutton & Barto example 6.6: with epsilon 0.1 kept on, SARSA walks away from the
    cliff; Q-learning learns the optimal path along its edge."""
    env = make_env("CliffWalking-v1")
    Q = td_control(env, method=method, total_steps=15_000, alpha=0.5, gamma=1.0,
                   epsilon=LinearSchedule(0.1, 0.1, 0), seed=0)
    ret, path = cliff_path(Q)
    edge = [(row, col) for row, col in path if row == 2 and 1 <= col <= 10]  # cells just above the cliff
    if method == "q_learning":
        assert ret == -13.0 and len(edge) == 10
    else:
        assert -17.0 <= ret < -13.0 and edge == []


@pytest.mark.slow
def test_q_learning_frozenlake_reaches_optimal_success_rate():
    """300k Python-loop steps (the frozenlake-q recipe); about 5 s unloaded."""
    env = make_env("FrozenLake-v1")
    Q = td_control(env, method="q_learning", total_steps=300_000, alpha=0.05, gamma=0.99,
                   epsilon=LinearSchedule(1.0, 0.1, 150_000), seed=0)
    assert expected_return(env, Q.argmax(1), 100) >= optimal_expected_return(env, 100) - 0.02


def test_linear_schedule():
    sched = LinearSchedule(1.0, 0.1, 10)
    assert [sched(t) for t in (0, 5, 10, 50)] == pytest.approx([1.0, 0.55, 0.1, 0.1])
    assert LinearSchedule(1.0, 0.2, 0)(0) == 0.2


def test_bandits_find_the_best_arm():
    means = [0.1, 0.5, 0.9, 0.3]
    ucb = run_bandit(means, strategy="ucb", steps=5000, c=2.0, seed=0)
    eps = run_bandit(means, strategy="epsilon_greedy", steps=5000, epsilon=0.1, seed=0)
    assert (ucb["actions"][-1000:] == 2).mean() > 0.9
    assert (eps["actions"][-1000:] == 2).mean() > 0.85  # about 1 - 0.1 + 0.1/4 when it has converged
    rand_regret = 5000 * (0.9 - np.mean(means))
    assert ucb["regret"][-1] < 0.2 * rand_regret and eps["regret"][-1] < 0.2 * rand_regret


def test_gridworld_env_class_has_transition_table():
    env = GridWorldEnv()
    assert env.P[11][1] == [(1.0, 15, 1.0, True)]  # down from (2,3) reaches the goal
    assert env.P[0][0] == [(1.0, 0, -0.01, False)]  # up from (0,0) hits the wall
