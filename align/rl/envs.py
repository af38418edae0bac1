"""Environments for the foundations: the seed's 4x4 grid world and the Gymnasium ones.

`make_env(env_id)` is the one way every algorithm in `align.rl` builds an environment,
so an unknown name fails the same way everywhere (an `AlignError` naming the closest
supported id). Gymnasium 1.4 names are used: `CliffWalking-v1` and `Taxi-v4` (the
older `-v0`/`-v3` ids raise `DeprecatedEnv` there).
"""

from __future__ import annotations

import difflib

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from align.errors import AlignError

GRID_SIZE = 4
GRID_GOAL = 15
GRID_MOVES = ((-1, 0), (1, 0), (0, -1), (0, 1))  # up, down, left, right (the seed's order)
GRID_OPTIMAL_RETURN = 0.95  # 6 steps from (0,0) to (3,3): 5 * -0.01 + 1.0


class GridWorldEnv(gym.Env):
    """The seed's 4x4 grid world, exactly: start at state 0 = (0,0), goal 15 = (3,3).

    Actions 0 up, 1 down, 2 left, 3 right; a move into a wall leaves the agent in place.
    Reward +1.0 on the step that reaches the goal (which terminates the episode) and
    -0.01 on every other step. The seed's loop caps an episode at 100 steps; the
    registered id `GridWorld-v0` adds that as a Gymnasium TimeLimit (truncation, not
    part of the MDP).

    `P[s][a]` is the toy-text transition table `[(prob, next_state, reward, terminated)]`,
    so `value_iteration` treats this environment like FrozenLake. The goal is absorbing
    with zero reward, as Gymnasium's toy-text terminal states are.
    """

    metadata = {"render_modes": []}

    def __init__(self):
        self.observation_space = spaces.Discrete(GRID_SIZE * GRID_SIZE)
        self.action_space = spaces.Discrete(len(GRID_MOVES))
        self.P = {s: {a: [self._transition(s, a)] for a in range(4)} for s in range(GRID_SIZE * GRID_SIZE)}
        self.s = 0

    @staticmethod
    def _transition(s: int, a: int) -> tuple[float, int, float, bool]:
        if s == GRID_GOAL:
            return (1.0, s, 0.0, True)
        row, col = divmod(s, GRID_SIZE)
        dr, dc = GRID_MOVES[a]
        row = max(0, min(GRID_SIZE - 1, row + dr))
        col = max(0, min(GRID_SIZE - 1, col + dc))
        s_next = row * GRID_SIZE + col
        reward = 1.0 if s_next == GRID_GOAL else -0.01
        return (1.0, s_next, reward, s_next == GRID_GOAL)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.s = 0
        return self.s, {}

    def step(self, action):
        _, s_next, reward, terminated = self.P[self.s][int(action)][0]
        self.s = s_next
        return s_next, reward, terminated, False, {}


gym.register("GridWorld-v0", entry_point=GridWorldEnv, max_episode_steps=100)

# Environment ids `align rl` accepts, with the episodic return that counts as solved.
# CartPole/Acrobot/FrozenLake/Taxi: Gymnasium's reward_threshold. Pendulum has none in
# Gymnasium; -200 is the usual bar. CliffWalking: the 13-step cliff-edge path. GridWorld:
# the 6-step optimum.
SOLVE_THRESHOLDS = {
    "GridWorld-v0": GRID_OPTIMAL_RETURN,
    "FrozenLake-v1": 0.70,
    "FrozenLake8x8-v1": 0.85,
    "CliffWalking-v1": -13.0,
    "Taxi-v4": 8.0,
    "CartPole-v1": 475.0,
    "Acrobot-v1": -100.0,
    "Pendulum-v1": -200.0,
}
ENV_IDS = tuple(SOLVE_THRESHOLDS)
# CliffWalking has no time limit in Gymnasium; a greedy policy that loops would never end.
_EXTRA_TIME_LIMIT = {"CliffWalking-v1": 500}


def check_env_id(env_id: str) -> str:
    if env_id not in SOLVE_THRESHOLDS:
        close = difflib.get_close_matches(env_id, ENV_IDS, n=1, cutoff=0.4)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise AlignError(f"env: unknown environment {env_id!r}{hint} (supported: {', '.join(ENV_IDS)})")
    return env_id


def make_env(env_id: str, **kwargs) -> gym.Env:
    """gym.make for a supported id (the grid world included)."""
    check_env_id(env_id)
    if env_id in _EXTRA_TIME_LIMIT:
        kwargs.setdefault("max_episode_steps", _EXTRA_TIME_LIMIT[env_id])
    return gym.make(env_id, **kwargs)


def make_vector_env(env_id: str, num_envs: int, seed: int) -> gym.vector.SyncVectorEnv:
    """`num_envs` copies in one process, auto-reset in the same step.

    SAME_STEP: when an episode ends, `step` returns the first observation of the next
    episode and puts the last one in `info["final_obs"]` (used to bootstrap truncated
    episodes). Each copy's action space is seeded so sampling is reproducible.
    """
    envs = gym.vector.SyncVectorEnv([lambda: make_env(env_id) for _ in range(num_envs)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    envs.action_space.seed(seed)
    envs.single_action_space.seed(seed)
    return envs


def make_next_step_vector_env(env_id: str, num_envs: int) -> gym.vector.VectorEnv:
    """`num_envs` copies in one process, auto-reset on the step after an episode ends.

    NEXT_STEP: the step that ends an episode returns its last observation; the next
    step ignores the action, resets that copy and returns the first observation of
    the next episode (reward 0, neither terminated nor truncated). Where Gymnasium
    ships a numpy-vectorised implementation (CartPole-v1's `CartPoleVectorEnv`: the
    same dynamics and 500-step limit, all copies in one array op per step) it is used;
    other environments get a SyncVectorEnv. Seed with `reset(seed=...)`.
    """
    check_env_id(env_id)
    if gym.spec(env_id).vector_entry_point is not None and env_id not in _EXTRA_TIME_LIMIT:
        return gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="vector_entry_point")
    return gym.vector.SyncVectorEnv([lambda: make_env(env_id) for _ in range(num_envs)],
                                    autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)


def transition_table(env) -> tuple[dict, int, int]:
    """(P, n_states, n_actions) of a toy-text environment or the grid world."""
    base = getattr(env, "unwrapped", env)
    P = getattr(base, "P", None)
    if P is None or not isinstance(env.observation_space, spaces.Discrete):
        raise AlignError(f"{env.spec.id if env.spec else env}: no transition table (needs a toy-text "
                         "environment with discrete states, e.g. FrozenLake-v1, CliffWalking-v1, Taxi-v4, GridWorld-v0)")
    return P, int(env.observation_space.n), int(env.action_space.n)


def is_discrete(space) -> bool:
    return isinstance(space, spaces.Discrete)


def obs_dim(space) -> int:
    return int(np.prod(space.shape))
