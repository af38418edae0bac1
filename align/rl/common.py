"""What every `align rl` run shares: the recipe keys, seeding, evaluation, and the run log.

`RunConfig` holds the keys every recipe understands; each algorithm file subclasses it
with its own hyperparameters (defaults live there, in the schema, and nowhere else).
`RunLog` owns the output folder: `log.jsonl`, the tqdm bar with the episodic return,
the solve criterion (`solve_consecutive` evaluations in a row at or above the threshold),
`metrics.json` and the learning-curve PNG.
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from align.config import positive
from align.errors import AlignError
from align.io_utils import JsonlLog, atomic_write_json
from align.plots import plot_curves, series_title
from align.rl.envs import SOLVE_THRESHOLDS, check_env_id, make_env


@dataclass
class RunConfig:
    """Keys every `align rl` recipe understands."""

    algo: str = ""
    """Algorithm; selects the rest of the schema (see `align.rl.runner.ALGOS`)."""
    env: str = "CartPole-v1"
    """Environment id (`align.rl.envs.ENV_IDS`)."""
    output_dir: str = "runs/rl"
    """Folder for metrics.json, log.jsonl, curve.png and config.json."""
    seed: int = 0
    """Seeds torch, numpy, the environments and their action spaces."""
    total_steps: int = field(default=50_000, metadata=positive("total_steps"))
    """Environment steps to train for (value/policy iteration: maximum sweeps)."""
    eval_every: int = field(default=2_000, metadata=positive("eval_every"))
    """Evaluate the greedy/deterministic policy every this many environment steps."""
    eval_episodes: int = field(default=10, metadata={"check": lambda v: v >= 10, "expect": "eval_episodes >= 10"})
    """Episodes per evaluation (periodic and final)."""
    solve_threshold: float | None = None
    """Mean evaluation return that counts as solved; None: the environment's usual bar."""
    solve_consecutive: int = field(default=3, metadata=positive("solve_consecutive"))
    """A solve needs this many evaluations in a row at or above the threshold."""
    stop_when_solved: bool = False
    """End training at the solve (then run the final evaluation on fresh episodes)."""
    progress: bool = True
    """Show a tqdm progress bar."""

    def validate(self) -> None:
        check_env_id(self.env)

    @property
    def threshold(self) -> float:
        return SOLVE_THRESHOLDS[self.env] if self.solve_threshold is None else self.solve_threshold


def seed_everything(seed: int) -> None:
    """Python, numpy and torch RNGs; one torch thread (two threads on a busy 2-core host are much slower)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)


class Evaluator:
    """Runs `n_episodes` episodes side by side with a batched policy `act(obs (n, ...)) -> actions (n,)`.

    Each call uses fresh episode seeds (derived from `seed`), so repeated evaluations
    see different initial states but a rerun of the same recipe sees the same ones.
    """

    def __init__(self, env_id: str, n_episodes: int, seed: int):
        self.envs = [make_env(env_id) for _ in range(n_episodes)]
        self.seed, self.calls = seed, 0

    def __call__(self, act) -> np.ndarray:
        n = len(self.envs)
        base = self.seed + 1_000_003 * (self.calls + 1)
        self.calls += 1
        obs = np.stack([np.asarray(env.reset(seed=base + i)[0]) for i, env in enumerate(self.envs)])  # (n, ...)
        returns = np.zeros(n)  # (n,)
        active = np.ones(n, dtype=bool)
        while active.any():
            idx = np.flatnonzero(active)
            actions = act(obs[idx])
            for j, i in enumerate(idx):
                o, r, terminated, truncated, _ = self.envs[i].step(actions[j])
                obs[i], returns[i] = o, returns[i] + r
                if terminated or truncated:
                    active[i] = False
        return returns


class RunLog:
    """Output folder, progress bar, evaluation bookkeeping and the final metrics of one run."""

    def __init__(self, cfg: RunConfig, unit: str = "step"):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out / "config.json", asdict(cfg))
        self.jsonl = JsonlLog(self.out / "log.jsonl")
        self.bar = tqdm(total=cfg.total_steps, unit=unit, desc=f"{cfg.algo} {cfg.env}", disable=not cfg.progress,
                        dynamic_ncols=True, mininterval=0.5)
        self.step = 0
        self.recent = deque(maxlen=20)  # last episodic returns, for the bar
        self.train_curve: tuple[list, list] = ([], [])
        self.eval_curve: tuple[list, list] = ([], [])
        self.streak, self.solved_step, self.solved_seconds = 0, None, None
        self.start, self.eval_seconds = time.perf_counter(), 0.0
        self.next_eval = cfg.eval_every

    # -- training progress ---------------------------------------------------
    def advance(self, step: int) -> None:
        """Move the bar to `step` (environment steps so far)."""
        if step > self.step:
            self.bar.update(step - self.step)
            self.step = step

    def episode(self, step: int, episodic_return: float) -> None:
        self.recent.append(float(episodic_return))
        self.train_curve[0].append(step)
        self.train_curve[1].append(float(episodic_return))
        self.bar.set_postfix(ret=f"{np.mean(self.recent):.2f}", refresh=False)

    def log(self, step: int, metrics: dict) -> None:
        """One `log.jsonl` record; the mean of the recent episodic returns is added."""
        if self.recent:
            metrics = {"train/episode_return": float(np.mean(self.recent)), **metrics}
        self.jsonl.write(step, metrics)

    def train_seconds(self) -> float:
        """Wall time so far, evaluation excluded."""
        return time.perf_counter() - self.start - self.eval_seconds

    # -- evaluation -----------------------------------------------------------
    def evaluate(self, step: int, run_eval) -> bool:
        """Time `run_eval() -> returns`, log it, update the solve streak. True once solved."""
        t0 = time.perf_counter()
        returns = np.asarray(run_eval(), dtype=np.float64)
        self.eval_seconds += time.perf_counter() - t0
        mean = float(returns.mean())
        self.eval_curve[0].append(step)
        self.eval_curve[1].append(mean)
        self.streak = self.streak + 1 if mean >= self.cfg.threshold - 1e-9 else 0  # 1e-9: float sums of rewards
        if self.solved_step is None and self.streak >= self.cfg.solve_consecutive:
            self.solved_step, self.solved_seconds = step, self.train_seconds()
        self.log(step, {"eval/return_mean": mean, "eval/return_std": float(returns.std())})
        self.bar.set_postfix(ret=f"{np.mean(self.recent) if self.recent else float('nan'):.2f}",
                             eval=f"{mean:.2f}", refresh=False)
        return self.solved_step is not None

    def should_stop(self) -> bool:
        return self.cfg.stop_when_solved and self.solved_step is not None

    def eval_due(self, step: int) -> bool:
        """For loops that advance many steps at a time: True once per `eval_every` steps crossed."""
        if step < self.next_eval:
            return False
        self.next_eval += self.cfg.eval_every * ((step - self.next_eval) // self.cfg.eval_every + 1)
        return True

    def finish_with(self, policy, extra: dict | None = None) -> dict:
        """The final evaluation (fresh episode seeds, never used during training), then `finish`."""
        final = Evaluator(self.cfg.env, self.cfg.eval_episodes, self.cfg.seed + 7919)(policy)
        return self.finish(final, extra)

    # -- the end --------------------------------------------------------------
    def finish(self, final_returns, extra: dict | None = None) -> dict:
        """Write metrics.json and curve.png; return the flat metrics."""
        train_seconds = self.train_seconds()
        self.bar.close()
        final_returns = np.asarray(final_returns, dtype=np.float64)
        metrics = {
            "eval/return_mean": float(final_returns.mean()),
            "eval/return_std": float(final_returns.std()),
            "eval/episodes": int(len(final_returns)),
            "solve/threshold": float(self.cfg.threshold),
            "solve/steps": self.solved_step,
            "solve/train_seconds": self.solved_seconds,
            "train/steps": int(self.step),
            "train/episodes": len(self.train_curve[0]),
            "time/train_seconds": train_seconds,
            "time/eval_seconds": self.eval_seconds,
            **(extra or {}),
        }
        self.jsonl.write(self.step, {k: v for k, v in metrics.items() if k.startswith("eval/")})
        atomic_write_json(self.out / "metrics.json", metrics)
        curves = {"train episodic return": _smooth(self.train_curve), "eval return (mean)": self.eval_curve}
        plot_curves(self.out / "curve.png", curves, title=series_title(f"{self.cfg.algo} on {self.cfg.env}", curves),
                    xlabel="environment steps", ylabel="return")
        return metrics


def _smooth(curve: tuple[list, list], window: int = 20) -> tuple[list, list]:
    xs, ys = curve
    if len(ys) < window:
        return xs, ys
    kernel = np.ones(window) / window
    return xs[window - 1:], list(np.convolve(ys, kernel, mode="valid"))


def mlp(n_in: int, n_out: int, hidden: int, activation=nn.ReLU, out_gain: float | None = None) -> nn.Sequential:
    """n_in -> hidden -> hidden -> n_out with `activation` between layers.

    With `out_gain` set, weights get orthogonal init (gain sqrt 2 inside, `out_gain` on
    the output layer) and zero biases, as CleanRL's PPO does; otherwise PyTorch's default.
    """
    layers = [nn.Linear(n_in, hidden), activation(), nn.Linear(hidden, hidden), activation(), nn.Linear(hidden, n_out)]
    if out_gain is not None:
        linears = [layer for layer in layers if isinstance(layer, nn.Linear)]
        for layer in linears:
            nn.init.orthogonal_(layer.weight, out_gain if layer is linears[-1] else np.sqrt(2))
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


def step_into_buffer(env, obs, action, buffer, log: RunLog, step: int, ep_return: float):
    """One step of a single environment into a replay buffer (off-policy DQN and SAC).

    Stores (s, a, r, s', terminated): the true last observation even at an episode's end,
    and `terminated` only (a time-limit truncation still bootstraps). Resets the environment
    when the episode ends. -> (the next observation to act on, the running return).
    """
    next_obs, reward, terminated, truncated, _ = env.step(action)
    ep_return += reward
    buffer.add(obs, action, reward, next_obs, float(terminated))
    if terminated or truncated:
        log.episode(step, ep_return)
        ep_return = 0.0
        next_obs, _ = env.reset()
    return next_obs, ep_return


def require(condition: bool, message: str) -> None:
    """Raise AlignError(message) unless `condition` (recipe checks that need the environment)."""
    if not condition:
        raise AlignError(message)
