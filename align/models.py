"""The one loader: every stage gets its model and tokenizer here.

`model.name_or_path` may be
- `builtin:tiny` / `builtin:small`: a randomly initialised Llama from `align.builtin`
  with the shipped character-level tokenizer (nothing downloaded);
- a local folder with a full model (safetensors) or a PEFT adapter (`adapter_config.json`);
- a hub id (`Qwen/Qwen2.5-0.5B`), fetched by transformers on a machine that can reach the hub.

Safetensors only; `trust_remote_code` stays off unless the recipe turns it on.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from align import builtin, logprobs
from align.device import gradient_checkpointing
from align.errors import AlignError
from align.recipe import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def _adapter_base(path: str) -> str | None:
    """The base model named by a PEFT adapter folder, or None when `path` is not one."""
    config = Path(path) / "adapter_config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("base_model_name_or_path")


def load_tokenizer(cfg: ModelConfig, *, padding_side: str = "right"):
    """Tokenizer with a pad token guaranteed (clear error otherwise)."""
    name = cfg.name_or_path
    if builtin.is_builtin(name):
        tokenizer = builtin.load_tokenizer()
    else:
        from transformers import AutoTokenizer

        source = name
        if _adapter_base(name) and not (Path(name) / "tokenizer_config.json").is_file():
            source = _adapter_base(name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, revision=cfg.revision,
                                                      trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as err:
            raise AlignError(f"model.name_or_path: cannot load a tokenizer from {source!r} ({_first_line(err)})") from None
    tokenizer.padding_side = padding_side
    if cfg.chat_template is not None:
        tokenizer.chat_template = cfg.chat_template
    if tokenizer.pad_token is None:
        if cfg.pad_token is None:
            raise AlignError(
                f"model.name_or_path: the tokenizer of {name!r} has no pad token; set model.pad_token "
                f"(for example model.pad_token={tokenizer.eos_token!r} or another unused special token)")
        tokenizer.pad_token = cfg.pad_token
    return tokenizer


@contextmanager
def _held_load_report():
    """Hold back the weight-loading report transformers logs (a table of MISSING/UNEXPECTED keys); yields the
    held log records, for `_explain_loading` to replace by one line or to pass on."""
    import logging

    held = []

    def hold(record) -> bool:
        if "LOAD REPORT" in str(record.msg):
            held.append(record)
            return False
        return True

    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(hold)
    try:
        yield held
    finally:
        logger.removeFilter(hold)


SCORE_HEADS = ("score", "classifier")


def _explain_loading(loading: dict, held: list, head: str) -> None:
    """A causal LM loaded with a score head has no weights for that head and drops its LM head: expected, so
    one line says so. Any other missing, unexpected or mismatched weight gets transformers' own report."""
    import logging

    missing, unexpected = set(loading["missing_keys"]), set(loading["unexpected_keys"])
    fresh_head = (head != "causal_lm" and missing and not loading["mismatched_keys"]
                  and all(k.split(".")[0] in SCORE_HEADS for k in missing)
                  and all(k.split(".")[0] == "lm_head" for k in unexpected))
    if fresh_head:
        if int(os.environ.get("RANK", "0")) == 0:
            print("score head initialised fresh: expected for a reward/value model built from a causal LM", flush=True)
        return
    for record in held:
        logging.getLogger(record.name).handle(record)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_model(cfg: ModelConfig, tokenizer, *, head: str = "causal_lm", seed: int = 0,
               trainable: bool = True):
    """Load (or build) the model; `head` is "causal_lm" or "score" (one scalar: reward or value model).

    A LoRA config wraps the model in a PEFT adapter when `trainable`; a PEFT adapter folder
    is loaded on its base model (trainable when `trainable`).

    Under DeepSpeed ZeRO-3 a trainable model from a folder or the hub is built sharded
    (zero.Init; `prepare` takes it from there). A frozen model (`trainable=False`: the
    reference, the reward model) is built whole on every process instead, so its forwards
    need no collective and processes may run different numbers of them: it must fit on
    one device. The built-in models are always built whole (same seeded weights under
    every launch config).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if head == "causal_lm" else AutoModelForSequenceClassification
    dtype = DTYPES[cfg.dtype]
    name = cfg.name_or_path
    extra = {} if cfg.attn_implementation is None else {"attn_implementation": cfg.attn_implementation}
    adapter_of = _adapter_base(name) if not builtin.is_builtin(name) else None
    if builtin.is_builtin(name):
        config = builtin.model_config(name, tokenizer)
        if head != "causal_lm":
            config.num_labels = 1
        # built whole even under ZeRO-3 (prepare shards it): seeded weights identical under every launch config
        with torch.random.fork_rng(), _without_zero3_init():
            torch.manual_seed(seed)
            model = auto.from_config(config, dtype=torch.float32 if dtype == "auto" else dtype, **extra)
    else:
        source = adapter_of or name
        kwargs = dict(revision=cfg.revision if not adapter_of else None, dtype=dtype,
                      trust_remote_code=cfg.trust_remote_code, use_safetensors=True, **extra)
        if head != "causal_lm":
            kwargs["num_labels"] = 1
        if cfg.quantization.load_in_4bit:
            kwargs.update(quantization_kwargs(cfg, trainable=trainable, adapter=bool(adapter_of)))
        try:
            with _without_zero3_init() if not trainable else nullcontext(), _held_load_report() as held:
                model, loading = auto.from_pretrained(source, output_loading_info=True, **kwargs)
        except (OSError, ValueError) as err:
            raise AlignError(f"model.name_or_path: cannot load {source!r} ({_first_line(err)})") from None
        _explain_loading(loading, held, head)
        if adapter_of:
            from peft import PeftModel

            if cfg.disable_dropout:
                disable_dropout(model)
            if cfg.quantization.load_in_4bit and trainable:
                _prepare_kbit(model, cfg)
            model = PeftModel.from_pretrained(model, name, is_trainable=trainable)
    if cfg.disable_dropout and not adapter_of:  # (an adapter's base was done before wrapping, above)
        disable_dropout(model)  # before LoRA wraps it: the adapter's own lora.dropout is the recipe's choice
    if head != "causal_lm" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise AlignError(f"model.name_or_path: the tokenizer has {len(tokenizer)} tokens but the model's "
                         f"embedding has {model.get_input_embeddings().num_embeddings}")
    if cfg.quantization.load_in_4bit and trainable and not adapter_of:
        _prepare_kbit(model, cfg)
    elif gradient_checkpointing(cfg.gradient_checkpointing) and trainable:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora.enabled and trainable and not adapter_of:
        model = _wrap_lora(model, cfg, head)
    if not trainable:
        model.eval()
        model.requires_grad_(False)
    if head == "causal_lm":
        logprobs.configure(model, chunked=cfg.chunked_logprobs, chunk_tokens=cfg.logprob_chunk_tokens)
    return model


# float attributes that a module reads at forward time as a dropout probability or training-time noise:
# attention modules copy `config.attention_dropout` at construction (Llama, Qwen, Mistral, Gemma, Phi-3,
# MoE families), Mixtral's router adds `jitter_noise` in train mode
_TRAINING_NOISE = ("jitter_noise", "dropout_p")


def disable_dropout(model) -> None:
    """Make the model's train-mode forward deterministic: every `nn.Dropout` gets p = 0 and every float
    attribute a module reads as a dropout probability (`attention_dropout`, `*_dropout`) or as router
    noise is set to 0 (TRL's `disable_dropout` does the first only, and leaves attention dropout on).

    The config is left as it is, so a saved model keeps the dropout its author gave it.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if isinstance(value, float) and (name.endswith("dropout") or name in _TRAINING_NOISE):
                setattr(module, name, 0.0)


def quantization_kwargs(cfg: ModelConfig, *, trainable: bool = True, adapter: bool = False) -> dict:
    """`from_pretrained` arguments loading the base weights in 4 bits (QLoRA, Dettmers et al. 2023).

    transformers' `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_compute_dtype=bfloat16, bnb_4bit_use_double_quant=True)` by default (the QLoRA
    paper's settings; `model.quantization` changes them), with the whole model on this
    process's GPU (`device_map`), as bitsandbytes needs and as TRL does for QLoRA. Trainable
    only through a LoRA adapter (`model.lora.enabled`, or a PEFT adapter folder).

    NOT VERIFIED HERE: this machine has no GPU and no bitsandbytes; only the configuration and
    the error paths are tested (tests/test_real_recipes.py). Not supported with DeepSpeed ZeRO-3
    (whose sharding would need `bnb_4bit_quant_storage`): refused.
    """
    q = cfg.quantization
    if trainable and not cfg.lora.enabled and not adapter:
        raise AlignError("model.quantization.load_in_4bit: 4-bit weights cannot be trained; QLoRA trains a LoRA "
                         "adapter on top: set model.lora.enabled: true")
    if builtin.is_builtin(cfg.name_or_path):
        raise AlignError(f"model.quantization.load_in_4bit: needs a pretrained model, not {cfg.name_or_path}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise AlignError("model.quantization.load_in_4bit: needs bitsandbytes and a CUDA GPU "
                         "(pip install bitsandbytes)") from None
    if zero3_enabled():
        raise AlignError("model.quantization.load_in_4bit: not supported under DeepSpeed ZeRO-3 here; use "
                         "launch/single_gpu.yaml or launch/multi_gpu.yaml (each GPU holds the 4-bit model)")
    from accelerate import PartialState
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                                bnb_4bit_compute_dtype=DTYPES[q.compute_dtype],
                                bnb_4bit_use_double_quant=q.double_quant)
    return {"quantization_config": config, "device_map": {"": PartialState().local_process_index}}


def _prepare_kbit(model, cfg: ModelConfig) -> None:
    """PEFT's `prepare_model_for_kbit_training`: freezes the base, casts the non-quantised weights
    (norms, embeddings) to fp32, makes the inputs require grad for gradient checkpointing."""
    from peft import prepare_model_for_kbit_training

    checkpointing = gradient_checkpointing(cfg.gradient_checkpointing)
    prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                    gradient_checkpointing_kwargs={"use_reentrant": False})
    if checkpointing:
        model.config.use_cache = False


def _wrap_lora(model, cfg: ModelConfig, head: str):
    from peft import LoraConfig, TaskType, get_peft_model

    lora = cfg.lora
    task_type = TaskType.CAUSAL_LM if head == "causal_lm" else TaskType.SEQ_CLS
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=lora.target_modules, task_type=task_type)
    if gradient_checkpointing(cfg.gradient_checkpointing):
        model.enable_input_require_grads()
    return get_peft_model(model, peft_config)


POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings")
"""Names of learned absolute position tables (GPT-2 / GPT-Neo / OPT / BERT-style)."""


def position_limit(model) -> int | None:
    """Positions a model with a LEARNED absolute position table takes (GPT-2's n_positions), through
    DDP/PEFT wrappers; None for rotary or ALiBi models, which run past their configured length (and
    extrapolate) rather than fail."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in POSITION_TABLES:
            return module.num_embeddings - getattr(module, "offset", 0)  # OPT's table has 2 extra rows
    return None


def check_positions(model, longest: int, what: str) -> None:
    """One clear error before training where a sequence of `longest` tokens would index past the model's
    position table: an IndexError deep inside the embedding on CPU, a device-side assert on a GPU."""
    limit = position_limit(model)
    if limit is not None and longest > limit:
        raise AlignError(f"{what}: sequences of up to {longest} tokens, but the model has {limit} positions "
                         f"(a learned position table, e.g. GPT-2's n_positions); keep them within {limit}")


def stop_token_ids(model, tokenizer) -> list[int]:
    """Token ids that end a generated completion: the tokenizer's EOS, then every EOS id of the model's
    generation config, the set `generate` stops at (Gemma 2 instruct ends a turn with <end_of_turn>,
    Llama 3.1 Instruct with any of <|end_of_text|>, <|eom_id|>, <|eot_id|>). TRL 1.16's GRPOTrainer
    stops at the same set."""
    return _with_generation_eos(tokenizer, getattr(model, "generation_config", None))


def saved_stop_token_ids(cfg: ModelConfig, tokenizer) -> list[int]:
    """`stop_token_ids` of a model folder without loading the weights (its generation_config.json; a hub id
    from the local cache only): what `align check` audits the trained completions against."""
    from transformers import GenerationConfig

    source = _adapter_base(cfg.name_or_path) or cfg.name_or_path
    try:
        config = None if builtin.is_builtin(source) else GenerationConfig.from_pretrained(source,
                                                                                          local_files_only=True)
    except (OSError, ValueError):
        config = None
    return _with_generation_eos(tokenizer, config)


def _with_generation_eos(tokenizer, generation_config) -> list[int]:
    ids = getattr(generation_config, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return [tokenizer.eos_token_id] + [i for i in ids if i != tokenizer.eos_token_id]


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def save_pretrained(model, tokenizer, out_dir: str | Path, accelerator=None) -> None:
    """Save in Hugging Face format (safetensors): a full model, or the adapter for PEFT models.

    Collective with an accelerator (every process must call it). Under ZeRO-3 (and FSDP)
    `get_state_dict` gathers the full weights from every process's shards; under ZeRO-1/2
    every process holds whole parameters and the module saves itself (accelerate's cloned
    ZeRO-2 state dict would break tied weights apart and write lm_head twice).

    The saved config has `use_cache: true` whatever training set (gradient checkpointing
    turns the cache off on the training model): the saved model is for generation, and
    `from_pretrained(...).generate()` without a KV cache recomputes every prefix.
    """
    out_dir = Path(out_dir)
    config = getattr(accelerator.unwrap_model(model) if accelerator is not None else model, "config", None)
    with _cache_on_in(config):
        _save(model, tokenizer, out_dir, accelerator)


@contextmanager
def _cache_on_in(config):
    training_value = getattr(config, "use_cache", None)
    if training_value is False:
        config.use_cache = True
    try:
        yield
    finally:
        if training_value is False:
            config.use_cache = False


def _save(model, tokenizer, out_dir: Path, accelerator) -> None:
    if accelerator is not None:
        unwrapped = accelerator.unwrap_model(model)
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        whole = plugin is not None and plugin.zero_stage < 3
        state_dict = None if whole else accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            unwrapped.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(out_dir)
        accelerator.wait_for_everyone()
    else:
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)


# ---------------------------------------------------------------------------
# DeepSpeed ZeRO-3: sharded parameters
# ---------------------------------------------------------------------------
def zero3_enabled() -> bool:
    """True inside an `accelerate launch` with a ZeRO-3 config: transformers then builds models sharded."""
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return is_deepspeed_zero3_enabled()


@contextmanager
def _without_zero3_init():
    """Build a model whole even when a ZeRO-3 run would shard it at construction (zero.Init).

    transformers builds under zero.Init whenever accelerate's DeepSpeed config says stage 3
    (accelerate's `zero3_init_context_manager(enable=False)` keeps that config registered,
    so it does not stop it): the config is unregistered for the block instead.
    """
    if not zero3_enabled():
        yield
        return
    from transformers.integrations import deepspeed as hf_deepspeed

    config = hf_deepspeed._hf_deepspeed_config_weak_ref()
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)


def _is_sharded_engine(model) -> bool:
    stage = getattr(model, "zero_optimization_stage", None)
    return callable(stage) and stage() == 3


def is_zero3_sharded(model) -> bool:
    """A ZeRO-3 engine, or a module whose parameters zero.Init sharded (not usable outside `gathered`)."""
    return _is_sharded_engine(model) or any(hasattr(p, "ds_id") for p in model.parameters())


@contextmanager
def gathered(model, accelerator=None):
    """The bare module with every parameter whole, for `generate` or forwards outside the engine.

    Under ZeRO-3 (a DeepSpeed engine, or a model built sharded by zero.Init and not yet
    prepared) the parameters are gathered ONCE for the block and an engine's ZeRO-3 hooks
    are taken off meanwhile, so nothing inside the block talks to other processes:
    processes may run different numbers of forwards (generation stops at EOS, eval shards
    differ by one row). Collective on entry and exit: every process must enter. The whole
    model must fit on one device. Elsewhere it only unwraps DDP/accelerate wrappers.
    """
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    engine = _is_sharded_engine(model)
    if not is_zero3_sharded(model) or (not engine and _all_gathered(unwrapped)):
        yield unwrapped  # not sharded, or inside an enclosing `gathered` block already
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(unwrapped.parameters()), modifier_rank=None):
        if engine and getattr(model, "optimizer", None) is not None:
            with _zero3_hooks_off(model):
                yield unwrapped
        else:
            yield unwrapped


def _all_gathered(module) -> bool:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return all(getattr(p, "ds_status", None) == ZeroParamStatus.AVAILABLE for p in module.parameters())


@contextmanager
def _zero3_hooks_off(engine):
    """Take a ZeRO-3 engine's gather/release hooks off its modules for the block.

    `deepspeed.zero.unwrap_model_for_generation` (0.19) removes the per-module hooks but
    leaves the root's start-of-forward hook, whose `reset_step` is a collective until the
    engine has recorded its parameter trace (e.g. before the first training step), so
    processes running different numbers of forwards would wait on each other forever.
    This removes that one too and puts everything back after.
    """
    offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)
    for hook in offload.forward_hooks + offload.backward_hooks:
        hook.remove()
    offload.forward_hooks, offload.backward_hooks = [], []
    root_hooks = offload.module._forward_pre_hooks
    start_of_forward = root_hooks.pop(offload.fwd_pre_hook.id)
    try:
        yield
    finally:
        offload.fwd_pre_hook = offload.module.register_forward_pre_hook(start_of_forward)
        offload._register_deepspeed_module(offload.module)
