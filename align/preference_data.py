"""Preference data: (prompt, chosen, rejected) rows tokenized identically on both sides.

Formats (TRL's names):

| format | columns |
|---|---|
| explicit prompt | `prompt`, `chosen`, `rejected` (strings, or message lists: conversational) |
| implicit prompt | `chosen`, `rejected` only: the shared beginning is the prompt |

Optional columns: `margin` (a per-pair number for the Bradley–Terry margin) and `subset`
(a category, for per-subset accuracy).

The implicit prompt of two transcripts is their longest common prefix, cut back to a
clean boundary: for conversational rows, the messages both share; for strings, the
end of the last `Assistant:` marker inside the shared text when there is one
(Anthropic HH-RLHF transcripts `\\n\\nHuman: … \\n\\nAssistant: …`), else the last
whitespace, so that a word both answers start with is not split.

A tokenized pair is a dict `prompt_ids`, `chosen_ids`, `rejected_ids` (the completion
ids end with EOS or the template's end of turn), plus `margin` / `subset` when the row
has them. Samples longer than `max_length` lose the end of their completion (with
`prompt_truncation="keep_end"`, the beginning of their prompt first); pairs
left with no completion token, or whose two sides become identical, are dropped and
counted (all dropped is an error).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from align.data import (
    IGNORE,
    Rows,
    cut_from_start,
    encode_prompt_completion,
    is_conversational,
    prefix_sharing_mask,
)
from align.errors import AlignError

ASSISTANT_MARKER = "Assistant:"


def split_implicit_prompt(chosen, rejected):
    """(prompt, chosen_completion, rejected_completion) from two full transcripts."""
    if is_conversational(chosen) and is_conversational(rejected):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        # the prompt ends before the first differing assistant turn
        while n > 0 and chosen[n - 1].get("role") == "assistant" and n == min(len(chosen), len(rejected)):
            n -= 1
        return chosen[:n], chosen[n:], rejected[n:]
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise ValueError("chosen and rejected must both be strings or both message lists")
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    shared = chosen[:n]
    marker = shared.rfind(ASSISTANT_MARKER)
    if marker >= 0:
        n = marker + len(ASSISTANT_MARKER)
    elif n < limit or n < max(len(chosen), len(rejected)):
        while n > 0 and not chosen[n - 1].isspace():
            n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


@dataclass
class PreferenceSet:
    examples: list[dict]
    dropped_identical: int = 0
    dropped_empty: int = 0
    truncated: int = 0
    source: str = ""
    empty_prompts: int = 0
    """Pairs with no prompt token (an implicit split with no shared beginning, a tokenizer without BOS):
    the first token of each answer has nothing before it and is not scored."""

    def __len__(self):
        return len(self.examples)

    def summary(self) -> str:
        text = (f"{len(self.examples)} pairs kept; {self.dropped_identical} dropped as identical after truncation, "
                f"{self.dropped_empty} with no completion token left, {self.truncated} truncated")
        if self.empty_prompts:
            text += (f"; {self.empty_prompts} with an empty prompt (no shared beginning and no BOS token: "
                     f"the first token of each answer is not scored)")
        return text


def _row_parts(row: dict, where: str):
    for column in ("chosen", "rejected"):
        if column not in row:
            raise AlignError(f"{where}: missing column '{column}'; preference data needs chosen and rejected "
                             f"(and optionally prompt), got columns {sorted(row)}")
        if row[column] in (None, "", []):
            raise AlignError(f"{where}: empty '{column}'")
    chosen, rejected = row["chosen"], row["rejected"]
    if is_conversational(chosen) != is_conversational(rejected):
        raise AlignError(f"{where}: chosen and rejected must both be strings or both message lists")
    if "prompt" in row and row["prompt"] not in (None, ""):
        prompt = row["prompt"]
        if is_conversational(chosen):
            _check_roles(prompt, chosen, rejected, where)
        return prompt, chosen, rejected
    try:
        prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
    except ValueError as err:
        raise AlignError(f"{where}: {err}") from None
    if is_conversational(chosen):
        _check_roles(prompt, chosen, rejected, where)
    return prompt, chosen, rejected


def _check_roles(prompt, chosen, rejected, where):
    if not is_conversational(prompt):
        raise AlignError(f"{where}: a conversational pair needs a message-list prompt")
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        if not side or side[0].get("role") != "assistant":
            raise AlignError(f"{where}: the {name} messages after the prompt must start with an assistant turn, "
                             f"got roles {[m.get('role') for m in side]}")
    if prompt and prompt[-1].get("role") == "assistant":
        raise AlignError(f"{where}: the prompt ends with an assistant turn; expected it to end with a user turn")


PROMPT_TRUNCATION = ("keep_start", "keep_end")


def pair_truncation(recipe) -> str:
    """A recipe's rule for too-long pairs: `data.prompt_truncation`, or the deprecated `reward.prompt_truncation`
    when a recipe still sets it."""
    old = getattr(recipe.stage_args, "prompt_truncation", None)
    return old if old is not None else recipe.data.prompt_truncation


def _keep_prompt_end(prompt_ids: list[int], longest: int, max_length: int, bos_id) -> list[int]:
    """The prompt cut from the left to leave room for the longer completion (its first
    half of max_length at least); a leading BOS is kept."""
    return cut_from_start(prompt_ids, max(max_length - longest, max_length // 2), bos_id)


def tokenize_preferences(rows: Rows, tokenizer, *, max_length: int, key: str,
                         prompt_truncation: str = "keep_start", scores_tokens: bool = True) -> PreferenceSet:
    """Tokenize every pair. Too-long pairs lose the end of their completions; with
    prompt_truncation="keep_end" the prompt first loses its beginning (the end of a long
    dialogue, next to the answers, survives) so that the completions fit.

    `scores_tokens` (the DPO family): a pair must keep a scored token on each side; with an
    empty prompt an answer's first token is not scored, so a one-token answer is dropped.
    A reward model reads the last token only and needs one token a side."""
    if prompt_truncation not in PROMPT_TRUNCATION:
        raise AlignError(f"{key}: prompt truncation {prompt_truncation!r}; expected one of {PROMPT_TRUNCATION}")
    examples, identical, empty, truncated, empty_prompts = [], 0, 0, 0, 0
    for i, row in enumerate(rows.rows):
        where = f"{key}: {rows.where(i)}"
        prompt, chosen, rejected = _row_parts(row, where)
        prompt_ids, chosen_ids = encode_prompt_completion(tokenizer, prompt, chosen, where)
        prompt_ids_r, rejected_ids = encode_prompt_completion(tokenizer, prompt, rejected, where)
        if prompt_ids != prompt_ids_r:
            raise AlignError(f"{where}: the prompt tokenizes differently before chosen and rejected")
        cut = False
        if prompt_truncation == "keep_end":
            kept = _keep_prompt_end(prompt_ids, max(len(chosen_ids), len(rejected_ids)), max_length,
                                    tokenizer.bos_token_id)
            cut, prompt_ids = len(kept) < len(prompt_ids), kept
        room = max_length - len(prompt_ids)
        if cut or len(chosen_ids) > room or len(rejected_ids) > room:
            truncated += 1
        chosen_ids, rejected_ids = chosen_ids[: max(room, 0)], rejected_ids[: max(room, 0)]
        # with an empty prompt (no BOS) an answer's first token has nothing before it and is not scored
        least = 2 if scores_tokens and not prompt_ids else 1
        empty_prompts += not prompt_ids
        if len(chosen_ids) < least or len(rejected_ids) < least:
            empty += 1
            continue
        if chosen_ids == rejected_ids:
            identical += 1
            continue
        example = {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}
        if "margin" in row and row["margin"] is not None:
            example["margin"] = float(row["margin"])
        if "subset" in row and row["subset"] is not None:
            example["subset"] = str(row["subset"])
        examples.append(example)
    name = rows.origins[0][0]
    result = PreferenceSet(examples, identical, empty, truncated, name, empty_prompts)
    if not examples:
        raise AlignError(f"{key}: no usable pair in {name} ({result.summary()}); check data.max_length")
    return result


def pair_length(example: dict) -> int:
    """Tokens of the longer side (prompt included), used to group pairs by length."""
    n = len(example["prompt_ids"])
    return n + max(len(example["chosen_ids"]), len(example["rejected_ids"]))


def collate_pairs(examples: list[dict], pad_id: int, *, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """One concatenated batch for one forward pass: rows [chosen_1..chosen_B, rejected_1..rejected_B].

    input_ids, attention_mask: (2B, T); labels: (2B, T), the completion tokens and
    -100 elsewhere (prompt and padding); margin: (B,) when the pairs have margins.
    """
    sequences, labels = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for ex in examples:
            sequences.append(ex["prompt_ids"] + ex[side])
            labels.append([IGNORE] * len(ex["prompt_ids"]) + ex[side])
    width = max(len(s) for s in sequences)
    rows = len(sequences)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    label_t = torch.full((rows, width), IGNORE, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for r, (seq, lab) in enumerate(zip(sequences, labels)):
        n = len(seq)
        span = slice(width - n, width) if padding_side == "left" else slice(0, n)
        input_ids[r, span] = torch.tensor(seq)
        label_t[r, span] = torch.tensor(lab)
        mask[r, span] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": label_t}
    if examples and "margin" in examples[0]:
        batch["margin"] = torch.tensor([ex.get("margin", 0.0) for ex in examples], dtype=torch.float32)
    return batch


PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, 3  # segment ids; PROMPT = 0 is the shared prefix of prefix_sharing_mask


def shared_pair_width(example: dict) -> int:
    """Tokens of a pair as ONE shared-prompt row: prompt + chosen + rejected."""
    return len(example["prompt_ids"]) + len(example["chosen_ids"]) + len(example["rejected_ids"])


def collate_shared_pairs(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """One row per pair, [prompt, chosen, rejected], right-padded: the prompt is computed once.

    Prefix sharing (Wang et al. 2024, "Accelerating Direct Preference Optimization with
    Prefix Sharing"): the rejected tokens see the prompt and themselves, never the chosen
    ones (chosen tokens never see rejected ones by causality), and continue the prompt's
    positions, so every real token's logits equal those of the separate rows
    [prompt, chosen] and [prompt, rejected] of `collate_pairs`.

    input_ids, position_ids, segments (PROMPT/CHOSEN/REJECTED/PAD): (B, T) with
    T = max(P + C + R); position_ids [0..P+C-1, P..P+R-1, then the pads' own, none past the batch's
    longest pair: max(P + max(C, R)) - 1];
    attention_mask: (B, 1, T, T) bool from `align.data.prefix_sharing_mask` (PROMPT = 0 is the
    shared prefix: chosen sees prompt + chosen, rejected prompt + rejected, pads the prompt and
    the pads; every query sees itself);
    prompt_last, chosen_last, rejected_last: (B,) index of the last prompt / chosen /
    rejected token; margin: (B,) when the pairs have margins.

    Cost: the prompt's tokens go through the model once instead of twice (on HH-RLHF,
    whose prompts are most of the tokens, about 0.65x the real tokens). Attention, though,
    runs with an explicit mask: on CPU, SDPA's flash kernel then computes every (query,
    key) block, where its causal variant skips the blocks above the diagonal (kv blocks of
    512: it matters from about 768 tokens), and a row is P+C+R wide instead of P+max(C,R).
    A pair with a short prompt and long answers can thus cost more than two rows; measured
    on builtin:small with HH-RLHF pairs (CPU, fp32) a whole epoch is still faster (1.3x at
    max_length 1024, 1.5x at 384) with lower peak memory (fewer rows and logits).
    """
    B = len(examples)
    width = max(shared_pair_width(e) for e in examples)
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    segments = torch.full((B, width), PAD, dtype=torch.long)
    position_ids = torch.arange(width).repeat(B, 1)  # (B, T)
    ends = torch.zeros((3, B), dtype=torch.long)
    for b, ex in enumerate(examples):
        p, c, r = len(ex["prompt_ids"]), len(ex["chosen_ids"]), len(ex["rejected_ids"])
        input_ids[b, : p + c + r] = torch.tensor(ex["prompt_ids"] + ex["chosen_ids"] + ex["rejected_ids"])
        segments[b, p: p + c] = CHOSEN
        segments[b, p + c: p + c + r] = REJECTED
        segments[b, :p] = PROMPT
        position_ids[b, p + c:] -= c  # rejected continue the prompt; pads continue after them
        ends[:, b] = torch.tensor([p - 1, p + c - 1, p + c + r - 1])
    # ... up to the last position a pair of the batch needs: pads of a short pair batched with a long one would
    # otherwise run to width - C, past data.max_length and a learned position table (GPT-2's n_positions)
    position_ids.clamp_(max=max(len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"]))
                                for e in examples) - 1)
    batch = {"input_ids": input_ids, "attention_mask": prefix_sharing_mask(segments), "position_ids": position_ids,
             "segments": segments, "prompt_last": ends[0], "chosen_last": ends[1], "rejected_last": ends[2]}
    if examples and "margin" in examples[0]:
        batch["margin"] = torch.tensor([ex.get("margin", 0.0) for ex in examples], dtype=torch.float32)
    return batch


# attention implementations that apply a custom boolean (B, 1, T, T) mask as given (transformers 5 passes a
# 4D mask through unchanged). flash_attention_2/3 only take a 2D padding mask (a 4D one is not applied as
# such; uneven position_ids may even be read as packed sequences), flex_attention wants a BlockMask, and
# eager ADDS the mask to the scores (a boolean one would be +1/0, not -inf/0): those fall back to 2B rows.
SHARED_PROMPT_ATTENTION = ("sdpa",)


def supports_shared_prompt(model) -> bool:
    """Whether `model` (through DDP / PEFT wrappers) can take a shared-prompt batch exactly: its
    attention implementation applies a custom 4D mask (`SHARED_PROMPT_ATTENTION`), its forward takes
    position_ids, and no layer uses sliding-window attention (a custom mask replaces the window)."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) not in SHARED_PROMPT_ATTENTION:
        return False
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return False
    if "sliding_attention" in (getattr(config, "layer_types", None) or []):
        return False
    return getattr(config, "sliding_window", None) is None or not getattr(config, "use_sliding_window", True)


def is_shared_batch(batch: dict) -> bool:
    """Whether a batch comes from `collate_shared_pairs` (else `collate_pairs`)."""
    return "segments" in batch


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding: (B, T) -> (B,).

    Found from the attention mask, never from the pad token id, so a tokenizer whose
    pad token equals its EOS token still scores the real last token.
    """
    T = attention_mask.shape[-1]
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).max(-1).values


# ---------------------------------------------------------------------------
# unpaired rows (KTO): prompt, completion, label
# ---------------------------------------------------------------------------
@dataclass
class UnpairedSet:
    """Tokenized unpaired examples: dicts `prompt_ids`, `completion_ids`, `label` (bool), `pair` (the
    preference row an example came from, or None) and `kl_completion_ids` (`add_kl_completions`)."""

    examples: list[dict]
    truncated: int = 0
    dropped_empty: int = 0
    from_pairs: int = 0

    @property
    def desirable(self) -> int:
        return sum(e["label"] for e in self.examples)

    def summary(self) -> str:
        n = len(self.examples)
        return (f"{n} examples ({self.desirable} desirable, {n - self.desirable} undesirable; {self.from_pairs} "
                f"preference pairs split into two), {self.truncated} truncated, {self.dropped_empty} with no "
                f"completion token left")


def unpaired_rows(row: dict, where: str) -> list[tuple]:
    """[(prompt, completion, label)] of one row: an unpaired row as it is, or a preference row as two
    (chosen -> True, rejected -> False: TRL's `unpair_preference_dataset`)."""
    if "chosen" in row or "rejected" in row:
        prompt, chosen, rejected = _row_parts(row, where)
        return [(prompt, chosen, True), (prompt, rejected, False)]
    missing = [c for c in ("prompt", "completion", "label") if c not in row]
    if missing:
        raise AlignError(f"{where}: missing column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}; "
                         f"unpaired data needs prompt, completion and label (true: desirable, false: undesirable), "
                         f"or preference rows with chosen and rejected; got columns {sorted(row)}")
    if not isinstance(row["label"], bool):
        raise AlignError(f"{where}: label must be true or false (a boolean), got {row['label']!r}")
    if row["completion"] in (None, "", []):
        raise AlignError(f"{where}: empty 'completion'")
    return [(row["prompt"] if row["prompt"] is not None else "", row["completion"], row["label"])]


def tokenize_unpaired(rows: Rows, tokenizer, *, max_length: int, key: str) -> UnpairedSet:
    """Tokenize every unpaired example (preference rows become two). A too-long example loses the
    end of its completion; one left with no scored token is dropped and counted (all: an error)."""
    out = UnpairedSet([])
    for i, row in enumerate(rows.rows):
        where = f"{key}: {rows.where(i)}"
        parts = unpaired_rows(row, where)
        pair = i if len(parts) == 2 else None
        out.from_pairs += pair is not None
        for prompt, completion, label in parts:
            prompt_ids, completion_ids = encode_prompt_completion(tokenizer, prompt, completion, where)
            room = max(max_length - len(prompt_ids), 0)
            out.truncated += len(completion_ids) > room
            completion_ids = completion_ids[:room]
            if len(completion_ids) < (1 if prompt_ids else 2):  # with no prompt the first token is not scored
                out.dropped_empty += 1
                continue
            out.examples.append({"prompt_ids": prompt_ids, "completion_ids": completion_ids, "label": label,
                                 "pair": pair})
    if not out.examples:
        raise AlignError(f"{key}: no usable example in {rows.origins[0][0]} ({out.summary()}); check data.max_length")
    return out


def add_kl_completions(examples: list[dict], seed: int) -> None:
    """Give each example a MISMATCHED completion `kl_completion_ids` for KTO's reference point: the
    completion of the example before it in a seeded shuffle, skipping examples with the same prompt
    (a preference row's two halves share theirs). Fixed once, so its reference log-prob is computed
    once like the others (TRL 1.16 rotates completions by one within each fixed batch instead)."""
    if len(examples) < 2:
        raise AlignError("kto: at least 2 examples are needed (the reference point pairs a prompt with another "
                         "example's completion)")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    for k, i in enumerate(order):
        for back in range(1, len(order)):
            j = order[k - back]
            if examples[j]["prompt_ids"] != examples[i]["prompt_ids"]:
                break
        examples[i]["kl_completion_ids"] = examples[j]["completion_ids"]


def kto_pair_view(example: dict) -> dict:
    """An unpaired example as a pair sharing its prompt: (completion, KL completion), so the pair machinery
    (`collate_pairs`, `collate_shared_pairs`, the preference stage's scorer) scores both in one forward."""
    return {"prompt_ids": example["prompt_ids"], "chosen_ids": example["completion_ids"],
            "rejected_ids": example["kl_completion_ids"]}


def label_balance_warning(desirable: int, undesirable: int, desirable_weight: float,
                          undesirable_weight: float) -> str | None:
    """A warning when lambda_D n_D / (lambda_U n_U) is outside KTO's eq. 8 range [1, 4/3], with TRL's
    suggestion (change ONE of the weights), else None."""
    n_d, n_u = max(desirable, 1), max(undesirable, 1)
    ratio = desirable_weight * n_d / (undesirable_weight * n_u)
    if 1.0 <= ratio <= 4 / 3:
        return None
    d_lo, d_hi = n_u * undesirable_weight / n_d, n_u * undesirable_weight / n_d * 4 / 3
    u_lo, u_hi = n_d * desirable_weight / n_u * 3 / 4, n_d * desirable_weight / n_u
    return (f"kto: {desirable} desirable and {undesirable} undesirable examples give desirable_weight x n_D / "
            f"(undesirable_weight x n_U) = {ratio:.2f}, outside [1, 1.33] (KTO paper, eq. 8); set EITHER "
            f"kto.desirable_weight in [{d_lo:.2f}, {d_hi:.2f}] OR kto.undesirable_weight in [{u_lo:.2f}, {u_hi:.2f}]")
