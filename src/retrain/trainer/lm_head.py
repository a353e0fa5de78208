"""Completion log-probs and entropies through the LM head in chunks of tokens, never all logits at once.

`chunked_logps(hidden, weight, bias, targets, ...)` computes, for each of M tokens, the log-prob of
its target and the entropy of its distribution at the sampling temperature, from the final hidden
states `[M, H]` and the LM head `[V, H]`. The full path materialises `[M, V]` logits (and the same
again for their gradient); here at most `[chunk, V]` exists at a time, in the forward and in the
backward, which recomputes each chunk's logits instead of storing them. Memory for this part is
O(chunk x V); the extra cost is one more LM-head product per chunk in the backward.

The gradient, with z = (h W^T + b) / T, p = softmax(z), for a token's log-prob l = z_y - logsumexp(z)
and entropy E = -sum_v p_v log p_v:

    dl/dz = onehot(y) - p
    dE/dz = -p * (log p + E)

and dz/d(hW^T + b) = 1/T, from which the gradients of h, W and b follow by the chain rule.
"""

from __future__ import annotations

from typing import Optional

import torch

from retrain.rollout.draw import nucleus_, truncation_mask

Truncation = Optional[tuple[int, float]]  # (top_k, top_p) the sampler truncates with, or None for the full softmax

# Elements of one chunk's logits (16M: 64 MB in float32; the path holds about two such tensors at a
# time): the default chunk is this many divided by V.
DEFAULT_CHUNK_ELEMENTS = 2**24


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so that one chunk's `[chunk, V]` logits hold about `DEFAULT_CHUNK_ELEMENTS`."""
    return max(1, DEFAULT_CHUNK_ELEMENTS // max(1, vocab_size))


def sampler_support(logits: torch.Tensor, targets: torch.Tensor, truncation: Truncation) -> Optional[torch.Tensor]:
    """`[c, V]` bool: the tokens the sampler could draw from `logits` `[c, V]` (at the temperature)
    under `truncation` (`truncation_mask`), and each row's target `[c]`, which is always kept: a token
    the sampler drew at the nucleus edge must not get log-prob -inf from a forward that rounds
    slightly differently. None when nothing is truncated (also top_k >= V with top_p 1)."""
    keep = None if truncation is None else truncation_mask(logits.detach(), *truncation)
    if keep is not None:
        keep[torch.arange(keep.size(0), device=keep.device), targets] = True
    return keep


def log_softmax_over(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The log-softmax of `logits` `[c, V]` over the `keep` tokens only; the others get the most
    negative finite value instead of -inf, so that 0 x log p stays 0 in the entropy and its gradient.
    In place where autograd does not need the log-softmax (the chunked head's own backward)."""
    log_probs = logits.masked_fill(~keep, float("-inf")).log_softmax(-1)
    floor = torch.finfo(log_probs.dtype).min
    return log_probs.clamp(min=floor) if log_probs.requires_grad else log_probs.clamp_(min=floor)


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], temperature: float) -> torch.Tensor:
    """One chunk's logits `[c, V]` at the temperature, in at least float32."""
    logits = hidden @ weight.t()  # [c, V]
    if bias is not None:
        logits += bias
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half-precision heads: softmax in float32
    if temperature != 1.0:
        logits /= temperature
    return logits


def _chunk_log_probs(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], temperature: float) -> torch.Tensor:
    """One chunk's log-softmax `[c, V]` at the temperature, in the logits' own memory (each `[c, V]`
    tensor is the path's whole memory, so every one counts)."""
    logits = _chunk_logits(hidden, weight, bias, temperature)
    return torch.log_softmax(logits, -1, out=logits)


def _truncated_chunk(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], temperature: float,
    truncation: tuple[int, float], targets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk under the sampler's truncation (`truncation_mask`'s rules, and each row's target
    kept, as `sampler_support`): `log_p` `[c, V]`, `p` `[c, V]` (0 outside the kept tokens) and `m`
    `[c, 1]` with the truncated distribution q = p / m and log q = log_p - log m on its tokens.

    One softmax of the whole row serves the nucleus search and the log-probs, and the nucleus is cut
    out of it in place (`nucleus_`), where masking the logits would take a mask, a masked copy and a
    second softmax. Under top-k, `p` and `log_p` are those of the renormalized top-k, as the nucleus
    is taken of it."""
    top_k, top_p = truncation
    logits = _chunk_logits(hidden, weight, bias, temperature)
    outside = None
    if 0 < top_k < logits.size(-1):  # transformers' rule on the logits themselves: ties at the k-th stay
        outside = logits < logits.topk(top_k, dim=-1).values[:, -1:]  # [c, V] bool
    log_p = torch.log_softmax(logits, -1, out=logits)  # [c, V]
    probs = log_p.exp()  # [c, V]
    chosen = probs.gather(1, targets[:, None])  # [c, 1] each target's probability, put back below
    if outside is not None:
        probs.masked_fill_(outside, 0.0)
        del outside
        if top_p < 1.0:  # the nucleus is of the renormalized top-k
            top_mass = probs.sum(-1, keepdim=True)  # [c, 1]
            probs /= top_mass
            log_p -= top_mass.log()
            chosen /= top_mass
    if top_p < 1.0:
        nucleus_(probs, top_p)
    probs.scatter_(1, targets[:, None], chosen)
    return log_p, probs, probs.sum(-1, keepdim=True)


def _chunk_statistics(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor, temperature: float,
    truncation: Truncation,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For one chunk: (log-probs of the targets [c], entropies [c])."""
    if truncation is None:
        log_probs = _chunk_log_probs(hidden, weight, bias, temperature)  # [c, V]
        target_logps = log_probs.gather(-1, targets[:, None]).squeeze(-1)  # [c]
        return target_logps, -(log_probs.exp().mul_(log_probs)).sum(-1)
    log_p, probs, mass = _truncated_chunk(hidden, weight, bias, temperature, truncation, targets)
    log_mass = mass.log().squeeze(-1)  # [c]
    target_logps = log_p.gather(-1, targets[:, None]).squeeze(-1) - log_mass  # [c]
    # -sum q log q with q = p / m over the kept tokens: log m - sum(p log_p) / m, since sum(p) = m
    weighted = torch.bmm(probs[:, None, :], log_p[:, :, None]).view(-1)  # [c] sum(p log_p), no [c, V] product
    return target_logps, log_mass - weighted / mass.squeeze(-1)


class _ChunkedLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk, truncation):  # type: ignore[override]
        dtype = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
        logps = torch.empty(hidden.size(0), dtype=dtype, device=hidden.device)  # [M]
        entropy = torch.empty_like(logps)  # [M]
        for start in range(0, hidden.size(0), chunk):
            rows = slice(start, start + chunk)
            logps[rows], entropy[rows] = _chunk_statistics(hidden[rows], weight, bias, targets[rows], temperature, truncation)
        ctx.save_for_backward(hidden, weight, bias, targets, entropy)
        ctx.temperature, ctx.chunk, ctx.truncation = temperature, chunk, truncation
        ctx.set_materialize_grads(False)  # an unused output (a detached entropy) then costs nothing in backward
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy):  # type: ignore[override]
        hidden, weight, bias, targets, entropy = ctx.saved_tensors
        temperature, chunk, truncation = ctx.temperature, ctx.chunk, ctx.truncation
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        dtype = entropy.dtype  # the precision the forward's softmax ran at
        grad_weight = torch.zeros_like(weight, dtype=dtype) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=dtype) if need_bias and bias is not None else None
        grad_logps = torch.zeros_like(entropy) if grad_logps is None else grad_logps.to(dtype)
        grad_entropy = None if grad_entropy is None else grad_entropy.to(dtype)
        for start in range(0, hidden.size(0), chunk):
            rows = slice(start, start + chunk)
            # the same support as the forward's: recomputed from the same logits (deterministic), not stored
            shift, scale = entropy[rows, None], None  # [c, 1]: log p + shift = log q + E, and q = p * scale
            if truncation is None:
                log_probs = _chunk_log_probs(hidden[rows], weight, bias, temperature)  # [c, V]
                probs = log_probs.exp()  # [c, V]
            else:  # q = p / m and log q = log p - log m on the kept tokens (p is 0 elsewhere), folded into the row factors
                log_probs, probs, mass = _truncated_chunk(hidden[rows], weight, bias, temperature, truncation, targets[rows])
                shift, scale = shift - mass.log(), mass.reciprocal()
            # d/dz of (g_l * l + g_E * E), then 1/T for z = logits / T: [c, V], built in place so that
            # at most two [c, V] tensors exist
            if grad_entropy is not None:
                factor = -grad_entropy[rows, None] if scale is None else -grad_entropy[rows, None] * scale
                spread = log_probs.add_(shift).mul_(probs).mul_(factor)  # -g_E q (log q + E)
            del log_probs
            grad_z = probs.mul_(-grad_logps[rows, None] if scale is None else -grad_logps[rows, None] * scale)  # -g_l q
            if grad_entropy is not None:
                grad_z += spread
                del spread
            grad_z.scatter_add_(-1, targets[rows, None], grad_logps[rows, None])
            if temperature != 1.0:
                grad_z /= temperature
            if need_hidden:
                grad_hidden[rows] = (grad_z.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_weight:
                grad_weight.addmm_(grad_z.t(), hidden[rows].to(dtype))  # in place: no [V, H] temporary per chunk
            if grad_bias is not None:
                grad_bias += grad_z.sum(0)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def chunked_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: Optional[int] = None,
    entropy_grad: bool = False,
    top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs `[...]` of `targets` and entropies `[...]` of the LM head's distribution at `temperature`.

    Args:
        hidden: final hidden states `[..., H]` (any leading shape; flattened to M tokens).
        weight: the LM head's weight `[V, H]` (the tied embedding, for tied models).
        bias: its bias `[V]`, or None.
        targets: the token whose log-prob is wanted, `[...]`.
        temperature: logits are divided by it, as the sampler does.
        chunk_size: tokens per chunk (default: `default_chunk_size(V)`).
        entropy_grad: whether gradients flow through the entropy (an entropy bonus); otherwise it is
            returned detached and its gradient is not computed.
        top_k, top_p: with either set (top_k > 0, top_p < 1), log-probs and entropies of the
            truncated, renormalized distribution the sampler draws from (`_chunk_log_probs`); the
            tokens kept are constants of the gradient, as the sampler's choice is.
    """
    leading = targets.shape
    flat_hidden = hidden.reshape(-1, hidden.size(-1))  # [M, H]
    flat_targets = targets.reshape(-1)  # [M]
    chunk = chunk_size or default_chunk_size(weight.size(0))
    truncation = (int(top_k), float(top_p)) if 0 < top_k < weight.size(0) or top_p < 1.0 else None  # None: nothing truncated
    logps, entropy = _ChunkedLogps.apply(flat_hidden, weight, bias, flat_targets, float(temperature), int(chunk), truncation)
    if not entropy_grad:
        entropy = entropy.detach()
    return logps.view(leading), entropy.view(leading)
