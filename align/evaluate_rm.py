"""Reward-model scoring and evaluation: `align eval-rm` and the reward stage's held-out metrics.

The reward of a sequence is the score head's output at its last real token, found
from the attention mask (`preference_data.last_token_index`), not from the pad token
id as transformers' sequence-classification pooling does: with a tokenizer whose pad
token is its EOS token that pooling reads the token before the final EOS. Position ids
are computed from the attention mask, so left and right padding give the same rewards.

`align eval-rm` reports, on any preference set:

| figure | meaning |
|---|---|
| accuracy | share of pairs with r_chosen > r_rejected; a tie counts as wrong |
| ties | pairs with r_chosen == r_rejected (reported, counted wrong) |
| mean_margin | mean of r_chosen - r_rejected |
| subsets | accuracy per value of a `subset` column (RewardBench-style breakdown) |
| length_buckets | accuracy per quartile of pair length (prompt + longer answer, tokens) |
| longer_wins | share of pairs (answers of different lengths) where the longer answer gets the higher reward |
| chosen_longer | share of those pairs where the chosen answer is the longer: the accuracy of "prefer longer" |

Under `accelerate launch` each process scores every n-th pair, the scores are gathered
once, and only the main process prints and writes files.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from align.data import is_right_padded
from align.evaluate import shard
from align.preference_data import (
    collate_pairs,
    collate_shared_pairs,
    is_shared_batch,
    last_token_index,
    pair_length,
    shared_pair_width,
    supports_shared_prompt,
)

HEAD_NAMES = ("score", "classifier")


# ---------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------
def score_head(model) -> torch.nn.Module:
    """The scalar head of a sequence-classification model (through DDP / PEFT wrappers)."""
    found = [(name.count("."), name, module) for name, module in model.named_modules()
             if name.rsplit(".", 1)[-1] in HEAD_NAMES]
    if not found:
        raise ValueError(f"{type(model).__name__} has no score head (a module named {' or '.join(HEAD_NAMES)})")
    return min(found, key=lambda f: f[0])[2]


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar reward of each row, read at its last real token: (N, T) -> (N,) float32.

    The forward goes through `model` itself (so DDP/DeepSpeed hooks run); the per-token
    scores (N, T, 1) are taken from the head with a forward hook.
    """
    if is_right_padded(attention_mask):
        # causal attention alone keeps every real token away from the pads after it: no mask
        # needed, so sdpa takes its causal kernel (no (T, T) mask; much less memory on CPU)
        scores = _token_scores(model, input_ids=input_ids)
    else:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (N, T)
        scores = _token_scores(model, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    last = last_token_index(attention_mask)  # (N,)
    return scores.gather(1, last[:, None]).squeeze(1).float()


def _token_scores(model, **inputs) -> torch.Tensor:
    """The score head's output at every position: (N, T), from a forward hook on the head."""
    captured = []
    handle = score_head(model).register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        model(**inputs, use_cache=False)
    finally:
        handle.remove()
    scores = captured[-1]
    return scores[..., 0] if scores.dim() == 3 else scores  # (N, T)


def pair_rewards(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected), each (B,) float32, from one forward of a pair batch.

    A shared-prompt batch (`collate_shared_pairs`, one row [prompt, chosen, rejected] per
    pair; prefix sharing, Wang et al. 2024) reads the chosen reward at the last chosen token
    and the rejected reward at the last rejected token, whose context excludes the chosen
    tokens (4D mask) and whose positions continue the prompt's: the same rewards as the two
    rows [prompt, chosen], [prompt, rejected]. A `collate_pairs` batch (2B rows) reads each
    row at its last real token.
    """
    if not is_shared_batch(batch):
        return sequence_rewards(model, batch["input_ids"], batch["attention_mask"]).chunk(2)
    scores = _token_scores(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"])  # (B, T)
    return (scores.gather(1, batch["chosen_last"][:, None]).squeeze(1).float(),
            scores.gather(1, batch["rejected_last"][:, None]).squeeze(1).float())


@torch.no_grad()
def score_pairs(model, examples: list[dict], pad_id: int, *, batch_size: int,
                accelerator=None, shared_prompt: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected), each (N,) float32 on CPU in the order of `examples`.

    Each process scores its share (every n-th pair); the shares are gathered once.
    shared_prompt: one row per pair (`collate_shared_pairs`) or two (`collate_pairs`);
    None: shared when the model's attention takes a 4D mask (`supports_shared_prompt`).
    """
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    if shared_prompt is None:
        shared_prompt = supports_shared_prompt(model)
    collate, width = (collate_shared_pairs, shared_pair_width) if shared_prompt else (collate_pairs, pair_length)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    mine = list(shard(len(examples), accelerator))
    mine.sort(key=lambda i: -width(examples[i]))
    per_process = math.ceil(len(examples) / (accelerator.num_processes if accelerator is not None else 1))
    rows = torch.full((per_process, 3), -1.0, dtype=torch.float64)  # (index, r_chosen, r_rejected)
    for start in range(0, len(mine), batch_size):
        chunk = mine[start: start + batch_size]
        batch = collate([examples[i] for i in chunk], pad_id)
        chosen, rejected = pair_rewards(model, {k: v.to(device) for k, v in batch.items()})
        rows[start: start + len(chunk), 0] = torch.tensor(chunk, dtype=torch.float64)
        rows[start: start + len(chunk), 1] = chosen.double().cpu()
        rows[start: start + len(chunk), 2] = rejected.double().cpu()
    model.train(was_training)
    if accelerator is not None and accelerator.num_processes > 1:
        rows = accelerator.gather(rows.to(accelerator.device)).cpu()  # (P * per_process, 3)
    rows = rows[rows[:, 0] >= 0]
    rows = rows[rows[:, 0].argsort()]
    return rows[:, 1].float(), rows[:, 2].float()


# ---------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------
def summarize(examples: list[dict], chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    """Accuracy and its breakdowns (see the module docstring) from per-pair rewards."""
    margins = chosen - rejected
    correct = margins > 0
    n = len(examples)
    out = {"accuracy": correct.float().mean().item(), "n": n, "ties": int((margins == 0).sum()),
           "mean_margin": margins.mean().item(), "reward_chosen": chosen.mean().item(),
           "reward_rejected": rejected.mean().item()}
    subsets: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        if "subset" in ex:
            subsets.setdefault(ex["subset"], []).append(i)
    if subsets:
        out["subsets"] = {name: correct[idx].float().mean().item() for name, idx in sorted(subsets.items())}
        out["subset_counts"] = {name: len(idx) for name, idx in sorted(subsets.items())}
    out["length_buckets"] = _length_buckets(examples, correct)
    c_len = torch.tensor([len(ex["chosen_ids"]) for ex in examples])
    r_len = torch.tensor([len(ex["rejected_ids"]) for ex in examples])
    differ = c_len != r_len
    if differ.any():
        chosen_longer = c_len[differ] > r_len[differ]
        longer_higher = torch.where(chosen_longer, margins[differ] > 0, margins[differ] < 0)
        out["longer_wins"] = longer_higher.float().mean().item()
        out["chosen_longer"] = chosen_longer.float().mean().item()
    return out


def _length_buckets(examples: list[dict], correct: torch.Tensor, buckets: int = 4) -> list[dict]:
    lengths = torch.tensor([len(ex["prompt_ids"]) + max(len(ex["chosen_ids"]), len(ex["rejected_ids"]))
                            for ex in examples])
    edges = sorted({int(torch.quantile(lengths.double(), q / buckets).item()) for q in range(1, buckets)})
    out, low = [], int(lengths.min())
    for high in edges + [int(lengths.max())]:
        inside = (lengths >= low) & (lengths <= high)
        if inside.any():
            out.append({"tokens": f"{low}-{high}", "n": int(inside.sum()),
                        "accuracy": correct[inside].float().mean().item()})
        low = high + 1
    return out


def format_table(summary: dict, title: str = "") -> str:
    lines = [title] if title else []
    lines += [f"{'accuracy':<24}{summary['accuracy']:.4f}   (ties count as wrong)",
              f"{'pairs':<24}{summary['n']}",
              f"{'ties':<24}{summary['ties']}",
              f"{'mean margin':<24}{summary['mean_margin']:+.4f}",
              f"{'mean reward chosen':<24}{summary['reward_chosen']:+.4f}",
              f"{'mean reward rejected':<24}{summary['reward_rejected']:+.4f}"]
    if "longer_wins" in summary:
        lines.append(f"{'longer answer wins':<24}{summary['longer_wins']:.4f}   "
                     f"(chosen is the longer in {summary['chosen_longer']:.4f})")
    if summary.get("subsets"):
        lines.append("")
        lines.append(f"{'subset':<32}{'n':>7}{'accuracy':>10}")
        for name, acc in summary["subsets"].items():
            lines.append(f"{name[:31]:<32}{summary['subset_counts'][name]:>7}{acc:>10.4f}")
    lines.append("")
    lines.append(f"{'length (tokens)':<32}{'n':>7}{'accuracy':>10}")
    for bucket in summary["length_buckets"]:
        lines.append(f"{bucket['tokens']:<32}{bucket['n']:>7}{bucket['accuracy']:>10.4f}")
    return "\n".join(lines)


def write_plot(path: str | Path, summary: dict, margins: torch.Tensor, title: str = "") -> Path:
    """PNG: the margin histogram (left) and accuracy per subset, or per length bucket (right)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    try:
        left.hist(margins.numpy(), bins=40, color="tab:blue", alpha=0.8)
        left.axvline(0.0, color="black", linewidth=1)
        left.set_xlabel("r_chosen - r_rejected")
        left.set_ylabel("pairs")
        left.set_title(f"margins (accuracy {summary['accuracy']:.3f}, n={summary['n']})")
        if summary.get("subsets"):
            names, values, what = list(summary["subsets"]), list(summary["subsets"].values()), "subset"
        else:
            names = [b["tokens"] for b in summary["length_buckets"]]
            values, what = [b["accuracy"] for b in summary["length_buckets"]], "length (tokens)"
        right.bar(range(len(names)), values, color="tab:green")
        right.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        right.axhline(0.5, color="gray", linestyle="--", linewidth=1)
        right.set_ylim(0, 1)
        right.set_xlabel(what)
        right.set_ylabel("accuracy")
        right.set_title(f"accuracy per {what}")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


# ---------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------
def evaluate_reward_model(model_path: str, data, *, output: str | None = None, plot: str | None = None,
                          batch_size: int = 32, max_length: int = 1024, prompt_truncation: str = "keep_end",
                          quiet: bool = False) -> dict:
    """`align eval-rm`: score every pair of `data` with the reward model at `model_path`.

    `model_path` is a saved reward model or a PEFT adapter folder of one. Returns the
    summary (also written to `output` as JSON, and plotted to `plot`, on the main process).
    """
    from align import models
    from align.accel import make_accelerator
    from align.data import load_rows
    from align.preference_data import tokenize_preferences
    from align.recipe import ModelConfig, TrainConfig

    accelerator = make_accelerator(TrainConfig(mixed_precision="no"), ".")
    cfg = ModelConfig(name_or_path=model_path)
    tokenizer = models.load_tokenizer(cfg)
    pairs = tokenize_preferences(load_rows(data, key="--data"), tokenizer, max_length=max_length, key="--data",
                                 prompt_truncation=prompt_truncation, scores_tokens=False)
    model = models.load_model(cfg, tokenizer, head="score", trainable=False).to(accelerator.device)
    models.check_positions(model, max(map(pair_length, pairs.examples)), f"--max-length {max_length}")
    chosen, rejected = score_pairs(model, pairs.examples, tokenizer.pad_token_id, batch_size=batch_size,
                                   accelerator=accelerator)
    summary = summarize(pairs.examples, chosen, rejected)
    summary.update(model=str(model_path), data=str(data), dropped_identical=pairs.dropped_identical,
                   dropped_empty=pairs.dropped_empty, truncated=pairs.truncated)
    if accelerator.is_main_process:
        if not quiet:
            print(format_table(summary, f"reward model {model_path} on {data} ({pairs.summary()})"))
        if output:
            from align.io_utils import atomic_write_json

            Path(output).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(Path(output), summary)
        if plot:
            write_plot(plot, summary, chosen - rejected, title=f"{Path(model_path).name} on {Path(str(data)).name}")
    accelerator.wait_for_everyone()
    return summary

