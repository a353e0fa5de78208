"""From trajectories to training tensors, and per-token log-probs of a batch.

Layout of one packed batch (`N` rollouts, prompt width `P`, completion width `C`):

    input_ids       [N, P + C]   prompts left-padded to P, completions right-padded to C
    attention_mask  [N, P + C]   1 on real tokens
    completion_mask [N, C]       1 on tokens the policy generated (the only ones with loss)

Left-padded prompts put every completion at the same columns, so one forward pass over the batch
gives all completion log-probs with a single slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional, Sequence

import torch
from trl.trainer.utils import entropy_from_logits, selective_log_softmax

from retrain.core.episode import Trajectory
from retrain.trainer.lm_head import chunked_logps
from retrain.reward.calculator import RewardResult


@dataclass
class Experience:
    """A batch of scored rollouts, ready for the loss."""

    input_ids: torch.Tensor  # [N, P + C]
    attention_mask: torch.Tensor  # [N, P + C]
    completion_mask: torch.Tensor  # [N, C] float
    rewards: torch.Tensor  # [N]
    advantages: torch.Tensor  # [N]
    group_std: torch.Tensor  # [N]
    old_logps: Optional[torch.Tensor] = None  # [N, C], when a generation feeds several updates
    ref_logps: Optional[torch.Tensor] = None  # [N, C], when beta > 0
    completion_turns: Optional[torch.Tensor] = None  # [N, C] turn index of each completion token
    sampler_logps: Optional[torch.Tensor] = None  # [N, C] the sampler's log-probs (0 off the policy's tokens), when it gave them
    sampler_weights: Optional[torch.Tensor] = None  # [N, C] or [N, 1] the sampler correction's weights, when it is on
    trajectories: list[Trajectory] = field(default_factory=list)
    reward_result: Optional[RewardResult] = None

    @property
    def completion_width(self) -> int:
        return self.completion_mask.size(1)

    def to(self, device: torch.device) -> "Experience":
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                setattr(self, f.name, value.to(device))
        return self

    def __len__(self) -> int:
        return self.input_ids.size(0)

    def split(self, parts: int) -> list["Experience"]:
        """`parts` consecutive, equal slices of the rollouts (one per optimizer step of a generation)."""
        n = len(self)
        if n % parts:
            raise ValueError(f"{n} rollouts cannot be split into {parts} equal optimizer steps.")
        size = n // parts
        return [self.rows(slice(i * size, (i + 1) * size)) for i in range(parts)]

    def rows(self, rows: slice) -> "Experience":
        """The rollouts in `rows`, every tensor sliced along its first dimension."""
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value[rows]
            elif f.name == "trajectories":
                value = value[rows]
            values[f.name] = value
        return Experience(**values)


def pack_trajectories(
    trajectories: Sequence[Trajectory], pad_token_id: int, *, mask_truncated: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack trajectories into `(input_ids, attention_mask, completion_mask)` (see the module docstring).

    With `mask_truncated`, rollouts that hit the token budget get an all-zero completion mask
    (DAPO's overlong filtering, TRL's `mask_truncated_completions`).
    """
    prompt_width = max(len(t.prompt_ids) for t in trajectories)
    completion_width = max(1, max(len(t.completion_ids) for t in trajectories))
    n = len(trajectories)
    input_ids = torch.full((n, prompt_width + completion_width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, prompt_width + completion_width), dtype=torch.long)
    completion_mask = torch.zeros((n, completion_width), dtype=torch.float32)
    for i, t in enumerate(trajectories):
        p, c = len(t.prompt_ids), len(t.completion_ids)
        input_ids[i, prompt_width - p : prompt_width] = torch.tensor(t.prompt_ids, dtype=torch.long)
        attention_mask[i, prompt_width - p : prompt_width + c] = 1
        if c:
            input_ids[i, prompt_width : prompt_width + c] = torch.tensor(t.completion_ids, dtype=torch.long)
            if not (mask_truncated and t.truncated):
                completion_mask[i, :c] = torch.tensor(t.completion_mask, dtype=torch.float32)
    return input_ids, attention_mask, completion_mask


def pack_sampler_logps(trajectories: Sequence[Trajectory], completion_width: int) -> Optional[torch.Tensor]:
    """`[N, C]` the sampler's log-prob of every policy token (0 elsewhere), or None when some policy
    token has none (a backend or an environment that does not report them)."""
    logps = torch.zeros((len(trajectories), completion_width), dtype=torch.float32)
    for i, t in enumerate(trajectories):
        if len(t.completion_logprobs) != len(t.completion_ids):
            return None
        if t.completion_ids:
            row = torch.tensor(t.completion_logprobs, dtype=torch.float32)
            policy = torch.tensor(t.completion_mask, dtype=torch.bool)
            if bool(row[policy].isnan().any()):
                return None
            logps[i, : len(row)] = torch.where(policy, row, torch.zeros(()))
    return logps


def pack_turns(trajectories: Sequence[Trajectory], completion_width: int) -> torch.Tensor:
    """`[N, C]` the turn index of every completion token (0 on padding, which is masked anyway)."""
    turns = torch.zeros((len(trajectories), completion_width), dtype=torch.long)
    for i, t in enumerate(trajectories):
        if t.completion_turns:
            turns[i, : len(t.completion_turns)] = torch.tensor(t.completion_turns, dtype=torch.long)
    return turns


def pack_step_rewards(step_rewards: Sequence[Sequence[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """`([N, T] step rewards, [N, T] turn mask)` from ragged per-episode lists."""
    width = max(1, max((len(r) for r in step_rewards), default=0))
    values = torch.zeros((len(step_rewards), width))
    mask = torch.zeros((len(step_rewards), width))
    for i, rewards in enumerate(step_rewards):
        values[i, : len(rewards)] = torch.tensor(list(rewards), dtype=torch.float32)
        mask[i, : len(rewards)] = 1.0
    return values, mask


def completion_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_width: int,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    chunk_size: Optional[int] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-token log-probs `[N, C]` of the completion tokens (and their entropies, if asked).

    Logits are divided by the sampling temperature, as TRL does, so the log-probs are those of the
    distribution the tokens were sampled from. Position ids follow the attention mask, as in
    `generate`, so left padding does not shift positions.

    With `chunk_size`, the log-probs and entropies come from the final hidden states through the LM
    head `chunk_size` tokens at a time (`retrain.trainer.lm_head`), so no `[N, C, V]` logits exist;
    for a model whose head that path does not cover (`chunkable_head` is None) the full path runs.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    if chunk_size:
        parts = chunkable_head(model)
        if parts is not None:
            backbone, head = parts
            hidden = backbone(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state[:, -(completion_width + 1) : -1]  # [N, C, H]: the state at t predicts token t + 1
            logps, entropy = chunked_logps(
                hidden, head.weight, head.bias, input_ids[:, -completion_width:],
                temperature=temperature, chunk_size=chunk_size, entropy_grad=entropy_grad,
            )
            return logps, entropy if with_entropy else None
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        logits_to_keep=completion_width + 1,
    ).logits
    logits = logits[:, :-1, :]  # [N, C, V]: the logit at t predicts token t + 1
    if temperature != 1.0:  # skip a full copy of the logits in the common case
        logits = logits / temperature
    targets = input_ids[:, -completion_width:]  # [N, C]
    logps = selective_log_softmax(logits, targets)
    entropy = None
    if with_entropy:  # with grad only when a loss term (an entropy bonus) differentiates through it
        entropy = entropy_from_logits(logits if entropy_grad else logits.detach())
    return logps, entropy


# Architectures whose logits are exactly `lm_head(final hidden state)` (no soft-capping or scaling
# after the head), so the chunked path computes the same numbers as the model's own forward.
CHUNKABLE_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral", "gpt2"})


def chunkable_head(model: torch.nn.Module) -> Optional[tuple[torch.nn.Module, torch.nn.Linear]]:
    """(the backbone that returns the final hidden states, the LM head) when the chunked path covers
    `model`: a listed architecture, a plain `nn.Linear` head (not LoRA-adapted) and full (not
    FSDP-sharded) weights; else None."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") and hasattr(model, "peft_config") else model
    config = getattr(inner, "config", None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if getattr(config, "model_type", None) not in CHUNKABLE_MODEL_TYPES or type(head) is not torch.nn.Linear:
        return None
    if hasattr(head.weight, "full_tensor"):  # a DTensor: FSDP2 gathers it only inside the head's own forward
        return None
    backbone = getattr(inner, "base_model", None)
    if backbone is None or backbone is inner:
        return None
    return backbone, head
