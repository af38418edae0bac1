"""The one data layer: read rows, detect the format, tokenize with loss masks, batch.

Sources: a local `.jsonl`, `.jsonl.gz`, `.json`, `.parquet` or `.csv` file, a
`datasets` name (loaded with `datasets.load_dataset`), a mapping
`{path, name, split, take, columns, chat_prompt}`, or a list of these (a mixture,
concatenated in order). In a mapping, `columns: {old: new}` renames columns as rows
are read (GSM8K's `question` becomes the `prompt` a stage reads:
`{path: openai/gsm8k, name: main, split: train, columns: {question: prompt}}`), and
`chat_prompt: true` turns a string `prompt` into a one-turn conversation
`[{role: user, content: prompt}]` so it goes through the chat template (a string
value adds it as the system message first), and string answers (`completion`,
`chosen`, `rejected`) into the assistant's reply `[{role: assistant, content: …}]`:
SFT on GSM8K is `{columns: {question: prompt, answer: completion}, chat_prompt: true}`.

Formats (detected from the columns, as TRL names them):

| format | columns | trained tokens |
|---|---|---|
| language modelling | `text` | all but the first |
| prompt-completion | `prompt`, `completion` (strings, or message lists: conversational) | the completion (+ EOS) |
| conversational | `messages` | every assistant turn (as the chat template renders it) |
| preference | `prompt`?, `chosen`, `rejected` | see `align.preference_data` |

Standard (string) data is tokenized as `tokenizer(prompt)` (which adds BOS where the
tokenizer does) followed by `tokenizer(completion, add_special_tokens=False)` and
EOS. Conversational data goes through the tokenizer's chat template; the trained span
of an assistant turn is what the template adds between the prompt rendered with
`add_generation_prompt=True` and the prompt plus that turn, so the mask is exact to
the token. A template that renders a prefix differently once more turns follow
("boundary drift") is an error, not a silently wrong mask.

An example is a dict of int lists: `input_ids`, `labels` (-100 where not trained),
and for packed rows `position_ids`. Labels are aligned with `input_ids` (not
shifted); the loss shifts. The first token of every sample is never a label, so
samples concatenated in one row (packing, padding-free) never learn across a boundary.
"""

from __future__ import annotations

import bisect
import gzip
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from align.errors import AlignError

IGNORE = -100
FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".csv")


# ---------------------------------------------------------------------------
# 1. reading rows
# ---------------------------------------------------------------------------
@dataclass
class Rows:
    """Rows of one or more sources, remembering where each row came from (for error messages)."""

    rows: list[dict]
    origins: list[tuple[str, int]] = field(default_factory=list)  # (source name, row number from 1)

    def where(self, i: int) -> str:
        name, line = self.origins[i]
        return f"{name} row {line}"


def load_rows(spec: Any, *, key: str = "data.train") -> Rows:
    """Read every row of a source spec (a path, a datasets name, a mapping or a list of them)."""
    specs = spec if isinstance(spec, list) else [spec]
    if not specs:
        raise AlignError(f"{key}: an empty list; expected a data file or a datasets name")
    rows, origins = [], []
    for one in specs:
        path, name, split, take = _parse_spec(one, key)
        part = _read_source(path, name, split, key)
        if take is not None:
            part = part[:take]
        label = path if split is None else f"{path}[{split}]"
        if isinstance(one, dict) and (one.get("columns") or one.get("chat_prompt")):
            part = _map_columns(part, one.get("columns") or {}, one.get("chat_prompt"), label, key)
        rows.extend(part)
        origins.extend((label, i + 1) for i in range(len(part)))
    if not rows:
        raise AlignError(f"{key}: {spec!r} has no rows")
    return Rows(rows, origins)


def is_local(spec) -> bool:
    """Whether a data spec (a path, a mapping with `path`, or a list of them) names local files only, not a
    `datasets` name: check and planning read those, and leave hub datasets to the stage."""
    specs = spec if isinstance(spec, list) else [spec]
    for one in specs:
        path = str(one.get("path") if isinstance(one, dict) else one)
        if not (Path(path).exists() or any(path.endswith(s) for s in FILE_SUFFIXES)):
            return False
    return True


def load_eval_rows(data) -> Rows | None:
    """The held-out rows of a recipe's data section: `data.eval` cut to its first `data.eval_limit` rows (the
    one place the limit applies, to raw rows, for every stage); None without `data.eval`."""
    if data.eval is None:
        return None
    rows = load_rows(data.eval, key="data.eval")
    if data.eval_limit is not None:
        rows = Rows(rows.rows[: data.eval_limit], rows.origins[: data.eval_limit])
    return rows


def _parse_spec(spec, key):
    if isinstance(spec, str):
        return spec, None, None, None
    if isinstance(spec, dict):
        unknown = set(spec) - {"path", "name", "split", "take", "columns", "chat_prompt"}
        if unknown or "path" not in spec:
            raise AlignError(f"{key}: a source mapping takes keys path, name, split, take, columns, chat_prompt; "
                             f"got {sorted(spec)}")
        columns = spec.get("columns")
        if columns is not None and (not isinstance(columns, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in columns.items())):
            raise AlignError(f"{key}: columns must map column names to new names ({{question: prompt}}), "
                             f"got {columns!r}")
        chat = spec.get("chat_prompt")
        if chat is not None and not isinstance(chat, (bool, str)):
            raise AlignError(f"{key}: chat_prompt must be true/false or a system prompt string, got {chat!r}")
        take = spec.get("take")
        if take is not None and (not isinstance(take, int) or take <= 0):
            raise AlignError(f"{key}: take must be a positive integer, got {take!r}")
        return str(spec["path"]), spec.get("name"), spec.get("split"), take
    raise AlignError(f"{key}: got {spec!r}, expected a file path, a datasets name or a mapping {{path, split}}")


CHAT_ANSWERS = ("completion", "chosen", "rejected")
"""Columns that `chat_prompt` wraps as the assistant's reply when they are strings."""


def _map_columns(rows: list[dict], columns: dict[str, str], chat_prompt, label: str, key: str) -> list[dict]:
    """Rename columns ({old: new}) and optionally wrap a string `prompt` (and string answers) as chat messages.

    >>> _map_columns([{"question": "1+1?", "answer": "#### 2"}], {"question": "prompt"}, True, "x", "k")
    [{'answer': '#### 2', 'prompt': [{'role': 'user', 'content': '1+1?'}]}]
    >>> _map_columns([{"q": "1+1?", "completion": "2"}], {"q": "prompt"}, True, "x", "k")[0]["completion"]
    [{'role': 'assistant', 'content': '2'}]
    """
    out = []
    for i, row in enumerate(rows):
        missing = [c for c in columns if c not in row]
        if missing:
            raise AlignError(f"{key}: {label} row {i + 1} has no column {missing[0]!r} to rename "
                             f"(columns: {sorted(row)})")
        row = {k: v for k, v in row.items() if k not in columns} | {
            new: row[old] for old, new in columns.items()}
        if chat_prompt:
            prompt = row.get("prompt")
            if not isinstance(prompt, str):
                raise AlignError(f"{key}: {label} row {i + 1}: chat_prompt needs a string 'prompt' column, "
                                 f"got {type(prompt).__name__} (columns: {sorted(row)})")
            system = [{"role": "system", "content": chat_prompt}] if isinstance(chat_prompt, str) else []
            row["prompt"] = system + [{"role": "user", "content": prompt}]
            for answer in CHAT_ANSWERS:  # the reply to a chat prompt is an assistant turn (TRL's conversational form)
                if isinstance(row.get(answer), str):
                    row[answer] = [{"role": "assistant", "content": row[answer]}]
        out.append(row)
    return out


def _read_source(path: str, name, split, key) -> list[dict]:
    local = Path(path)
    if local.suffix and any(str(local).endswith(s) for s in FILE_SUFFIXES):
        if not local.is_file():
            raise AlignError(f"{key}: file {path} not found")
        return _slice(_read_file(local), split, key)
    if local.exists():
        if local.is_dir():
            return _read_datasets(path, name, split or "train", key)
        raise AlignError(f"{key}: {path} has an unsupported extension; expected one of {', '.join(FILE_SUFFIXES)}")
    return _read_datasets(path, name, split or "train", key)


def _slice(rows: list[dict], split, key) -> list[dict]:
    """A file's rows sliced as `datasets` slices a split: "train[:1800]", "test[1800:]", "[100:200]"
    (the name before the brackets means nothing for one file); no brackets: every row."""
    if split is None or "[" not in str(split):
        return rows
    inside = str(split)[str(split).index("[") + 1:]
    try:
        if not inside.endswith("]") or inside.count(":") != 1:
            raise ValueError
        start, stop = (int(x) if x.strip() else None for x in inside[:-1].split(":"))
    except ValueError:
        raise AlignError(f"{key}: split {split!r}; expected a slice such as 'train[:1800]' or 'train[1800:]'") from None
    return rows[start:stop]


def _read_file(path: Path) -> list[dict]:
    text_name = str(path)
    if text_name.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if text_name.endswith(".gz") else open
        rows = []
        with opener(path, "rt", encoding="utf-8") as handle:
            for n, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise AlignError(f"{path} line {n}: not valid JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise AlignError(f"{path} line {n}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
        return rows
    if text_name.endswith((".json", ".json.gz")):
        opener = gzip.open if text_name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as handle:
            try:
                data = json.load(handle)
            except json.JSONDecodeError as err:
                raise AlignError(f"{path}: not valid JSON ({err.msg})") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise AlignError(f"{path}: expected a JSON list of objects")
        return data
    import datasets

    kind = "parquet" if text_name.endswith(".parquet") else "csv"
    return list(datasets.load_dataset(kind, data_files=str(path), split="train"))


def _read_datasets(path, name, split, key) -> list[dict]:
    import datasets

    try:
        return list(datasets.load_dataset(path, name, split=split))
    except Exception as err:  # datasets raises many types for a missing name or split
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AlignError(f"{key}: cannot load {path!r} (split {split!r}) as a file or a datasets name: {text}") from None


# ---------------------------------------------------------------------------
# 2. formats
# ---------------------------------------------------------------------------
SFT_FORMATS = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
}


def detect_format(rows: Rows, formats: dict[str, tuple[str, ...]], key: str) -> str:
    first = rows.rows[0]
    for name, columns in formats.items():
        if all(c in first for c in columns):
            return name
    expected = " or ".join("/".join(c) for c in formats.values())
    raise AlignError(f"{key}: {rows.where(0)} has columns {sorted(first)}; expected {expected}")


def is_conversational(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


def _check_messages(messages, where: str) -> None:
    if not is_conversational(messages) or not messages:
        raise AlignError(f"{where}: expected a non-empty list of {{role, content}} messages")
    for m in messages:
        if "content" not in m or not isinstance(m["content"], str):
            raise AlignError(f"{where}: every message needs a string 'content'")


def _require_chat_template(tokenizer, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise AlignError(f"{where}: conversational data needs a chat template, and the tokenizer has none; "
                         "set model.chat_template")


# ---------------------------------------------------------------------------
# 3. tokenization
# ---------------------------------------------------------------------------
def chat_ids(tokenizer, messages, *, add_generation_prompt=False) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return list(ids)


def cut_from_start(prompt_ids: list[int], budget: int, bos_id) -> list[int]:
    """A prompt cut to its last `budget` tokens (a long dialogue keeps its latest turns, next to the answer);
    a leading BOS is kept."""
    if len(prompt_ids) <= budget:
        return prompt_ids
    head = prompt_ids[:1] if bos_id is not None and prompt_ids[:1] == [bos_id] else []
    return head + prompt_ids[len(prompt_ids) - (budget - len(head)):]


def encode_prompt(tokenizer, prompt, where: str = "prompt") -> list[int]:
    """Token ids of a prompt as generation sees it (chat template + generation prompt if conversational)."""
    if is_conversational(prompt):
        _require_chat_template(tokenizer, where)
        return chat_ids(tokenizer, prompt, add_generation_prompt=True)
    if not isinstance(prompt, str):
        raise AlignError(f"{where}: prompt must be a string or a list of messages, got {type(prompt).__name__}")
    return list(tokenizer(prompt)["input_ids"])


def encode_prompt_completion(tokenizer, prompt, completion, where: str) -> tuple[list[int], list[int]]:
    """(prompt_ids, completion_ids) for one pair; completion ends with EOS (or the template's end of turn)."""
    if is_conversational(prompt) or is_conversational(completion):
        if not (is_conversational(prompt) and is_conversational(completion)):
            raise AlignError(f"{where}: prompt and completion must both be strings or both message lists")
        _check_messages(prompt, where)
        _check_messages(completion, where)
        prompt_ids = encode_prompt(tokenizer, prompt, where)
        full = chat_ids(tokenizer, prompt + completion)
        if full[: len(prompt_ids)] != prompt_ids:
            raise AlignError(f"{where}: the chat template renders the prompt differently once the completion follows "
                             "(boundary drift); the loss mask would be wrong")
        return prompt_ids, full[len(prompt_ids):]
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise AlignError(f"{where}: prompt and completion must be strings or message lists")
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None and (not completion_ids or completion_ids[-1] != tokenizer.eos_token_id):
        completion_ids.append(tokenizer.eos_token_id)
    return prompt_ids, completion_ids


def _tokenize_messages(tokenizer, messages, where) -> tuple[list[int], list[int]]:
    _check_messages(messages, where)
    _require_chat_template(tokenizer, where)
    if not any(m["role"] == "assistant" for m in messages):
        raise AlignError(f"{where}: no assistant message to train on")
    full = chat_ids(tokenizer, messages)
    labels = [IGNORE] * len(full)
    special = set(tokenizer.all_special_ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = chat_ids(tokenizer, messages[:i], add_generation_prompt=True) if i else []
        start, end = len(prompt), _turn_end(full, chat_ids(tokenizer, messages[: i + 1]), special)
        if end is None or end <= start or full[:start] != prompt:
            raise AlignError(f"{where}: the chat template renders turn {i} differently once later turns follow "
                             "(boundary drift); the loss mask would be wrong")
        labels[start:end] = full[start:end]
    return full, labels


def _turn_end(full: list[int], upto: list[int], special: set[int]) -> int | None:
    """Where a conversation rendered up to an assistant turn (`upto`) ends inside the whole one (`full`).

    `upto` must be a prefix of `full`, except for special tokens a template adds only when the
    conversation ends there: Phi-3's template closes a conversation with EOS after the last
    `<|end|>`, which an earlier turn does not have. None when the rendering really differs (a
    template that rewrites earlier turns, e.g. dropping their reasoning).
    """
    n = 0
    while n < min(len(full), len(upto)) and full[n] == upto[n]:
        n += 1
    return n if all(t in special for t in upto[n:]) else None


def tokenize_sft_row(tokenizer, row: dict, fmt: str, where: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one SFT row, untruncated."""
    if fmt == "text":
        text = row["text"]
        if not isinstance(text, str) or not text:
            raise AlignError(f"{where}: 'text' must be a non-empty string")
        ids = list(tokenizer(text)["input_ids"])
        if tokenizer.eos_token_id is not None and ids[-1] != tokenizer.eos_token_id:
            ids.append(tokenizer.eos_token_id)
        return ids, list(ids)
    if fmt == "prompt_completion":
        prompt_ids, completion_ids = encode_prompt_completion(tokenizer, row["prompt"], row["completion"], where)
        return prompt_ids + completion_ids, [IGNORE] * len(prompt_ids) + completion_ids
    return _tokenize_messages(tokenizer, row["messages"], where)


@dataclass
class TokenizedSet:
    examples: list[dict]
    dropped: int = 0
    truncated: int = 0
    source: str = ""

    def __len__(self):
        return len(self.examples)

    @property
    def lengths(self) -> list[int]:
        return [len(e["input_ids"]) for e in self.examples]


def cut_sft_sample(ids: list[int], labels: list[int], max_length: int, *, prompt_truncation: str = "keep_start",
                   bos_id=None) -> tuple[list[int], list[int]]:
    """A too-long SFT sample cut to max_length: with prompt_truncation="keep_end", a prompt/completion sample
    first loses the beginning of its prompt (a long dialogue keeps its latest turns; BOS kept), down to half
    of max_length at least, as preference pairs do; then whatever is still too long loses its end."""
    if len(ids) <= max_length:
        return ids, labels
    prompt = next((i for i, label in enumerate(labels[1:], 1) if label != IGNORE), len(ids))
    if prompt_truncation == "keep_end" and all(label != IGNORE for label in labels[prompt:]):
        kept = cut_from_start(ids[:prompt], max(max_length - (len(ids) - prompt), max_length // 2), bos_id)
        ids, labels = kept + ids[prompt:], [IGNORE] * len(kept) + labels[prompt:]
    return ids[:max_length], labels[:max_length]


def tokenize_sft(rows: Rows, tokenizer, *, max_length: int, truncation: str, key: str,
                 prompt_truncation: str = "keep_start") -> TokenizedSet:
    """Tokenize every row; too-long samples are cut (`cut_sft_sample`) or dropped (truncation="drop"); samples
    left with no trained token are dropped and counted."""
    fmt = detect_format(rows, SFT_FORMATS, key)
    examples, dropped, truncated = [], 0, 0
    for i, row in enumerate(rows.rows):
        where = rows.where(i)
        for column in SFT_FORMATS[fmt]:
            if row.get(column) in (None, ""):
                raise AlignError(f"{key}: {where} has an empty '{column}'")
        ids, labels = tokenize_sft_row(tokenizer, row, fmt, where)
        labels[0] = IGNORE  # never trained: nothing predicts the first token of a sample
        if len(ids) > max_length:
            if truncation == "drop":
                dropped += 1
                continue
            ids, labels = cut_sft_sample(ids, labels, max_length, prompt_truncation=prompt_truncation,
                                         bos_id=tokenizer.bos_token_id)
            truncated += 1
        if all(label == IGNORE for label in labels):
            dropped += 1
            continue
        examples.append({"input_ids": ids, "labels": labels})
    name = rows.origins[0][0]
    if not examples:
        raise AlignError(f"{key}: all {len(rows.rows)} samples of {name} have no trainable token left after "
                         f"truncation to data.max_length={max_length}; raise data.max_length")
    return TokenizedSet(examples, dropped=dropped, truncated=truncated, source=name)


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Concatenate whole samples into rows of at most max_length, with per-sample position_ids.

    Best-fit decreasing (as TRL's default "bfd" packing, without splitting samples): the
    longest samples first, each into the fullest row it still fits, else a new row. On
    HH-RLHF dialogues cut at 512 tokens rows come out 98% full (next-fit in file order:
    84%). Rows are returned in the order of their first sample and hold their samples in
    their original order, so data that fits in order packs as it reads.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    free: list[tuple[int, int]] = []  # (space left, row), sorted: the first fit is the best fit
    members: list[list[int]] = []
    for i in order:
        n = len(examples[i]["input_ids"])
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, row = free.pop(k)
        else:
            space, row = max_length, len(members)
            members.append([])
        members[row].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, row))
    rows = []
    for row in sorted(members, key=min):
        current = {"input_ids": [], "labels": [], "position_ids": []}
        for i in sorted(row):
            ex = examples[i]
            current["input_ids"] += ex["input_ids"]
            current["labels"] += ex["labels"]
            current["position_ids"] += list(range(len(ex["input_ids"])))
        rows.append(current)
    return rows


# ---------------------------------------------------------------------------
# 4. batches
# ---------------------------------------------------------------------------
class GlobalBatches:
    """The deterministic sequence of global batches: step -> list of example indices.

    A global batch holds `size` = batch_size x grad_accum x processes examples, so the
    data of an optimizer step does not depend on how the batch is split: whole, by
    gradient accumulation, or across processes (the invariance guarantee). Epoch e is
    a permutation seeded by (seed, e); the last incomplete global batch of an epoch is
    dropped. Any step's batch is computed directly, so resuming at step s needs no
    replay. With `group_by_length`, windows of 64 batches are sorted by length before
    batching (and the batches shuffled again) so that batches hold similar lengths.
    """

    WINDOW = 64

    def __init__(self, lengths: list[int], size: int, *, seed: int, group_by_length: bool = True):
        if len(lengths) < size:
            raise AlignError(f"train: a global batch needs {size} samples (batch_size x grad_accum x processes) "
                             f"but the training set has {len(lengths)}")
        self.lengths, self.size, self.seed, self.group = lengths, size, seed, group_by_length
        self.per_epoch = len(lengths) // size
        self._epoch, self._batches = None, None

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        order = order[: self.per_epoch * self.size]
        if self.group:
            window = self.WINDOW * self.size
            order = [i for start in range(0, len(order), window)
                     for i in sorted(order[start: start + window], key=lambda j: -self.lengths[j])]
        batches = [order[i: i + self.size] for i in range(0, len(order), self.size)]
        if self.group:
            rng.shuffle(batches)
        return batches

    def __getitem__(self, step: int) -> list[int]:
        epoch, index = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._epoch_batches(epoch)
        return self._batches[index]


def split_global_batch(indices: list[int], lengths: list[int], *, micro_batches: int, process: int,
                       processes: int) -> list[list[int]]:
    """This process's micro-batches of a global batch: sorted by length, then cut in equal chunks.

    Chunk k of the (micro_batches x processes) chunks goes to process k % processes, so
    each process gets `micro_batches` micro-batches of similar lengths.
    """
    ordered = sorted(indices, key=lambda i: (-lengths[i], i))
    n_chunks = micro_batches * processes
    per = len(ordered) // n_chunks
    chunks = [ordered[k * per: (k + 1) * per] for k in range(n_chunks)]
    return [chunks[k] for k in range(process, n_chunks, processes)]


def split_by_token_budget(indices: list[int], widths: list[int], budget: int, *,
                          rows_per_example: int = 1) -> list[list[int]]:
    """Cut examples into micro-batches of at most `budget` padded tokens each.

    Examples are taken longest first; a micro-batch of n examples padded to its longest
    width w costs rows_per_example x n x w tokens (a preference pair is two rows). An
    example wider than the budget goes alone. Deterministic: ties break on the index.
    """
    ordered = sorted(indices, key=lambda i: (-widths[i], i))
    chunks: list[list[int]] = []
    for i in ordered:
        # the chunk's first example is its widest, so adding i keeps width widths[chunk[0]]
        if chunks and rows_per_example * (len(chunks[-1]) + 1) * widths[chunks[-1][0]] <= budget:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row is ones then zeros: (N, T) -> bool."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def without_causal_padding_mask(batch: dict) -> dict:
    """Drop the attention mask of right-padded rows: under causal attention every pad comes
    after the real tokens of its row, so no real token attends to one and the mask changes no
    real logit. Without it SDPA runs its causal kernel instead of a masked one (no (B, 1, T, T)
    mask: less memory, faster on CPU). Left-padded or packed batches are returned unchanged."""
    mask = batch.get("attention_mask")
    if mask is None or "position_ids" in batch or not is_right_padded(mask):
        return batch
    return {k: v for k, v in batch.items() if k != "attention_mask"}


def prefix_sharing_mask(segments: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
    """The 4D attention mask of rows that share a prefix: (N, T) segment ids -> (N, 1, T, T) bool.

    Segment 0 is the shared prefix (a prompt); every other id is one continuation (a pair's
    chosen or rejected answer, one of a GRPO group's completions). A query attends to an
    earlier-or-same key that is real (`real`, (N, T) bool; default all) and lies in the prefix
    or in the query's own segment, so each continuation's logits equal those of the row
    [prefix, continuation] alone. Every query also sees itself: no row is empty (an empty
    softmax row would put NaNs into the backward pass). True = may attend.
    """
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()  # (T, T)
    query, key = segments[:, :, None], segments[:, None, :]  # (N, T, 1), (N, 1, T)
    allowed = causal & ((key == 0) | (key == query))  # (N, T, T)
    if real is not None:
        allowed &= real[:, None, :]
    allowed |= torch.eye(T, dtype=torch.bool, device=segments.device)
    return allowed[:, None]


def collate(examples: list[dict], pad_id: int, *, padding_free: bool = False,
            width: int | None = None) -> dict[str, torch.Tensor]:
    """Stack examples into tensors.

    Padded (default): right-padded (B, T) input_ids / labels / attention_mask, T the
    longest example or `width` if that is more (packed rows come at data.max_length: every
    micro-batch then has the same shape, so the allocator reuses the same blocks each step).
    Padding-free, or packed rows: examples concatenated into one (1, sum T) row with
    position_ids restarting at each sample and no attention_mask; transformers then
    keeps attention within each sample.
    """
    if padding_free:
        ids, labels, positions = [], [], []
        for ex in examples:
            ids += ex["input_ids"]
            labels += ex["labels"]
            positions += ex.get("position_ids") or list(range(len(ex["input_ids"])))
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([positions])}
    width = max([len(ex["input_ids"]) for ex in examples] + [width or 0])
    B = len(examples)
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    labels = torch.full((B, width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((B, width), dtype=torch.long)
    has_positions = "position_ids" in examples[0]
    position_ids = torch.zeros((B, width), dtype=torch.long) if has_positions else None
    for b, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[b, :n] = torch.tensor(ex["input_ids"])
        labels[b, :n] = torch.tensor(ex["labels"])
        attention_mask[b, :n] = 1
        if has_positions:
            position_ids[b, :n] = torch.tensor(ex["position_ids"])
            position_ids[b, n:] = torch.arange(width - n)
    batch = {"input_ids": input_ids, "labels": labels}
    if has_positions:
        # packed rows: attention follows position_ids, so no attention_mask
        batch["position_ids"] = position_ids
    else:
        batch["attention_mask"] = attention_mask
    return batch

