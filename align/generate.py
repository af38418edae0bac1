"""`align generate`: batched sampling from any trained policy (a full model or a LoRA adapter folder).

Prompts come from any source the data layer reads, with a `prompt` column (a string or a
message list) or a `messages` column (the conversation so far; a final assistant turn is
dropped so the model answers it). Each output row is the input row plus `completion`
(and `sample` when `--num-samples` > 1). Temperature 0 is greedy decoding. Under
`accelerate launch` each process samples its share and the main process writes all rows,
in input order. Sampling is keyed by (prompt, sample) and the seed, so the same command gives
the same rows whatever the batch size or the number of processes. `--backend vllm` samples with
an in-process vLLM engine holding the model's weights (`align.vllm_backend`; LoRA merged), keyed
the same way (one request seed per job): greedy rows are the own loop's, sampled rows are
vLLM's own draws.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm.auto import tqdm

from align import models
from align.accel import distributed_state
from align.data import encode_prompt, load_rows
from align.errors import AlignError
from align.io_utils import atomic_write_text
from align.recipe import ModelConfig
from align.rollout import SamplingConfig, completion_mask, left_pad, row_keys, sample


def prompt_of(row: dict, where: str):
    if "prompt" in row and row["prompt"] not in (None, "", []):
        return row["prompt"]
    if "messages" in row and isinstance(row["messages"], list) and row["messages"]:
        messages = row["messages"]
        return messages[:-1] if messages[-1].get("role") == "assistant" else messages
    raise AlignError(f"--prompts: {where} has columns {sorted(row)}; expected prompt or messages")


def sample_jobs(model, tokenizer, rows, jobs: list[tuple[int, int]], *, sampling: SamplingConfig, num_samples: int,
                seed: int, do_sample: bool, progress: str | None = None, engine=None) -> dict[tuple[int, int], str]:
    """Completion text of each (row index, sample index) job: this process's share of `align generate`.

    Each job samples with its own key (from the seed and its index i x num_samples + s), so what it
    samples depends neither on the batch it lands in nor on how the jobs are dealt out to processes.
    `progress`: the label of a progress bar counting samples (shown on a terminal only); None: no bar.
    `engine`: a `align.vllm_backend.VLLMSampler` holding the model's weights samples instead of the own loop.
    """
    encoded = [encode_prompt(tokenizer, prompt_of(rows.rows[i], rows.where(i)), rows.where(i)) for i, _ in jobs]
    keys = row_keys(seed, [i * num_samples + s for i, s in jobs]) if do_sample else None
    order = sorted(range(len(jobs)), key=lambda k: len(encoded[k]))  # similar lengths share a batch
    by_job, stops = {}, models.stop_token_ids(model, tokenizer)
    bar = tqdm(total=len(jobs), desc=progress, unit="sample", dynamic_ncols=True,
               disable=True if progress is None else None)  # None: tqdm shows it on a terminal only
    for start in range(0, len(order), sampling.batch_size):
        chunk = order[start: start + sampling.batch_size]
        ids, mask = left_pad([encoded[k] for k in chunk], tokenizer.pad_token_id)
        chunk_keys = keys[chunk] if keys is not None else None
        if engine is None:
            out = sample(model, ids, mask, sampling=sampling, eos_id=stops, pad_id=tokenizer.pad_token_id,
                         do_sample=do_sample, keys=chunk_keys)
        else:
            out, _ = engine.sample([encoded[k] for k in chunk], max_new_tokens=sampling.max_new_tokens,
                                   temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                                   stop_ids=stops, pad_id=tokenizer.pad_token_id, keys=chunk_keys)
        keep, _ = completion_mask(out, stops)
        for row, k in enumerate(chunk):
            n = int(keep[row].sum())
            by_job[jobs[k]] = tokenizer.decode(out[row, :n].tolist(), skip_special_tokens=True)
        bar.update(len(chunk))
    bar.close()
    return by_job


def generate(model_path: str, prompts_path: str, *, output: str | None = None, max_new_tokens: int = 64,
             batch_size: int = 64, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             num_samples: int = 1, seed: int = 0, trust_remote_code: bool = False,
             progress: str = "sampling", backend: str = "own") -> list[dict]:
    """Sample completions for every prompt; returns the output rows (also written to `output` or stdout).

    The main process shows a progress bar labelled `progress` on a terminal. `backend`: own (align's
    decode loop) or vllm (`align.vllm_backend`)."""
    from accelerate.utils import gather_object

    if num_samples < 1 or max_new_tokens < 1 or batch_size < 1 or temperature < 0:
        raise AlignError("generate: --num-samples, --max-new-tokens and --batch-size must be >= 1 and "
                         "--temperature >= 0")
    if backend not in ("own", "vllm"):
        raise AlignError(f"generate: --backend {backend!r}; expected own or vllm")
    if backend == "vllm":
        from align.vllm_backend import require_vllm

        require_vllm("generate --backend vllm")
    state = distributed_state()
    cfg = ModelConfig(name_or_path=model_path, trust_remote_code=trust_remote_code)
    tokenizer = models.load_tokenizer(cfg, padding_side="left")
    model = models.load_model(cfg, tokenizer, trainable=False).to(state.device)
    rows = load_rows(prompts_path, key="--prompts")
    jobs = [(i, s) for i in range(len(rows.rows)) for s in range(num_samples)]
    mine = jobs[state.process_index:: state.num_processes]
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature or 1.0, top_p=top_p,
                              top_k=top_k, batch_size=batch_size)
    engine = None
    if backend == "vllm":
        from align.vllm_backend import VLLMSampler

        longest = max((len(encode_prompt(tokenizer, prompt_of(r, rows.where(i)), rows.where(i)))
                       for i, r in enumerate(rows.rows)), default=1)
        engine = VLLMSampler(max_model_len=longest + max_new_tokens, seed=seed)
        engine.sync(model)
    by_job = sample_jobs(model, tokenizer, rows, mine, sampling=sampling, num_samples=num_samples, seed=seed,
                         do_sample=temperature > 0, progress=progress if state.is_main_process else None,
                         engine=engine)
    texts = [(job, by_job[job]) for job in mine]
    if state.num_processes > 1:
        texts = gather_object(texts)
    results = dict(texts)
    out_rows = []
    for i, s in jobs:
        row = dict(rows.rows[i], completion=results[(i, s)])
        if num_samples > 1:
            row["sample"] = s
        out_rows.append(row)
    if state.is_main_process:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out_rows)
        if output:
            atomic_write_text(Path(output), text)
        else:
            sys.stdout.write(text)
    return out_rows
