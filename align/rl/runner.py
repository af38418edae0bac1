"""`align rl RECIPE.yaml [key.path=value ...]`: one classic-RL run from a recipe.

The recipe's `algo` key picks the schema (a dataclass per algorithm, defaults there
only) and the training function. Every recipe understands `output_dir`, `seed` and
`total_steps`; see `align.rl.common.RunConfig` for the other shared keys.

    python -m align.rl.runner recipes/rl/cartpole-ppo.yaml seed=1 output_dir=runs/ppo1
"""

from __future__ import annotations

import difflib
import json
import sys

from align.config import apply_overrides, build, read_yaml
from align.errors import AlignError
from align.rl import a2c, dqn, ppo, reinforce, sac, tabular_train

# algo name -> (schema, train function)
ALGOS = {
    "value_iteration": (tabular_train.DPConfig, tabular_train.train_dp),
    "policy_iteration": (tabular_train.DPConfig, tabular_train.train_dp),
    "q_learning": (tabular_train.TDConfig, tabular_train.train_td),
    "sarsa": (tabular_train.TDConfig, tabular_train.train_td),
    "expected_sarsa": (tabular_train.TDConfig, tabular_train.train_td),
    "dqn": (dqn.DQNConfig, dqn.train),
    "reinforce": (reinforce.ReinforceConfig, reinforce.train),
    "a2c": (a2c.A2CConfig, a2c.train),
    "ppo": (ppo.PPOConfig, ppo.train),
    "sac": (sac.SACConfig, sac.train),
}


def load_config(recipe_path: str | None, overrides: list[str] | None = None, data: dict | None = None):
    """Read the recipe (or `data`), apply overrides, and validate it against its algorithm's schema."""
    raw = read_yaml(recipe_path) if recipe_path is not None else dict(data or {})
    raw = apply_overrides(raw, overrides or [])
    algo = raw.get("algo")
    if algo is None:
        where = f"recipe {recipe_path}" if recipe_path else "recipe"
        raise AlignError(f"{where}: missing key algo (one of {', '.join(ALGOS)})")
    if algo not in ALGOS:
        close = difflib.get_close_matches(str(algo), list(ALGOS), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise AlignError(f"algo: unknown algorithm {algo!r}{hint} (expected one of {', '.join(ALGOS)})")
    schema, _ = ALGOS[algo]
    return build(schema, raw)


def run(recipe_path: str, overrides: list[str] | None = None) -> dict:
    """Train as the recipe says; write metrics.json, log.jsonl, curve.png; return the final metrics."""
    cfg = load_config(recipe_path, overrides)
    _, train = ALGOS[cfg.algo]
    return train(cfg)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    try:
        metrics = run(argv[0], argv[1:])
    except AlignError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
