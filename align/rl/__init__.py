"""Foundations: tabular and classic-control RL on Gymnasium (see docs/rl.md).

One readable file per algorithm (`dqn`, `reinforce`, `a2c`, `ppo`, `sac`), tabular
methods in `tabular`, the seed's grid world in `envs`, the shared run plumbing in
`common`, and the recipe entry point in `runner`. PPO's GAE, clipped surrogate and
clipped value loss are imported from `align.losses`, shared with the LLM PPO stage.
"""
