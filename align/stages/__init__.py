"""Stage registry: recipe `stage:` name -> its settings schema and its class.

A stage class is built as `Stage(recipe, accelerator)` and provides what `Stage` below says;
optionally `checkpoint_state(step) -> dict` (JSON, stored in the checkpoint's trainer_state.json)
and `load_checkpoint_state(state)` for state outside the model and optimizer (PPO's adaptive beta).
Stages share code by composition (`align.stages.base`, `align.stages.online`), never by subclassing
each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Stage(Protocol):
    """What the engine (`align.engine.train`) needs of a stage."""

    model: Any
    """The module to train; the engine replaces it by its prepared (DDP / DeepSpeed) wrapper."""

    def micro_batches(self, step: int) -> list[dict]:
        """This process's micro-batches of optimizer step `step`, each with `_weight` (its share of the
        step's loss normaliser) and `_tokens` (its input tokens, for throughput)."""

    def loss(self, model, batch: dict) -> tuple[Any, dict]:
        """(summed loss of the micro-batch, {metric: (sum, count)}); the engine divides by the global weight."""

    def after_step(self, step: int) -> None:
        """Called after each optimizer step (e.g. to update a KL controller)."""

    def evaluate(self, model) -> dict:
        """Held-out metrics, {name: value}, the same on every process."""

    def save(self, out_dir, accelerator) -> None:
        """The final model in Hugging Face format (collective under several processes)."""


@dataclass(frozen=True)
class StageSpec:
    module: str
    class_name: str
    args_name: str
    section: str
    summary: str = ""
    """One line for `align train --help`."""
    online: bool = False
    """Samples its own batches each step (no dataset to pass over: `train.epochs` does not apply)."""

    @property
    def args_cls(self):
        """The settings dataclass of the stage's section (the schema alone: no runtime module is imported)."""
        from align import stage_settings

        return getattr(stage_settings, self.args_name)

    @property
    def cls(self):
        return getattr(import_module(self.module), self.class_name)


STAGES: dict[str, StageSpec] = {
    "sft": StageSpec("align.stages.sft", "SFTStage", "SFTArgs", "sft",
                     "supervised fine-tuning: NLL of the completion tokens (prompt/completion, messages, text)"),
    "dpo": StageSpec("align.stages.preference", "PreferenceStage", "DPOArgs", "dpo",
                     "DPO / IPO / hinge / robust on chosen-rejected pairs against a reference (dpo.loss_type)"),
    "simpo": StageSpec("align.stages.preference", "PreferenceStage", "SimPOArgs", "simpo",
                       "SimPO: reference-free, length-averaged log-probs with a target margin"),
    "orpo": StageSpec("align.stages.preference", "PreferenceStage", "ORPOArgs", "orpo",
                      "ORPO: SFT plus an odds-ratio term on pairs, from a base model, no reference"),
    "kto": StageSpec("align.stages.kto", "KTOStage", "KTOArgs", "kto",
                     "KTO on unpaired thumbs-up/down completions (prompt, completion, label) against a reference"),
    "online_dpo": StageSpec("align.stages.online_dpo", "OnlineDPOStage", "OnlineDPOArgs", "online_dpo",
                            "online DPO: two samples a prompt ranked by a verifier or reward model, then DPO (online)",
                            online=True),
    "gkd": StageSpec("align.stages.gkd", "GKDStage", "GKDArgs", "gkd",
                     "GKD: distil a frozen teacher, per-token generalised JSD on student samples (lmbda) or the data's",
                     online=True),
    "reward": StageSpec("align.stages.reward", "RewardStage", "RewardArgs", "reward",
                        "Bradley-Terry reward model (a scalar head) on chosen-rejected pairs"),
    "grpo": StageSpec("align.stages.grpo", "GRPOStage", "GRPOArgs", "grpo",
                      "GRPO: group-relative advantages from reward functions, no critic (online)", online=True),
    "ppo": StageSpec("align.stages.ppo", "PPOStage", "PPOArgs", "ppo",
                     "PPO against a reward model with a per-token KL penalty, value model (online)", online=True),
}
