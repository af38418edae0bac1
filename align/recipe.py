"""The recipe schema shared by every LLM stage.

A recipe YAML has the common sections below (`model`, `data`, `train`, `eval`) plus
one optional section named after its stage (`sft:`, `dpo:` …) whose schema the stage
declares. Defaults live here and in the stage sections only.

    stage: sft
    output_dir: runs/tiny-sft
    model: {name_or_path: builtin:tiny}
    data: {train: data/arith/sft_train.jsonl, eval: data/arith/sft_eval.jsonl}
    train: {max_steps: 1800, batch_size: 128, lr: 3e-3}
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from align import config as cfg
from align import trl_names
from align.errors import AlignError
from align.stage_settings import RolloutConfig


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train a LoRA adapter (PEFT) instead of the full model."""
    r: int = field(default=16, metadata=cfg.positive("lora rank r"))
    """Rank of the adapter matrices."""
    alpha: float = field(default=32.0, metadata=cfg.positive("lora alpha"))
    """Scale: the adapter's update is multiplied by alpha / r."""
    dropout: float = field(default=0.0, metadata=cfg.in_range(0.0, 0.99, "lora dropout"))
    """Dropout on the adapter's input (kept when model.disable_dropout switches the model's off)."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt, or PEFT's "all-linear"."""


@dataclass
class QuantizationConfig:
    """QLoRA (Dettmers et al. 2023): the frozen base weights stored in 4 bits (bitsandbytes), a LoRA
    adapter trained on top in `compute_dtype`. Needs a CUDA GPU and `pip install bitsandbytes`."""

    load_in_4bit: bool = False
    """Load the frozen base weights in 4 bits (needs model.lora.enabled)."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """NF4 (4-bit NormalFloat, the QLoRA paper's data type) or plain FP4."""
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """dtype the 4-bit weights are dequantised to for each matmul."""
    double_quant: bool = True
    """Quantise the quantisation constants too (QLoRA's double quantisation: ~0.4 bits/parameter saved)."""


@dataclass
class ModelConfig:
    name_or_path: str = "builtin:tiny"
    """A hub id, a local folder (full model or PEFT adapter), or builtin:tiny / builtin:small."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of name_or_path."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """dtype the weights are loaded in (auto: the checkpoint's)."""
    attn_implementation: str | None = None
    """None keeps transformers' default (sdpa)."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub checkpoint; off unless set."""
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    """Recompute each layer's activations in the backward pass instead of keeping them: about a
    third more compute for a fraction of the activation memory. auto: on with a GPU (as TRL's
    default), off on a CPU, where `train.micro_batch_tokens: auto` bounds the activations instead
    (`align.device`). The real-model recipes set it on."""
    pad_token: str | None = None
    """Token to pad with when the tokenizer has none (else loading fails with a clear error)."""
    chat_template: str | None = None
    """A Jinja chat template to use when the tokenizer has none."""
    disable_dropout: bool = True
    """Switch off every dropout of the model (TRL's `disable_dropout`, on by default here in every stage):
    the reference log-probs, rollout log-probs and training forwards then compute the same function, so
    the step-0 policy/reference ratios are exactly 1. A LoRA adapter's own `lora.dropout` is kept.
    false: keep the model's dropout (its config's values)."""
    chunked_logprobs: bool | Literal["auto"] = "auto"
    """Per-token log-probs (every loss, reference and evaluation) from the last hidden states, chunked over
    tokens, so that the (tokens x vocabulary) logits never exist at once (`align.logprobs`): the same values
    and gradients, a fraction of the memory on a real vocabulary. false: the model's full logits (the plain
    path). auto: chunked for a forward whose logits exceed one chunk (2^24 entries: 64 MiB), else plain
    (nothing to save; the tiny models keep their exact numbers). Heads it cannot reproduce (a LoRA on
    lm_head, DeepSpeed ZeRO-3) use the plain path, with a warning."""
    logprob_chunk_tokens: int | None = None
    """Positions per chunk of `chunked_logprobs`; None: 2^24 logit entries' worth (~110 positions at a
    151,936 vocabulary, a tiny model's whole batch)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    from_recipe: str | None = None
    """A recipe that produces `name_or_path` (its output_dir), run first when that folder has no model yet:
    e.g. a DPO recipe names the tiny SFT recipe, so it trains the SFT model it starts from when missing."""
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    """`quantization: {load_in_4bit: true}` loads the base model in 4 bits for QLoRA (`align.models`)."""

    def validate(self) -> None:
        if self.logprob_chunk_tokens is not None and self.logprob_chunk_tokens < 1:
            raise AlignError(f"model.logprob_chunk_tokens: {self.logprob_chunk_tokens} positions per chunk; expected "
                             "a positive number, or null for the default")
        if self.quantization.load_in_4bit and not self.lora.enabled:
            raise AlignError("quantization.load_in_4bit: 4-bit weights cannot be trained; QLoRA trains a LoRA "
                             "adapter on top: set model.lora.enabled: true")
        if self.quantization.load_in_4bit and self.name_or_path.startswith("builtin:"):
            raise AlignError("quantization.load_in_4bit: needs a pretrained model (a folder or hub id), "
                             f"not {self.name_or_path}")


@dataclass
class PolicySource:
    prompts: Any = None
    """Prompt rows (any source the data layer reads, with a `prompt` column)."""
    output: str = ""
    """The pairs file (.jsonl) to write."""


@dataclass
class PolicyPairsConfig:
    policy: str = ""
    """Folder of the policy to sample (e.g. the SFT model PPO starts from)."""
    policy_recipe: str | None = None
    """A recipe that trains `policy` when that folder has no model yet."""
    train: PolicySource = field(default_factory=PolicySource)
    eval: PolicySource | None = None
    """Held-out pairs made the same way (optional)."""
    num_samples: int = field(default=4, metadata=cfg.positive("data.from_policy.num_samples"))
    """Completions sampled per prompt."""
    temperature: float = field(default=1.0, metadata=cfg.positive("data.from_policy.temperature"))
    """Sampling temperature."""
    max_new_tokens: int = field(default=8, metadata=cfg.positive("data.from_policy.max_new_tokens"))
    """Longest sampled completion."""
    pairs_per_prompt: int = field(default=1, metadata=cfg.positive("data.from_policy.pairs_per_prompt"))
    """At most this many (correct, incorrect) pairs per prompt."""
    label: str = "exact_match"
    """The simulated labeller: a reward function of `align.rewards` (name or module:function); > 0.5 is correct."""
    seed: int = 0
    """Seeds the sampling and the choice of pairs."""
    batch_size: int = field(default=512, metadata=cfg.positive("data.from_policy.batch_size"))
    """Rows per generate call."""


@dataclass
class DataConfig:
    train: Any = None
    """Training data: a local .jsonl/.json/.jsonl.gz/.parquet/.csv file, a datasets name, a mapping
    {path, name, split, take, columns, chat_prompt}, or a list of these (a mixture, concatenated).
    `columns: {question: prompt}` renames columns as rows are read; `chat_prompt: true` (or a system
    prompt string) makes a string `prompt` a chat conversation and string answers (completion, chosen,
    rejected) the assistant's reply (`align.data`)."""
    eval: Any = None
    """Held-out data in the same forms (optional)."""
    max_length: int = field(default=1024, metadata=cfg.positive("data.max_length"))
    """Longest tokenized sequence the model is given to learn from: SFT, a sample (prompt + completion; with
    packing, a row); reward and DPO family, one side of a pair (prompt + the longer answer); GRPO/PPO, a
    prompt (completions add up to grpo/ppo/online_dpo/gkd.max_new_tokens). Too long: `data.prompt_truncation` cuts pair
    and online prompts, `data.truncation` SFT samples."""
    truncation: Literal["keep_start", "drop"] = "keep_start"
    """keep_start: cut the end of too-long samples; drop: drop them. Either way a sample left with
    no trainable token is dropped and counted, and the run fails if every sample is dropped."""
    prompt_truncation: Literal["keep_end", "keep_start"] = "keep_end"
    """Preference pairs (reward, DPO, SimPO, ORPO) longer than max_length: keep_end first cuts the BEGINNING
    of the prompt (a long dialogue keeps its last turns, next to the answers), then the ends of the answers;
    keep_start cuts only the ends of the answers (a long prompt can leave no answer token: the pair is
    dropped and counted). GRPO/PPO prompts longer than max_length: keep_end cuts their beginning, keep_start
    refuses them. SFT prompt/completion samples: keep_end cuts the prompt's beginning first, then
    `data.truncation` applies to what is still too long."""
    packing: bool = True
    """SFT: concatenate whole samples into rows of max_length (best-fit decreasing; position_ids restart
    at each sample, so attention and the loss stay within it). Rows, not samples, then fill batch_size.
    On by default: 96 HH-RLHF dialogues cut at 512 tokens fill 76 rows 98% full, and rows of one fixed
    width keep peak memory flat (bench/bench_sft.py). The other stages batch whole samples and ignore it."""
    padding_free: bool = False
    """Collate each micro-batch as one row of concatenated samples, no pad tokens (best with a
    varlen attention kernel such as flash-attention on GPU; on CPU sdpa pads are cheaper)."""
    shared_prompt: bool = True
    """Preference pairs (reward, DPO, SimPO, ORPO): one row [prompt, chosen, rejected] per pair with a 4D
    attention mask, the prompt computed once (prefix sharing; exact), instead of two rows each repeating
    the prompt. Models whose attention implementation cannot take a custom 4D mask (flash_attention_2,
    flex_attention) fall back to two rows automatically."""
    group_by_length: bool = False
    """Batch samples of similar length together (within windows of 64 batches) to cut padding. Off by
    default: it makes batches non-i.i.d. (on the built-in task it stalled learning: train loss 1.05 vs 0.13
    after 500 steps). Micro-batches are always cut from a length-sorted global batch, which cuts
    padding under gradient accumulation without changing what a step trains on."""
    eval_limit: int | None = None
    """Evaluate on at most this many held-out rows (None: all)."""
    from_policy: PolicyPairsConfig | None = None
    """Preference pairs sampled from a policy and labelled by a reward function, written to the files that
    data.train / data.eval name when missing (`align.policy_pairs`)."""


@dataclass
class TrainConfig:
    max_steps: int = field(default=100, metadata=cfg.positive("train.max_steps"))
    """Optimizer steps (or give train.epochs). Each step consumes batch_size x grad_accum x processes
    samples (packed rows when SFT packs, the default)."""
    batch_size: int = field(default=8, metadata=cfg.positive("train.batch_size"))
    """Samples (SFT with data.packing: rows of data.max_length) per micro-batch per process."""
    epochs: float | None = field(default=None, metadata=cfg.positive("train.epochs"))
    """Offline stages (sft, reward, dpo, simpo, orpo): the budget in passes over the training set instead
    of max_steps (give one of the two); max_steps = ceil(epochs x examples / global batch), resolved and
    printed once the data is tokenized (SFT with packing counts packed rows). TRL's num_train_epochs."""
    grad_accum: int = field(default=1, metadata=cfg.positive("train.grad_accum"))
    """Micro-batches accumulated per optimizer step."""
    micro_batch_tokens: int | Literal["auto"] | None = field(default="auto",
                                                            metadata=cfg.positive("train.micro_batch_tokens"))
    """Offline stages: at most this many padded tokens per forward pass (rows x longest row; a
    preference pair is two rows). Each process's share of the step is sorted by length and cut
    greedily under it (a longer sample goes alone), instead of into grad_accum micro-batches of
    batch_size. The loss is normalised by the global batch, so the result does not change: only
    peak activation memory and padding do. null: grad_accum micro-batches of batch_size. auto:
    1,024 on a CPU without gradient checkpointing, else null (`align.device`)."""
    lr: float = field(default=1e-4, metadata=cfg.positive("train.lr"))
    """AdamW's peak learning rate."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    """Shape of the learning rate after warmup, down to min_lr_ratio x lr at max_steps."""
    warmup_steps: int = field(default=0, metadata=cfg.non_negative("train.warmup_steps"))
    """Steps of linear warmup from 0 to lr."""
    warmup_ratio: float | None = field(default=None, metadata=cfg.in_range(0.0, 1.0, "train.warmup_ratio"))
    """Warmup as a fraction of max_steps (rounded up, as TRL does), instead of warmup_steps."""
    min_lr_ratio: float = field(default=0.0, metadata=cfg.in_range(0.0, 1.0, "train.min_lr_ratio"))
    """Final learning rate of the linear/cosine schedule, as a fraction of lr."""
    weight_decay: float = field(default=0.0, metadata=cfg.non_negative("train.weight_decay"))
    """AdamW's decoupled weight decay (not applied to biases and norms)."""
    adam_beta1: float = field(default=0.9, metadata=cfg.in_range(0.0, 0.999999, "train.adam_beta1"))
    """AdamW's decay rate of the gradient's running mean."""
    adam_beta2: float = field(default=0.999, metadata=cfg.in_range(0.0, 0.999999, "train.adam_beta2"))
    """AdamW's decay rate of the squared gradient's running mean."""
    max_grad_norm: float | None = field(default=1.0, metadata=cfg.positive("train.max_grad_norm"))
    """Clip the global gradient norm to this (null: no clipping)."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """auto: the launcher's --mixed_precision under `accelerate launch`; else bf16 autocast where the
    machine computes bf16 natively (a CUDA GPU with bf16, a CPU with AVX512-BF16/AMX), as TRL's
    default bf16=True; else no (fp32)."""
    save_steps: int = field(default=500, metadata=cfg.positive("train.save_steps"))
    """Write an atomic checkpoint every this many steps (a rerun resumes from the newest)."""
    save_total_limit: int = field(default=2, metadata=cfg.positive("train.save_total_limit"))
    """Checkpoints kept (the oldest are deleted)."""
    log_steps: int = field(default=10, metadata=cfg.positive("train.log_steps"))
    """Write a line of log.jsonl (and the trackers) every this many steps."""
    report_to: list[Literal["none", "tensorboard", "wandb", "trackio"]] = field(default_factory=lambda: ["none"])
    """Trackers to log to besides log.jsonl."""
    progress_bar: bool = True
    """A tqdm bar with loss and tokens/s on the main process."""

    def validate(self) -> None:
        if self.warmup_ratio is not None and self.warmup_steps:
            raise AlignError("train.warmup_ratio and train.warmup_steps are both set; give one")

    def warmup(self) -> int:
        """Warmup steps: warmup_steps, or ceil(warmup_ratio x max_steps)."""
        if self.warmup_ratio is None:
            return self.warmup_steps
        return math.ceil(self.warmup_ratio * self.max_steps)


@dataclass
class EvalConfig:
    steps: int | None = field(default=None, metadata=cfg.positive("eval.steps"))
    """Evaluate every this many steps (None: only before the first and after the last step)."""
    batch_size: int = field(default=256, metadata=cfg.positive("eval.batch_size"))
    """Rows per forward (or generate call) while evaluating."""
    generate: bool = True
    """Compute eval/task_accuracy: exact match of greedy generations against the reference completions."""
    max_new_tokens: int = field(default=8, metadata=cfg.positive("eval.max_new_tokens"))
    """Greedy generation length for eval/task_accuracy."""
    stop_metric: str | None = None
    """Stop training at the first periodic evaluation (every eval.steps) where this metric (e.g.
    eval/task_accuracy) reaches eval.stop_value; train.max_steps caps the run. For a start model of a
    chosen accuracy whatever the seed's pace (the tiny SFT starts learn to add at a seed-dependent step)."""
    stop_value: float | None = None
    """The value of eval.stop_metric (at least) that stops training."""

    def validate(self) -> None:
        if (self.stop_metric is None) != (self.stop_value is None):
            raise AlignError("eval.stop_metric and eval.stop_value go together; give both or neither")
        if self.stop_metric is not None and not self.steps:
            raise AlignError("eval.stop_metric needs eval.steps (the evaluations that can stop the run)")


@dataclass
class Recipe:
    stage: str = ""
    """The stage to run: sft, reward, dpo, simpo, orpo, kto, online_dpo, gkd, grpo or ppo (`align train --help`)."""
    output_dir: str = ""
    """Folder of the run: the model, metrics.json, log.jsonl, config.yaml, checkpoints/ (required)."""
    seed: int = 0
    """Seeds model initialisation (built-in models), data order and sampling."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """How the online stages (grpo, ppo) sample: align's own decode loop or vLLM."""
    stage_args: Any = None
    """The stage's own section (`sft:`, `dpo:` …), validated against the stage's schema."""


def load_recipe(path: str | Path | None, overrides: list[str] | None = None, data: dict | None = None) -> Recipe:
    """Read, override and validate a recipe; nothing is loaded or written yet."""
    from align.stages import STAGES

    raw = cfg.read_yaml(path) if path is not None else dict(data or {})
    stage = cfg.apply_overrides(raw, overrides or []).get("stage")
    if not isinstance(stage, str) or stage not in STAGES:
        close = cfg.difflib.get_close_matches(str(stage), list(STAGES), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise AlignError(f"stage: got {stage!r}, expected one of {', '.join(STAGES)}{hint}")
    args_cls = STAGES[stage].args_cls
    section_name = STAGES[stage].section
    if "stage_args" in raw:
        raise AlignError(f"unknown key stage_args; the stage's own settings go under {section_name}:")
    # TRL's names (learning_rate, per_device_train_batch_size, beta ...) become align's keys, then the overrides
    raw = trl_names.apply_names(raw, overrides or [], stage, field_names(args_cls, section_name))
    common = {k: v for k, v in raw.items() if k != section_name}
    recipe = cfg.build(Recipe, common)
    recipe.stage_args = cfg.build(args_cls, raw.get(section_name) or {}, section_name)
    if not recipe.output_dir:
        raise AlignError("output_dir: required (the folder the run writes its model, logs and checkpoints to)")
    if recipe.data.train is None:
        raise AlignError("data.train: required (a data file or a datasets name)")
    if recipe.train.epochs is not None and STAGES[stage].online:
        raise AlignError(f"train.epochs: {stage} is an online stage (it samples new completions every step, so "
                         f"there is no training set to pass over); set its budget with train.max_steps")
    if recipe.rollout.backend != "own" and stage not in ("grpo", "ppo"):
        what = "samples with align's own decode loop only" if STAGES[stage].online else "samples none"
        raise AlignError(f"rollout.backend: {recipe.rollout.backend} samples the rollouts of grpo and ppo; "
                         f"{stage} {what} (remove the rollout section)")
    return recipe


def field_names(args_cls, section_name: str) -> dict[str, set[str]]:
    """align's own key names per section ("" the top level) of a recipe whose stage section is `section_name`."""
    hints = typing.get_type_hints(Recipe)
    sections = {"": {name for name in hints if name != "stage_args"} | {section_name}}
    for name, tp in hints.items():
        if dataclasses.is_dataclass(tp):
            sections[name] = {f.name for f in dataclasses.fields(tp)}
    sections[section_name] = {f.name for f in dataclasses.fields(args_cls)}
    return sections


def recipe_keys(stage: str | None = None) -> list[tuple[str, object, str]]:
    """[(key, default, docstring)] of every recipe key: the common sections, then the stage sections
    (every stage's, or `stage`'s only), read from the schema (`align keys`)."""
    from align.stages import STAGES

    rows = [row for row in cfg.schema_keys(Recipe) if row[0] != "stage_args"]
    seen = set()
    for name, spec in STAGES.items():
        if (stage is not None and name != stage) or spec.section in seen:
            continue
        seen.add(spec.section)
        rows += cfg.schema_keys(spec.args_cls, spec.section + ".")
    return rows


def recipe_to_dict(recipe: Recipe) -> dict:
    from align.stages import STAGES

    out = dataclasses.asdict(recipe)
    out.pop("stage_args")
    out[STAGES[recipe.stage].section] = dataclasses.asdict(recipe.stage_args)
    return out
