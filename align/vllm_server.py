"""Server mode of the vLLM rollout backend (`rollout.mode: server`): generation in a process of its own.

`align vllm-serve --model M` runs one vLLM engine (`align.vllm_backend.VLLMSampler`, the colocated
engine's code) behind a small HTTP server, on GPUs the training does not use (as TRL's
`trl vllm-serve`). A GRPO or PPO run with `rollout.backend: vllm` and `rollout.mode: server` reaches
it at `rollout.server_host:server_port` through `VLLMServerClient`, which the stages use as they use
the colocated engine (`sync`, `sample`):

- **Weights**: when due (`rollout.sync_steps`) the training's main process pushes the policy's
  weights (LoRA merged, ZeRO-3 gathered by the caller: `merged_state_dict`) over a process group of
  two members, the server (rank 0) and itself (rank 1): gloo on a CPU, NCCL between GPUs, its store
  on the server at the group port `/health` gives. Parameters travel in buckets of flat tensors in
  the served dtype; the server loads them and resets its prefix cache before it answers. Every
  training process waits at a barrier until the push is done, then samples.
- **Sampling**: each process sends its own rows with their own seeds (`align.rollout.row_keys`, from
  the rows' global indices), so the server samples what a colocated engine with the same weights
  samples, on any number of training processes.
- **Checks**: the client refuses at once (one line) a server that does not answer within
  `rollout.server_timeout` seconds, one whose `max_model_len` cannot hold the longest prompt +
  completion, and weights whose names or shapes differ from the served model's.

HTTP endpoints (JSON): GET /health; POST /init_communicator {backend, params: [[name, shape], ...]}
-> {session}; POST /update_weights {session} (answers once the weights are loaded; the client
broadcasts while it waits); POST /generate {prompts, max_tokens, temperature, top_p, top_k,
stop_token_ids, seeds} -> {completions: [[token ids, log-probs], ...]}. Requests run one at a time.

Tested on a CPU with gloo (tests/test_vllm.py). NCCL between GPUs and a server on several GPUs
(tensor parallel) are not built or tested here: the server runs one in-process engine.
"""

from __future__ import annotations

import datetime
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from align.errors import AlignError
from align.vllm_backend import RolloutEngine, merged_state_dict

BUCKET_ELEMENTS = 2**27  # parameters travel in flat tensors of at most this many elements (256 MiB in bf16)
SERVER_RANK, TRAINER_RANK = 0, 1


def weight_buckets(shapes: list[list[int]], limit: int = BUCKET_ELEMENTS) -> list[list[int]]:
    """Indices of `shapes` grouped in order into buckets of at most `limit` elements (a larger tensor alone)."""
    buckets, size = [[]], 0
    for i, shape in enumerate(shapes):
        n = torch.Size(shape).numel()
        if buckets[-1] and size + n > limit:
            buckets.append([])
            size = 0
        buckets[-1].append(i)
        size += n
    return [b for b in buckets if b]


def _group(store, rank: int, backend: str, timeout: datetime.timedelta):
    """The two-member process group over `store` (gloo, or NCCL on GPUs)."""
    import torch.distributed as dist

    if backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, 2)
    return dist.ProcessGroupGloo(store, rank, 2, timeout)


def _broadcast(group, tensor: torch.Tensor) -> None:
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = TRAINER_RANK
    group.broadcast([tensor], opts).wait()


class _BadRequest(Exception):
    """A request the server refuses (HTTP 400), with what was wrong."""


class WeightServer:
    """The served engine and the weights group of the current training run (one at a time)."""

    def __init__(self, sampler, shapes: dict[str, list[int]], *, model: str, store, group_port: int,
                 timeout: datetime.timedelta):
        self.sampler, self.shapes, self.model, self.timeout = sampler, shapes, model, timeout
        self.dtype = sampler.dtype
        self.store, self.group_port = store, group_port
        self.lock = threading.Lock()
        self.session, self.joining = 0, None
        self.params: list[tuple[str, list[int]]] = []
        self.backend = "gloo"

    def health(self) -> dict:
        return {"model": self.model, "dtype": str(self.dtype).removeprefix("torch."),
                "max_model_len": self.sampler.max_model_len, "group_port": self.group_port,
                "parameters": len(self.shapes)}

    def init_communicator(self, body: dict) -> dict:
        """A new training run's weights group (replacing any earlier one), after checking its parameters."""
        import torch.distributed as dist

        params = [(name, list(shape)) for name, shape in body["params"]]
        for name, shape in params:
            if name not in self.shapes:
                raise _BadRequest(f"the training model has a weight {name!r} the served model ({self.model}) "
                                  "does not have: start the server with the policy's model")
            if self.shapes[name] != shape:
                raise _BadRequest(f"weight {name!r}: shape {shape} in the training model, {self.shapes[name]} in "
                                  f"the served model ({self.model})")
        backend = body.get("backend", "gloo")
        if backend not in ("gloo", "nccl"):
            raise _BadRequest(f"backend {backend!r}; expected gloo or nccl")
        with self.lock:
            self.session += 1
            self.params, self.backend = params, backend
            store = dist.PrefixStore(f"align-session-{self.session}", self.store)
            result: dict = {}

            def join():
                try:
                    result["group"] = _group(store, SERVER_RANK, backend, self.timeout)
                except Exception as err:  # reported by the next update_weights
                    result["error"] = err

            self.joining = (threading.Thread(target=join, daemon=True), result)
            self.joining[0].start()
            return {"session": self.session}

    def update_weights(self, body: dict) -> dict:
        """Receive every parameter of the session (broadcast by the trainer), load them, reset the prefix cache."""
        with self.lock:
            if body.get("session") != self.session or self.joining is None:
                raise _BadRequest(f"session {body.get('session')} is not the current one ({self.session}): "
                                  "another training run joined this server since")
            thread, result = self.joining
            thread.join()
            if "error" in result:
                raise RuntimeError(f"joining the weights group failed: {result['error']}")
            group = result["group"]
            device = "cuda" if self.backend == "nccl" else "cpu"
            for bucket in weight_buckets([shape for _, shape in self.params]):
                sizes = [torch.Size(self.params[i][1]).numel() for i in bucket]
                flat = torch.empty(sum(sizes), dtype=self.dtype, device=device)
                _broadcast(group, flat)
                pieces = flat.split(sizes)
                self.sampler.load([(self.params[i][0], piece.view(self.params[i][1]))
                                   for i, piece in zip(bucket, pieces)])
            return {"loaded": len(self.params)}

    def generate(self, body: dict) -> dict:
        with self.lock:
            done = self.sampler.complete(body["prompts"], max_new_tokens=int(body["max_tokens"]),
                                         temperature=float(body["temperature"]), top_p=float(body["top_p"]),
                                         top_k=int(body["top_k"]), stop_ids=list(body["stop_token_ids"]),
                                         seeds=body.get("seeds"))
            return {"completions": [[tokens, logps] for tokens, logps in done]}


def _handler(server: WeightServer):
    routes = {"/init_communicator": server.init_communicator, "/update_weights": server.update_weights,
              "/generate": server.generate}

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, code: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path == "/health":
                self._answer(200, server.health())
            else:
                self._answer(404, {"error": f"no GET {self.path}; GET /health"})

        def do_POST(self):  # noqa: N802
            route = routes.get(self.path)
            if route is None:
                self._answer(404, {"error": f"no POST {self.path}; expected one of {', '.join(routes)}"})
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                self._answer(200, route(body))
            except (_BadRequest, KeyError, ValueError, TypeError) as err:
                self._answer(400, {"error": f"{type(err).__name__}: {err}" if not isinstance(err, _BadRequest)
                                   else str(err)})
            except Exception as err:  # the server keeps serving; the client reports it
                self._answer(500, {"error": f"{type(err).__name__}: {err}"})

        def log_message(self, format, *args):  # noqa: A002 (quiet: one line per request is noise)
            pass

    return Handler


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, group_port: int = 51216,
          dtype: str = "auto", revision: str | None = None, max_model_len: int | None = None, seed: int = 0,
          gpu_memory_utilization: float = 0.9, trust_remote_code: bool = False, ready=None) -> None:
    """`align vllm-serve`: load `model` with align's loader (hub id, folder or builtin:), start the engine with its
    weights, and serve until interrupted. `ready(httpd)`: called once listening (tests stop the server with it)."""
    from align import models
    from align.recipe import ModelConfig
    from align.vllm_backend import VLLMSampler, require_vllm

    require_vllm("align vllm-serve")
    timeout = datetime.timedelta(minutes=30)
    try:  # both ports first: a taken one is reported in seconds, not after the model has loaded
        httpd = ThreadingHTTPServer((host, port), BaseHTTPRequestHandler)
    except OSError as err:
        raise AlignError(f"align vllm-serve: cannot listen on {host}:{port} ({err.strerror or err}); is another "
                         "server there? choose another --port") from None
    try:
        store = torch.distributed.TCPStore("0.0.0.0", group_port, None, True, timeout, wait_for_workers=False)
    except (RuntimeError, OSError) as err:
        httpd.server_close()
        raise AlignError(f"align vllm-serve: cannot open the weights group's store on port {group_port} "
                         f"({str(err).splitlines()[0]}); choose another --group-port") from None
    cfg = ModelConfig(name_or_path=model, revision=revision, dtype=dtype, trust_remote_code=trust_remote_code)
    tokenizer = models.load_tokenizer(cfg)
    policy = models.load_model(cfg, tokenizer, trainable=False)
    limit = max_model_len or getattr(policy.config, "max_position_embeddings", None) or 4096
    sampler = VLLMSampler(max_model_len=limit, seed=seed, gpu_memory_utilization=gpu_memory_utilization)
    sampler.sync(policy)
    shapes = {name: list(value.shape) for name, value in merged_state_dict(policy).items()}
    del policy
    weights = WeightServer(sampler, shapes, model=model, store=store, group_port=group_port, timeout=timeout)
    httpd.RequestHandlerClass = _handler(weights)
    print(f"vLLM server for {model} ({weights.health()['dtype']}, max_model_len {limit}) at http://{host}:{port}; "
          f"weights group on port {group_port}", flush=True)
    if ready is not None:
        ready(httpd)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()


class VLLMServerClient(RolloutEngine):
    """The training side of server mode: `sync` pushes weights (main process), `sample` asks for completions.

    Construction waits up to `timeout` seconds for the server's /health and checks that its max_model_len
    holds `max_model_len` tokens.
    """

    def __init__(self, *, host: str, port: int, timeout: float, max_model_len: int, sync_steps: int = 1):
        super().__init__(sync_steps)
        self.url = f"http://{host}:{port}"
        self.host, self.timeout = host, timeout
        self.info = self._wait_for_server()
        if self.info["max_model_len"] < max_model_len:
            raise AlignError(f"rollout.mode: server: the vLLM server at {self.url} holds {self.info['max_model_len']} "
                             f"tokens a sequence, fewer than the longest prompt + max_new_tokens ({max_model_len}): "
                             "restart it with a larger --max-model-len")
        self.dtype = getattr(torch, self.info["dtype"])
        self.session, self.group = None, None

    def _wait_for_server(self) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=10) as answer:
                    return json.loads(answer.read())
            except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
                if time.monotonic() > deadline:
                    raise AlignError(f"rollout.mode: server: no vLLM server answered at {self.url}/health within "
                                     f"rollout.server_timeout={self.timeout:g} s ({err}); start one with "
                                     "`align vllm-serve --model <the policy's model>` or use rollout.mode: "
                                     "colocate") from None
                time.sleep(1.0)

    def _post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as err:
            message = json.loads(err.read() or b"{}").get("error", err.reason)
            if err.code == 400:
                raise AlignError(f"rollout.mode: server: the vLLM server at {self.url} refused {path}: "
                                 f"{message}") from None
            raise RuntimeError(f"vLLM server at {self.url}{path}: {message}") from None

    def _join(self, weights: dict[str, torch.Tensor]) -> None:
        """Announce this run's parameters (the server checks them) and join the weights group as rank 1."""
        import torch.distributed as dist

        first = next(iter(weights.values()))
        backend, self.device = ("nccl", first.device) if first.is_cuda else ("gloo", torch.device("cpu"))
        params = [[name, list(value.shape)] for name, value in weights.items()]
        self.session = self._post("/init_communicator", {"backend": backend, "params": params})["session"]
        store = dist.TCPStore(self.host, self.info["group_port"], None, False,
                              datetime.timedelta(seconds=max(self.timeout, 60)))
        prefixed = dist.PrefixStore(f"align-session-{self.session}", store)
        self.group = _group(prefixed, TRAINER_RANK, backend, datetime.timedelta(minutes=30))
        self._store = store  # the group's store lives as long as the group

    def _push(self, weights: dict[str, torch.Tensor]) -> None:
        items = list(weights.items())
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(self._post, "/update_weights", {"session": self.session})
            for bucket in weight_buckets([list(v.shape) for _, v in items]):
                flat = torch.cat([items[i][1].reshape(-1).to(device=self.device, dtype=self.dtype) for i in bucket])
                _broadcast(self.group, flat)
            answer.result()

    def sync(self, model, step: int = 0) -> bool:
        """Push `model`'s weights (the bare module, whole) when due at optimizer step `step` (main process only;
        every process waits until the server has them); -> whether pushed."""
        if not self.due(step):
            return False
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not distributed or torch.distributed.get_rank() == 0:
            weights = merged_state_dict(model)
            if self.group is None:
                self._join(weights)
            self._push(weights)
        if distributed and torch.distributed.get_world_size() > 1:
            torch.distributed.barrier()
        self.synced_step = step
        return True

    def complete(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
                 top_k: int, stop_ids: list[int], seeds: list[int] | None) -> list[tuple[list[int], list[float]]]:
        """As `VLLMSampler.complete`, from the server."""
        body = {"prompts": [list(map(int, p)) for p in prompts], "max_tokens": max_new_tokens,
                "temperature": temperature, "top_p": top_p, "top_k": top_k, "stop_token_ids": list(stop_ids),
                "seeds": seeds}
        return [(tokens, logps) for tokens, logps in self._post("/generate", body)["completions"]]
