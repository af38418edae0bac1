"""GRPO: group-relative policy optimisation with verifiable rewards, no critic.

Shao et al. 2024 (DeepSeekMath, sec. 4.1), as DeepSeek-R1 trains: for each prompt, G
completions are sampled from the current policy; each is scored by reward functions
(exact match on the built-in task); the advantage of a completion is its reward minus
its group's mean, divided by the group's std (`align.losses.group_advantages`, with
`scale_rewards` "group" / "batch" / "none"), the same for all of its tokens. The
per-token loss is PPO's clipped surrogate with separate low/high epsilon (DAPO's
clip-higher) plus kl_coef * k3 KL to the reference (`grpo_token_losses`), aggregated by
`grpo.aggregation` (`align.losses.TOKEN_AGGREGATIONS`: grpo, dr_grpo, dapo).

Two neighbours are settings of this stage, not trainers of their own:
`grpo.advantage_estimator` picks how rewards become advantages
(`align.losses.ADVANTAGE_ESTIMATORS`): `grpo` (above), `rloo` (RLOO, Ahmadian et al. 2024:
reward minus the mean of the other G-1 completions of its group) or `reinforce_pp`
(REINFORCE++, Hu 2025: no baseline, whitened over the whole global batch, token-weighted).
Where they depart from their papers/TRL: the loss stays this stage's per-token clipped
surrogate and aggregation (TRL's RLOOTrainer clips one ratio per sequence, of summed
log-probs), and the KL to the reference stays in the loss (RLOO and REINFORCE++ subtract
it from the reward). `grpo.importance_sampling_level: sequence` is GSPO (Zheng et al.
2025): one importance ratio per completion, exp(mean_t log-ratio), clipped per sequence
(`align.losses.sequence_log_ratio`, TRL's `importance_sampling_level`); it changes
anything only with num_iterations > 1 (on-policy every ratio is 1 and the surrogate's
gradient is GRPO's).

One optimizer step = one global batch of `train.batch_size x train.grad_accum x
processes` completions (TRL's convention: batch sizes count completions), i.e. that
divided by G prompts. `micro_batches(step)` generates the step's rollouts: each process
samples the groups of its own prompts (rows of one prompt contiguous), scores them,
computes advantages (gathering all rewards first, so "batch" scaling sees the global
batch), then cuts its rows into `grad_accum` micro-batches. The engine divides the
summed loss by the global `_weight`, which the aggregation sets (sequences for grpo,
sequences x max_new_tokens for dr_grpo, completion tokens for dapo), so a step's update
does not depend on how the batch is split over micro-batches or processes (tested). The
rollouts themselves do not either: each completion's sampling noise is keyed by its
index in the global batch (`rollout_seed`, `align.rollout`), so 1 process with batch 8
and 2 processes with batch 4 sample the same completions and train the same weights
(tests/test_distributed.py, under `accelerate launch`).

On-policy by default (`num_iterations: 1`: one update per rollout; the old log-probs
are the training forward's own, detached, so the ratio is 1 and no extra forward is
spent, as TRL does). With `num_iterations: k` a rollout is reused for k consecutive
optimizer steps, its old log-probs computed once at sampling time; the clip then acts.
Resume is exact from a checkpoint on a rollout boundary (`train.save_steps` a multiple of
num_iterations; the stage warns otherwise): a checkpoint inside a rollout's steps keeps no
rollout, so the resumed run samples it again from the partly updated policy (as PPO's).

`kl_coef: 0` (TRL's beta, default 0) loads no reference model at all and logs no KL; kl_coef > 0 loads
a frozen copy of the starting policy (for a new LoRA adapter: the same weights with the
adapter disabled; starting from a trained adapter folder: a frozen base + that adapter). Groups whose rewards are all equal get zero advantage and contribute
no policy gradient: they are counted (`train/zero_std_groups` per step,
`train/frac_zero_std_groups`). Dropout is off (`model.disable_dropout`, the default in
every stage), so rollout and training forwards compute the same function.

Logs `train/reward` (and `rewards/<function>`), `train/reward_std`, `train/kl` (token mean
of k3), `losses/clipfrac`, `objective/entropy`, `train/completion_length`,
`train/ended` (share of completions that produced EOS); evaluation `eval/task_accuracy`
(mean of the `grpo.accuracy` function over greedy completions: exact match by default),
`eval/reward` (mean reward of the greedy completions) and, with a
reference, `eval/kl` (sequence KL to the reference, summed log-ratio of sampled
completions). At the end the curves are plotted to `grpo_curves.png` and `grpo_kl.png`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from align import models, rewards
from align.errors import AlignError
from align.losses import (
    ADVANTAGE_ESTIMATORS,
    aggregate_token_losses,
    grpo_token_losses,
    masked_sum,
    zero_std_groups,
)
from align.recipe import Recipe
from align.rollout import Rollout, completion_logprobs, rollout, score_logprobs
from align.stage_settings import GRPOArgs  # noqa: F401  (re-exported)
from align.stages.online import (
    PromptSource,
    eval_kl,
    greedy_eval,
    plot_run,
    rollout_engine,
    sampler_correction,
    sampling_config,
)


def batch_weight(mask: torch.Tensor, aggregation: str, max_new_tokens: int) -> float:
    """A micro-batch's share of the step's loss normaliser under `aggregation` (see TOKEN_AGGREGATIONS)."""
    return aggregate_token_losses(torch.zeros(mask.shape), mask, aggregation=aggregation,
                                  max_completion_length=max_new_tokens)[1]


class GRPOStage:
    def __init__(self, recipe: Recipe, accelerator):
        self.recipe, self.accelerator = recipe, accelerator
        self.args: GRPOArgs = recipe.stage_args
        a, t = self.args, recipe.train
        per_process = t.batch_size * t.grad_accum
        if per_process % a.num_generations:
            raise AlignError(f"train.batch_size x train.grad_accum = {per_process} completions per process per "
                             f"step must be a multiple of grpo.num_generations = {a.num_generations}")
        self.prompts = PromptSource(recipe, accelerator, per_process // a.num_generations)
        self.tokenizer = self.prompts.tokenizer
        self.reward_names = list(a.reward_funcs)
        self.reward_fns = [rewards.resolve(n) for n in self.reward_names]
        self.reward_fn = rewards.weighted_sum(self.reward_fns, a.reward_weights)
        self.accuracy_fn = rewards.resolve(a.accuracy)
        self.sampling = sampling_config(a)
        self.model = models.load_model(recipe.model, self.tokenizer, seed=recipe.seed)
        self.prompts.check_positions(self.model, a.max_new_tokens)
        self.stop_ids = models.stop_token_ids(self.model, self.tokenizer)
        self.ref_model = None
        if a.kl_coef > 0 and not self._reference_is_base_model():
            self.ref_model = models.load_model(recipe.model, self.tokenizer, seed=recipe.seed, trainable=False)
            self.ref_model.to(accelerator.device)
        self.engine = rollout_engine(recipe, self.prompts, a.max_new_tokens)
        if t.save_steps % a.num_iterations:
            accelerator.print(f"warning: train.save_steps {t.save_steps} is not a multiple of grpo.num_iterations "
                              f"{a.num_iterations}: a run resumed from a checkpoint inside a rollout samples that "
                              f"rollout again from the partly updated policy (not the same result as a run straight "
                              f"through)")
        self._cache: tuple[int, list[dict]] | None = None

    def _reference_is_base_model(self) -> bool:
        """Whether the starting policy is its base model with the adapter disabled: a NEW LoRA adapter (its B
        matrices start at zero), so the reference costs no second model. A policy that starts from a trained
        adapter folder is base + adapter: its reference is a frozen copy of that (a second base in memory)."""
        return models.is_peft(self.model) and not models._adapter_base(self.recipe.model.name_or_path)

    def score(self, rows: list[dict], out: Rollout) -> tuple[torch.Tensor, dict]:
        """Rewards (B,) of a rollout of `rows` (one row per completion) and each function's (B,) scores."""
        texts = out.texts(self.tokenizer)
        prompts = [r["prompt"] for r in rows]
        columns = self.prompts.columns(rows)
        per_fn = {}
        for name, fn in zip(self.reward_names, self.reward_fns):
            values = fn(prompts, texts, **columns)
            rewards.check_scores(values, len(texts), name)
            per_fn[name] = torch.tensor(values, dtype=torch.float32)
        weights = self.args.reward_weights or [1.0] * len(self.reward_fns)
        total = sum(w * s for w, s in zip(weights, per_fn.values()))
        return rewards.missing_eos_penalty(total, out.ended, self.args.missing_eos_penalty), per_fn

    def make_rollout(self, generation: int, step: int = 0) -> tuple[Rollout, torch.Tensor, dict]:
        """Rollout batch `generation` (sampled at optimizer step `step`) of this process: (rollout, advantages
        (B,), rollout metrics)."""
        a, G = self.args, self.args.num_generations
        acc = self.accelerator
        indices = self.prompts.step(generation)
        rows = [self.prompts.rows[i] for i in indices for _ in range(G)]  # (B,) groups contiguous
        prompts = [self.prompts.prompt_ids[i] for i in indices for _ in range(G)]
        if self.engine is not None:  # vLLM: the policy's weights (LoRA merged, ZeRO-3 gathered) when due
            with models.gathered(self.model, acc) as bare:
                self.engine.sync(bare, step)
        out = rollout(self.model, prompts, sampling=self.sampling, eos_id=self.stop_ids,
                      pad_id=self.tokenizer.pad_token_id, accelerator=acc, ref_model=self.ref_model,
                      policy_logprobs=a.num_iterations > 1, engine=self.engine,
                      **self.prompts.rollout_seed(generation, len(prompts)))
        if a.kl_coef > 0 and self.ref_model is None:  # LoRA: the reference is the base model, adapter disabled
            base = acc.unwrap_model(self.model)
            with base.disable_adapter():
                out.ref_logprobs = score_logprobs(base, out.prompt_ids, out.prompt_mask, out.completion_ids,
                                                  out.completion_mask, temperature=a.temperature,
                                                  batch_size=a.generation_batch_size)
        reward, per_fn = self.score(rows, out)
        # advantages from the rewards (and lengths) of the whole global batch (groups never straddle processes)
        lengths = out.lengths.to(reward.dtype)
        if acc.num_processes > 1:
            all_rewards, all_lengths = acc.gather(torch.stack([reward, lengths]).T.contiguous().to(acc.device)).cpu().T
        else:
            all_rewards, all_lengths = reward, lengths
        advantages = ADVANTAGE_ESTIMATORS[a.advantage_estimator](all_rewards, G, all_lengths, a.scale_rewards)
        B = reward.shape[0]
        advantages = advantages[acc.process_index * B: (acc.process_index + 1) * B]
        n_groups = B // G
        metrics = {
            "train/reward": (reward.sum().item(), B),
            "train/completion_length": (out.lengths.sum().item(), B),
            "train/ended": (out.ended.sum().item(), B),
        }
        if G > 1:  # (reinforce_pp may sample one completion a prompt: no groups)
            metrics.update({
                "train/reward_std": (reward.view(-1, G).std(-1).sum().item(), n_groups),
                "train/zero_std_groups": (zero_std_groups(reward, G), 1.0 / acc.num_processes),
                "train/frac_zero_std_groups": (zero_std_groups(reward, G), n_groups),
            })
        metrics.update({f"rewards/{name}": (s.sum().item(), B) for name, s in per_fn.items()})
        return out, advantages, metrics

    def split(self, out: Rollout, advantages: torch.Tensor, metrics: dict, size: int) -> list[dict]:
        """Cut a rollout into micro-batches of `size` rows, each with its `_weight` and `_tokens`."""
        a = self.args
        batches = []
        for s in range(0, advantages.shape[0], size):
            part = slice(s, s + size)
            mask = out.completion_mask[part]
            batch = {"prompt_ids": out.prompt_ids[part], "prompt_mask": out.prompt_mask[part],
                     "completion_ids": out.completion_ids[part], "completion_mask": mask,
                     "advantages": advantages[part]}
            if out.logprobs is not None:
                batch["old_logprobs"] = out.logprobs[part]
            if out.ref_logprobs is not None:
                batch["ref_logprobs"] = out.ref_logprobs[part]
            if out.sampling_logprobs is not None:
                batch["sampling_logprobs"] = out.sampling_logprobs[part]
            batch["_weight"] = batch_weight(mask, a.aggregation, a.max_new_tokens)
            batch["_tokens"] = int(out.prompt_mask[part].sum() + mask.sum())
            batches.append(batch)
        batches[0]["_metrics"] = metrics
        return batches

    # -- engine interface ---------------------------------------------------------------
    def micro_batches(self, step: int) -> list[dict]:
        generation = step // self.args.num_iterations
        if self._cache is None or self._cache[0] != generation:
            # under the training forward's autocast: the old and reference log-probs (and the reward model)
            # are the same computation as the loss's, so the step-0 ratio is 1 and the KL 0 under bf16 too
            with self.accelerator.autocast():
                rollout_batch = self.make_rollout(generation, step)
            self._cache = (generation, self.split(*rollout_batch, self.recipe.train.batch_size))
        batches = [dict(b) for b in self._cache[1]]
        if step % self.args.num_iterations:
            batches[0].pop("_metrics", None)  # rollout statistics counted once per rollout
        return batches

    def loss(self, model, batch):
        a = self.args
        mask = batch["completion_mask"]
        logps, entropy = completion_logprobs(model, batch["prompt_ids"], batch["prompt_mask"],
                                             batch["completion_ids"], mask, temperature=a.temperature,
                                             return_entropy=True)  # (B, C)
        old = batch["old_logprobs"] if "old_logprobs" in batch else logps.detach()
        losses, clipped, kl = grpo_token_losses(logps, old, batch["advantages"], clip_eps=a.clip_coef,
                                                clip_eps_high=a.clip_coef_high, beta=a.kl_coef,
                                                ref_logprobs=batch.get("ref_logprobs"),
                                                kl_ratio_correction=a.kl_ratio_correction,
                                                importance_sampling_level=a.importance_sampling_level, mask=mask)
        is_weights, is_metrics = sampler_correction(old, batch, mask, self.recipe.rollout)  # vLLM's samples
        numerator, _ = aggregate_token_losses(losses * is_weights, mask, aggregation=a.aggregation,
                                              max_completion_length=a.max_new_tokens)
        tokens = float(mask.sum())
        metrics = dict(batch.get("_metrics", {}), **is_metrics)
        metrics["losses/clipfrac"] = (masked_sum(clipped, mask).item(), tokens)
        metrics["objective/entropy"] = (entropy.detach().sum().item(), tokens)
        if kl is not None:
            metrics["train/kl"] = (masked_sum(kl.detach(), mask).item(), tokens)
        return numerator, metrics

    def after_step(self, step: int) -> None:
        pass

    def evaluate(self, model) -> dict:
        metrics = greedy_eval(model, self.prompts, self.accuracy_fn, self.reward_fn)
        if not metrics:
            return metrics
        if self.args.kl_coef > 0 and self.args.eval_kl_prompts:
            metrics["eval/kl"] = eval_kl(model, self.ref_model, self.prompts, self.sampling, self.stop_ids,
                                         self.args.eval_kl_prompts)
        return metrics

    def save(self, out_dir, accelerator) -> None:
        models.save_pretrained(self.model, self.tokenizer, out_dir, accelerator)
        if self.args.plot and accelerator.is_main_process:
            plot_run(Path(out_dir), "grpo")
