"""`RLTrainer`: what every RL algorithm shares, as one LightningModule base class.

An algorithm (GRPO, RLOO) subclasses it and supplies two pure pieces: how rewards become
advantages (`compute_advantages`) and the loss on one optimizer step's rollouts (`policy_objective`).
Everything else lives here once: loading the policy and the frozen reference, batched rollouts and
rewards, reusing one generation for several optimizer updates, logging, and the optimizer.

One `training_step` is one *generation*: it rolls out the batch's prompts, then makes
`num_iterations * steps_per_generation` optimizer updates from it (TRL's mu and
steps_per_generation), which is why optimization is manual: `trainer.global_step` counts optimizer
updates, so `max_steps` and `every_n_train_steps` are in updates, as in TRL.
"""

from __future__ import annotations

import contextlib
import copy
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Sequence

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from transformers import get_scheduler

from retrain.core.errors import ConfigError, TrainingFault
from retrain.core.records import PromptRecord
from retrain.environment.base import Environment, Trajectory
from retrain.environment.single_turn import SingleTurnEnvironment
from retrain.models.loading import PolicyConfig, ensure_tiny_model, is_adapter_model, load_policy, load_tokenizer
from retrain.reward.calculator import RewardCalculator, RewardResult
from retrain.trainer.base import BaseTrainer
from retrain.trainer.cadence import align_checkpoint_cadence
from retrain.rollout.context import check_datamodule_prompts, context_length
from retrain.trainer.experience import (
    Experience, completion_logps, episode_rows, logps_path, pack_sampler_logps, pack_trajectories, packing_problem,
)
from retrain.trainer.micro_batches import plan_micro_batches, stretch_plan
from retrain.trainer.host_memory import tune_malloc_for_reuse
from retrain.trainer.losses import LossStats, masked_mean
from retrain.trainer.off_policy import sampler_mismatch
from retrain.trainer.rng_state import random_states, restore_random_states
from retrain.trainer.reporting import episode_metrics, logged_step, policy_summary
from retrain.trainer.metrics import MajAtK, PassAtK
from retrain.rollout.engine import RolloutEngine
from retrain.rollout.sampler import Backend, BatchingSampler
from retrain.rollout.sharding import generation_context, is_sharded, shard_model
from retrain.rollout.vllm_engine import VLLMEngine, VLLMOptions, vllm_unavailable_reason

SchedulerType = Literal["constant", "constant_with_warmup", "linear", "cosine"]


@dataclass
class LossInputs:
    """What an extra loss term (e.g. an entropy bonus) sees for one optimizer step."""

    logps: torch.Tensor  # [N, C]
    entropy: torch.Tensor  # [N, C], with grad when a term asked for it
    mask: torch.Tensor  # [N, C]
    experience: Experience


LossTerm = Callable[[LossInputs], tuple[torch.Tensor, dict[str, torch.Tensor]]]
GroupFilter = Callable[["RLTrainer", Sequence[PromptRecord], list[Trajectory], RewardResult], tuple[list[Trajectory], RewardResult]]


def check_strategy(strategy: Any) -> None:
    """Refuse, before the policy loads or any rollout runs, a Lightning strategy that cannot run this
    module's training step."""
    if isinstance(strategy, FSDPStrategy):
        # Seen on an H100 (benchmarks/NOTES.md): FSDP1 wraps the whole LightningModule, so
        # training_step runs inside the root's forward, and the manual-optimization backward there
        # trips FSDP1's state checks ("Expects BACKWARD_PRE or BACKWARD_POST state but got
        # HandleTrainingState.FORWARD"; Lightning issue #19685). FSDP2 shards only the policy.
        raise ConfigError(
            "trainer.strategy: Lightning's FSDPStrategy (FSDP1) cannot run retrain's training step, which calls "
            "backward inside FSDP1's root forward (Lightning issue #19685). Use FSDP2 instead:\n"
            "  strategy:\n    class_path: lightning.pytorch.strategies.ModelParallelStrategy\n"
            "    init_args: {data_parallel_size: <num_nodes x devices>, tensor_parallel_size: 1}\n"
            "(configs/fsdp_multinode.yaml and configs/quickstart_fsdp.yaml show it in full)."
        )


class RLTrainer(pl.LightningModule, BaseTrainer):
    """Shared machinery of retrain's RL algorithms (see the module docstring).

    Args:
        policy: the model to train and how to load it.
        reward: the reward functions and verifiers that score each rollout.
        environment: the world each rollout happens in (default: one prompt, one completion).
        num_generations: rollouts per prompt (the group size G); at least 2.
        max_completion_length: the most tokens after the prompt in one rollout.
        temperature: sampling temperature; log-probs are taken at the same temperature.
        top_p: nucleus sampling threshold (1.0 = off).
        top_k: top-k sampling (0 = off).
        beta: KL coefficient to a frozen copy of the initial policy (0 = no reference model).
        epsilon: clip range of the importance ratio.
        epsilon_high: upper clip range (DAPO's clip-higher); default `epsilon`.
        mask_truncated_completions: give rollouts that hit the token budget no loss.
        num_iterations: optimizer passes over each generation (mu); > 1 reuses rollouts off-policy,
            with log-probs stored at generation time.
        steps_per_generation: optimizer steps one generation is split into; the generation is
            `data.batch_size * num_generations` rollouts, and must divide evenly.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        adam_betas: AdamW betas.
        max_grad_norm: clip the gradient norm to this before each update (None = no clipping).
        lr_scheduler_type: learning-rate schedule over `trainer.max_steps` (transformers' schedulers).
        warmup_steps: linear warm-up steps of the schedule.
        num_completions_to_keep: sample completions kept from each step for logging tables.
        eval_num_generations: samples per prompt (k) in validation and test (default:
            `num_generations`); pass@k and maj@k are computed over them.
        eval_temperature: sampling temperature in validation and test (default: `temperature`).
        eval_success_threshold: a sample counts as correct for pass@k / maj@k when its reward is at
            least this.
        micro_batch_size: rollouts per forward/backward pass; an optimizer step's rollouts are
            processed in micro-batches of this size and their gradients accumulated, to bound
            memory (None = all at once). The result does not depend on it.
        generation_backend: "auto" samples Llama-family policies (Llama, Qwen2, Qwen3, Mistral;
            LoRA included) with retrain's own KV-cached decoder (same weights and sampling rules, far less
            per-token overhead) and any other policy with `transformers`' `generate` (the run's first
            lines say which, and why); "retrain" insists on the decoder (a policy it cannot sample is
            refused before the first rollout); "transformers" always uses `generate`; "vllm" samples
            with a vLLM engine colocated in each training process (`vllm` options; the policy's
            weights are pushed into it before every rollout phase).
        vllm: the colocated vLLM engine's options (`retrain.rollout.vllm_engine.VLLMOptions`), for
            `generation_backend: vllm`.
        micro_batch_tokens: instead of a fixed number of rows, fill each forward/backward pass with
            rollouts (longest first) up to this many tokens (prompt + completion, padding counted
            unless `pack_rows`); a rollout longer than the budget gets a pass of its own. With
            `micro_batch_size` too, both bounds hold. The result does not depend on it.
        pack_rows: run each pass's rollouts as one sequence without padding (position ids restart
            per rollout; `transformers` keeps attention inside each one). Less work on padding;
            with `sdpa`/`eager` attention the pass's mask is dense in its total length, so bound
            the passes with `micro_batch_tokens`; `flash_attention_2` runs packed rows natively.
        logits_chunk_size: tokens per chunk of the LM head when the completion log-probs and
            entropies are computed from the final hidden states (`retrain.trainer.lm_head`, the
            default), so no `[N, C, V]` logits exist; memory O(chunk x V), one more head product per
            chunk in the backward. null: about 16M logits per chunk (`default_chunk_size`).
        lm_head_kernel: the chunked head's kernel: "retrain" (`retrain.trainer.lm_head`: token
            chunks, the whole vocabulary at once) or "trl" (TRL's `ChunkedLogProbFunction`: token and
            vocabulary tiles with an online log-sum-exp, a Triton kernel on CUDA; `logits_chunk_size`
            is then its vocabulary tile, default 32768).
        full_logits: ask the model for all `[N, C, V]` logits instead (retrain before the chunked head;
            more memory). Policies the chunked path does not cover (heads other than a plain linear layer of Llama, Qwen2/3, Mistral or GPT-2, e.g. a LoRA-adapted head) use it anyway. The chunked
            head runs inside the model's own forward, so PEFT, FSDP2 and `policy.compile` (which
            traces it into the same graph) cover it; a compiled policy under FSDP2 takes the full
            logits (`_compiled_and_sharded`).
        old_logps_from_sampler: when a generation feeds several updates (`num_iterations` or
            `steps_per_generation` > 1), use the sampler's log-probs as the old log-probs instead of
            a forward pass over the generation. Safe when the sampler draws from exactly the
            trainer's distribution: retrain's decoder or `generate` on the policy's own weights, in
            float32, with top_k 0 and top_p 1 or with `truncated_logps` (`train/sampler/kl` reads ~0;
            check it). Not with bf16 sampling or another engine, whose mismatch would then go
            uncorrected.
        truncated_logps: take every log-prob the loss uses (the policy's, the old and the reference
            policy's) under the distribution the sampler draws from: the softmax at the temperature
            restricted to top_k, then to the top_p nucleus, renormalized, each model under its own
            nucleus, with the completion's own token always kept (a token drawn at the nucleus edge
            must not get log-prob -inf from a forward that rounds differently). Off (TRL's choice):
            the full softmax at the temperature, so with top_k or top_p set the sampler's log-probs
            and the trainer's describe different distributions and `train/sampler/*` measures the
            truncation as well as any engine mismatch; on, they read ~0 in float32. No effect with
            top_k 0 and top_p 1. Costs one nucleus search per token of the loss (fast for a trained
            model's peaked rows), in the forward and again in the backward.
    """

    def __init__(
        self,
        policy: PolicyConfig,
        reward: RewardCalculator,
        environment: Optional[Environment] = None,
        num_generations: int = 8,
        max_completion_length: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        beta: float = 0.0,
        epsilon: float = 0.2,
        epsilon_high: Optional[float] = None,
        mask_truncated_completions: bool = False,
        num_iterations: int = 1,
        steps_per_generation: int = 1,
        learning_rate: float = 1e-6,
        weight_decay: float = 0.0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        max_grad_norm: Optional[float] = 1.0,
        lr_scheduler_type: SchedulerType = "constant",
        warmup_steps: int = 0,
        num_completions_to_keep: int = 8,
        eval_num_generations: Optional[int] = None,
        eval_temperature: Optional[float] = None,
        eval_success_threshold: float = 1.0,
        micro_batch_size: Optional[int] = None,
        generation_backend: Backend = "auto",
        old_logps_from_sampler: bool = False,
        vllm: Optional[VLLMOptions] = None,
        logits_chunk_size: Optional[int] = None,
        full_logits: bool = False,
        micro_batch_tokens: Optional[int] = None,
        pack_rows: bool = False,
        lm_head_kernel: Literal["retrain", "trl"] = "retrain",
        truncated_logps: bool = False,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.save_hyperparameters(ignore=["reward", "environment"])
        problems = self.option_problems()
        if problems:
            raise ConfigError(f"Invalid {type(self).__name__} options (model.init_args):\n  - " + "\n  - ".join(problems))
        self.policy_config = policy
        self.vllm_options = vllm or VLLMOptions()
        self.calculator = reward
        self.environment = environment or SingleTurnEnvironment()
        self.rollouts = RolloutEngine(self.environment, reward)
        self.policy: Optional[torch.nn.Module] = None
        self._compiled_policy: Optional[torch.nn.Module] = None  # PolicyConfig.compile; not a submodule
        self.ref_policy: Optional[torch.nn.Module] = None
        self.tokenizer = None
        self.extra_loss_terms: list[LossTerm] = []  # added by callbacks, e.g. EntropyBonus
        self.entropy_grad = False  # a loss term differentiates through the entropy
        self.group_filter: Optional[GroupFilter] = None  # set by DynamicSampling
        self.eval_metrics = torch.nn.ModuleDict(
            {stage: torch.nn.ModuleDict({"pass": PassAtK(), "maj": MajAtK()}) for stage in ("val", "test")}
        )
        self.last_samples: list[dict[str, Any]] = []
        self._last_trajectories: list[Trajectory] = []
        self._step_started = 0.0
        self._engine: Optional[VLLMEngine] = None  # generation_backend: vllm; built by start_engine

    # ------------------------------------------------------------------ what an algorithm supplies
    def compute_advantages(self, rewards: torch.Tensor, experience: Experience) -> tuple[torch.Tensor, torch.Tensor]:
        """`(advantages [N] or [N, C], group_std [N])` of `experience`'s rows from the grouped
        rewards `[E]` of its episodes (rows are episodes unless an episode gave several:
        `Experience.per_row`)."""
        raise NotImplementedError

    def policy_objective(
        self, logps: torch.Tensor, entropy: torch.Tensor, experience: Experience, num_items_in_batch: torch.Tensor
    ) -> tuple[torch.Tensor, LossStats]:
        """The algorithm's loss on one optimizer step's rollouts."""
        raise NotImplementedError

    @property
    def needs_generation_logps(self) -> bool:
        """Whether log-probs at generation time must be stored (the policy moves before they are used)."""
        return self.hparams.num_iterations * self.hparams.steps_per_generation > 1

    def option_problems(self) -> list[str]:
        """Every invalid option, each with its fix (subclasses add theirs)."""
        h, problems = self.hparams, []
        if h.num_generations < 2:
            problems.append(f"num_generations={h.num_generations}: a group needs at least 2 rollouts to compare; use 2 or more.")
        if h.max_completion_length < 1:
            problems.append(f"max_completion_length={h.max_completion_length}: must be at least 1.")
        if not h.temperature > 0:
            problems.append(f"temperature={h.temperature}: must be > 0 (sampling is required for RL).")
        if not 0 < h.top_p <= 1:
            problems.append(f"top_p={h.top_p}: must be in (0, 1].")
        if h.top_k < 0:
            problems.append(f"top_k={h.top_k}: must be >= 0 (0 turns it off).")
        if h.beta < 0:
            problems.append(f"beta={h.beta}: must be >= 0.")
        if not h.epsilon > 0:
            problems.append(f"epsilon={h.epsilon}: must be > 0.")
        for name in ("num_iterations", "steps_per_generation"):
            if h[name] < 1:
                problems.append(f"{name}={h[name]}: must be at least 1.")
        if h.learning_rate <= 0:
            problems.append(f"learning_rate={h.learning_rate}: must be > 0.")
        if h.max_grad_norm is not None and h.max_grad_norm <= 0:
            problems.append(f"max_grad_norm={h.max_grad_norm}: must be > 0, or null for no clipping.")
        if h.warmup_steps < 0:
            problems.append(f"warmup_steps={h.warmup_steps}: must be >= 0.")
        if h.micro_batch_size is not None and h.micro_batch_size < 1:
            problems.append(f"micro_batch_size={h.micro_batch_size}: must be >= 1, or null.")
        if h.eval_num_generations is not None and h.eval_num_generations < 1:
            problems.append(f"eval_num_generations={h.eval_num_generations}: must be >= 1.")
        if h.old_logps_from_sampler and (h.top_k or h.top_p < 1) and not h.truncated_logps:
            problems.append(
                f"old_logps_from_sampler=true with top_k={h.top_k}, top_p={h.top_p}: the sampler then draws from a truncated "
                "distribution, not the trainer's; set truncated_logps: true (the trainer's log-probs then describe the same "
                "distribution), use top_k 0 and top_p 1.0, or compute the old log-probs (false)."
            )
        if h.truncated_logps and h.lm_head_kernel == "trl" and not h.full_logits:
            problems.append(
                "truncated_logps=true with lm_head_kernel='trl': TRL's kernel takes the full softmax; use lm_head_kernel "
                "'retrain' (or full_logits: true)."
            )
        if h.logits_chunk_size is not None and h.logits_chunk_size < 1:
            problems.append(f"logits_chunk_size={h.logits_chunk_size}: must be >= 1 (tokens per chunk), or null for the default.")
        if h.micro_batch_tokens is not None and h.micro_batch_tokens < 1:
            problems.append(f"micro_batch_tokens={h.micro_batch_tokens}: must be >= 1 (tokens per pass), or null.")
        if h.vllm is not None and h.generation_backend != "vllm":
            problems.append(
                f"vllm options are set but generation_backend={h.generation_backend!r}: set generation_backend: vllm "
                "to sample with vLLM, or remove the vllm block."
            )
        if h.eval_temperature is not None and not h.eval_temperature > 0:
            problems.append(f"eval_temperature={h.eval_temperature}: must be > 0.")
        return problems

    # ------------------------------------------------------------------ model and optimizer
    def prepare_data(self) -> None:
        """Once per node, before any rank loads: build the tiny local model if it is configured and missing."""
        self._start_environment()
        if self.hparams.generation_backend == "vllm":
            self._check_vllm_setup()
        built = ensure_tiny_model(self.policy_config)
        if built:
            rank_zero_info(built)

    def configure_model(self) -> None:
        """Load the policy and, when `beta > 0`, the reference: a frozen copy of the initial policy, or
        (LoRA) no copy at all, since the base weights with the adapter disabled are the reference."""
        if self.policy is not None:
            return
        self.tokenizer = load_tokenizer(self.policy_config)
        self.policy = load_policy(self.policy_config).train()  # from_pretrained returns eval mode
        if self.hparams.beta > 0 and not is_adapter_model(self.policy):
            self.ref_policy = copy.deepcopy(self.policy).requires_grad_(False).eval()
        problem = packing_problem(self.policy) if self.hparams.pack_rows else None
        if problem:
            raise ConfigError(f"{type(self).__name__} (model.init_args.{problem}")
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 (retrain.rollout.sharding)
            for model in (self.policy, self.ref_policy):
                if model is not None:
                    shard_model(model, self.device_mesh, generation=self.policy_config.sharded_generation)
        if self.policy_config.compile:
            # Set around nn.Module.__setattr__: registered as a submodule, the wrapper would put every
            # weight in the checkpoint a second time (under `_orig_mod.`).
            object.__setattr__(self, "_compiled_policy", torch.compile(self.policy, dynamic=True))

    @property
    def has_reference(self) -> bool:
        return self.ref_policy is not None or (self.hparams.beta > 0 and is_adapter_model(self.policy))

    def reference_logps(self, experience: Experience) -> torch.Tensor:
        """`[N, C]` completion log-probs under the reference policy (no grad)."""
        if self.ref_policy is not None:
            return self.generation_logps(self.ref_policy, experience)
        with self.policy.disable_adapter():
            return self.generation_logps(self.policy, experience)

    def generation_logps(self, model: torch.nn.Module, experience: Experience) -> torch.Tensor:
        """`[N, C]` log-probs of a whole generation under `model` (no grad), pass by pass as the
        update will run them, so these passes fit wherever the update's do."""
        logps = None
        with torch.no_grad():
            for rows, micro in self.micro_batches(experience):
                part, _ = self.completion_logps(model, micro)
                if not rows:  # an empty pass: only keeps this rank's collectives in step with the others'
                    continue
                if logps is None:
                    logps = part.new_zeros(len(experience), experience.completion_width)
                logps[torch.as_tensor(rows, device=part.device), : micro.completion_width] = part
        return logps

    def _compiled_and_sharded(self, model: torch.nn.Module) -> bool:
        # The compiled forward of an FSDP2-sharded policy through the chunked head trained differently
        # from eager after the first update (tests/integration/test_distributed.py, bf16-mixed on 2 CPU
        # processes); until that is understood, that combination takes the full logits.
        return model is self._compiled_policy and is_sharded(self.policy)

    def micro_batches(self, experience: Experience) -> list[tuple[list[int], Experience]]:
        """`experience` cut into forward/backward passes (`micro_batch_size`, `micro_batch_tokens`),
        each with its row indices and without the columns that are padding in all its rows.

        Under a token budget ranks may need different numbers of passes, but DDP and FSDP2 run
        collectives in every pass: every rank then runs the most any rank needs (`stretch_plan`);
        an empty pass (no rows) runs one row whose loss counts for nothing."""
        h = self.hparams
        prompts, completions = experience.lengths
        plan = plan_micro_batches(
            prompts, completions, max_rows=h.micro_batch_size, max_tokens=h.micro_batch_tokens, packed=h.pack_rows
        )
        # (Rows per rank differ too when an agent's episodes split into several samples.)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            count = torch.tensor(len(plan), device=experience.input_ids.device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            plan = stretch_plan(plan, int(count))
        return [(rows, experience.rows(rows or [0]).trimmed()) for rows in plan]

    def completion_logps(
        self, model: torch.nn.Module, experience: Experience, *, with_entropy: bool = False, entropy_grad: bool = False
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """`[N, C]` log-probs (and entropies) of `experience`'s completions under `model`, by the
        trainer's options (`logits_chunk_size`, `full_logits`, `pack_rows`)."""
        h = self.hparams
        return completion_logps(
            model, experience.input_ids, experience.attention_mask, experience.completion_width,
            temperature=h.temperature, with_entropy=with_entropy, entropy_grad=entropy_grad,
            chunk_size=h.logits_chunk_size, full_logits=h.full_logits or self._compiled_and_sharded(model),
            pack=h.pack_rows, kernel=h.lm_head_kernel,
            top_k=h.top_k if h.truncated_logps else 0, top_p=h.top_p if h.truncated_logps else 1.0,
        )

    def configure_optimizers(self) -> Any:
        self.configure_model()
        h = self.hparams
        params = [p for p in self.policy.parameters() if p.requires_grad]
        # The fused kernel (as TRL uses) is ~3x faster per step on CPU and GPU. Lightning's mixed
        # precision plugins refuse to clip gradients for fused optimizers, so those keep the loop.
        mixed = self._trainer is not None and "mixed" in str(self.trainer.precision)
        fused = not mixed and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        optimizer = torch.optim.AdamW(
            params, lr=h.learning_rate, weight_decay=h.weight_decay, betas=tuple(h.adam_betas), fused=fused or None
        )
        scheduler = get_scheduler(h.lr_scheduler_type, optimizer, num_warmup_steps=h.warmup_steps, num_training_steps=self._total_steps())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _total_steps(self) -> int:
        trainer = self._trainer
        if trainer is not None and trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        if self.hparams.lr_scheduler_type in ("linear", "cosine"):
            raise ConfigError(f"lr_scheduler_type={self.hparams.lr_scheduler_type!r} needs trainer.max_steps to be set.")
        return 1

    def setup(self, stage: str) -> None:
        check_strategy(getattr(self._trainer, "strategy", None))
        if self._trainer is not None and self.trainer.strategy.root_device.type == "cpu":
            tune_malloc_for_reuse()
        if stage == "fit" and self._trainer is not None and self.trainer.world_size > 1:
            # seed_everything gives every rank the same seed; rollouts must differ per rank (as in
            # TRL). A resumed run then restores each rank's own saved state over this.
            torch.manual_seed(torch.initial_seed() + self.global_rank)
        h = self.hparams
        updates = h.num_iterations * h.steps_per_generation
        max_steps = getattr(self._trainer, "max_steps", -1)
        if updates > 1 and max_steps and max_steps > 0 and max_steps % updates:
            rank_zero_warn(
                f"trainer.max_steps={max_steps} is not a multiple of the {updates} optimizer updates each generation "
                f"makes (num_iterations x steps_per_generation): training stops after {-(-max_steps // updates) * updates}."
            )
        if updates > 1 and self._trainer is not None:
            for message in align_checkpoint_cadence(self.trainer.checkpoint_callbacks, updates):
                rank_zero_info(message)
        datamodule = getattr(self._trainer, "datamodule", None)
        batch_size = getattr(datamodule, "batch_size", None)
        self._check_batch_split(batch_size)
        self._start_environment()  # every rank (prepare_data ran on one per node), before configure_model
        if h.generation_backend == "vllm":
            self._check_vllm_setup()

    def _check_vllm_setup(self) -> None:
        """Refuse vLLM options that cannot work, before the policy loads."""
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        problems = self.vllm_options.problems(device)
        reason = vllm_unavailable_reason()
        if reason:
            problems.append(reason)
        if problems:
            raise ConfigError("generation_backend: vllm cannot start (model.init_args.vllm):\n  - " + "\n  - ".join(problems))

    def start_engine(self) -> Optional[VLLMEngine]:
        """The colocated vLLM engine, built once per process from the policy's checkpoint (None for
        the other backends)."""
        if self.hparams.generation_backend != "vllm" or self._engine is not None:
            return self._engine
        self.configure_model()
        config = self.policy_config
        self._engine = VLLMEngine(
            config.name_or_path, self.vllm_options, dtype=next(self.policy.parameters()).dtype,
            seed=(torch.initial_seed() + self.global_rank) % 2**31, trust_remote_code=config.trust_remote_code,
            revision=config.revision,
        )
        return self._engine

    def rollout_context(self) -> Any:
        """Around a rollout phase: the engine holds the current weights (vLLM), or the sharded policy
        is ready to sample (`generation_context`)."""
        engine = self.start_engine()
        if engine is None:
            return generation_context(self.policy)
        engine.sync(self.policy, version=self.global_step)
        return contextlib.nullcontext()

    def _start_environment(self) -> None:
        """Set up the environment before the policy is built or loaded: a tool server that cannot start
        fails the run in seconds, not after minutes of loading."""
        try:
            self.rollouts.start()
        except TrainingFault as err:
            raise ConfigError(f"model.init_args.environment could not be set up, so training did not start: {err}") from err

    def _check_batch_split(self, batch_size: Optional[int]) -> None:
        if batch_size is not None and (batch_size * self.hparams.num_generations) % self.hparams.steps_per_generation:
            raise ConfigError(
                f"data.batch_size={batch_size} x num_generations={self.hparams.num_generations} rollouts cannot be split "
                f"into steps_per_generation={self.hparams.steps_per_generation} equal optimizer steps; make the product "
                "a multiple of steps_per_generation."
            )

    # ------------------------------------------------------------------ experience
    def make_sampler(self, temperature: Optional[float] = None) -> BatchingSampler:
        h = self.hparams
        return BatchingSampler(
            self.policy, self.tokenizer, max_new_tokens=h.max_completion_length,
            temperature=temperature or h.temperature, top_p=h.top_p, top_k=h.top_k, backend=h.generation_backend,
            engine=self.start_engine(), policy_version=self.global_step,
        )

    def rollout(self, records: Sequence[PromptRecord]) -> tuple[list[Trajectory], RewardResult]:
        """`num_generations` scored rollouts of each record, grouped by record."""
        h = self.hparams
        return self.rollouts.collect(records, h.num_generations, self.make_sampler(), h.max_completion_length)

    @torch.no_grad()
    def gather_experience(self, records: Sequence[PromptRecord]) -> Experience:
        self.configure_model()
        h = self.hparams
        with self.rollout_context():  # every rank once: a sharded policy or the engine's weights
            trajectories, scored = self.rollout(records)
            if self.group_filter is not None:
                trajectories, scored = self.group_filter(self, records, trajectories, scored)
        if self._engine is not None:
            self._engine.sleep()  # GPUs with vllm.enable_sleep_mode: the update needs the memory
        rows, row_episode = episode_rows(trajectories)  # an episode an agent split trains as several rows
        input_ids, attention_mask, completion_mask = pack_trajectories(
            rows, self.tokenizer.pad_token_id, mask_truncated=h.mask_truncated_completions
        )
        n = len(rows)
        rewards = torch.tensor(scored.total, dtype=torch.float32)  # [E]
        experience = Experience(
            input_ids=input_ids, attention_mask=attention_mask, completion_mask=completion_mask,
            rewards=rewards if row_episode is None else rewards[row_episode],
            advantages=torch.zeros(n), group_std=torch.zeros(n),
            sampler_logps=pack_sampler_logps(rows, completion_mask.size(1)),
            trajectories=rows, reward_result=scored, row_episode=row_episode,
            episodes=None if row_episode is None else trajectories,
        ).to(self._policy_device())
        if self.needs_generation_logps and h.old_logps_from_sampler and experience.sampler_logps is not None:
            experience.old_logps = experience.sampler_logps  # the sampler's, instead of a forward pass
        elif self.needs_generation_logps:
            experience.old_logps = self.generation_logps(self.policy, experience)
        if self.has_reference:
            experience.ref_logps = self.reference_logps(experience)
        experience.advantages, experience.group_std = self.compute_advantages(rewards.to(self._policy_device()), experience)
        return experience

    def _policy_device(self) -> torch.device:
        return next(self.policy.parameters()).device

    # ------------------------------------------------------------------ loss
    def compute_loss(
        self,
        experience: Experience,
        num_items_in_batch: Optional[torch.Tensor] = None,
        policy_weight: float = 1.0,
        token_share: float = 1.0,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss on `experience` and its metrics.

        For a micro-batch of a larger step, `policy_weight` scales the algorithm's loss and
        `token_share` (the micro-batch's share of the step's policy tokens) scales the extra terms,
        which are token means, so that the micro-batches' losses add up to the step's loss. The
        metrics are the micro-batch's own, unweighted.
        """
        model = self.policy if self._compiled_policy is None else self._compiled_policy
        logps, entropy = self.completion_logps(model, experience, with_entropy=True, entropy_grad=self.entropy_grad)
        mask = experience.completion_mask
        if num_items_in_batch is None:
            num_items_in_batch = mask.sum()
        policy_loss, stats = self.policy_objective(logps, entropy, experience, num_items_in_batch)
        loss = policy_loss * policy_weight
        metrics = {
            "entropy": masked_mean(entropy.detach(), mask),
            "clip_ratio": stats.clip_ratio,
            "clip_ratio/low": stats.clip_ratio_low,
            "clip_ratio/high": stats.clip_ratio_high,
        }
        if stats.kl is not None:
            metrics["kl"] = stats.kl
        if experience.sampler_logps is not None and experience.old_logps is None and not self.needs_generation_logps:
            metrics.update(sampler_mismatch(logps, experience.sampler_logps, mask))  # on-policy: these logps are pi at sampling
        for term in self.extra_loss_terms:
            value, term_metrics = term(LossInputs(logps, entropy, mask, experience))
            loss = loss + value * token_share
            metrics.update(term_metrics)
        return loss, metrics

    # ------------------------------------------------------------------ Lightning loop
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def training_step(self, batch: list[PromptRecord], batch_idx: int) -> None:
        h = self.hparams
        experience = self.gather_experience(batch)
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        chunks = experience.split(h.steps_per_generation)
        # dapo/cispo normalise by the generation batch's tokens per optimizer step, as TRL does.
        num_items = self._reduce_mean(experience.completion_mask.sum()) / h.steps_per_generation
        totals: dict[str, float] = {}
        updates = 0
        for _ in range(h.num_iterations):
            for chunk in chunks:
                optimizer.zero_grad()
                metrics = self._accumulate_gradients(chunk, num_items)
                optimizer.step()  # clips in on_before_optimizer_step, after any loss-scaler unscale
                if scheduler is not None:
                    scheduler.step()
                for key, value in metrics.items():
                    totals[key] = totals.get(key, 0.0) + value
                updates += 1
        self._log_generation(experience, {k: v / updates for k, v in totals.items()})

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning calls this inside optimizer.step(), after a 16-mixed scaler has unscaled the
        # gradients: clipping here clips the true gradient norm.
        if self.hparams.max_grad_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.max_grad_norm, gradient_clip_algorithm="norm")

    def _accumulate_gradients(self, chunk: Experience, num_items: torch.Tensor) -> dict[str, float]:
        """Backward over one optimizer step's rollouts, pass by pass (`micro_batches`).

        Each micro-batch's loss is weighted by its share of the step (`micro_batch_weight`), so the
        accumulated gradient equals the gradient of the whole step's loss.
        """
        step_tokens = chunk.completion_mask.sum().clamp(min=1.0)
        metrics: dict[str, float] = {}
        for rows, micro in self.micro_batches(chunk):
            if not rows:  # an empty pass (`micro_batches`): the collectives of a backward, no gradient
                loss, _ = self.compute_loss(micro, num_items)
                self.manual_backward(loss * 0.0)
                continue
            share = float(micro.completion_mask.sum() / step_tokens)
            weight = self.micro_batch_weight(micro, chunk)
            loss, micro_metrics = self.compute_loss(micro, num_items, policy_weight=weight, token_share=share)
            self.manual_backward(loss)
            metrics["loss"] = metrics.get("loss", 0.0) + float(loss.detach())  # the parts add up to the step's loss
            for key, value in micro_metrics.items():  # the step's metrics: token-weighted means (extremes: extremes)
                if key.endswith(("_max", "_min")):
                    pick = max if key.endswith("_max") else min
                    metrics[key] = pick(metrics[key], float(value)) if key in metrics else float(value)
                else:
                    metrics[key] = metrics.get(key, 0.0) + share * float(value)
        return metrics

    def micro_batch_weight(self, micro: Experience, chunk: Experience) -> float:
        """The share of the step's loss one micro-batch carries (default: its share of the rollouts,
        right for losses that average over sequences)."""
        return len(micro) / len(chunk)

    def before_standalone_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.hparams.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], self.hparams.max_grad_norm)

    def _reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        if self._trainer is None:
            return value
        return self.trainer.strategy.reduce(value.float(), reduce_op="mean")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # After every update of the generation, so the rate counts rollouts and learning together.
        elapsed = time.perf_counter() - self._step_started
        tokens = sum(t.num_policy_tokens for t in self._last_trajectories)
        self.log("train/tokens_per_second", tokens / max(elapsed, 1e-9), on_step=True, batch_size=1)
        self.log("train/step_seconds", elapsed, on_step=True, batch_size=1)

    def on_fit_start(self) -> None:
        h = self.hparams
        rank_zero_info(
            policy_summary(self) + f"; loss log-probs: {logps_path(self.policy, h.full_logits, h.pack_rows, h.lm_head_kernel)}"
            f"; sampling with {self.make_sampler().describe_backend()}"
        )
        self.check_prompt_lengths(("train", "val"))

    def on_validation_start(self) -> None:
        if self._trainer is not None and self.trainer.state.fn == "validate":  # `retrain validate`
            self.check_prompt_lengths(("val",))

    def on_validation_end(self) -> None:
        if self._engine is not None:
            self._engine.sleep()

    def on_test_start(self) -> None:
        self.check_prompt_lengths(("test",))

    def check_prompt_lengths(self, splits: Sequence[str]) -> None:
        """Every prompt of this rank's finite `splits` fits in the context with its completion budget,
        checked before any rollout (`retrain.rollout.context`)."""
        limit = context_length(self.policy, self.tokenizer)
        datamodule = getattr(self._trainer, "datamodule", None)
        if limit is not None and datamodule is not None:
            check_datamodule_prompts(datamodule, splits, self.make_sampler().encode, limit, self.hparams.max_completion_length)

    def on_fit_end(self) -> None:
        self.rollouts.close()

    # ------------------------------------------------------------------ exact resume
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store every rank's random state: sampling continues exactly where the checkpoint was taken."""
        checkpoint.update(random_states(self._gather_states, self.device))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_random_states(checkpoint, self.global_rank if self._trainer is not None else 0)

    def _gather_states(self, state: torch.Tensor) -> list[torch.Tensor]:
        """`state` of every rank, in rank order (one rank: just this one)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return [state]
        gathered = self.trainer.strategy.all_gather(state.to(self.device))  # [world, S]
        # Each row its own storage: rows of one tensor are views at an offset, and torch.set_rng_state
        # segfaults on a state tensor with a nonzero storage offset (torch 2.13, CPU).
        return [row.clone() for row in gathered.unbind(0)]

    # ------------------------------------------------------------------ validation and test
    def validation_step(self, batch: list[PromptRecord], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: list[PromptRecord], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: list[PromptRecord], stage: str) -> None:
        """k samples per held-out prompt through the same environment and rewards; pass@k, maj@k.

        Evaluation samples from forked random states, so how often validation runs never changes
        training's sampling, and a run resumed from a checkpoint taken before a validation (which
        Lightning does not repeat) continues exactly like the uninterrupted one.
        """
        python_state = random.getstate()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            self._evaluate_sampled(batch, stage)
        random.setstate(python_state)

    def _evaluate_sampled(self, batch: list[PromptRecord], stage: str) -> None:
        self.configure_model()
        h = self.hparams
        k = h.eval_num_generations or h.num_generations
        with self.rollout_context():
            trajectories, scored = self.rollouts.collect(batch, k, self.make_sampler(h.eval_temperature), h.max_completion_length)
        rewards = torch.tensor(scored.total)
        correct = (rewards >= h.eval_success_threshold).view(-1, k)
        answers = [[t.completion_text.strip() for t in trajectories[i : i + k]] for i in range(0, len(trajectories), k)]
        metrics = self.eval_metrics[stage]
        metrics["pass"].update(correct.to(self.device))
        metrics["maj"].update(answers, correct)
        n = len(trajectories)
        self.log(f"{stage}/pass@{k}", metrics["pass"], on_epoch=True, batch_size=n)
        self.log(f"{stage}/maj@{k}", metrics["maj"], on_epoch=True, batch_size=n)
        values = {f"{stage}/reward": rewards.mean()}
        if k > 1:  # the mean over the k samples: the unbiased estimate of pass@1
            values[f"{stage}/pass@1"] = correct.float().mean()
        values.update({f"{stage}/rewards/{name}": torch.tensor(v).mean() for name, v in scored.components.items()})
        values.update({f"{stage}/verifiers/{name}": torch.tensor(v, dtype=torch.float32).mean() for name, v in scored.verifier_passed.items()})
        values["step"] = logged_step(self.global_step)  # a constant: its epoch mean is the step itself
        self.log_dict(values, on_epoch=True, sync_dist=True, batch_size=n)

    def _log_generation(self, experience: Experience, update_metrics: dict[str, float]) -> None:
        scored = experience.reward_result
        rewards = torch.tensor(scored.total, dtype=torch.float32)  # one per episode
        trajectories = experience.episodes if experience.episodes is not None else experience.trajectories
        metrics: dict[str, Any] = {
            "train/reward": rewards.mean(),
            "train/reward_std": rewards.std() if rewards.numel() > 1 else torch.zeros(()),
            "train/completion_length": torch.tensor([float(t.num_policy_tokens) for t in trajectories]).mean(),
            "train/frac_truncated": torch.tensor([float(t.truncated) for t in trajectories]).mean(),
            "train/frac_reward_zero_std": (experience.group_std.abs() < 1e-8).float().mean(),
            "train/learning_rate": torch.tensor(self._current_lr()),
        }
        metrics.update(episode_metrics(trajectories, scored))
        metrics.update({f"train/{k}": torch.tensor(v) for k, v in update_metrics.items()})
        metrics.update({f"train/rewards/{k}": torch.tensor(v).mean() for k, v in scored.components.items()})
        metrics.update({f"train/verifiers/{k}": torch.tensor(v, dtype=torch.float32).mean() for k, v in scored.verifier_passed.items()})
        if experience.sampler_logps is not None and experience.old_logps is not None:
            metrics.update({f"train/{k}": v for k, v in sampler_mismatch(experience.old_logps, experience.sampler_logps, experience.completion_mask).items()})
        metrics["step"] = logged_step(self.global_step)
        self.log_dict(metrics, on_step=True, batch_size=len(trajectories))
        self.log("reward", rewards.mean(), prog_bar=True, on_step=True, logger=False, batch_size=len(trajectories))
        self._last_trajectories = experience.trajectories  # every trained row (its tokens are counted)
        self.last_samples = [
            {"prompt": t.record.prompt, "completion": t.completion_text, "reward": r}
            for t, r in zip(trajectories[: self.hparams.num_completions_to_keep], scored.total)
        ]

    def _current_lr(self) -> float:
        if self._trainer is None or not self.trainer.optimizers:
            return self.hparams.learning_rate
        return self.trainer.optimizers[0].param_groups[0]["lr"]
