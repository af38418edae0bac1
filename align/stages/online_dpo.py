"""Online DPO: pairs sampled from the current policy, ranked by a verifier or a reward model, then a DPO step.

Guo et al. 2024 ("Direct Language Model Alignment from Online AI Feedback"), as TRL 1.16's
`OnlineDPOTrainer` computes it: for each prompt the policy samples TWO completions
(`align.rollout`, at `online_dpo.temperature`), `reward_funcs` (the exact-match verifier by
default) or `reward_model` score them (minus `missing_eos_penalty` without an EOS), the
higher-scored one is chosen, and the pair takes the DPO loss (`align.losses.dpo_loss`)
against the reference on SUMMED completion log-probs computed WITHOUT the temperature, as
TRL does. The log-probs come from the preference stage's pair forward
(`align.stages.preference.pair_logps`: prompt once, chosen and rejected kept apart by a 4D
mask when the attention allows), so online DPO and offline DPO score a pair identically.

The reference is the frozen starting policy (a second copy; for a new LoRA adapter the same
weights with the adapter disabled), scored once per rollout with no gradient. Where this
departs from TRL: `skip_ties` (default true) gives a pair whose two samples score the same no
gradient: with a 0/1 verifier most pairs tie, and TRL's rule (the first sample wins a tie)
would train on a coin flip; such pairs stay in the normaliser (TRL's batch mean), as GRPO's
zero-std groups do. `rpo_alpha` adds the chosen sample's NLL (as dpo.rpo_alpha) on the
informative pairs. `loss_type: ipo` divides each log-ratio by its token count, as the dpo
stage's IPO (TRL's online IPO uses sums).

One optimizer step = `train.batch_size x train.grad_accum x processes` prompts (pairs; TRL's
per-device batch counts prompts too). Every sample is keyed by its row's index in the GLOBAL
rollout batch (`PromptSource.rollout_seed`), and each pair's loss is normalised by the global
number of pairs, so 1 process and 2 processes sample the same pairs and train the same
weights (tests/test_distributed.py), and a resumed run re-samples what the killed one would
have.

Metrics (TRL's names where it has them): `rewards/chosen`, `rewards/rejected`,
`rewards/margins`, `rewards/accuracies` (implicit rewards beta * log-ratio), `logps/chosen`,
`logps/rejected`, `objective/kl` (mean summed log-ratio of a sample to the reference),
`train/reward` (mean score of all samples), `train/reward_chosen`, `train/reward_rejected`,
`train/reward_margin` (TRL's objective/scores_margin), `train/tied_pairs`, `train/ended`,
`train/completion_length`, `nll_loss` (with rpo_alpha); evaluation `eval/task_accuracy`
(`online_dpo.accuracy` over greedy completions), `eval/reward` (reward_funcs) and `eval/kl`.
"""

from __future__ import annotations

import torch

from align import models, rewards
from align.losses import dpo_loss
from align.preference_data import collate_pairs, collate_shared_pairs, supports_shared_prompt
from align.recipe import ModelConfig, Recipe
from align.rollout import Rollout, rollout
from align.stage_settings import OnlineDPOArgs  # noqa: F401  (re-exported)
from align.stages.base import tensors_only
from align.stages.online import PromptSource, eval_kl, greedy_eval, sampling_config
from align.stages.preference import pair_logps


def pair_up(prompt_ids: list[list[int]], out: Rollout, scores: torch.Tensor, skip_ties: bool) -> list[dict]:
    """Rows 2i and 2i+1 of a rollout (two samples of prompt i) -> preference examples, the higher score chosen
    (the first on a tie, as TRL); `informative` 0.0 on a tie when `skip_ties`."""
    examples = []
    for i, prompt in enumerate(prompt_ids):
        a, b = 2 * i, 2 * i + 1
        first_wins = bool(scores[a] >= scores[b])
        chosen, rejected = (a, b) if first_wins else (b, a)
        tie = bool(scores[a] == scores[b])
        examples.append({"prompt_ids": list(prompt), "chosen_ids": _tokens(out, chosen),
                         "rejected_ids": _tokens(out, rejected), "score_chosen": float(scores[chosen]),
                         "score_rejected": float(scores[rejected]), "informative": 0.0 if tie and skip_ties else 1.0})
    return examples


def _tokens(out: Rollout, row: int) -> list[int]:
    return out.completion_ids[row, : int(out.lengths[row])].tolist()


class OnlineDPOStage:
    def __init__(self, recipe: Recipe, accelerator):
        self.recipe, self.accelerator = recipe, accelerator
        self.args: OnlineDPOArgs = recipe.stage_args
        a, t = self.args, recipe.train
        self.prompts = PromptSource(recipe, accelerator, t.batch_size * t.grad_accum)
        self.tokenizer = self.prompts.tokenizer
        self.pad_id = self.tokenizer.pad_token_id
        self.sampling = sampling_config(a)
        self.reward_fn = rewards.weighted_sum([rewards.resolve(n) for n in a.reward_funcs], a.reward_weights)
        self.accuracy_fn = rewards.resolve(a.accuracy)
        self.reward_model = None
        if a.reward_model is not None:
            rm_cfg = ModelConfig(name_or_path=a.reward_model, dtype=recipe.model.dtype)  # (made by the planning layer)
            self.reward_model = rewards.RewardModel(
                models.load_model(rm_cfg, self.tokenizer, head="score", trainable=False).to(accelerator.device),
                batch_size=a.generation_batch_size)
        self.model = models.load_model(recipe.model, self.tokenizer, seed=recipe.seed)
        self.prompts.check_positions(self.model, a.max_new_tokens)
        self.stop_ids = models.stop_token_ids(self.model, self.tokenizer)
        self.shared_prompt = recipe.data.shared_prompt and supports_shared_prompt(self.model)
        self.ref_model = None  # a new LoRA adapter: the reference is the base model, adapter disabled
        if not (models.is_peft(self.model) and not models._adapter_base(recipe.model.name_or_path)):
            self.ref_model = models.load_model(recipe.model, self.tokenizer, seed=recipe.seed,
                                               trainable=False).to(accelerator.device)

    # -- rollout and pairs ---------------------------------------------------------------
    def scores(self, rows: list[dict], out: Rollout) -> torch.Tensor:
        """(2B,) scores of the samples: the reward model's, or the reward functions' weighted sum."""
        if self.reward_model is not None:
            score = self.reward_model.score_rollout(out)
        else:
            values = self.reward_fn([r["prompt"] for r in rows], out.texts(self.tokenizer), **self.prompts.columns(rows))
            score = torch.tensor(values, dtype=torch.float32)
        return rewards.missing_eos_penalty(score, out.ended, self.args.missing_eos_penalty)

    def make_pairs(self, step: int) -> tuple[list[dict], dict]:
        """This process's pairs of step `step` (two samples per prompt, ranked) and the rollout's metrics."""
        indices = self.prompts.step(step)
        prompt_ids = [self.prompts.prompt_ids[i] for i in indices]
        rows = [self.prompts.rows[i] for i in indices for _ in range(2)]  # (2B,) the two samples of a prompt adjacent
        out = rollout(self.model, [p for p in prompt_ids for _ in range(2)], sampling=self.sampling,
                      eos_id=self.stop_ids, pad_id=self.pad_id, accelerator=self.accelerator, policy_logprobs=False,
                      **self.prompts.rollout_seed(step, 2 * len(indices)))
        score = self.scores(rows, out)
        examples = pair_up(prompt_ids, out, score, self.args.skip_ties)
        n, tied = len(examples), sum(e["score_chosen"] == e["score_rejected"] for e in examples)
        metrics = {
            "train/reward": (score.sum().item(), 2 * n),
            "train/reward_chosen": (sum(e["score_chosen"] for e in examples), n),
            "train/reward_rejected": (sum(e["score_rejected"] for e in examples), n),
            "train/reward_margin": (sum(e["score_chosen"] - e["score_rejected"] for e in examples), n),
            "train/tied_pairs": (float(tied), n),
            "train/ended": (out.ended.sum().item(), 2 * n),
            "train/completion_length": (out.lengths.sum().item(), 2 * n),
        }
        return examples, metrics

    def _collate(self, examples: list[dict]) -> dict:
        batch = (collate_shared_pairs if self.shared_prompt else collate_pairs)(examples, self.pad_id)
        batch["informative"] = torch.tensor([e["informative"] for e in examples], dtype=torch.float32)
        return batch

    @torch.no_grad()
    def _reference(self, batch: dict) -> dict:
        """The reference's summed log-probs of a collated batch, stored in it as pair_logps reads them."""
        device = self.accelerator.device
        inputs = {k: v.to(device) for k, v in tensors_only(batch).items()}
        if self.ref_model is not None:
            lp = pair_logps(self.ref_model, inputs)
        else:
            base = self.accelerator.unwrap_model(self.model)
            with base.disable_adapter():
                lp = pair_logps(base, inputs)
        batch["ref_chosen_logps"], batch["ref_rejected_logps"] = lp["chosen"].float().cpu(), lp["rejected"].float().cpu()
        return batch

    # -- engine interface ---------------------------------------------------------------
    def micro_batches(self, step: int) -> list[dict]:
        """The step's pairs (sampled now, by the current policy), cut into micro-batches of train.batch_size."""
        size = self.recipe.train.batch_size
        # under the training forward's autocast: the reference is the same computation as the loss's
        with self.accelerator.autocast():
            examples, metrics = self.make_pairs(step)
            batches = []
            for s in range(0, len(examples), size):
                part = examples[s: s + size]
                batch = self._reference(self._collate(part))
                batch["_weight"] = len(part)
                batch["_tokens"] = sum(len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"])
                                       for e in part)
                batches.append(batch)
        batches[0]["_metrics"] = metrics
        return batches

    def loss(self, model, batch):
        a = self.args
        metrics = dict(batch.get("_metrics", {}))
        batch = tensors_only(batch)
        lp = pair_logps(model, batch)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            lp["chosen"], lp["rejected"], lp["ref_chosen"], lp["ref_rejected"], beta=a.beta, loss_type=a.loss_type,
            chosen_lengths=lp["chosen_n"], rejected_lengths=lp["rejected_n"])
        if a.rpo_alpha:
            losses = losses + a.rpo_alpha * lp["chosen_nll"]
            metrics["nll_loss"] = (lp["chosen_nll"].detach().sum().item(), losses.shape[0])
        losses = losses * batch["informative"]
        n = losses.shape[0]
        log_ratios = (chosen_rewards + rejected_rewards) / a.beta  # summed log pi - log ref of both samples
        metrics.update({
            "rewards/chosen": (chosen_rewards.sum().item(), n),
            "rewards/rejected": (rejected_rewards.sum().item(), n),
            "rewards/accuracies": ((chosen_rewards > rejected_rewards).sum().item(), n),
            "rewards/margins": ((chosen_rewards - rejected_rewards).sum().item(), n),
            "logps/chosen": (lp["chosen"].detach().sum().item(), n),
            "logps/rejected": (lp["rejected"].detach().sum().item(), n),
            "objective/kl": (log_ratios.sum().item(), 2 * n),
        })
        return losses.sum(), metrics

    def after_step(self, step: int) -> None:
        pass

    def evaluate(self, model) -> dict:
        metrics = greedy_eval(model, self.prompts, self.accuracy_fn,
                              self.reward_fn if self.reward_model is None else None)
        if metrics and self.args.eval_kl_prompts:
            metrics["eval/kl"] = eval_kl(model, self.ref_model, self.prompts, self.sampling, self.stop_ids,
                                         self.args.eval_kl_prompts)
        return metrics

    def save(self, out_dir, accelerator) -> None:
        models.save_pretrained(self.model, self.tokenizer, out_dir, accelerator)
