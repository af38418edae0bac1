"""What the online stages (GRPO, PPO, online DPO) share, by composition rather than inheritance.

- `PromptSource`: the left-padding tokenizer, the training and held-out prompts encoded as
  generation sees them, the schedule that deals training prompts out to rollout batches
  and processes, and each rollout row's sampling key (`rollout_seed`).
- `greedy_eval`: held-out task accuracy (and reward) of greedy completions;
- `eval_kl`: the held-out KL to the reference that both stages log as `eval/kl`.
- `sampling_config` and `plot_run`: the sampling section both stages share the names of, and
  the curves they plot at the end.
- `rollout_engine` and `sampler_correction`: the `rollout:` section's vLLM engine (None for the own
  decode loop) and the truncated importance weights of the tokens it sampled.

Each stage builds its own model(s) and loss; this module holds no model of its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from align import evaluate, models
from align.data import cut_from_start, encode_prompt, load_eval_rows, load_rows
from align.errors import AlignError
from align.losses import kl_penalty, masked_sum, truncated_importance_weights
from align.recipe import Recipe
from align.rollout import SamplingConfig, rollout, score_logprobs


def sampling_config(a) -> SamplingConfig:
    """The sampling settings of an online stage's section (GRPO's and PPO's share the names)."""
    return SamplingConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                          batch_size=a.generation_batch_size)


def rollout_engine(recipe: Recipe, prompts: "PromptSource", max_new_tokens: int):
    """The `rollout:` section's engine: None (the own decode loop), a colocated vLLM engine sized for the
    longest prompt + max_new_tokens (`align.vllm_backend.VLLMSampler`, started at its first weight sync), or in
    server mode the client of an `align vllm-serve` process (`align.vllm_server.VLLMServerClient`)."""
    if recipe.rollout.backend != "vllm":
        return None
    k = recipe.rollout.sync_steps
    if recipe.train.save_steps % k:
        prompts.accelerator.print(
            f"warning: train.save_steps {recipe.train.save_steps} is not a multiple of rollout.sync_steps {k}: a run "
            "resumed from a checkpoint sends the engine the resumed weights, where the run straight through sampled "
            "with the weights of its last send (not the same result)")
    longest = max(map(len, prompts.prompt_ids))
    r = recipe.rollout
    if r.mode == "server":
        from align.vllm_server import VLLMServerClient

        return VLLMServerClient(host=r.server_host, port=r.server_port, timeout=r.server_timeout,
                                max_model_len=longest + max_new_tokens, sync_steps=k)
    from align.vllm_backend import VLLMSampler

    return VLLMSampler(max_model_len=longest + max_new_tokens, seed=recipe.seed, sync_steps=k,
                       gpu_memory_utilization=r.gpu_memory_utilization, sleep=r.sleep)


def sampler_correction(old_logprobs: torch.Tensor, batch: dict, mask: torch.Tensor, rollout_cfg):
    """Truncated importance weights (B, C) of tokens another engine sampled, and the mismatch metrics.

    `old_logprobs`: the trainer's log-probs of the sampled tokens at sampling time (detached).
    A batch without `sampling_logprobs` (the own decode loop samples with the trainer's
    weights and kernels) -> (1.0, {}). Logs `rollout/logprob_diff` (mean |trainer - vLLM| per
    token, TRL's sampling/sampling_logp_difference/mean) and, when the correction is on,
    `rollout/importance_weight` (mean truncated weight).
    """
    if "sampling_logprobs" not in batch:
        return 1.0, {}
    sampled, tokens = batch["sampling_logprobs"], float(mask.sum())
    metrics = {"rollout/logprob_diff": (masked_sum((old_logprobs - sampled).abs(), mask).item(), tokens)}
    if not rollout_cfg.importance_sampling_correction:
        return 1.0, metrics
    weights = truncated_importance_weights(old_logprobs, sampled, cap=rollout_cfg.importance_sampling_cap)
    metrics["rollout/importance_weight"] = (masked_sum(weights, mask).item(), tokens)
    return weights, metrics


class PromptSource:
    """Training and held-out prompts of an online stage, and which of them a rollout batch samples.

    `per_process` prompts go into each process's share of a rollout batch. Attributes: `tokenizer`
    (left padding, EOS required), `rows` / `prompt_ids` (training), `eval_rows` / `eval_prompt_ids`.
    """

    def __init__(self, recipe: Recipe, accelerator, per_process: int):
        self.recipe, self.accelerator, self.per_process = recipe, accelerator, per_process
        self.tokenizer = models.load_tokenizer(recipe.model, padding_side="left")
        if self.tokenizer.eos_token_id is None:
            raise AlignError("model: the tokenizer has no EOS token; completions could never end")
        self.rows, self.prompt_ids = self._encode(load_rows(recipe.data.train, key="data.train"), "data.train")
        self.eval_rows, self.eval_prompt_ids = [], []
        eval_rows = load_eval_rows(recipe.data)
        if eval_rows is not None:
            self.eval_rows, self.eval_prompt_ids = self._encode(eval_rows, "data.eval")

    def _encode(self, rows, key: str) -> tuple[list[dict], list[list[int]]]:
        """Prompts as generation sees them; one longer than data.max_length is cut from its beginning
        (`data.prompt_truncation: keep_end`, the default: a long dialogue keeps its latest turns) or refused."""
        data, encoded, cut = self.recipe.data, [], 0
        for i, row in enumerate(rows.rows):
            if "prompt" not in row:
                raise AlignError(f"{key}: {rows.where(i)} has no 'prompt' column ({self.recipe.stage} samples "
                                 f"completions for prompts; columns: {sorted(row)})")
            ids = encode_prompt(self.tokenizer, row["prompt"], rows.where(i))
            if len(ids) > data.max_length:
                if data.prompt_truncation != "keep_end":
                    raise AlignError(f"{key}: {rows.where(i)}: the prompt has {len(ids)} tokens, more than "
                                     f"data.max_length={data.max_length} (data.prompt_truncation: keep_end cuts "
                                     "long prompts from their beginning instead)")
                ids, cut = cut_from_start(ids, data.max_length, self.tokenizer.bos_token_id), cut + 1
            encoded.append(ids)
        if cut:
            self.accelerator.print(f"{key}: {cut} of {len(encoded)} prompts longer than data.max_length="
                                   f"{data.max_length} cut from their beginning (data.prompt_truncation: keep_end)")
        return rows.rows, encoded

    def check_positions(self, model, max_new_tokens: int) -> None:
        """The longest prompt and the longest generation (sampled, or greedy on held-out prompts) fit the
        policy's positions (`models.check_positions`: a learned position table such as GPT-2's)."""
        new = max(max_new_tokens, self.recipe.eval.max_new_tokens if self.eval_rows else 0)
        prompt = max(map(len, self.prompt_ids + self.eval_prompt_ids))
        models.check_positions(model, prompt + new, f"the longest prompt ({prompt} tokens) + "
                                                    f"{self.recipe.stage}.max_new_tokens / eval.max_new_tokens")

    def step(self, generation: int) -> list[int]:
        """Indices of this process's prompts for rollout batch `generation` (an epoch-wise shuffle)."""
        n, acc = len(self.rows), self.accelerator
        global_prompts = self.per_process * acc.num_processes
        per_epoch = max(1, n // global_prompts)
        epoch, k = divmod(generation, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.recipe.seed * 7919 + epoch)).tolist()
        start = k * global_prompts + acc.process_index * self.per_process
        return [order[(start + j) % n] for j in range(self.per_process)]

    def rollout_seed(self, generation: int, rows: int) -> dict:
        """Sampling seed of rollout batch `generation` and this process's rows' GLOBAL indices in it.

        Not the process index: the batch samples the same completions on any number of
        processes (see align.rollout).
        """
        first = self.accelerator.process_index * rows
        return {"generator_seed": (self.recipe.seed * 1_000_003 + generation) * 1009,
                "row_ids": range(first, first + rows)}

    @staticmethod
    def columns(rows: list[dict]) -> dict[str, list]:
        """The rows' columns other than `prompt`, as reward functions take them (e.g. the reference answer)."""
        return {k: [r.get(k) for r in rows] for k in rows[0] if k != "prompt"} if rows else {}


def greedy_eval(model, prompts: PromptSource, accuracy_fn, reward_fn=None) -> dict:
    """Means over the held-out prompts' greedy completions: eval/reward (of `reward_fn`, when given) and
    eval/task_accuracy (of `accuracy_fn`); {} without held-out prompts or with eval.generate off."""
    ev, acc, eval_rows = prompts.recipe.eval, prompts.accelerator, prompts.eval_rows
    if not eval_rows or not ev.generate:
        return {}
    completions = evaluate.greedy_completions(model, prompts.tokenizer, [r["prompt"] for r in eval_rows],
                                              max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size,
                                              accelerator=acc)
    mine = sorted(completions)
    rows, texts = [eval_rows[i] for i in mine], [completions[i] for i in mine]
    columns, texts_of = prompts.columns(rows), [r["prompt"] for r in rows]
    reward = reward_fn(texts_of, texts, **columns) if reward_fn is not None else []
    correct = accuracy_fn(texts_of, texts, **columns)
    total, right, count = evaluate._reduce_sum(acc, [sum(reward), sum(correct), float(len(rows))])
    metrics = {"eval/reward": total / max(count, 1.0)} if reward_fn is not None else {}
    metrics["eval/task_accuracy"] = right / max(count, 1.0)
    return metrics


def eval_kl(policy, ref_model, prompts: PromptSource, sampling: SamplingConfig, stop_ids: list[int],
            n: int) -> float:
    """Mean over `n` held-out prompts of the sequence KL estimate sum_t (log pi - log ref) of one sample each.

    `ref_model` None: the policy is a new LoRA adapter and its reference the base model (adapter disabled).
    """
    acc = prompts.accelerator
    mine = list(evaluate.shard(min(n, len(prompts.eval_prompt_ids)), acc))
    out = rollout(policy, [prompts.eval_prompt_ids[i] for i in mine], sampling=sampling, eos_id=stop_ids,
                  pad_id=prompts.tokenizer.pad_token_id, accelerator=acc, ref_model=ref_model,
                  generator_seed=prompts.recipe.seed + 17, row_ids=mine)
    if out.ref_logprobs is None:
        base = acc.unwrap_model(policy)
        with base.disable_adapter():
            out.ref_logprobs = score_logprobs(base, out.prompt_ids, out.prompt_mask, out.completion_ids,
                                              out.completion_mask, temperature=sampling.temperature)
    kl = masked_sum(kl_penalty(out.logprobs, out.ref_logprobs, estimator="k1"), out.completion_mask)
    total, count = evaluate._reduce_sum(acc, [kl.item(), float(len(mine))])
    return total / max(count, 1.0)


def plot_run(out_dir: Path, prefix: str, train_kl: str = "token mean of k3") -> list[Path]:
    """Proxy reward vs true accuracy (one PNG) and KL (another) against steps, from log.jsonl."""
    from align.plots import plot_curves, series_title

    log = out_dir / "log.jsonl"
    if not log.is_file():
        return []
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]

    def series(name):
        pts = [(r["step"], r[name]) for r in records if isinstance(r.get(name), (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]

    curves = {n: series(n) for n in ("train/reward", "eval/reward", "train/task_accuracy", "eval/task_accuracy")}
    paths = [plot_curves(out_dir / f"{prefix}_curves.png", curves, title=series_title(prefix, curves), ylabel="value")]
    kl = {f"train/kl ({train_kl})": series("train/kl"), "eval/kl (per sequence, sum of k1)": series("eval/kl")}
    if any(xs for xs, _ in kl.values()):
        paths.append(plot_curves(out_dir / f"{prefix}_kl.png", kl, title=f"{prefix}: KL to the reference",
                                 ylabel="KL (nats)"))
    return paths
