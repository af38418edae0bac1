"""Benchmark: seconds and environment steps to solve CartPole-v1, align vs Stable-Baselines3.

Solved = `solve_consecutive` (3) evaluations in a row with mean return >= 475 over 10
deterministic episodes. Both sides are evaluated by the same `align.rl.common.Evaluator`
every 2000 environment steps (align's recipes: every `eval_every` steps), evaluation time
excluded from the training seconds on both sides, one torch thread, one process, in
one run. SB3 uses RL-Zoo's tuned CartPole-v1 hyperparameters (hyperparams/ppo.yml and
dqn.yml). A matmul probe before and after each measurement flags a throttled host.

    OMP_NUM_THREADS=1 python bench/bench_rl_cartpole.py [--seeds 0 1] [--algos ppo dqn]

This prints figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from align.rl import runner  # noqa: E402
from align.rl.common import Evaluator  # noqa: E402

RECIPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "recipes", "rl")
THRESHOLD, CONSECUTIVE, EVAL_EVERY, EVAL_EPISODES = 475.0, 3, 2000, 10

# RL-Zoo (DLR-RM/rl-baselines3-zoo) hyperparams for CartPole-v1
ZOO = {
    "ppo": dict(n_envs=8, n_timesteps=100_000, n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20,
                ent_coef=0.0, learning_rate="lin_0.001", clip_range="lin_0.2"),
    "dqn": dict(n_envs=1, n_timesteps=50_000, learning_rate=2.3e-3, batch_size=64, buffer_size=100_000,
                learning_starts=1000, gamma=0.99, target_update_interval=10, train_freq=256, gradient_steps=128,
                exploration_fraction=0.16, exploration_final_eps=0.04, net_arch=[256, 256]),
}


def matmul_gflops(seconds: float = 0.3) -> float:
    a = torch.randn(256, 256)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ a
        n += 1
    return 2 * 256**3 * n / (time.perf_counter() - start) / 1e9


def run_align(algo: str, seed: int, budget: int) -> dict:
    """The recipe as shipped (its own total_steps: PPO's LR annealing depends on it)."""
    with tempfile.TemporaryDirectory() as out:
        m = runner.run(os.path.join(RECIPES, f"cartpole-{algo}.yaml"),
                       [f"output_dir={out}", f"seed={seed}", "progress=false", "stop_when_solved=true"])
    return {"steps": m["solve/steps"], "seconds": m["solve/train_seconds"], "final": m["eval/return_mean"],
            "trained_steps": m["train/steps"], "train_seconds": m["time/train_seconds"]}


def run_sb3(algo: str, seed: int, budget: int | None) -> dict:
    from stable_baselines3 import DQN, PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    hp = dict(ZOO[algo])
    n_envs = hp.pop("n_envs")
    zoo_budget = hp.pop("n_timesteps")
    budget = budget or zoo_budget
    for key in ("learning_rate", "clip_range"):
        if isinstance(hp.get(key), str):  # "lin_x": linear decay from x to 0
            start = float(hp[key].split("_")[1])
            hp[key] = lambda progress, s=start: progress * s
    if "net_arch" in hp:
        hp["policy_kwargs"] = dict(net_arch=hp.pop("net_arch"))
    env = make_vec_env("CartPole-v1", n_envs=n_envs, seed=seed)
    cls = PPO if algo == "ppo" else DQN
    model = cls("MlpPolicy", env, seed=seed, device="cpu", verbose=0, **hp)
    evaluator = Evaluator("CartPole-v1", EVAL_EPISODES, seed)
    state = {"next": EVAL_EVERY, "streak": 0, "eval_seconds": 0.0, "steps": None, "seconds": None, "last": None}

    class SolveCallback(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps < state["next"]:
                return True
            state["next"] += EVAL_EVERY
            t0 = time.perf_counter()
            mean = float(evaluator(lambda obs: model.predict(obs, deterministic=True)[0]).mean())
            state["eval_seconds"] += time.perf_counter() - t0
            state["streak"] = state["streak"] + 1 if mean >= THRESHOLD else 0
            if state["streak"] >= CONSECUTIVE:
                state["steps"] = self.num_timesteps
                state["seconds"] = time.perf_counter() - state["start"] - state["eval_seconds"]
                return False
            return True

    state["start"] = time.perf_counter()
    model.learn(total_timesteps=budget, callback=SolveCallback())
    train_seconds = time.perf_counter() - state["start"] - state["eval_seconds"]
    final = float(Evaluator("CartPole-v1", EVAL_EPISODES, seed + 7919)(
        lambda obs: model.predict(obs, deterministic=True)[0]).mean())
    return {"steps": state["steps"], "seconds": state["seconds"], "final": final,
            "trained_steps": int(model.num_timesteps), "train_seconds": train_seconds}


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algos", nargs="+", default=["ppo", "dqn"], choices=["ppo", "dqn"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--budget", type=int, default=None,
                        help="SB3's total timesteps (default: RL-Zoo's n_timesteps, which its schedules use; "
                             "align runs its recipe's total_steps)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, python {sys.version.split()[0]}")
    header = f"{'algo':5} {'seed':>4} {'impl':6} {'steps':>7} {'seconds':>8} {'final':>6} {'GF/s before':>11} {'after':>6}"
    print(header)
    ratios = {a: [] for a in args.algos}
    for algo in args.algos:
        for seed in args.seeds:
            row = {}
            for impl, fn in (("align", run_align), ("sb3", run_sb3)):
                before = matmul_gflops()
                r = fn(algo, seed, args.budget)
                after = matmul_gflops()
                flag = "  <- throttled?" if min(before, after) < 0.5 * max(before, after) else ""
                print(f"{algo:5} {seed:>4} {impl:6} {fmt(r['steps'], '>7d')} {fmt(r['seconds'], '>8.1f')} "
                      f"{r['final']:>6.1f} {before:>11.0f} {after:>6.0f}{flag}", flush=True)
                row[impl] = r
            if row["align"]["seconds"] and row["sb3"]["seconds"]:
                ratio = row["align"]["seconds"] / row["sb3"]["seconds"]
                ratios[algo].append(ratio)
                print(f"{algo:5} {seed:>4} ratio  align/sb3 seconds to solve = {ratio:.3f}  "
                      f"(steps {row['align']['steps']} vs {row['sb3']['steps']})", flush=True)
            else:
                print(f"{algo:5} {seed:>4} ratio  n/a (a side did not solve within its budget)")
    for algo, rs in ratios.items():
        if rs:
            print(f"{algo}: median align/sb3 wall-time ratio {np.median(rs):.3f} over {len(rs)} seed(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
