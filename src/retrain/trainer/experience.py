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
from retrain.rollout.decoding import unwrapped
from retrain.trainer.lm_head import chunked_logps, log_softmax_over, sampler_support
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
    trajectories: list[Trajectory] = field(default_factory=list)  # one per row
    reward_result: Optional[RewardResult] = None  # one entry per episode
    row_episode: Optional[torch.Tensor] = None  # [N] the episode of each row, when an episode gave several (else row i is episode i)
    episodes: Optional[list[Trajectory]] = None  # the generation's episodes, when rows are not episodes

    def per_row(self, values: torch.Tensor) -> torch.Tensor:
        """`[E, ...]` values of the episodes as `[N, ...]` values of the rows."""
        return values if self.row_episode is None else values[self.row_episode.to(values.device)]

    def episode_sum(self, values: torch.Tensor) -> torch.Tensor:
        """`[N]` values of the rows summed per episode, `[E]`."""
        if self.row_episode is None:
            return values
        size = len(self.episodes) if self.episodes is not None else int(self.row_episode.max()) + 1
        return torch.zeros(size, dtype=values.dtype, device=values.device).index_add_(0, self.row_episode.to(values.device), values)

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
        """`parts` consecutive, equal slices of the rollouts (one per optimizer step of a generation);
        by episodes when rows are not episodes (each part gets the rows of its episodes)."""
        if self.row_episode is not None and parts > 1:
            episodes = int(self.row_episode.max()) + 1 if self.episodes is None else len(self.episodes)
            if episodes % parts:
                raise ValueError(f"{episodes} episodes cannot be split into {parts} equal optimizer steps.")
            part = (self.row_episode // (episodes // parts)).cpu()
            return [self.rows(torch.nonzero(part == k).flatten().tolist()) for k in range(parts)]
        n = len(self)
        if n % parts:
            raise ValueError(f"{n} rollouts cannot be split into {parts} equal optimizer steps.")
        size = n // parts
        return [self.rows(slice(i * size, (i + 1) * size)) for i in range(parts)]

    def rows(self, rows: slice | torch.Tensor | list[int]) -> "Experience":
        """The rollouts in `rows` (a slice or indices), every tensor indexed along its first dimension."""
        index = rows if isinstance(rows, slice) else torch.as_tensor(rows, dtype=torch.long, device=self.input_ids.device)
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value[index]
            elif f.name == "trajectories" and value:
                value = value[rows] if isinstance(rows, slice) else [value[int(i)] for i in index]
            values[f.name] = value
        return Experience(**values)

    @property
    def lengths(self) -> tuple[list[int], list[int]]:
        """(prompt lengths, completion lengths) of the rollouts, in tokens (padding excluded)."""
        prompt_width = self.input_ids.size(1) - self.completion_width
        real = self.attention_mask.bool()
        return real[:, :prompt_width].sum(1).tolist(), real[:, prompt_width:].sum(1).tolist()

    def trimmed(self) -> "Experience":
        """The same rollouts without the columns that are padding in every row: the left-padding
        beyond the longest prompt and the completion columns beyond the longest completion.

        Positions follow the attention mask, so the log-probs are unchanged; `[N, C]` tensors keep
        their first `C'` columns (`[N]` and `[N, 1]` ones are kept whole)."""
        prompt_width = self.input_ids.size(1) - self.completion_width
        prompts, completions = self.lengths
        start = prompt_width - max(prompts, default=0)
        width = max(1, max(completions, default=0))  # at least one column, as `pack_trajectories` keeps
        if start == 0 and width == self.completion_width:
            return self
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("input_ids", "attention_mask"):
                value = value[:, start : prompt_width + width]
            elif isinstance(value, torch.Tensor) and value.dim() == 2 and value.size(1) == self.completion_width:
                value = value[:, :width]
            values[f.name] = value
        return Experience(**values)


def episode_rows(episodes: Sequence[Trajectory]) -> tuple[list[Trajectory], Optional[torch.Tensor]]:
    """The training rows of `episodes` (an episode an agent split has several: `Trajectory.samples`)
    and `[N]` the episode of each row (None when every episode is one row)."""
    rows = [sample for episode in episodes for sample in episode.samples]
    if len(rows) == len(episodes):
        return list(episodes), None
    owners = [i for i, episode in enumerate(episodes) for _ in episode.samples]
    return rows, torch.tensor(owners, dtype=torch.long)


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
    full_logits: bool = False,
    chunk_size: Optional[int] = None,
    pack: bool = False,
    kernel: str = "retrain",
    top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-token log-probs `[N, C]` of the completion tokens (and their entropies, if asked).

    Logits are divided by the sampling temperature, as TRL does, so the log-probs are those of the
    distribution the tokens were sampled from. Position ids follow the attention mask, as in
    `generate`, so left padding does not shift positions. With `top_k` / `top_p` set, the
    distribution is truncated as the sampler truncates it (`retrain.trainer.lm_head`; each row's own
    token always kept); TRL's kernel does not do that.

    By default the log-probs and entropies come from the final hidden states through the LM head
    `chunk_size` tokens at a time (`retrain.trainer.lm_head`; default `default_chunk_size(V)`), for
    the real completion tokens only, so no `[N, C, V]` logits exist; padding gets 0. `full_logits`
    (or a head that path does not cover, `chunkable_head` is None) asks the model for all logits.

    `kernel` "trl" computes the chunked head with TRL's `ChunkedLogProbFunction` instead (Triton on
    CUDA; `chunk_size` is then its vocabulary tile).

    With `pack`, the rows' real tokens run as one sequence `[1, T]` without padding, position ids
    restarting per row; `transformers` then keeps attention inside each row (`packing_problem`).
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    layout = _TargetLayout.of(attention_mask, completion_width, pack)
    if pack:
        real = attention_mask.bool()
        model_inputs = {"input_ids": input_ids[real][None], "attention_mask": None, "position_ids": position_ids[real][None]}
        keep = 0  # every position: the targets are scattered through the pack
    else:
        model_inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        keep = completion_width + 1
    truncating = bool(top_k) or top_p < 1.0
    if truncating and kernel == "trl" and not full_logits:
        raise ValueError("top_k/top_p truncated log-probs need lm_head_kernel 'retrain' (TRL's kernel takes the full softmax)")
    head = None if full_logits else chunkable_head(model)
    targets = input_ids[:, -completion_width:][layout.rows, layout.cols]  # [M]
    if head is not None:

        def log_probs_head(hidden: torch.Tensor) -> torch.Tensor:  # [B, S, H] -> [N, C, 2]
            states = hidden.reshape(-1, hidden.size(-1))[layout.states]  # [M, H]
            if kernel == "trl":
                logps, entropy = trl_chunked_logps(states, head.weight, head.bias, targets, temperature, chunk_size)
                entropy = entropy if entropy_grad else entropy.detach()
            else:
                logps, entropy = chunked_logps(
                    states, head.weight, head.bias, targets,
                    temperature=temperature, chunk_size=chunk_size, entropy_grad=entropy_grad, top_k=top_k, top_p=top_p,
                )
            return torch.stack([layout.scatter(logps), layout.scatter(entropy)], -1)

        # The head module itself computes the log-probs, inside the model's own forward: whatever
        # wraps the model (PEFT, FSDP2's unshard hooks on the root) runs as usual around it.
        head.forward = log_probs_head  # an instance attribute shadows the class's forward
        try:
            out = model(**model_inputs, use_cache=False, logits_to_keep=keep).logits  # [N, C, 2]
        finally:
            del head.forward
        return out[..., 0], out[..., 1] if with_entropy else None
    logits = model(**model_inputs, use_cache=False, logits_to_keep=keep).logits
    if pack:
        logits = logits.reshape(-1, logits.size(-1))[layout.states][None]  # [1, M, V]
    else:
        logits = logits[:, :-1, :]  # [N, C, V]: the logit at t predicts token t + 1
    if temperature != 1.0:  # skip a full copy of the logits in the common case
        logits = logits / temperature
    if truncating:
        return _truncated_full_logps(logits, input_ids[:, -completion_width:] if not pack else targets[None], top_k, top_p,
                                     with_entropy, entropy_grad, layout if pack else None)
    if pack:
        logps = layout.scatter(selective_log_softmax(logits, targets[None])[0])
    else:
        logps = selective_log_softmax(logits, input_ids[:, -completion_width:])
    entropy = None
    if with_entropy:  # with grad only when a loss term (an entropy bonus) differentiates through it
        entropy = entropy_from_logits(logits if entropy_grad else logits.detach())
        if pack:
            entropy = layout.scatter(entropy[0])
    return logps, entropy


def _truncated_full_logps(
    logits: torch.Tensor, targets: torch.Tensor, top_k: int, top_p: float, with_entropy: bool, entropy_grad: bool,
    layout: Optional["_TargetLayout"],
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The full-logits path's log-probs (and entropies) `[N, C]` of `targets` `[N, C]` under the
    top-k/top-p truncated distribution, by the chunked head's rules (`sampler_support`,
    `log_softmax_over`; `layout`: packed rows, scattered back)."""
    flat = logits.reshape(-1, logits.size(-1)).float()  # [N*C, V]
    keep = sampler_support(flat, targets.reshape(-1), (top_k, top_p))
    log_probs = flat.log_softmax(-1) if keep is None else log_softmax_over(flat, keep)
    logps = log_probs.gather(-1, targets.reshape(-1, 1)).view(targets.shape)
    entropy = None
    if with_entropy:
        source = log_probs if entropy_grad else log_probs.detach()
        entropy = -(source.exp() * source).sum(-1).view(targets.shape)
    if layout is not None:
        logps = layout.scatter(logps[0])
        entropy = None if entropy is None else layout.scatter(entropy[0])
    return logps, entropy


def trl_chunked_logps(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
    temperature: float, vocab_tile: Optional[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropies `[M]` through TRL's tiled LM-head kernel (what TRL's own trainers
    run): `[4096, vocab_tile]` tiles with an online log-sum-exp, Triton on CUDA, torch elsewhere."""
    from trl.kernels import ChunkedLogProbFunction

    logps, entropy, *_ = ChunkedLogProbFunction.apply(
        hidden, weight, bias, targets, float(temperature), int(vocab_tile or TRL_VOCAB_TILE), None, 1.0, ("entropy",)
    )
    return logps, entropy


TRL_VOCAB_TILE = 32768  # TRL's own default (`trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE`)


@dataclass
class _TargetLayout:
    """Where the real completion tokens are, and which of the model's output positions predicts each.

    `rows`, `cols` [M]: the targets' places in the `[N, C]` completion block; `states` [M]: the
    predicting position in the model's output, flattened (`[N, C + 1]` padded, `[1, T]` packed).
    A target counts when it and the token before it are real (a row's first token has no prediction).
    """

    rows: torch.Tensor
    cols: torch.Tensor
    states: torch.Tensor
    shape: tuple[int, int]

    @classmethod
    def of(cls, attention_mask: torch.Tensor, completion_width: int, pack: bool) -> "_TargetLayout":
        n, width = attention_mask.shape
        real = attention_mask.bool()
        c = completion_width
        targets = real[:, width - c :] & real[:, width - c - 1 : width - 1]  # [N, C]
        rows, cols = targets.nonzero(as_tuple=True)
        if pack:
            index = real.reshape(-1).cumsum(0).view(n, width) - 1  # [N, W]: each real token's place in the pack
            states = index[:, width - c :][rows, cols] - 1
        else:
            states = rows * (c + 1) + cols  # output [N, C + 1]: position j predicts completion column j
        return cls(rows, cols, states, (n, c))

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """`[M]` values back into `[N, C]`, 0 off the targets (differentiable)."""
        out = values.new_zeros(self.shape)
        return out.index_put((self.rows, self.cols), values)


# Architectures whose logits are exactly `lm_head(final hidden state)` (no soft-capping or scaling
# after the head), so the chunked path computes the same numbers as the model's own forward.
CHUNKABLE_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral", "gpt2"})


# Attention implementations that keep packed rows apart: `transformers` builds a block-diagonal mask
# from the restarting position ids (sdpa, eager, flex) or runs variable-length kernels (flash).
PACKABLE_ATTENTION = frozenset({"sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"})


def packing_problem(model: torch.nn.Module) -> Optional[str]:
    """Why `model`'s rows cannot be packed into one sequence (`pack_rows`), or None when they can."""
    inner = unwrapped(model)
    config = getattr(inner, "config", None)
    model_type = getattr(config, "model_type", None)
    attention = getattr(config, "_attn_implementation", None)
    if model_type not in CHUNKABLE_MODEL_TYPES:
        return (
            f"pack_rows: model_type {model_type!r} is not one whose packed rows retrain has checked against padded ones "
            f"({', '.join(sorted(CHUNKABLE_MODEL_TYPES))}); set pack_rows: false."
        )
    if attention not in PACKABLE_ATTENTION:
        return (
            f"pack_rows: attention implementation {attention!r} does not keep packed rows apart; use one of "
            f"{', '.join(sorted(PACKABLE_ATTENTION))} (policy.attn_implementation), or set pack_rows: false."
        )
    return None


def logps_path(model: torch.nn.Module, full_logits: bool, pack: bool, kernel: str = "retrain") -> str:
    """How `completion_logps` will compute `model`'s log-probs, for the run's first lines."""
    packed = ", rows packed" if pack else ""
    if full_logits:
        return f"full logits (full_logits: true){packed}"
    if chunkable_head(model) is None:
        inner = unwrapped(model)
        head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
        model_type = getattr(getattr(inner, "config", None), "model_type", None)
        why = f"model_type {model_type!r}" if model_type not in CHUNKABLE_MODEL_TYPES else f"the head {type(head).__module__}.{type(head).__qualname__}"
        return f"full logits ({why} is not covered by the chunked head){packed}"
    return f"the LM head in chunks{' (TRL kernel)' if kernel == 'trl' else ''}{packed}"


def chunkable_head(model: torch.nn.Module) -> Optional[torch.nn.Linear]:
    """The LM head, when the chunked path covers `model`: a listed architecture with a plain
    `nn.Linear` head (not LoRA-adapted nor wrapped by PEFT's `modules_to_save`); else None.

    An FSDP2-sharded head is covered: the head runs inside the root module's forward, after FSDP2 has
    gathered the root's parameters, and its backward before they are freed again."""
    inner = unwrapped(model)
    config = getattr(inner, "config", None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if getattr(config, "model_type", None) not in CHUNKABLE_MODEL_TYPES or type(head) is not torch.nn.Linear:
        return None
    return head
