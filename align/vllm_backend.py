"""vLLM as the rollout engine (`rollout.backend: vllm`): GRPO and PPO rollouts, `align generate --backend vllm`.

Colocated: one in-process vLLM engine per training process, next to the policy
(`VLLMSampler`); under `accelerate launch` each process's engine joins the process group as an
`external_launcher` and samples its own rows (2 CPU processes train the 1-process weights,
tests/test_vllm.py). Everything around the sampling stays align's:

- **Weights**: the engine starts from the policy's config with placeholder weights
  (`load_format="dummy"`: nothing is written to disk or read from the hub) and is sent the
  policy's own weights before it first samples, then again before sampling after every
  `rollout.sync_steps` optimizer steps (`sync`): `collective_rpc("reload_weights")` with the
  Hugging Face parameter names, LoRA adapters merged into their base weights
  (`merged_state_dict`, computed; the training model is untouched), whole parameters under
  ZeRO-3 (the caller gathers them, `align.models.gathered`). The prefix cache is reset after
  each update, or a repeated prompt would reuse keys/values of the old weights. A resumed run
  starts its engine from the resumed weights: exact when the checkpoint's step is a multiple of
  sync_steps (`RolloutEngine`; the stages warn when train.save_steps is not).
- **Log-probs**: vLLM returns the log-prob of each sampled token under the distribution it
  sampled from (`logprobs_mode="processed_logprobs"`: after temperature, top-k, top-p). The
  losses never use them: the old/reference log-probs are the trainer's, recomputed by a forward
  (`align.rollout.completion_logprobs`); vLLM's only serve the truncated importance-sampling
  correction (`align.losses.truncated_importance_weights`) and `rollout/logprob_diff`.
- **Reproducible**: each row is one request with its own `seed`, the row's 32-bit key from the
  rollout seed and its GLOBAL index (`align.rollout.row_keys`), so what a row samples depends
  neither on its batch nor on how rows are dealt out to processes. (The draws are vLLM's, not
  the own loop's Gumbel noise: the two backends sample different, equally distributed tokens.)
- **In-process**: VLLM_ENABLE_V1_MULTIPROCESSING=0 and the "uni" executor (no child process);
  on a CPU the KV cache is VLLM_CPU_KVCACHE_SPACE GiB (1 unless set). vLLM reseeds the global
  torch RNG when it starts and turns `torch.set_num_threads` into a no-op; `VLLMSampler` gives
  both back, so the training's random stream and threads do not depend on the backend.
- **Held-out evaluation** (greedy `eval/task_accuracy`, `eval/kl`) stays on the own decode loop
  and the trainer's weights.

- **Sleep mode** (`rollout.sleep`, a GPU only): level-1 sleep after each generation (weights
  offloaded to CPU memory, KV cache freed), woken weights-first for the next sync, then the KV
  cache. Refused on a CPU; written to vLLM's documented API and not yet run on a GPU.

Server mode (generation in a process of its own, weights pushed over a process group) is
`align.vllm_server`, on this module's engine.
"""

from __future__ import annotations

import os
import tempfile

import torch

from align.errors import AlignError


def require_vllm(what: str = "rollout.backend: vllm") -> None:
    """One clear line (exit 2) when vLLM is not importable; `what` names what asked for it."""
    import importlib.util

    from align.stage_settings import VLLM_MISSING

    if importlib.util.find_spec("vllm") is None:
        raise AlignError(f"{what}: {VLLM_MISSING}")


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The causal LM's weights under Hugging Face names, each LoRA adapter merged into its base weight.

    A PEFT model gives W + scale * B A for every adapted linear (PEFT's `get_delta_weight`,
    computed here in the weights' dtype, outside any autocast, without grad: the model itself
    is not merged); the adapter matrices are left out. A plain model gives its state dict.
    Tensors are detached views, not copies.
    """
    from align.models import is_peft

    if not is_peft(model):
        return {k: v.detach() for k, v in model.state_dict().items()}
    from peft.tuners.lora import LoraLayer

    inner = model.get_base_model()
    device = next(model.parameters()).device.type
    with torch.no_grad(), torch.autocast(device_type=device, enabled=False):
        deltas = {name: sum(module.get_delta_weight(a) for a in module.active_adapters)
                  for name, module in inner.named_modules() if isinstance(module, LoraLayer) and not module.merged}
    out = {}
    for key, value in inner.state_dict().items():
        if ".lora_" in key or ".original_module." in key:
            continue
        name = key.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        owner = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and owner in deltas:
            value = value + deltas[owner].to(value.dtype)
        out[name] = value.detach()
    return out


def _engine_env() -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


class RolloutEngine:
    """What both vLLM engines (colocated `VLLMSampler`, `align.vllm_server.VLLMServerClient`) share: when the
    policy's weights are due, and padded rollouts from their `complete`.

    Weights are due at the first sync, then at the first sampling in each block of `sync_steps` optimizer steps
    (blocks counted from step 0, not from the engine's start, so a run resumed from a checkpoint at a multiple of
    sync_steps sends at the steps the run straight through sends)."""

    def __init__(self, sync_steps: int = 1):
        self.sync_steps = sync_steps
        self.synced_step: int | None = None

    def due(self, step: int) -> bool:
        """Whether weights are due at optimizer step `step`: never sent yet, or `step` in a later block of
        sync_steps steps than the last send."""
        return self.synced_step is None or step // self.sync_steps > self.synced_step // self.sync_steps

    def sample(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
               top_k: int, stop_ids: list[int], pad_id: int,
               keys: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Completions of `prompts` (token lists): -> (completion ids (B, C), their sampled log-probs (B, C)).

        `keys` (B,) the rows' seeds (`align.rollout.row_keys`); None: greedy. Rows are padded
        with `pad_id` (log-prob 0) after their stop token, which they keep.
        """
        return pad_completions(self.complete(prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                             top_p=top_p, top_k=top_k, stop_ids=stop_ids,
                                             seeds=None if keys is None else keys.tolist()), pad_id)


class VLLMSampler(RolloutEngine):
    """A colocated vLLM engine that samples completions of token-id prompts from the policy's current weights.

    `max_model_len`: the longest prompt + completion it must hold; `seed`: the engine's (rows
    have their own); `sync_steps`: when weights are due (`RolloutEngine`); `sleep`: vLLM's sleep
    mode on a GPU (weights offloaded to CPU memory and the KV cache freed after each generation,
    woken for the next sync or generation: level 1, so weights not due a sync survive). The engine
    starts on the first `sync`.
    """

    def __init__(self, *, max_model_len: int, seed: int = 0, sync_steps: int = 1,
                 gpu_memory_utilization: float = 0.3, sleep: bool = False):
        require_vllm()
        if sleep and not torch.cuda.is_available():
            raise AlignError("rollout.sleep: vLLM's sleep mode frees GPU memory and needs a CUDA or ROCm GPU; this "
                             "machine has none (set rollout.sleep: false)")
        super().__init__(sync_steps)
        self.max_model_len, self.seed, self.sleep = max_model_len, seed, sleep
        self.gpu_memory_utilization = gpu_memory_utilization
        self.llm, self.dtype = None, None
        self.asleep = False
        self._folder = None

    def _start(self, model) -> None:
        """The engine for `model`'s architecture (its config in a temporary folder, placeholder weights)."""
        _engine_env()
        from vllm import LLM

        from align.models import is_peft

        config = (model.get_base_model() if is_peft(model) else model).config
        self._folder = tempfile.TemporaryDirectory(prefix="align-vllm-")
        config.save_pretrained(self._folder.name)
        self.dtype = dtype = next(model.parameters()).dtype
        # one engine per training process: under a process group (accelerate launch) vLLM joins it as an
        # external launcher (each rank an independent engine, as TRL's colocate mode), else it runs alone
        joined = (torch.distributed.is_available() and torch.distributed.is_initialized()
                  and torch.distributed.get_world_size() > 1)  # (an earlier engine leaves a group of one)
        set_num_threads = torch.set_num_threads  # vLLM's CPU worker makes it a no-op: given back below
        with torch.random.fork_rng(devices=[]):  # vLLM reseeds the global RNG: keep the training's stream
            self.llm = LLM(model=self._folder.name, skip_tokenizer_init=True, load_format="dummy", dtype=dtype,
                           seed=self.seed, max_model_len=self.max_model_len, enforce_eager=True,
                           distributed_executor_backend="external_launcher" if joined else "uni",
                           generation_config="vllm", logprobs_mode="processed_logprobs",
                           gpu_memory_utilization=self.gpu_memory_utilization, enable_sleep_mode=self.sleep)
        torch.set_num_threads = set_num_threads

    def sync(self, model, step: int = 0) -> bool:
        """Send `model`'s weights (the bare module, whole) when due at optimizer step `step`; -> whether sent."""
        if not self.due(step):
            return False
        if self.llm is None:
            self._start(model)
        if self.asleep:  # the weights' memory first; the KV cache's after the update (less at peak)
            self.llm.wake_up(tags=["weights"])
        self.load(list(merged_state_dict(model).items()))
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.synced_step = step
        return True

    def load(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        """Put `weights` (Hugging Face names, any subset) into the engine and reset its prefix cache."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()

    def complete(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
                 top_k: int, stop_ids: list[int], seeds: list[int] | None) -> list[tuple[list[int], list[float]]]:
        """Completions of `prompts` (token lists): -> one (token ids, their sampled log-probs) per prompt.

        `seeds`: one per prompt (`align.rollout.row_keys`); None: greedy. A completion keeps its stop token.
        """
        from vllm import SamplingParams

        if self.llm is None:
            raise RuntimeError("VLLMSampler.complete before sync: the engine has no weights yet")
        common = dict(max_tokens=max_new_tokens, stop_token_ids=list(stop_ids), ignore_eos=True, detokenize=False,
                      logprobs=0, skip_special_tokens=False)
        if seeds is None:
            params = [SamplingParams(temperature=0.0, **common)] * len(prompts)
        else:
            params = [SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k or -1, seed=int(k), **common)
                      for k in seeds]
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        if self.asleep:  # no sync was due since the last generation
            self.llm.wake_up()
            self.asleep = False
        with torch.random.fork_rng(devices=[]):
            outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        if self.sleep:  # training runs next: give it the engine's GPU memory
            self.llm.sleep(level=1)
            self.asleep = True
        done = []
        for o in outputs:
            c = o.outputs[0]
            tokens = list(c.token_ids)
            logps = [lp[t].logprob for t, lp in zip(tokens, c.logprobs)] if c.logprobs is not None else [0.0] * len(tokens)
            done.append((tokens, logps))
        return done


def pad_completions(completions: list[tuple[list[int], list[float]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, log-probs) per row -> (token ids (B, C) padded with pad_id, sampled log-probs (B, C), 0 at pads)."""
    C = max(1, max(len(tokens) for tokens, _ in completions))
    ids = torch.full((len(completions), C), pad_id, dtype=torch.long)
    logps = torch.zeros(len(completions), C)
    for row, (tokens, lps) in enumerate(completions):
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        logps[row, : len(tokens)] = torch.tensor(lps, dtype=torch.float32)
    return ids, logps
