"""Shared test helpers: tiny recipes and weight comparison."""

from __future__ import annotations

import pathlib
import socket
import subprocess
import sys

import torch
from safetensors.torch import load_file

REPO = pathlib.Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port free now on 127.0.0.1 (the OS's pick; another process may take it before it is bound)."""
    return free_ports(1)[0]


def accelerate_launch(args: list[str], *, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m accelerate.commands.launch --main_process_port <a free port> *args` from the repository, output
    captured; launched again (once) when another process took the port between its pick and the bind."""
    for _ in range(2):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()), *args]
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0 or not any(m in proc.stderr for m in ("EADDRINUSE", "Address already in use")):
            break
    return proc


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports free now on 127.0.0.1 (all held open while the OS picks, so no two are equal)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tiny_sft_recipe(output_dir, **overrides) -> dict:
    """A seconds-long SFT recipe on 64 rows of the built-in task (no eval generation)."""
    recipe = {
        "stage": "sft",
        "output_dir": str(output_dir),
        "seed": 0,
        "model": {"name_or_path": "builtin:tiny"},
        "data": {"train": {"path": str(REPO / "data/arith/sft_train.jsonl"), "take": 64}, "max_length": 32},
        "train": {"max_steps": 3, "batch_size": 8, "lr": 1e-3, "lr_scheduler": "constant", "save_steps": 1000,
                  "log_steps": 1, "progress_bar": False},
        "eval": {"generate": False},
    }
    for key, value in overrides.items():
        node = recipe
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return recipe


def weights(output_dir) -> dict[str, torch.Tensor]:
    return load_file(str(pathlib.Path(output_dir) / "model.safetensors"))


def max_relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-12)).item() for k in a)


def save_dropout_model(folder, arch: str = "gpt2", p: float = 0.1):
    """A tiny random model with dropout p everywhere (GPT-2: resid/embd/attn; Llama: attention_dropout,
    which the attention modules copy at construction) and the built-in tokenizer, saved to `folder`."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from align import builtin

    tok = builtin.load_tokenizer()
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    if arch == "gpt2":
        config = GPT2Config(n_positions=128, n_embd=32, n_layer=2, n_head=2, resid_pdrop=p, embd_pdrop=p,
                            attn_pdrop=p, **ids)
    else:
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=2, attention_dropout=p, **ids)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return pathlib.Path(folder)


def grads_of(stage, batches):
    """Gradients of one step of `stage` over `batches`, normalised by their total weight as the engine does."""
    model = stage.model
    model.zero_grad(set_to_none=True)
    total = sum(b["_weight"] for b in batches)
    for b in batches:
        loss_sum, _ = stage.loss(model, b)
        (loss_sum / total).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
