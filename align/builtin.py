"""The built-in tiny world: a character-level tokenizer and small Llama configs.

`model.name_or_path: builtin:tiny` (or `builtin:small`) builds a randomly initialised
Llama-architecture model from the config below, with the shipped tokenizer in
`align/assets/tokenizer/`. Nothing is downloaded; no weights are shipped.

The tokenizer has one token per printable ASCII character plus newline and tab, and
special tokens for padding, BOS/EOS, unknown characters and chat roles. Its chat
template renders `<bos><|user|>hi<|assistant|>hello<eos>`; the role markers are
single tokens so the template costs three tokens a turn.
"""

from __future__ import annotations

from pathlib import Path

TOKENIZER_DIR = Path(__file__).parent / "assets" / "tokenizer"

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHARACTERS = [chr(c) for c in range(32, 127)] + ["\n", "\t"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# name -> Llama config overrides. `tiny` is the default of every tiny recipe
# (about 1.05M parameters); `small` (about 5M) is the benchmark model; `micro` (about 0.1M) is the
# student that recipes/tiny/gkd.yaml distils `tiny` into.
MODEL_CONFIGS = {
    "micro": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4),
    "tiny": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4),
    "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=8),
}
PREFIX = "builtin:"


def is_builtin(name: str) -> bool:
    return name.startswith(PREFIX)


def build_tokenizer():
    """Build the character-level tokenizer from scratch (what `data/make_data.py` saves)."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    # A BPE model with no merges is a character-level tokenizer: every character is
    # its own token, and characters outside the vocabulary map to <unk>.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.add_special_tokens(SPECIAL_TOKENS)
    core.decoder = decoders.Fuse()  # join characters back without separators
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        chat_template=CHAT_TEMPLATE, padding_side="right", model_max_length=4096,
    )


def load_tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(TOKENIZER_DIR))


def model_config(name: str, tokenizer, max_position_embeddings: int = 1024):
    from transformers import LlamaConfig

    size = name[len(PREFIX):]
    if size not in MODEL_CONFIGS:
        from align.errors import AlignError

        raise AlignError(f"model.name_or_path: unknown built-in model {name!r}; expected one of "
                         + ", ".join(PREFIX + k for k in MODEL_CONFIGS))
    return LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, **MODEL_CONFIGS[size],
    )
