"""Tiny random-weight models of the families people align, each with its family's conventions.

    python tests/families.py OUT_DIR [--families llama,gpt2]

writes one Hugging Face folder per family (safetensors weights, config, generation
config, tokenizer) that `AutoModelForCausalLM.from_pretrained`, `AutoTokenizer.from_pretrained`
and `align.models.load_model/load_tokenizer` load, and whose `apply_chat_template` renders
the family's real chat format. Tests import it (`build_family`, `FAMILIES`, `SPECS`) and
tests/conftest.py builds each family once per session (the `family_dir` fixture).

What is reproduced, per family (`SPECS`, one `FamilySpec` each):

- the architecture as transformers implements it (model_type, its config's real attribute
  names), shrunk to hidden 32 and 2 layers, keeping what makes the family different:
  Mistral's sliding window (16 tokens, so test rows hit it), Gemma 2's soft-capping of
  attention scores and final logits with alternating sliding/global layers (eager
  attention: transformers refuses sdpa for it), Phi-3's fused qkv and gate_up projections,
  GPT-2's absolute position embeddings and its 0.1 dropouts, Qwen3-MoE's top-2 routing
  over 4 experts;
- the tokenizer's special tokens where the family keeps them (Mistral, Gemma and Phi-3
  number theirs from 0, Llama 3, Qwen and GPT-2 after the BPE vocabulary), whether BOS is
  added by the post-processor, what EOS and pad are (pad == EOS for GPT-2, Mistral and
  Phi-3, as fine-tuners of those set it), the tokenizer class its folder names, and the
  instruct model's chat template;
- a byte-level BPE (1,200 entries before the special tokens) trained with `tokenizers` on
  real text, GSM8K solutions and HH-RLHF dialogues from ../shared/data, with the family's
  pre-tokenizer split (GPT-2's, Llama 3's digits-in-threes, Qwen's single digits + NFC).
  Mistral, Gemma and Phi-3 really ship SentencePiece BPEs; here they are byte-level too.

Weights are drawn with a fixed seed and a larger init than real checkpoints
(`initializer_range` 0.2): random tiny models at 0.02 predict a nearly uniform distribution,
and a test comparing log-probs could then not tell a right context from a wrong one.
Building is deterministic: the same family built twice gives identical files.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SEED = 0
BPE_SIZE = 1200  # byte alphabet + merges + leading special tokens
CORPUS_ROWS = {"gsm8k-train.jsonl.gz": 2000, "hh-rlhf-harmless-base-test.jsonl.gz": 1000}
INIT_RANGE = 0.2

# ---------------------------------------------------------------------------
# pre-tokenizer splits (the regexes the families' tokenizer.json files carry)
# ---------------------------------------------------------------------------
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {"gpt2": None, "llama3": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}  # None: ByteLevel's own (GPT-2) regex

# ---------------------------------------------------------------------------
# chat templates (the instruct models' own, trimmed of tool-calling branches)
# ---------------------------------------------------------------------------
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
MISTRAL_TEMPLATE = (  # v0.3 (v3 tokenizer: [INST] and [/INST] are control tokens); a system message opens the first user turn
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] + '\\n\\n' %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- set loop_messages = messages %}"
    "{%- endif %}{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}{{- '[INST] ' + (system if loop.first else '') + message['content'] + '[/INST]' }}"
    "{%- else %}{{- ' ' + message['content'] + eos_token }}{%- endif %}{%- endfor %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
PHI3_TEMPLATE = (  # Phi-3-mini-4k-instruct's: a conversation rendered without a generation prompt ends with EOS
    "{% for message in messages %}{% if message['role'] in ['system', 'user', 'assistant'] %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
HH_TEMPLATE = (  # GPT-2 has no chat format; this one writes the Human/Assistant transcripts of HH-RLHF
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '\\n\\nHuman: ' + message['content'] }}"
    "{% else %}{{ '\\n\\nAssistant: ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\nAssistant:' }}{% endif %}"
)

# ---------------------------------------------------------------------------
# the families
# ---------------------------------------------------------------------------
DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512)
CHATML_TOKENS = dict(trailing_specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), bos=None, adds_bos=False,
                     eos="<|im_end|>", pad="<|endoftext|>", unk=None, config_eos=("<|im_end|>",),
                     split="qwen2", chat_template_name="chatml", chat_template=CHATML_TEMPLATE,
                     tokenizer_class="Qwen2Tokenizer")
# config attributes that hold a family's dropout probabilities (GPT-2 and Phi-3 name theirs *_pdrop)
DROPOUT_KEYS = {"gpt2": ("resid_pdrop", "embd_pdrop", "attn_pdrop"),
                "phi3": ("resid_pdrop", "embd_pdrop", "attention_dropout")}


@dataclass(frozen=True)
class FamilySpec:
    """One family's architecture and tokenizer conventions (what tests read to know what to expect)."""

    name: str
    model_type: str
    arch: dict
    """Config attributes (transformers' own names) beyond token ids, window and dropout."""
    bos: str | None
    adds_bos: bool
    """The tokenizer's post-processor puts `bos` before every encoded text."""
    eos: str
    """The tokenizer's EOS: what align appends to a string completion and stops sampling at."""
    pad: str
    unk: str | None
    config_eos: tuple[str, ...]
    """config.json's eos_token_id (a list when the instruct model stops at several tokens)."""
    split: str
    """Pre-tokenizer split, a key of SPLITS."""
    chat_template_name: str
    chat_template: str
    tokenizer_class: str
    """tokenizer_config.json's tokenizer_class, as the family's hub folders name it."""
    leading_specials: tuple[str, ...] = ()
    """Special tokens numbered from 0, before the BPE vocabulary."""
    trailing_specials: tuple[str, ...] = ()
    """Special tokens numbered after the BPE vocabulary."""
    sliding_window: int | None = None
    dropout: float = 0.0
    tie_word_embeddings: bool = False
    attn_implementation: str = "sdpa"
    """What transformers picks by default for the family (Gemma 2: eager, sdpa cannot soft-cap)."""
    notes: str = ""

    @property
    def pad_is_eos(self) -> bool:
        return self.pad == self.eos

    @property
    def specials(self) -> tuple[str, ...]:
        return self.leading_specials + self.trailing_specials


SPECS: dict[str, FamilySpec] = {s.name: s for s in (
    FamilySpec(
        "llama", "llama", dict(DECODER, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
        bos="<|begin_of_text|>", adds_bos=True, eos="<|eot_id|>", pad="<|finetune_right_pad_id|>", unk=None,
        config_eos=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"), split="llama3", chat_template_name="llama3",
        chat_template=LLAMA3_TEMPLATE, tokenizer_class="PreTrainedTokenizerFast",
        trailing_specials=("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                           "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                           "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"),
        notes="Llama 3.1 Instruct"),
    FamilySpec("qwen2", "qwen2", dict(DECODER), tie_word_embeddings=True, notes="Qwen2.5 Instruct (0.5B ties)",
               **CHATML_TOKENS),
    FamilySpec(
        "mistral", "mistral", dict(DECODER), sliding_window=16,
        bos="<s>", adds_bos=True, eos="</s>", pad="</s>", unk="<unk>", config_eos=("</s>",), split="llama3",
        chat_template_name="mistral-inst", chat_template=MISTRAL_TEMPLATE, tokenizer_class="PreTrainedTokenizerFast",
        leading_specials=("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
        notes="Mistral 7B Instruct v0.3 with v0.1's sliding window; ships no pad token, fine-tuners set pad = EOS"),
    FamilySpec(
        "gemma2", "gemma2",
        dict(DECODER, head_dim=8, query_pre_attn_scalar=8, final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
        sliding_window=16, tie_word_embeddings=True, attn_implementation="eager",
        bos="<bos>", adds_bos=True, eos="<eos>", pad="<pad>", unk="<unk>", config_eos=("<eos>", "<end_of_turn>"),
        split="gpt2", chat_template_name="gemma", chat_template=GEMMA_TEMPLATE,
        tokenizer_class="PreTrainedTokenizerFast",
        leading_specials=("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"),
        notes="Gemma 2 it: layers alternate sliding (16) and global attention"),
    FamilySpec(
        "phi3", "phi3", dict(DECODER, num_key_value_heads=4),
        bos="<s>", adds_bos=False, eos="<|endoftext|>", pad="<|endoftext|>", unk="<unk>", config_eos=("<|endoftext|>",),
        split="gpt2", chat_template_name="phi3", chat_template=PHI3_TEMPLATE, tokenizer_class="PreTrainedTokenizerFast",
        leading_specials=("<unk>", "<s>", "</s>"),
        trailing_specials=("<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"),
        notes="Phi-3-mini-4k-instruct (add_bos_token false), without its 2047-token window"),
    FamilySpec(
        "gpt2", "gpt2", dict(n_embd=32, n_inner=128, n_layer=2, n_head=4, n_positions=512), dropout=0.1,
        tie_word_embeddings=True, bos="<|endoftext|>", adds_bos=False, eos="<|endoftext|>", pad="<|endoftext|>",
        unk="<|endoftext|>", config_eos=("<|endoftext|>",), split="gpt2", chat_template_name="hh",
        chat_template=HH_TEMPLATE, tokenizer_class="GPT2Tokenizer", trailing_specials=("<|endoftext|>",),
        notes="GPT-2: absolute positions, dropout 0.1; ships no pad token, fine-tuners set pad = EOS"),
    FamilySpec(
        "qwen3_moe", "qwen3_moe",
        dict(DECODER, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
        notes="Qwen3-30B-A3B shape: every layer sparse, top-2 of 4 experts", **CHATML_TOKENS),
)}
FAMILIES: tuple[str, ...] = tuple(SPECS)


# ---------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------
@lru_cache(maxsize=1)
def corpus() -> tuple[str, ...]:
    """Real text to train the BPEs on: GSM8K question + answer, HH-RLHF chosen dialogues (file order)."""
    texts = []
    for name, rows in CORPUS_ROWS.items():
        with gzip.open(SHARED_DATA / name, "rt", encoding="utf-8") as handle:
            for _, line in zip(range(rows), handle):
                row = json.loads(line)
                texts.append(row["chosen"] if "chosen" in row else row["question"] + "\n" + row["answer"])
    return tuple(texts)


def _pre_tokenizer(split: str):
    from tokenizers import Regex, pre_tokenizers

    regex = SPLITS[split]
    if regex is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


@lru_cache(maxsize=None)
def _trained_bpe(split: str, leading: tuple[str, ...]) -> str:
    """tokenizer.json text of a byte-level BPE trained on `corpus()`, `leading` special tokens at ids 0.."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    if split == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = _pre_tokenizer(split)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_SIZE, special_tokens=list(leading), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus(), trainer)
    return tokenizer.to_str()


def build_tokenizer(spec: FamilySpec):
    """The family's tokenizer (a transformers fast tokenizer), trained and assembled in memory."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer.from_str(_trained_bpe(spec.split, spec.leading_specials))
    tokenizer.add_special_tokens(list(spec.trailing_specials))
    byte_level = processors.ByteLevel(trim_offsets=False)
    if spec.adds_bos:
        bos = (spec.bos, tokenizer.token_to_id(spec.bos))
        template = processors.TemplateProcessing(single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos}:1 $B:1",
                                                 special_tokens=[bos])
        tokenizer.post_processor = processors.Sequence([byte_level, template])
    else:
        tokenizer.post_processor = byte_level
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=spec.bos, eos_token=spec.eos,
                                   pad_token=spec.pad, unk_token=spec.unk, chat_template=spec.chat_template,
                                   model_max_length=512, clean_up_tokenization_spaces=False)


def _set_tokenizer_class(folder: Path, name: str) -> None:
    """Write the family's tokenizer_class into tokenizer_config.json, as its hub folders have it."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = name
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------
def model_config(spec: FamilySpec, tokenizer):
    """The family's transformers config: `arch` + token ids, window, dropout, init range."""
    from transformers import AutoConfig

    ids = [tokenizer.convert_tokens_to_ids(t) for t in spec.config_eos]
    kwargs = dict(spec.arch, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=ids[0] if len(ids) == 1 else ids,
                  tie_word_embeddings=spec.tie_word_embeddings, initializer_range=INIT_RANGE)
    kwargs.update({key: spec.dropout for key in DROPOUT_KEYS.get(spec.model_type, ("attention_dropout",))})
    if spec.sliding_window is not None:
        kwargs["sliding_window"] = spec.sliding_window
    config = AutoConfig.for_model(spec.model_type, **kwargs)
    config._attn_implementation = spec.attn_implementation
    return config


def build_model(spec: FamilySpec, tokenizer, seed: int = SEED):
    """Random weights drawn from `seed` (the global RNG is left as it was)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model_config(spec, tokenizer)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def build_family(name: str, out_dir: Path) -> Path:
    """Write family `name`'s folder (model + tokenizer) under out_dir and return it (out_dir / name)."""
    spec = SPECS[name]
    folder = Path(out_dir) / name
    tokenizer = build_tokenizer(spec)
    model = build_model(spec, tokenizer)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    _set_tokenizer_class(folder, spec.tokenizer_class)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)}")
    args = parser.parse_args(argv)
    names = [n for n in args.families.split(",") if n]
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        parser.error(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    for name in names:
        print(build_family(name, args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
