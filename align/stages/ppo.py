"""PPO with a KL-penalised reward-model reward (RLHF as InstructGPT trains it).

Ziegler et al. 2019 ("Fine-tuning language models from human preferences") and Ouyang
et al. 2022 (InstructGPT), with the details of Huang et al. 2024 ("The N+ implementation
details of RLHF with PPO"):

1. **Rollout** (`align.rollout`): one sampled completion per prompt (keyed by its index in
   the global batch: the same samples on any number of processes); its tokens' log-probs
   under the policy (old) and the frozen reference (the starting policy); the value of
   every completion position; the reward model's score of prompt + completion read at
   the last real token (`align.rewards.RewardModel`), minus `missing_eos_penalty` when
   the completion never produced EOS.
2. **Per-token reward**: r_t = -beta * KL_t at every completion token (KL_t by the
   `kl_estimator` k1 / k2 / k3 of `align.losses.kl_penalty`, on old vs reference
   log-probs), plus the score at the last real token.
3. **Advantages**: `align.losses.gae_advantages` (gamma, gae_lambda) over the completion tokens,
   the episode ending at the last real token; returns = advantages + values; then
   advantage whitening over the GLOBAL rollout batch (all processes' rows) as a separate step.
4. **Updates**: `update_epochs` passes over the rollout batch in `num_minibatches`
   shuffled minibatches (`_minibatch_rows`: the same global minibatches on any number of
   processes), one optimizer step each; the loss per token is
   `ppo_clip_loss` + vf_coef * `clipped_value_loss` — the functions the classic-RL PPO
   (`align.rl.ppo`) uses — averaged over every completion token of the minibatch
   (`_weight` = tokens, so the engine's global normalisation keeps it split invariant).
5. **beta**: fixed, or the adaptive controller of Ziegler et al. 2019 (sec. 2.2) steering
   the mean sequence KL of each rollout toward `kl_target`:
   beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * rollout_size / horizon).

The value model is its OWN backbone with a scalar head, initialised from the reward model
(InstructGPT's choice: separate policy and value networks; a shared backbone would let the
value loss pull on the policy's features and needs a loss-weight balance). Policy and
value live in one `PolicyAndValue` module so the engine prepares, optimises (one AdamW,
one lr, joint gradient clipping) and checkpoints them together; its forward returns both,
so DDP sees one forward per backward. The policy is saved in Hugging Face format to
output_dir, the value model to output_dir/value.

Joint clipping, checked (2026-11-25, first 12 minibatches of recipes/tiny/ppo.yaml): the
gradient norm is ~9-10 (policy ~3-7, value ~7-9 even at vf_coef 0.1), so
train.max_grad_norm = 1 rescales EVERY step by ~0.1 and the value gradient sets half or
more of that factor. It is kept (as TRL's PPOv2 `PolicyAndValueWrapper` does, one
optimizer and one clip) because Adam normalises each parameter by its own running gradient
scale: a common factor that changes slowly from step to step leaves Adam's update nearly
unchanged, and the value and policy parameters are normalised separately. What it does mean
is that max_grad_norm here is a constant rescale, not an outlier guard; clipping the two
networks separately (OpenRLHF's separate actor/critic optimizers) would need per-group
clipping in the engine and is not done.

Logs `train/reward` (reward-model score), `train/kl` (mean sequence KL, k1 sum),
`train/non_score_reward`, `train/task_accuracy` (exact match of the samples, the true
objective the proxy stands for), `train/completion_length`, `objective/entropy`,
`objective/kl_coef`, `losses/approx_kl`, `losses/clipfrac`, `losses/policy_loss`,
`losses/value_loss`, `val/clipfrac`, `val/explained_variance`; evaluation
`eval/task_accuracy`, `eval/reward` (score of greedy completions), `eval/kl`.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch

from align import evaluate, models, rewards
from align.evaluate_rm import score_head
from align.logprobs import forward_hidden, unwrap
from align.losses import (
    approx_kl,
    clipped_value_loss,
    explained_variance,
    gae_advantages,
    kl_penalty,
    masked_mean,
    masked_sum,
    ppo_clip_loss,
    whiten,
)
from align.recipe import ModelConfig, Recipe
from align.rollout import position_ids_of, rollout
from align.stage_settings import PPOArgs  # noqa: F401  (re-exported)
from align.stages.online import (
    PromptSource,
    eval_kl,
    plot_run,
    rollout_engine,
    sampler_correction,
    sampling_config,
)


class PolicyAndValue(torch.nn.Module):
    """The policy (causal LM) and the value model (scalar head per position), trained together."""

    def __init__(self, policy, value):
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, input_ids, attention_mask, position_ids):
        """-> the policy's last hidden states (B, T, H) (or its logits, see `align.logprobs`), values (B, T)."""
        hidden, self.head = forward_hidden(self.policy, input_ids=input_ids, attention_mask=attention_mask,
                                           position_ids=position_ids, use_cache=False)  # the head: for the caller
        captured = []
        handle = score_head(self.value).register_forward_hook(lambda m, a, out: captured.append(out))
        try:
            self.value(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        finally:
            handle.remove()
        return hidden, captured[-1][..., 0].float()


def forward_completion(model, prompt_ids, prompt_mask, completion_ids, mask, temperature):
    """(log-probs (B, C), values (B, C), entropy (B, C), detached) of the completion positions."""
    P = prompt_ids.shape[1]
    ids = torch.cat([prompt_ids, completion_ids], 1)
    attn = torch.cat([prompt_mask, mask.to(prompt_mask.dtype)], 1)
    hidden, values = model(ids, attn, position_ids_of(attn))
    head = unwrap(model).head  # the path this forward took (align.logprobs)
    hidden = hidden[:, P - 1: -1]  # position P-1+t predicts completion token t
    values = values[:, P - 1: -1]  # value of the state before completion token t
    logps, entropy = head.token_logprobs(hidden, completion_ids.masked_fill(mask == 0, -100), temperature=temperature,
                                         with_entropy=True)
    return logps, values, entropy.detach()


def kl_penalized_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                         beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards -beta * kl_t, plus the score at the last real token; and the episode ends there.

    scores (B,), kl (B, C), mask (B, C) -> rewards (B, C) (0 after the last token), dones (B, C).

    >>> r, d = kl_penalized_rewards(torch.tensor([1.0]), torch.tensor([[0.5, 1.0, 9.0]]),
    ...                             torch.tensor([[1, 1, 0]]), beta=0.1)
    >>> r.tolist(), d.tolist()
    ([[-0.05000000074505806, 0.8999999761581421, 0.0]], [[0.0, 1.0, 0.0]])
    """
    last = (mask.sum(-1) - 1).clamp(min=0)  # (B,) index of the last real completion token
    rows = torch.arange(scores.shape[0])
    rewards = torch.where(mask.bool(), -beta * kl, torch.zeros_like(kl))
    rewards[rows, last] += scores
    dones = torch.zeros_like(rewards)
    dones[rows, last] = 1.0
    return rewards, dones


class AdaptiveKL:
    """Ziegler et al. 2019's proportional controller of beta (fixed when target is None)."""

    def __init__(self, beta: float, target: float | None, horizon: int):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n / self.horizon


def global_moments(accelerator, x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(mean, variance) of the masked entries of `x` over every process's rollout (two all-reduces): the
    `moments` that `align.losses.whiten` and `explained_variance` take, so they see the global batch."""
    m = mask.double()
    total, count = evaluate._reduce_sum(accelerator, [float((x.double() * m).sum()), float(m.sum())])
    mean = total / max(count, 1.0)
    squares, = evaluate._reduce_sum(accelerator, [float((((x.double() - mean) ** 2) * m).sum())])
    return mean, squares / max(count, 1.0)


class PPOStage:
    """PPO's rollout, advantages and loss; prompts, their schedule and eval/kl shared with GRPO by composition
    (`align.stages.online`)."""

    def __init__(self, recipe: Recipe, accelerator):
        self.recipe, self.accelerator = recipe, accelerator
        self.args: PPOArgs = recipe.stage_args
        a, t = self.args, recipe.train
        self.per_step = t.batch_size * t.grad_accum  # prompts per optimizer step per process
        self.prompts = PromptSource(recipe, accelerator, self.per_step * a.num_minibatches)  # one rollout batch
        self.tokenizer = self.prompts.tokenizer
        self.sampling = sampling_config(a)
        rm_cfg = ModelConfig(name_or_path=a.reward_model, dtype=recipe.model.dtype)  # (made by the planning layer)
        self.reward_model = rewards.RewardModel(
            models.load_model(rm_cfg, self.tokenizer, head="score", trainable=False).to(accelerator.device),
            batch_size=a.generation_batch_size)
        policy = models.load_model(recipe.model, self.tokenizer, seed=recipe.seed)
        self.prompts.check_positions(policy, a.max_new_tokens)
        self.stop_ids = models.stop_token_ids(policy, self.tokenizer)
        value_cfg = ModelConfig(name_or_path=a.value_model or a.reward_model, dtype=recipe.model.dtype,
                                disable_dropout=recipe.model.disable_dropout)
        value = models.load_model(value_cfg, self.tokenizer, head="score", seed=recipe.seed)
        self.model = PolicyAndValue(policy, value)
        self.ref_model = models.load_model(recipe.model, self.tokenizer, seed=recipe.seed, trainable=False)
        self.ref_model.to(accelerator.device)
        self.kl_ctl = AdaptiveKL(a.kl_coef, a.kl_target, a.kl_horizon)
        self._beta_before = (-1, a.kl_coef)  # (generation, beta before that rollout's controller update)
        self.accuracy_fn = rewards.exact_match  # train/task_accuracy and eval/task_accuracy
        self.engine = rollout_engine(recipe, self.prompts, a.max_new_tokens)
        self._cache = None

    # -- rollout ---------------------------------------------------------------------------
    def make_rollout(self, generation: int, step: int = 0) -> tuple[dict, dict]:
        a, acc = self.args, self.accelerator
        indices = self.prompts.step(generation)
        rows = [self.prompts.rows[i] for i in indices]
        with models.gathered(self.model, acc) as whole:  # ZeRO-3: the engine's parameters gathered to generate
            if self.engine is not None:  # vLLM: the policy's weights when due (rollout.sync_steps)
                self.engine.sync(whole.policy, step)
            out = rollout(whole.policy, [self.prompts.prompt_ids[i] for i in indices], sampling=self.sampling,
                          eos_id=self.stop_ids, pad_id=self.tokenizer.pad_token_id, accelerator=acc,
                          ref_model=self.ref_model, policy_logprobs=False, engine=self.engine,
                          **self.prompts.rollout_seed(generation, len(indices)))
        mask = out.completion_mask
        model = self.model
        with torch.no_grad():
            parts = []
            for s in range(0, mask.shape[0], a.generation_batch_size):
                sl = [t[s: s + a.generation_batch_size].to(acc.device)
                      for t in (out.prompt_ids, out.prompt_mask, out.completion_ids, mask)]
                lp, v, _ = forward_completion(model, *sl, a.temperature)
                parts.append((lp.cpu(), v.cpu()))
        out.logprobs = torch.cat([p[0] for p in parts])
        values = torch.cat([p[1] for p in parts]) * mask  # (B, C)
        score = rewards.missing_eos_penalty(self.reward_model.score_rollout(out), out.ended, a.missing_eos_penalty)
        kl = kl_penalty(out.logprobs, out.ref_logprobs, estimator=a.kl_estimator) * mask  # (B, C)
        token_rewards, dones = kl_penalized_rewards(score, kl, mask, self.kl_ctl.beta)
        advantages, returns = gae_advantages(token_rewards, values, gamma=a.gamma, lam=a.gae_lambda, dones=dones)
        over_processes = partial(global_moments, acc)  # the GLOBAL rollout batch: the update does not depend on the split
        if a.whiten_advantages:
            advantages = whiten(advantages, mask, moments=over_processes)
        advantages, returns = advantages * mask, returns * mask
        seq_kl = masked_sum(kl_penalty(out.logprobs, out.ref_logprobs, estimator="k1"), mask, dim=-1)  # (B,)
        texts = out.texts(self.tokenizer)
        correct = self.accuracy_fn([r["prompt"] for r in rows], texts,
                                   **self.prompts.columns(rows))
        B = len(rows)
        kl_global = evaluate._reduce_sum(acc, [seq_kl.sum().item(), float(B)])
        beta_used = self.kl_ctl.beta
        self._beta_before = (generation, beta_used)
        self.kl_ctl.update(kl_global[0] / kl_global[1], int(kl_global[1]))
        metrics = {
            "train/reward": (score.sum().item(), B),
            "train/kl": (seq_kl.sum().item(), B),
            "train/non_score_reward": ((token_rewards.sum() - score.sum()).item(), B),
            "train/task_accuracy": (sum(correct), B),
            "train/completion_length": (mask.sum().item(), B),
            "train/ended": (out.ended.sum().item(), B),
            "objective/kl_coef": (beta_used, 1),
            "val/explained_variance": (explained_variance(values, returns, mask, moments=over_processes), 1),
        }
        data = {"prompt_ids": out.prompt_ids, "prompt_mask": out.prompt_mask, "completion_ids": out.completion_ids,
                "completion_mask": mask, "old_logprobs": out.logprobs, "old_values": values,
                "advantages": advantages, "returns": returns}
        if out.sampling_logprobs is not None:
            data["sampling_logprobs"] = out.sampling_logprobs
        return data, metrics

    # -- engine interface -------------------------------------------------------------------
    def micro_batches(self, step: int) -> list[dict]:
        a, t = self.args, self.recipe.train
        per_rollout = a.update_epochs * a.num_minibatches
        generation, k = divmod(step, per_rollout)
        if self._cache is None or self._cache[0] != generation:
            with self.accelerator.autocast():  # the loss's computation (see align.stages.grpo.GRPOStage.micro_batches)
                self._cache = (generation, *self.make_rollout(generation, step))
        _, data, metrics = self._cache
        epoch, minibatch = divmod(k, a.num_minibatches)
        rows = self._minibatch_rows(generation, epoch, minibatch)
        batches = []
        for s in range(0, len(rows), t.batch_size):
            idx = rows[s: s + t.batch_size]
            batch = {k2: v[idx] for k2, v in data.items()}
            batch["_weight"] = float(batch["completion_mask"].sum())
            batch["_tokens"] = int(batch["prompt_mask"].sum() + batch["completion_mask"].sum())
            batches.append(batch)
        if k == 0:
            batches[0]["_metrics"] = metrics
        return batches

    def _minibatch_rows(self, generation: int, epoch: int, minibatch: int) -> torch.Tensor:
        """This process's rows (local indices, (per_step,)) of minibatch `minibatch` of an epoch.

        The global rollout batch is cut into blocks of M = num_minibatches consecutive
        rows, and each block's rows go to the M minibatches in a random order (one draw
        for the whole global batch, from the seed, the rollout and the epoch). A process
        holds whole blocks, so every minibatch gets per_step rows from it, and the
        global minibatch is the same set of rows on any number of processes.
        """
        M, acc = self.args.num_minibatches, self.accelerator
        generator = torch.Generator().manual_seed((self.recipe.seed * 1_000_003 + generation) * 131 + epoch)
        assign = torch.rand(self.per_step * acc.num_processes, M, generator=generator).argsort(-1)  # (blocks, M)
        mine = assign[acc.process_index * self.per_step: (acc.process_index + 1) * self.per_step]  # (per_step, M)
        block, j = (mine == minibatch).nonzero(as_tuple=True)
        return block * M + j

    def loss(self, model, batch):
        a = self.args
        mask = batch["completion_mask"]
        logps, values, entropy = forward_completion(model, batch["prompt_ids"], batch["prompt_mask"],
                                                   batch["completion_ids"], mask, a.temperature)
        pg, clipped = ppo_clip_loss(logps, batch["old_logprobs"], batch["advantages"], clip_eps=a.clip_coef)
        is_weights, is_metrics = sampler_correction(batch["old_logprobs"], batch, mask, self.recipe.rollout)
        pg = pg * is_weights  # vLLM's samples: truncated importance weights (1.0 with the own loop)
        vl = clipped_value_loss(values, batch["old_values"], batch["returns"], clip_eps=a.vf_clip)
        loss_sum = masked_sum(pg + a.vf_coef * vl, mask)
        tokens = float(mask.sum())
        with torch.no_grad():
            v_clipped = (values - batch["old_values"]).abs() > (a.vf_clip or float("inf"))
            metrics = dict(batch.get("_metrics", {}), **is_metrics)
            metrics.update({
                "losses/policy_loss": (masked_sum(pg, mask).item(), tokens),
                "losses/value_loss": (masked_sum(vl, mask).item(), tokens),
                "losses/clipfrac": (masked_sum(clipped, mask).item(), tokens),
                "losses/approx_kl": (masked_sum(approx_kl(logps, batch["old_logprobs"]), mask).item(), tokens),
                "val/clipfrac": (masked_sum(v_clipped.float(), mask).item(), tokens),
                "objective/entropy": (masked_sum(entropy, mask).item(), tokens),
                "val/mean": (masked_mean(values, mask).item() * tokens, tokens),
            })
        return loss_sum, metrics

    def checkpoint_state(self, step: int) -> dict:
        """beta as step `step` (the next to run) needs it (JSON, in trainer_state.json), so a resumed run
        continues with the adapted beta instead of ppo.kl_coef.

        A checkpoint inside a rollout's epochs stores the beta from BEFORE that rollout's update: the
        resumed run samples that rollout again and updates beta once. (Only checkpoints on a rollout
        boundary — save_steps a multiple of update_epochs x num_minibatches — resume exactly: a rollout
        sampled again mid-way comes from the partly updated policy.)"""
        generation = step // (self.args.update_epochs * self.args.num_minibatches)
        if self._beta_before[0] == generation:
            return {"kl_coef": self._beta_before[1]}
        return {"kl_coef": self.kl_ctl.beta}

    def load_checkpoint_state(self, state: dict) -> None:
        self.kl_ctl.beta = float(state["kl_coef"])

    def after_step(self, step: int) -> None:
        pass

    def evaluate(self, model) -> dict:
        with models.gathered(model, self.accelerator) as whole:  # ZeRO-3: gathered once for the evaluation
            with self.accelerator.autocast():
                metrics = (self._greedy_metrics(whole.policy) if self.prompts.eval_rows and self.recipe.eval.generate
                           else {})
            if metrics and self.args.eval_kl_prompts:
                metrics["eval/kl"] = eval_kl(whole.policy, self.ref_model, self.prompts, self.sampling, self.stop_ids,
                                               self.args.eval_kl_prompts)
        return metrics

    def _greedy_metrics(self, policy) -> dict:
        """eval/task_accuracy and eval/reward of greedy completions of the held-out prompts.

        The reward model scores the generated token ids as a rollout's are scored (prompt + completion up to
        its first EOS, `missing_eos_penalty` when there is none), not the text decoded and tokenized again:
        a completion cut by max_new_tokens is not made to look finished by an appended EOS.
        """
        ev, acc = self.recipe.eval, self.accelerator
        mine = list(evaluate.shard(len(self.prompts.eval_prompt_ids), acc))
        if not mine:  # more processes than held-out prompts
            return dict(zip(("eval/reward", "eval/task_accuracy"), self._reduce_means(0.0, 0.0, 0.0)))
        greedy = replace(self.sampling, max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size)
        out = rollout(policy, [self.prompts.eval_prompt_ids[i] for i in mine], sampling=greedy,
                      eos_id=self.stop_ids, pad_id=self.tokenizer.pad_token_id, accelerator=acc,
                      policy_logprobs=False, do_sample=False)
        score = rewards.missing_eos_penalty(self.reward_model.score_rollout(out), out.ended,
                                            self.args.missing_eos_penalty)
        rows = [self.prompts.eval_rows[i] for i in mine]
        correct = self.accuracy_fn([r["prompt"] for r in rows], out.texts(self.tokenizer),
                                   **self.prompts.columns(rows))
        reward, accuracy = self._reduce_means(score.sum().item(), float(sum(correct)), float(len(mine)))
        return {"eval/reward": reward, "eval/task_accuracy": accuracy}

    def _reduce_means(self, *sums_and_count: float) -> list[float]:
        """Sums over every process divided by the global count (the last value)."""
        *sums, count = evaluate._reduce_sum(self.accelerator, list(sums_and_count))
        return [total / max(count, 1.0) for total in sums]

    def save(self, out_dir, accelerator) -> None:
        from pathlib import Path

        with models.gathered(self.model, accelerator) as unwrapped:  # ZeRO-3: whole weights on every process
            if accelerator.is_main_process:
                models.save_pretrained(unwrapped.policy, self.tokenizer, out_dir)
                unwrapped.value.save_pretrained(Path(out_dir) / "value", safe_serialization=True)
        accelerator.wait_for_everyone()
        if self.args.plot and accelerator.is_main_process:
            plot_run(Path(out_dir), "ppo", train_kl="per sequence, sum of k1")

