"""`align check RECIPE.yaml [--launch launch/X.yaml]`: a pre-flight audit, in seconds, without a GPU.

1. **Recipe**: loaded and validated exactly as `align train` loads it (same overrides, same
   errors, exit 2).
2. **Data**: a sample of the training rows (`--sample`, default 1000) is tokenized by the
   stage's own functions (`align.data` / `align.preference_data`), and `--rows` of them are
   printed with the trained tokens highlighted: the loss mask made visible (`⟦…⟧` around
   trained tokens, or a green background on a terminal).
3. **Known silent failures**, each a warning with a code (`CheckReport.warnings`):

   | code | what |
   |---|---|
   | `no_trainable_tokens` | samples left with no trained token (after truncation) |
   | `duplicated_bos` | a sample starts with BOS twice (text that already holds the template's BOS, tokenized with special tokens) |
   | `pad_equals_eos` | a reward model whose pad token is EOS: transformers' sequence classification (and TRL, serving stacks) then read the score before the final EOS |
   | `template_drift` | the chat template renders the prompt differently once the completion follows (the mask would be wrong; `align train` refuses such rows) |
   | `missing_eos` | a trained completion that does not end with EOS or another stop token of the model's generation config: the model never learns to stop |
   | `max_length` | data.max_length cuts most samples |
   | `memory` | the estimate exceeds (or nearly fills) the GPU given |

   Data that is not a local file (a hub dataset) is not downloaded: the data checks are
   skipped with a message. A tokenizer that cannot be loaded offline skips them too.
4. **Memory per GPU** of the run under the launch config (`--launch`, default one process),
   against `--gpu-memory` GiB (by default this machine's GPU, or without one an 80 GiB
   A100/H100, said on the report's memory line). The model's parameters are counted from its config on the
   `meta` device (nothing allocated, nothing downloaded): the config of `builtin:*`, of a
   local model folder (or the base of a PEFT adapter folder), of the model `model.from_recipe`
   would produce, or the file given with `--model-config config.json`. A hub id that is not
   in the local cache has no config offline: the estimate is skipped and says so (pass
   `--model-config`). The reward/value/reference models of PPO/GRPO are assumed to have the
   policy's architecture.

## The memory model (bytes per GPU; N = processes sharing the shards)

P parameters (P_t trainable: all, or the LoRA adapters r(d_in + d_out) per adapted linear,
kept in fp32 by PEFT), w bytes per stored weight (model.dtype: 4 fp32, 2 bf16/fp16; `auto`:
the config's dtype), a bytes per activation (2 under bf16/fp16 mixed precision or 16-bit
weights, else 4; recipe `train.mixed_precision: auto` counts as bf16, what the engine picks
on a GPU that has it).

    regime            weights   gradients   optimizer (AdamW m, v)   fp32 master
    plain / DDP / FSDP  P w       P_t w       2 P_t w                  -
    DeepSpeed 16-bit    P 2       P_t 2       8 P_t                    4 P_t
    DeepSpeed fp32      P 4       P_t 4       8 P_t                    -

Sharding divides: ZeRO-1 optimizer + master by N; ZeRO-2 also gradients; ZeRO-3 also
weights; FSDP FULL_SHARD (FSDP2 reshard_after_forward) weights, gradients, optimizer;
SHARD_GRAD_OP gradients and optimizer; HYBRID_* shards within a node. Offload moves
optimizer + master (DeepSpeed offload_optimizer), weights (offload_param) or all three
(FSDP offload_params) to CPU memory (reported, not counted). Sharded weights are gathered
one unit at a time: + 2 x the largest unit (a decoder layer or the embedding) x a. DDP
keeps its gradient buckets, a second copy of the gradients (+ P_t w; accelerate's default
`gradient_as_bucket_view=False`).

Activations of the largest micro-batch: R rows x T tokens (R = train.batch_size; x2 for
pair stages, chosen and rejected in one forward; T = the longest sample of the data sample
capped at data.max_length, data.max_length when SFT packs or when the data is not local;
PPO/GRPO: longest prompt + max_new_tokens). Saved per token per decoder layer, Llama-style
block with a flash/sdpa attention kernel (no T x T scores):

    9h + 2 kv + 4I      (h hidden, kv = kv_heads x head_dim, I intermediate)

(both RMSNorms: input, fp32 normalised copy, weighted output = 6h; q and sdpa's output and
o_proj's contiguous input = 3h; k, v = 2kv; MLP gate, SiLU(gate), up, product = 4I). Eager
attention adds 2 x heads x T per token (scores and probabilities). Gradient checkpointing
keeps h per layer plus one layer's full set (recomputed in backward). The LM head adds
3 x 4 V bytes per token on the plain path (logits, the fp32 log-softmax kept for backward and
its gradient); with `model.chunked_logprobs` (the default, `align.logprobs`) only one chunk's
logits and their gradient exist at a time: 2 x 4 V bytes per position of one chunk. A score
head (reward, value) adds nothing that counts. The report names the largest term.

Backward frees activations while it fills gradients, so a training step peaks at

    weights + optimizer + master + [DDP buckets] + max(activations + logits, gradients)

(DeepSpeed keeps its gradient partitions allocated: they are added instead). Stage extras:
DPO with `dpo.ref_model` scores the reference before training (a separate, smaller peak:
both models' weights, no gradients); DPO on LoRA with `precompute_ref_logps: false` adds a
no-grad reference forward's logits while the policy's activations are held; GRPO with
kl_coef > 0 (full model) and PPO keep a frozen reference copy; PPO also a frozen reward model
and a trainable value model (weights, gradients and optimizer states like the policy, and
its own activations without the LM head). Generation (PPO/GRPO) holds the KV cache
2 x L x kv x (prompt + max_new_tokens) x a per row of a generation batch, plus the sampled
step's logits; its peak (weights + optimizer + KV cache) is compared with the training one.

Not modelled: the CUDA context and NCCL buffers (~1-3 GiB: hence the 90% headroom warning),
allocator fragmentation, DeepSpeed's communication buckets. Measured on CPU (fp32, one
process, tests/test_check.py, docs/check.md) the estimate lands within 10% of the peak
resident memory a real run adds (the test allows 20%): the tiny model (SFT, reward, DPO,
GRPO with a reference) and a 50M-parameter Llama with a 32k vocabulary (SFT, reward, DPO).
Nothing here has been measured on a GPU yet (bf16 sizes, sharding, offload).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from align import builtin
from align.data import (
    IGNORE,
    SFT_FORMATS,
    Rows,
    detect_format,
    encode_prompt,
    is_local,
    load_rows,
)
from align.device import gradient_checkpointing
from align.errors import AlignError
from align.logprobs import chunk_positions
from align.recipe import ModelConfig, Recipe, load_recipe
from align.stage_settings import vllm_missing

GiB = 2**30
PAIR_STAGES = ("dpo", "simpo", "orpo", "kto", "reward")
ONLINE_STAGES = ("ppo", "grpo", "online_dpo", "gkd")
HIGHLIGHT = ("⟦", "⟧")
ANSI = ("\x1b[42;30m", "\x1b[0m")
DRIFT_WORDS = "boundary drift"


@dataclass
class Finding:
    code: str
    message: str


@dataclass
class CheckReport:
    recipe: Recipe
    warnings: list[Finding] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    """Tokenized samples: where, ids, trained (list of bool), length (untruncated)."""
    estimate: "MemoryEstimate | None" = None
    lines: list[str] = field(default_factory=list)

    def warn(self, code: str, message: str) -> None:
        self.warnings.append(Finding(code, message))

    def codes(self) -> set[str]:
        return {w.code for w in self.warnings}


# ---------------------------------------------------------------------------
# 1. the launch config
# ---------------------------------------------------------------------------
@dataclass
class Parallelism:
    """How the run is spread: what `accelerate launch --config_file X` sets up."""

    processes: int = 1
    per_node: int = 1
    kind: str = "single"
    """single | ddp | deepspeed | fsdp"""
    zero_stage: int = 0
    shard_weights: bool = False
    shard_grads: bool = False
    shard_optimizer: bool = False
    offload_optimizer: bool = False
    offload_weights: bool = False
    activation_checkpointing: bool = False
    mixed_precision: str | None = None
    """The config's mixed_precision (align passes the recipe's train.mixed_precision to Accelerator, which wins)."""
    description: str = "one process (no --launch)"


FSDP_STRATEGIES = {  # name -> (weights, gradients, optimizer) sharded; hybrid shards within a node
    "FULL_SHARD": (True, True, True), "SHARD_GRAD_OP": (False, True, True), "NO_SHARD": (False, False, False),
    "HYBRID_SHARD": (True, True, True), "HYBRID_SHARD_ZERO2": (False, True, True),
    "1": (True, True, True), "2": (False, True, True), "3": (False, False, False), "4": (True, True, True),
    "5": (False, True, True),
}


def read_launch(path: str | Path | None, nodes: int = 1) -> Parallelism:
    """The parallel layout of an accelerate config file (num_processes is per node, as launch/slurm.sh reads it)."""
    if path is None:
        return Parallelism()
    path = Path(path)
    if not path.is_file():
        raise AlignError(f"--launch: file {path} not found")
    import yaml

    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise AlignError(f"--launch {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    per_node = int(raw.get("num_processes", 1) or 1)
    n = per_node * nodes
    kind_name = str(raw.get("distributed_type", "NO")).upper()
    par = Parallelism(processes=n, per_node=per_node, description=f"{path.name}: {kind_name}, {n} process(es)",
                      mixed_precision=raw.get("mixed_precision"))
    if kind_name == "DEEPSPEED":
        ds = raw.get("deepspeed_config") or {}
        stage = int(ds.get("zero_stage", 0))
        par.kind, par.zero_stage = "deepspeed", stage
        par.shard_optimizer, par.shard_grads, par.shard_weights = stage >= 1, stage >= 2, stage >= 3
        par.offload_optimizer = str(ds.get("offload_optimizer_device", "none")).lower() in ("cpu", "nvme")
        par.offload_weights = stage >= 3 and str(ds.get("offload_param_device", "none")).lower() in ("cpu", "nvme")
        par.description += f", ZeRO-{stage}" + (", optimizer offloaded" if par.offload_optimizer else "") + (
            ", parameters offloaded" if par.offload_weights else "")
    elif kind_name == "FSDP":
        fs = raw.get("fsdp_config") or {}
        if int(fs.get("fsdp_version", 1)) == 2:
            strategy = "FULL_SHARD" if fs.get("fsdp_reshard_after_forward", True) else "SHARD_GRAD_OP"
        else:
            strategy = str(fs.get("fsdp_sharding_strategy", "FULL_SHARD")).upper()
        if strategy not in FSDP_STRATEGIES:
            raise AlignError(f"--launch {path}: fsdp sharding strategy {strategy!r}; expected one of "
                             + ", ".join(k for k in FSDP_STRATEGIES if not k.isdigit()))
        par.kind = "fsdp"
        par.shard_weights, par.shard_grads, par.shard_optimizer = FSDP_STRATEGIES[strategy]
        if strategy.startswith("HYBRID") or strategy in ("4", "5"):
            par.processes = per_node  # sharded within a node, replicated across nodes
        offload = bool(fs.get("fsdp_offload_params", False))
        par.offload_weights = par.offload_optimizer = offload
        par.activation_checkpointing = bool(fs.get("fsdp_activation_checkpointing", False))
        par.description += f", FSDP {strategy}" + (", offloaded to CPU" if offload else "")
    elif n > 1:
        par.kind = "ddp"
    return par


# ---------------------------------------------------------------------------
# 2. the model: config -> shape, counted on the meta device
# ---------------------------------------------------------------------------
@dataclass
class ModelShape:
    params: int
    trainable: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_dim: int
    vocab: int
    largest_unit: int
    """Parameters of the largest module gathered at once under ZeRO-3/FSDP (a layer or the embedding)."""
    weight_bytes: int
    lora: bool
    arch: str
    tied: bool = False
    """The LM head shares the input embedding's weight."""


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def resolve_model_cfg(cfg: ModelConfig) -> ModelConfig:
    """The model config the run will start from: `from_recipe`'s model when the folder has no model yet."""
    seen = set()
    while (cfg.from_recipe and not (Path(cfg.name_or_path) / "config.json").is_file()
           and not (Path(cfg.name_or_path) / "adapter_config.json").is_file() and cfg.from_recipe not in seen):
        seen.add(cfg.from_recipe)
        inner = load_recipe(cfg.from_recipe).model
        cfg = replace(inner, dtype=cfg.dtype, lora=cfg.lora, gradient_checkpointing=cfg.gradient_checkpointing)
    return cfg


def load_model_config(cfg: ModelConfig, tokenizer=None, model_config: str | None = None):
    """A transformers config without downloading; None when none is available offline."""
    from transformers import AutoConfig

    if model_config is not None:
        path = Path(model_config)
        if not path.exists():
            raise AlignError(f"--model-config: {path} not found")
        if path.is_dir():
            return AutoConfig.from_pretrained(str(path), trust_remote_code=cfg.trust_remote_code)
        return _config_from_json(path)
    name = cfg.name_or_path
    if builtin.is_builtin(name):
        return builtin.model_config(name, tokenizer or builtin.load_tokenizer())
    adapter = Path(name) / "adapter_config.json"
    if adapter.is_file():
        name = json.loads(adapter.read_text()).get("base_model_name_or_path") or name
    try:
        return AutoConfig.from_pretrained(name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                                          local_files_only=True)
    except (OSError, ValueError):
        return None


def _config_from_json(path: Path):
    from transformers import AutoConfig

    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AlignError(f"--model-config {path}: cannot read it as JSON ({err}); expected a transformers "
                         "config.json") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise AlignError(f"--model-config {path}: no model_type key; expected a transformers config.json")
    return AutoConfig.for_model(**data)


def model_shape(config, cfg: ModelConfig, *, head: str = "causal_lm") -> ModelShape:
    """Count parameters by building the model on the meta device (no memory, no download)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = copy.deepcopy(config)
    auto = AutoModelForCausalLM
    if head != "causal_lm":
        config.num_labels = 1
        auto = AutoModelForSequenceClassification
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=cfg.trust_remote_code)
    params = sum(p.numel() for p in model.parameters())
    text = getattr(config, "text_config", None) or config
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv_dim = (getattr(text, "num_key_value_heads", None) or heads) * head_dim
    units = [sum(p.numel() for p in m.parameters()) for m in _decoder_layers(model)]
    units.append(model.get_input_embeddings().weight.numel())
    trainable, lora = params, cfg.lora.enabled
    if lora:
        trainable = _lora_params(model, cfg.lora.target_modules, cfg.lora.r)
    if cfg.dtype == "auto":
        stored = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
        weight_bytes = DTYPE_BYTES.get(stored.replace("torch.", ""), 4)
    else:
        weight_bytes = DTYPE_BYTES[cfg.dtype]
    return ModelShape(params=params, trainable=trainable, hidden=hidden, layers=text.num_hidden_layers,
                      intermediate=getattr(text, "intermediate_size", 4 * hidden), heads=heads, kv_dim=kv_dim,
                      vocab=text.vocab_size if head == "causal_lm" else 1, largest_unit=max(units),
                      weight_bytes=weight_bytes, lora=lora, arch=type(model).__name__,
                      tied=bool(getattr(text, "tie_word_embeddings", False)) and head == "causal_lm")


def _decoder_layers(model):
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1:
            return list(module)
    return []


OUTPUT_HEADS = ("lm_head", "score", "classifier")


def _lora_params(model, targets, r: int) -> int:
    """r (d_in + d_out) per adapted linear layer (PEFT's "all-linear": every linear but the output head)."""
    import torch

    wanted = None if targets == "all-linear" else ([targets] if isinstance(targets, str) else list(targets))
    total = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if wanted is None and leaf in OUTPUT_HEADS:
            continue
        if wanted is not None and leaf not in wanted:
            continue
        total += r * (module.in_features + module.out_features)
    return total


# ---------------------------------------------------------------------------
# 3. the memory estimate
# ---------------------------------------------------------------------------
@dataclass
class MemoryEstimate:
    parts: dict[str, float]
    """GPU bytes by component (the peak phase's view)."""
    offloaded: dict[str, float]
    peak: float
    phase: str
    rows: int
    tokens: int
    notes: list[str] = field(default_factory=list)


def activation_bytes(shape: ModelShape, tokens: int, seq_len: int, act: int, *, checkpointing: bool,
                     eager: bool = False) -> float:
    """Saved activations of one training forward of `tokens` tokens (rows x seq_len), LM head excluded."""
    per_layer = 9 * shape.hidden + 2 * shape.kv_dim + 4 * shape.intermediate
    if eager:
        per_layer += 2 * shape.heads * seq_len
    kept = shape.layers * shape.hidden + per_layer if checkpointing else shape.layers * per_layer
    return float(tokens * kept * act)


def logits_bytes(shape: ModelShape, tokens: int, chunk_tokens: int | None = None) -> float:
    """The LM head's logits at the step's peak.

    Plain path (`chunk_tokens` None): logits, the fp32 log-softmax kept for backward and its
    gradient, 3 x 4 V bytes per token. Chunked (`align.logprobs`): one chunk's fp32 logits
    (probabilities in place) and their gradient, 2 x 4 V bytes per position of
    min(tokens, chunk_tokens), and the head's fp32 weight gradient (V x h), formed in the
    forward (SFT) or accumulated chunk by chunk in the backward.
    """
    if shape.vocab <= 1:
        return 0.0
    if chunk_tokens is None:
        return 12.0 * tokens * shape.vocab
    return 8.0 * min(tokens, chunk_tokens) * shape.vocab + 4.0 * shape.vocab * shape.hidden


def logprob_chunk_tokens(recipe: Recipe, shape: ModelShape, par: Parallelism, tokens: int) -> int | None:
    """Positions per chunk of the log-prob head, or None where the plain path runs (`align.logprobs`)."""
    if par.kind == "deepspeed" and par.zero_stage == 3:
        return None
    return chunk_positions(recipe.model.chunked_logprobs, tokens, shape.vocab, recipe.model.logprob_chunk_tokens)


def _resident_memory(recipe: Recipe, shape: ModelShape, par: Parallelism, mixed: str, act: int):
    """What stays in memory through a step: weights, optimizer states (and DeepSpeed's fp32 master
    weights), DDP buckets, gathered layers, frozen models -> (parts, offloaded parts, gradient bytes)."""
    stage, args = recipe.stage, recipe.stage_args
    P, Pt = shape.params, shape.trainable
    deepspeed16 = par.kind == "deepspeed" and mixed in ("bf16", "fp16")
    w = 2 if deepspeed16 else shape.weight_bytes
    wt = 4 if shape.lora and not deepspeed16 else w  # PEFT keeps adapters in fp32; DeepSpeed casts all to 16-bit
    n = max(par.processes, 1)

    def shard(x: float, on: bool) -> float:
        return x / n if on else x

    # (parameters, bytes each) of what trains: the policy, and PPO's value model (a full backbone + head)
    trained = [(Pt, wt)] + ([(P, w)] if stage == "ppo" else [])
    weights = shard(P * w * (2 if stage == "ppo" else 1), par.shard_weights)
    grads = shard(sum(k * b for k, b in trained), par.shard_grads)
    optim = shard(sum(2 * k * (4 if deepspeed16 else b) for k, b in trained), par.shard_optimizer)
    master = shard(4 * sum(k for k, _ in trained), par.shard_optimizer) if deepspeed16 else 0.0
    parts: dict[str, float] = {}
    offloaded: dict[str, float] = {}
    (offloaded if par.offload_weights else parts)["weights"] = weights
    (offloaded if par.offload_optimizer else parts)["optimizer states (AdamW m, v)"] = optim
    if master:
        (offloaded if par.offload_optimizer else parts)["fp32 master weights"] = master
    if par.kind == "fsdp" and par.offload_weights:
        offloaded["gradients"] = grads
        grads = 0.0
    if par.kind == "ddp":
        parts["DDP gradient buckets"] = sum(k * b for k, b in trained)
    if par.shard_weights or par.offload_weights:
        parts["gathered layers (2 units)"] = 2 * shape.largest_unit * act

    # frozen models resident during training
    frozen = 0.0
    if stage == "ppo":
        frozen = 2 * P * w  # reference copy + reward model
    elif stage == "grpo" and getattr(args, "kl_coef", 0) > 0 and not shape.lora:
        frozen = P * w
    elif stage == "gkd":  # the teacher, counted at the student's size (a larger teacher needs more)
        frozen = P * w
    elif stage == "online_dpo":  # the reference (none for a new LoRA adapter), and a reward model if it has one
        frozen = P * w * ((0 if shape.lora else 1) + (args.reward_model is not None))
    if frozen:
        parts["frozen models (reference / reward)"] = shard(frozen, par.kind == "deepspeed" and par.zero_stage == 3)

    return parts, offloaded, grads


def estimate_memory(recipe: Recipe, shape: ModelShape, par: Parallelism, *, seq_len: int) -> MemoryEstimate:
    """Bytes per GPU at the peak of the run (see the module docstring for the formula)."""
    t, stage, args = recipe.train, recipe.stage, recipe.stage_args
    mixed = t.mixed_precision if t.mixed_precision != "auto" else "bf16"
    act = 2 if (mixed in ("bf16", "fp16") or shape.weight_bytes == 2) else 4
    parts, offloaded, grads = _resident_memory(recipe, shape, par, mixed, act)

    # activations of the largest micro-batch
    rows = t.batch_size * (2 if stage in PAIR_STAGES + ("online_dpo",) else 1)
    tokens = rows * seq_len
    # the estimate is per GPU
    ckpt = gradient_checkpointing(recipe.model.gradient_checkpointing, on_accelerator=True) \
        or par.activation_checkpointing
    eager = (recipe.model.attn_implementation or "sdpa") == "eager"
    acts = activation_bytes(shape, tokens, seq_len, act, checkpointing=ckpt, eager=eager)
    chunk = logprob_chunk_tokens(recipe, shape, par, tokens)
    logits = logits_bytes(shape, tokens, chunk) if stage != "reward" else 0.0
    if stage == "ppo":
        acts *= 2  # the value model's forward
    if stage == "dpo" and not getattr(args, "precompute_ref_logps", True):  # a no-grad reference forward's logits
        logits += 8.0 * shape.vocab * (tokens if chunk is None else min(tokens, chunk))
    static = sum(parts.values())
    deepspeed_grads = par.kind == "deepspeed"
    # tied embeddings: the embedding's own (V x h) gradient exists next to the head's before autograd sums them
    tied_grad = 4.0 * shape.vocab * shape.hidden if shape.tied and logits and not shape.lora else 0.0
    train_peak = static + (grads + acts + logits if deepspeed_grads else max(acts + logits, grads + tied_grad))
    notes = []
    phase = "training step"
    peak = train_peak
    if stage in ONLINE_STAGES:
        # rows sampled per prompt of a step: PPO's rollout spans its minibatches; online DPO samples 2 a prompt
        per_prompt = args.num_minibatches if stage == "ppo" else 2 if stage == "online_dpo" else 1
        gen_rows = min(args.generation_batch_size, t.batch_size * t.grad_accum * per_prompt)
        kv = 2.0 * shape.layers * shape.kv_dim * seq_len * gen_rows * act
        gen_peak = static + kv + 8.0 * gen_rows * shape.vocab
        notes.append(f"generation: KV cache {kv / GiB:.2f} GiB for {gen_rows} rows x {seq_len} tokens "
                     f"(peak {gen_peak / GiB:.2f} GiB)")
        if gen_peak > train_peak:
            phase, peak = "generation", gen_peak
            parts["KV cache (generation)"] = kv
    if phase == "training step":
        parts["gradients"] = grads
        parts["activations" + (" (checkpointed)" if ckpt else "")] = acts
        if logits:
            parts["logits (fp32 log-softmax + gradient)" if chunk is None
                  else f"logits (chunked, {min(chunk, tokens)} positions at a time)"] = logits
        if not deepspeed_grads and grads > acts + logits:
            notes.append("gradients outgrow the activations: backward frees activations as it fills gradients, "
                         "so the peak counts the larger of the two")
        elif not deepspeed_grads:
            notes.append("backward frees activations as it fills gradients: the peak counts the larger "
                         "(activations + logits), not both")
    if stage == "dpo" and getattr(args, "ref_model", None):
        notes.append("dpo.ref_model is scored once before training: that phase holds both models' weights "
                     "and no gradients (smaller than the training peak)")
    largest = max(parts, key=parts.get)
    notes.append(f"largest term: {largest} ({parts[largest] / GiB:.2f} GiB, {parts[largest] / peak:.0%} of the peak)")
    return MemoryEstimate(parts=parts, offloaded=offloaded, peak=peak, phase=phase, rows=rows, tokens=tokens,
                          notes=notes)


# ---------------------------------------------------------------------------
# 4. data: tokenize a sample as the stage does, with the trained tokens
# ---------------------------------------------------------------------------
@dataclass
class Sample:
    where: str
    ids: list[int]
    trained: list[bool]
    length: int
    """Tokens before truncation."""
    spans_end: list[int] = field(default_factory=list)
    """Last token id of every trained span (untruncated): each should be EOS."""
    rejected: "Sample | None" = None
    """Pair stages: the rejected side (this sample is the chosen one)."""


def _trained_spans_end(ids: list[int], labels: list[int]) -> list[int]:
    ends = []
    for i, label in enumerate(labels):
        if label != IGNORE and (i + 1 == len(labels) or labels[i + 1] == IGNORE):
            ends.append(ids[i])
    return ends


def _sft_samples(recipe: Recipe, tokenizer, rows: Rows, report: CheckReport, key: str) -> list[Sample]:
    from align.data import cut_sft_sample, tokenize_sft_row

    fmt = detect_format(rows, SFT_FORMATS, key)
    samples = []
    for i, row in enumerate(rows.rows):
        where = rows.where(i)
        try:
            ids, labels = tokenize_sft_row(tokenizer, row, fmt, where)
        except AlignError as err:
            if DRIFT_WORDS in str(err):
                report.warn("template_drift", f"{key}: {err}")
                continue
            raise
        labels[0] = IGNORE
        every_token = not recipe.stage_args.completion_only_loss
        length, ends = len(ids), _trained_spans_end(ids, [IGNORE] + ids[1:] if every_token else labels)
        ids, labels = cut_sft_sample(ids, labels, recipe.data.max_length,  # as the stage cuts, then relabels
                                     prompt_truncation=recipe.data.prompt_truncation, bos_id=tokenizer.bos_token_id)
        if every_token:
            labels = [IGNORE] + ids[1:]
        samples.append(Sample(where, ids, [label != IGNORE for label in labels], length, ends))
    return samples


def _pair_samples(recipe: Recipe, tokenizer, rows: Rows, report: CheckReport, key: str) -> list[Sample]:
    """The chosen side of each pair (prompt + chosen; its `rejected` beside it), truncated as the stage truncates."""
    from align.preference_data import pair_truncation, tokenize_preferences

    truncation = pair_truncation(recipe)
    scores_tokens = recipe.stage != "reward"
    samples = []
    for i, row in enumerate(rows.rows):
        one = Rows([row], [rows.origins[i]])
        try:
            full = tokenize_preferences(one, tokenizer, max_length=10**9, key=key,
                                        scores_tokens=scores_tokens).examples[0]
        except AlignError as err:
            if DRIFT_WORDS in str(err):
                report.warn("template_drift", str(err))
                continue
            if "no usable pair" in str(err):  # chosen == rejected: nothing to learn from
                continue
            raise
        try:
            cut = tokenize_preferences(one, tokenizer, max_length=recipe.data.max_length, key=key,
                                       prompt_truncation=truncation, scores_tokens=scores_tokens).examples[0]
        except AlignError:  # no completion token left within max_length
            cut = {"prompt_ids": full["prompt_ids"][: recipe.data.max_length], "chosen_ids": [], "rejected_ids": []}
        sides = []
        for side in ("chosen_ids", "rejected_ids"):
            ids = cut["prompt_ids"] + cut[side]
            untruncated = full["prompt_ids"] + full[side]
            sides.append(Sample(f"{rows.where(i)} ({side[:-4]})", ids,
                                [False] * len(cut["prompt_ids"]) + [True] * len(cut[side]), len(untruncated),
                                _trained_spans_end(untruncated, [IGNORE] * len(full["prompt_ids"]) + full[side])))
        sides[0].rejected = sides[1]
        samples.append(sides[0])
    return samples


def _prompt_samples(recipe: Recipe, tokenizer, rows: Rows, report: CheckReport, key: str) -> list[Sample]:
    """Prompts of the online stages (the trained tokens are the sampled completions)."""
    samples = []
    for i, row in enumerate(rows.rows):
        if "prompt" not in row:
            raise AlignError(f"{key}: {rows.where(i)} has no 'prompt' column; columns {sorted(row)}")
        ids = encode_prompt(tokenizer, row["prompt"], rows.where(i))
        samples.append(Sample(rows.where(i), ids[: recipe.data.max_length], [False] * min(len(ids), recipe.data.max_length),
                              len(ids)))
    return samples


def _kto_samples(recipe: Recipe, tokenizer, rows: Rows, report: CheckReport, key: str) -> list[Sample]:
    """KTO rows: preference rows as the pair stages see them, unpaired rows (prompt, completion) as SFT's."""
    if rows.rows and "chosen" in rows.rows[0]:
        return _pair_samples(recipe, tokenizer, rows, report, key)
    from align.preference_data import unpaired_rows

    for i, row in enumerate(rows.rows):
        unpaired_rows(row, f"{key}: {rows.where(i)}")  # a missing or non-boolean label fails here, by row
    plain = Rows([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows.rows], rows.origins)
    return _sft_samples(recipe, tokenizer, plain, report, key)


SAMPLERS: dict[str, Callable] = {
    "sft": _sft_samples, "dpo": _pair_samples, "simpo": _pair_samples, "orpo": _pair_samples, "kto": _kto_samples,
    "reward": _pair_samples, "grpo": _prompt_samples, "ppo": _prompt_samples, "online_dpo": _prompt_samples,
    "gkd": _prompt_samples,
}


def _all_exist(spec) -> bool:
    specs = spec if isinstance(spec, list) else [spec]
    return all(Path(str(one.get("path") if isinstance(one, dict) else one)).exists() for one in specs)


def sample_rows(spec, key: str, n: int) -> Rows:
    rows = load_rows(spec, key=key)
    return Rows(rows.rows[:n], rows.origins[:n]) if len(rows.rows) > n else rows


# ---------------------------------------------------------------------------
# 5. the silent failures
# ---------------------------------------------------------------------------
def audit(recipe: Recipe, tokenizer, samples: list[Sample], report: CheckReport, key: str) -> None:
    """Warnings for the known silent failures in a tokenized sample."""
    n = len(samples)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    online = recipe.stage in ONLINE_STAGES
    max_length = recipe.data.max_length
    if recipe.stage == "reward" and tokenizer.pad_token_id is not None and tokenizer.pad_token_id == eos:
        report.warn("pad_equals_eos",
                    f"the tokenizer's pad token is its EOS ({tokenizer.eos_token!r}, id {eos}): align reads rewards "
                    f"at the last real token (attention mask), but the saved model's config.pad_token_id = EOS makes "
                    f"transformers' sequence classification, TRL and serving stacks score the token BEFORE the final "
                    f"EOS; use a tokenizer with a distinct pad token")
    if not n:
        return
    doubled = [s.where for s in samples if bos is not None and s.ids[:2] == [bos, bos]]
    if doubled:
        report.warn("duplicated_bos", f"{key}: {len(doubled)} of {n} samples start with BOS twice (e.g. {doubled[0]}): "
                                      f"the text already holds {tokenizer.bos_token!r} (a chat template rendered to "
                                      f"text) and the tokenizer adds another")
    if not online:
        sides = samples + [s.rejected for s in samples if s.rejected is not None]
        empty = [s.where for s in sides if not any(s.trained)]
        if empty:
            what = "all" if len(empty) == len(sides) else f"{len(empty)} of {len(sides)}"
            report.warn("no_trainable_tokens",
                        f"{key}: {what} samples have no trained token within data.max_length={max_length} "
                        f"(e.g. {empty[0]}); they are dropped" + ("; the run would fail" if len(empty) == len(sides)
                                                                 else ""))
        if eos is not None:
            from align import models

            stops = set(models.saved_stop_token_ids(resolve_model_cfg(recipe.model), tokenizer))
            unended = [s for s in sides if s.spans_end and any(end not in stops and not _stop_then_space(s, stops,
                                                                                                       tokenizer)
                                                               for end in s.spans_end)]
            if unended:
                s = unended[0]
                last = tokenizer.convert_ids_to_tokens(s.spans_end[-1])
                report.warn("missing_eos",
                            f"{key}: {len(unended)} of {len(sides)} trained completions do not end with EOS "
                            f"({tokenizer.eos_token!r}) or another stop token of the model's generation config, e.g. {s.where} ends with {last!r}: the model never learns "
                            f"to stop, and generation (eval, PPO/GRPO rollouts) runs to max_new_tokens")
    lengths = [s.length for s in samples]
    cut = sum(1 for x in lengths if x > max_length)
    if cut * 2 > n:
        report.warn("max_length", f"{key}: data.max_length={max_length} cuts {cut} of {n} samples (median "
                                  f"{int(statistics.median(lengths))} tokens, max {max(lengths)})"
                    + ("; prompts longer than max_length are an error for this stage" if online else ""))


def _stop_then_space(sample: Sample, stops: set[int], tokenizer) -> bool:
    """A template that closes a turn with a stop token then a newline (`<|im_end|>\\n`, Gemma's
    `<end_of_turn>\\n`) still trains the stop."""
    return any(tok in stops and sample.trained[i + 1] and not tokenizer.decode([sample.ids[i + 1]]).strip()
               for i, tok in enumerate(sample.ids[:-1]))


# ---------------------------------------------------------------------------
# 6. showing the loss mask
# ---------------------------------------------------------------------------
def render_tokens(tokenizer, ids: list[int], trained: list[bool], *, color: bool = False,
                  limit: int = 400) -> str:
    """One row as text with the trained tokens highlighted: ⟦…⟧ around each trained run (or green).

    Each token is shown as it decodes on its own (newlines and tabs escaped); rows longer
    than `limit` tokens show their first quarter and last three quarters of the limit.
    """
    start, end = ANSI if color else HIGHLIGHT
    keep = list(range(len(ids)))
    if len(ids) > limit:
        head = limit // 4
        keep = list(range(head)) + [-1] + list(range(len(ids) - (limit - head), len(ids)))
    out, inside = [], False
    for i in keep:
        if i < 0:
            out.append(end if inside else "")
            out.append(f" …{len(ids) - limit} tokens… ")
            inside = False
            continue
        if trained[i] and not inside:
            out.append(start)
        elif not trained[i] and inside:
            out.append(end)
        inside = trained[i]
        piece = tokenizer.decode([ids[i]])
        out.append(piece.replace("\n", "\\n").replace("\t", "\\t"))
    if inside:
        out.append(end)
    return "".join(out)


@contextlib.contextmanager
def hub_offline():
    """No network for the Hugging Face hub inside: only local folders and the cache (seconds, not retries)."""
    import huggingface_hub.constants as hub

    before = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = before


# ---------------------------------------------------------------------------
# 7. the command
# ---------------------------------------------------------------------------
def check(recipe_path: str | None, overrides: list[str] | None = None, *, launch: str | None = None,
          gpu_memory: float | None = None, rows: int = 3, sample: int = 1000, model_config: str | None = None,
          nodes: int = 1, color: bool = False, data: dict | None = None,
          print_fn: Callable[[str], None] | None = print) -> CheckReport:
    """Run every check and print the report; returns it (warnings, samples, estimate)."""
    recipe = load_recipe(recipe_path, overrides, data=data)
    report = CheckReport(recipe)
    say = report.lines.append
    m = recipe.model
    say(f"recipe: ok (stage {recipe.stage}, model {m.name_or_path}, output_dir {recipe.output_dir})")
    par = read_launch(launch, nodes)
    say(f"launch: {par.description}")
    mp = recipe.train.mixed_precision
    if par.mixed_precision and mp != "auto" and par.mixed_precision != mp:
        say(f"  note: the launch config says mixed_precision {par.mixed_precision} but the recipe's "
            f"train.mixed_precision={mp} is what align passes to Accelerator, and it wins")
    missing = vllm_missing(recipe.rollout)
    if missing:
        report.warn("vllm_missing", f"{missing}: a run on this machine stops at once")
    model_cfg = resolve_model_cfg(m)
    if model_cfg is not m:
        say(f"model: {m.name_or_path} does not exist yet; {m.from_recipe} makes it from {model_cfg.name_or_path}")
    tokenizer, samples, seq_len = _data_checks(recipe, model_cfg, report, rows=rows, sample=sample, color=color)
    _memory_check(recipe, model_cfg, tokenizer, par, report, seq_len, gpu_memory=gpu_memory,
                  model_config=model_config)
    say("")
    if report.warnings:
        say(f"warnings ({len(report.warnings)}):")
        for w in report.warnings:
            say(f"  [{w.code}] {w.message}")
    else:
        say("no warnings")
    report.samples = [{"where": s.where, "ids": s.ids, "trained": s.trained, "length": s.length} for s in samples]
    if print_fn is not None:
        for line in report.lines:
            print_fn(line)
    return report


def _data_checks(recipe: Recipe, model_cfg: ModelConfig, report: CheckReport, *, rows: int, sample: int,
                 color: bool):
    """Tokenize a sample of the training data as the stage will, audit it and show its loss mask:
    -> (tokenizer or None, samples, longest sequence or None)."""
    from align import models

    say, key = report.lines.append, "data.train"
    try:
        with hub_offline():
            tokenizer = models.load_tokenizer(model_cfg,
                                              padding_side="left" if recipe.stage in ONLINE_STAGES else "right")
    except AlignError as err:
        say(f"tokenizer: not available offline ({err}); data checks skipped")
        return None, [], None
    if getattr(recipe.data, "from_policy", None) and not _all_exist(recipe.data.train):
        say(f"{key}: {recipe.data.train!r} is made at run time by data.from_policy (sampled from the policy): "
            "data checks skipped")
        return tokenizer, [], None
    if not is_local(recipe.data.train):
        say(f"{key}: {recipe.data.train!r} is not a local file; check does not download data: data checks skipped")
        return tokenizer, [], None
    samples = SAMPLERS[recipe.stage](recipe, tokenizer, sample_rows(recipe.data.train, key, sample), report, key)
    audit(recipe, tokenizer, samples, report, key)
    _describe_samples(recipe, tokenizer, samples, rows, color, say, key)
    if not samples:
        return tokenizer, samples, None
    seq_len = max(s.length for s in samples)
    if recipe.stage in PAIR_STAGES:
        seq_len = max(max(s.length, s.rejected.length) if s.rejected else s.length for s in samples)
    return tokenizer, samples, min(seq_len, recipe.data.max_length)


def _memory_check(recipe: Recipe, model_cfg: ModelConfig, tokenizer, par, report: CheckReport, seq_len,
                  *, gpu_memory, model_config) -> None:
    """The memory estimate per GPU under the launch config, and its warnings."""
    say = report.lines.append
    with hub_offline():
        config = load_model_config(model_cfg, tokenizer, model_config)
    if config is None:
        say(f"memory: model config not available offline ({model_cfg.name_or_path!r} is not a local folder nor "
            "in the Hugging Face cache): memory estimate skipped; pass --model-config path/to/config.json")
        return
    shape = model_shape(config, recipe.model, head="score" if recipe.stage == "reward" else "causal_lm")
    if seq_len is None or (recipe.data.packing and recipe.stage == "sft"):
        seq_len = recipe.data.max_length
    if recipe.stage in ONLINE_STAGES:
        seq_len += recipe.stage_args.max_new_tokens
    est = estimate_memory(recipe, shape, par, seq_len=seq_len)
    report.estimate = est
    gpu_memory, gpu_words = assumed_gpu(gpu_memory)
    say(f"memory: compared with {gpu_words}")
    _describe_memory(recipe, shape, par, est, gpu_memory, say)
    room, where = gpu_memory, f"the {gpu_memory:g} GiB GPU"
    rollout = recipe.rollout
    if recipe.stage in ONLINE_STAGES and rollout.backend == "vllm" and rollout.mode == "colocate" and not rollout.sleep:
        room = gpu_memory * (1 - rollout.gpu_memory_utilization)
        where = f"the {room:.1f} GiB a colocated vLLM engine leaves"
        say(f"  a colocated vLLM engine keeps rollout.gpu_memory_utilization={rollout.gpu_memory_utilization:g} of "
            f"the GPU ({gpu_memory - room:.1f} GiB: its weights and KV cache) while training runs: {room:.1f} GiB "
            "left to training (rollout.sleep frees it between generations)")
    if est.peak > room * GiB:
        report.warn("memory", f"estimated peak {est.peak / GiB:.1f} GiB per GPU exceeds {where}: shard further "
                              f"(launch/zero3.yaml, fsdp2.yaml), enable gradient checkpointing, lower "
                              f"train.batch_size (raise grad_accum) or use LoRA")
    elif est.peak > 0.9 * room * GiB:
        report.warn("memory", f"estimated peak {est.peak / GiB:.1f} GiB per GPU leaves under 10% of {where} for "
                              f"the CUDA context, NCCL buffers and fragmentation")


def _describe_samples(recipe, tokenizer, samples, rows, color, say, key):
    if not samples:
        return
    lengths = [s.length for s in samples]
    trained = [sum(s.trained) for s in samples]
    cut = sum(1 for x in lengths if x > recipe.data.max_length)
    say(f"{key}: {len(samples)} samples checked; tokens median {int(statistics.median(lengths))}, max {max(lengths)} "
        f"(data.max_length {recipe.data.max_length}, {cut} cut); trained tokens per sample median "
        f"{int(statistics.median(trained))}")
    note = " (prompts: the trained tokens are the sampled completions)" if recipe.stage in ONLINE_STAGES else ""
    say(f"first {min(rows, len(samples))} samples, trained tokens {'in green' if color else 'in ⟦ ⟧'}{note}:")
    for s in samples[:rows]:
        say(f"  {s.where}: {len(s.ids)} tokens, {sum(s.trained)} trained")
        say(f"    {render_tokens(tokenizer, s.ids, s.trained, color=color)}")


DEFAULT_GPU = (80.0, "an 80 GiB GPU (an A100 or H100 80GB)")


def assumed_gpu(gpu_memory: float | None) -> tuple[float, str]:
    """(GiB per GPU the estimate is compared with, words saying which GPU that is)."""
    if gpu_memory is not None:
        return gpu_memory, f"a {gpu_memory:g} GiB GPU (--gpu-memory)"
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory / GiB, f"this machine's {props.name} ({props.total_memory / GiB:.0f} GiB)"
    gib, words = DEFAULT_GPU
    return gib, f"{words}: no GPU here, so that is assumed; --gpu-memory N for another"


def _describe_memory(recipe, shape, par, est, gpu_memory, say):
    t = recipe.train
    say(f"memory per GPU (estimate): {shape.arch}, {shape.params / 1e6:,.1f}M parameters, "
        f"{shape.trainable / 1e6:,.2f}M trainable{' (LoRA)' if shape.lora else ''}; micro-batch {est.rows} rows x "
        f"{est.tokens // max(est.rows, 1)} tokens; peak phase: {est.phase}")
    for name, value in est.parts.items():
        if value:
            say(f"  {name:<40} {value / GiB:9.3f} GiB")
    say(f"  {'total (peak)':<40} {est.peak / GiB:9.3f} GiB of {gpu_memory:g} GiB "
        f"({100 * est.peak / (gpu_memory * GiB):.0f}%)")
    for name, value in est.offloaded.items():
        say(f"  offloaded to CPU: {name} {value / GiB:.3f} GiB per process")
    for note in est.notes:
        say(f"  note: {note}")
    if t.mixed_precision == "auto":
        say("  (train.mixed_precision: auto counted as bf16, what the engine picks on a GPU with bf16)")


def main_check(args) -> int:
    """CLI entry: `align check`; a pipeline recipe (`steps:`) checks each step's recipe as written."""
    from align import config as cfg

    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    raw = cfg.read_yaml(args.recipe)
    paths = [args.recipe]
    if "steps" in raw and "stage" not in raw:
        paths = [step["recipe"] for step in raw["steps"] if isinstance(step, dict) and step.get("recipe")]
        print(f"{args.recipe}: a pipeline; checking the recipe of each of its {len(paths)} training steps as "
              f"written (without the pipeline's `set:` substitutions)")
    warned = False
    for path in paths:
        if len(paths) > 1:
            print(f"\n=== {path}")
        report = check(path, args.overrides, launch=args.launch, gpu_memory=args.gpu_memory, rows=args.rows,
                       sample=args.sample, model_config=args.model_config, nodes=args.nodes, color=color)
        warned = warned or bool(report.warnings)
    return 1 if (args.strict and warned) else 0
