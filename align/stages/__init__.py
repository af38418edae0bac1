"""Stage registry: recipe `stage:` name -> its settings schema and its class.

A stage class is built as `Stage(recipe, accelerator)` and gives the engine
`model`, `micro_batches(step)`, `weight(batch)`, `tokens(batch)`, `loss(model, batch)`,
`after_step(step)`, `evaluate(model)` and `save(output_dir, accelerator)`; optionally
`checkpoint_state(step) -> dict` (JSON, stored in the checkpoint's trainer_state.json) and
`load_checkpoint_state(state)` for state outside the model and optimizer (PPO's adaptive beta).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module


@dataclass(frozen=True)
class StageSpec:
    module: str
    class_name: str
    args_name: str
    section: str

    @property
    def args_cls(self):
        return getattr(import_module(self.module), self.args_name)

    @property
    def cls(self):
        return getattr(import_module(self.module), self.class_name)


STAGES: dict[str, StageSpec] = {
    "sft": StageSpec("align.stages.sft", "SFTStage", "SFTArgs", "sft"),
    "dpo": StageSpec("align.stages.preference", "PreferenceStage", "DPOArgs", "dpo"),
    "simpo": StageSpec("align.stages.preference", "PreferenceStage", "SimPOArgs", "simpo"),
    "orpo": StageSpec("align.stages.preference", "PreferenceStage", "ORPOArgs", "orpo"),
    "reward": StageSpec("align.stages.reward", "RewardStage", "RewardArgs", "reward"),
    "grpo": StageSpec("align.stages.grpo", "GRPOStage", "GRPOArgs", "grpo"),
    "ppo": StageSpec("align.stages.ppo", "PPOStage", "PPOArgs", "ppo"),
}
