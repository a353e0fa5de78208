"""A lean, KV-cached sampler for Llama-family decoders (Llama, Qwen2, Qwen3, Mistral).

Why it exists: RL spends much of each step decoding a batch of rollouts one token at a time, and
for the small batches of a single device each decoding step is dominated by per-operation
overhead, not arithmetic. `transformers`' `generate` pays for generality at every token: a
`DynamicCache` that re-concatenates every layer's keys and values (quadratic copying), mask
construction and hooks around every layer. This decoder runs the same weights through the same
arithmetic with about half the operations per token and no cache copying (generation 1.6x faster
than `generate` in `benchmarks/throughput.py`, see `benchmarks/NOTES.md`):

- a key/value cache preallocated for the whole call and written in place;
- rotary tables computed once per call by the model's own `rotary_emb` (so every RoPE scaling the
  model applies statically -- default, linear, llama3, yarn -- is honoured exactly);
- on CPU, the q/k/v and gate/up projections packed into one matrix each and every projection (the
  LM head included) reordered into oneDNN's blocked layout (a copy of the decoder's linear weights,
  made per call because the policy changes every step): fewer and larger matrix products, in the
  layout they run fastest in (pre-transposed for `torch.mm` where oneDNN is missing). On
  accelerators the model's own weights are used as they are (no copy);
- on CUDA, one decoding step captured once per call as a CUDA graph and replayed for every later
  token. A step is ~30 small kernels per layer, and launching them one by one from Python costs far
  more than running them (on an H100, `generate` and the eager decoder spent ~17 and ~11 ms per
  token of a 12-layer model, nearly all of it on the host). A graph needs fixed shapes and
  addresses, so in that "static" mode each step attends over the whole preallocated cache under a
  mask of the positions written so far, and the write position is a device tensor.

Sampling suppresses end-of-sequence until `min_new_tokens`, then draws from the temperature/top-k/
top-p distribution `generate` defines. `draw="inverse_cdf"` (the default) uses `retrain.rollout.draw`:
one uniform per row and top-p without a sort, exact, and far cheaper at a real vocabulary than
`generate`'s random number per vocabulary entry and full sort. `draw="generate"` uses `transformers`'
own warpers and `torch.multinomial`, and so draws token for token what `generate` draws from the
same logits and random state (what tests comparing the two decoders need). A row that
has ended emits padding, and the loop stops when every row has ended.

LoRA adapters (PEFT) are supported: each adapted projection adds `scaling * B @ A` -- folded into
the packed weights on CPU, applied as two thin products on accelerators. `supports(model)` says
whether a model can use the decoder; anything else (other architectures, DoRA and other LoRA
variants, adapted embeddings, quantized or sharded layers, dynamically rescaled RoPE) uses
`generate`.
`tests/rollout/test_decoding.py` checks the logits against the model's own forward pass.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from retrain.rollout import draw as draws

_ARCHITECTURES = {"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"}
_STATIC_ROPE = {"default", "linear", "llama3", "yarn"}
Draw = Literal["inverse_cdf", "generate"]


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (its projections carry the adapters)."""
    return model.get_base_model() if hasattr(model, "get_base_model") and hasattr(model, "peft_config") else model


def unsupported_reason(model: torch.nn.Module) -> Optional[str]:
    """Why `model` cannot use `KVDecoder` (None when it can)."""
    model = unwrapped(model)
    name = type(model).__name__
    if name not in _ARCHITECTURES:
        return f"architecture {name} (supported: {', '.join(sorted(_ARCHITECTURES))})"
    config = model.config
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act={config.hidden_act!r}"
    sliding = getattr(config, "use_sliding_window", False) or (name == "MistralForCausalLM" and config.sliding_window is not None)
    if sliding:
        return "sliding-window attention"
    rope_type = getattr(model.model.rotary_emb, "rope_type", "default")
    if rope_type not in _STATIC_ROPE:
        return f"rope_type={rope_type!r} (rescaled with the sequence length)"
    if type(model.model.embed_tokens) is not torch.nn.Embedding:
        return f"embed_tokens is a {type(model.model.embed_tokens).__name__}, not a plain Embedding"
    for module_name, module in model.named_modules():
        if module_name.endswith(("_proj", "lm_head")):
            reason = _projection_reason(module)
            if reason is not None:
                return f"{module_name}: {reason}"
    if any(_is_dtensor(param) for param in model.parameters()):
        return "sharded (DTensor) parameters"
    return None


def supports(model: torch.nn.Module) -> bool:
    return unsupported_reason(model) is None


def _is_lora(module: torch.nn.Module) -> bool:
    return type(module).__module__.startswith("peft.tuners.lora") and hasattr(module, "lora_A")


def _projection_reason(module: torch.nn.Module) -> Optional[str]:
    if type(module) is torch.nn.Linear:
        return None
    if not _is_lora(module):
        return f"a {type(module).__name__}, not a plain Linear or a LoRA layer (quantization?)"
    if type(module.base_layer) is not torch.nn.Linear:
        return f"LoRA over a {type(module.base_layer).__name__}, not a plain Linear"
    if module.disable_adapters and module.merged:
        return "a merged LoRA adapter that is switched off"
    if getattr(module, "fan_in_fan_out", False):
        return "LoRA with fan_in_fan_out"
    variants = getattr(module, "lora_variant", {}) or {}
    if any(name in variants for name in module.active_adapters):
        return "a LoRA variant (DoRA, ...)"
    return None


@dataclass
class _Linear:
    """One projection's effective parts: `x @ weight.T + bias + sum(scale * (x @ A.T) @ B.T + scale * b_B)`."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    adapters: list[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], float]]

    @classmethod
    def of(cls, module: torch.nn.Module) -> "_Linear":
        if not _is_lora(module):
            return cls(module.weight.detach(), _detach(module.bias), [])
        base = module.base_layer
        if module.disable_adapters or module.merged:  # merged: the base weights already hold the update
            return cls(base.weight.detach(), _detach(base.bias), [])
        adapters = [
            (module.lora_A[name].weight.detach(), module.lora_B[name].weight.detach(), _detach(module.lora_B[name].bias),
             float(module.scaling[name]))
            for name in module.active_adapters if name in module.lora_A
        ]
        return cls(base.weight.detach(), _detach(base.bias), adapters)

    def merged(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The weight and bias with every adapter's update added (a copy when there are adapters)."""
        weight, bias = self.weight, self.bias
        for a, b, b_bias, scale in self.adapters:
            weight = weight + scale * (b @ a).to(weight.dtype)
            if b_bias is not None:
                bias = scale * b_bias if bias is None else bias + scale * b_bias
        return weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        for a, b, b_bias, scale in self.adapters:
            y = y + F.linear(F.linear(x.to(a.dtype), a), b, b_bias).to(y.dtype) * scale
        return y


def _detach(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.detach()


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return "DTensor" in (type(tensor).__name__, type(tensor.data).__name__)


class _Projection:
    """Linear layers that read the same input, applied together; returns one output per layer.

    Packed (CPU): one product with the concatenated weights (LoRA updates folded in), reordered
    once into oneDNN's blocked layout for `rows` rows when oneDNN is available (`onednn`), else
    pre-transposed for `torch.mm`. Otherwise: the layers' own weights, one `F.linear` each (plus two
    thin products per adapter), and no copy.
    """

    def __init__(self, linears: Sequence[torch.nn.Module], packed: bool, rows: int = 1, onednn: Optional[bool] = None) -> None:
        parts = [_Linear.of(layer) for layer in linears]
        self.sizes = [part.weight.size(0) for part in parts]
        self.packed = packed
        self.onednn_weight: Optional[torch.Tensor] = None
        if packed:
            merged = [part.merged() for part in parts]
            weight = merged[0][0] if len(merged) == 1 else torch.cat([weight for weight, _ in merged])  # [width, in]
            self.bias = None if all(bias is None for _, bias in merged) else torch.cat(
                [bias if bias is not None else weight.new_zeros(weight.size(0)) for weight, bias in merged]
            )
            if onednn is not False:
                self.onednn_weight = _onednn_reorder(weight, rows)
            if onednn and self.onednn_weight is None:
                raise ValueError("onednn=True needs float32 CPU weights and a torch built with oneDNN")
            self.weight_t = weight.t().contiguous() if self.onednn_weight is None else None
            self.weight = weight  # oneDNN's products are float32 only: under autocast, F.linear on this
        else:
            self.parts = parts

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.packed:
            return tuple(part(x) for part in self.parts)
        y = self.output(x)
        return y.split(self.sizes, dim=-1) if len(self.sizes) > 1 else (y,)

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """Packed only: all layers' outputs, concatenated on the last dimension."""
        flat = x.flatten(0, -2)
        if self.onednn_weight is not None and (flat.dtype != torch.float32 or torch.is_autocast_enabled(flat.device.type)):
            y = F.linear(flat, self.weight, self.bias)
        elif self.onednn_weight is not None:
            y = torch.ops.mkldnn._linear_pointwise(flat, self.onednn_weight, self.bias, "none", [], "")
        elif self.bias is not None:
            y = torch.addmm(self.bias, flat, self.weight_t)
        else:
            y = flat @ self.weight_t
        return y.view(*x.shape[:-1], -1)


def _onednn_reorder(weight: torch.Tensor, rows: int) -> Optional[torch.Tensor]:
    """`weight` `[out, in]` in oneDNN's blocked layout for products with `rows` rows (any row count
    works), or None where that is not available. On CPU the skinny products of decoding (a few dozen
    rows against a 32k-152k vocabulary, or a layer's projections) run several times faster this way
    than `torch.mm` on the transposed weight (`benchmarks/NOTES.md`). These are the ops inductor's CPU
    freezing pass emits (`torch.ops.mkldnn`); torch has no public API for a pre-packed linear, and
    any failure falls back to `torch.mm`."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    try:
        reordered = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        probe = weight.new_ones(1, weight.size(1))
        torch.ops.mkldnn._linear_pointwise(probe, reordered, None, "none", [], "")
    except (RuntimeError, AttributeError):
        return None
    return reordered


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`transformers`' RMSNorm: normalise in float32, cast back, then scale."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.size(-1),), weight, eps)
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE as `transformers` applies it, `x * cos + rotate_half(x) * sin`, in four kernels:
    rotate_half(x) is `x` rolled by half its width with the first half negated, and the negation
    is folded into `signed_sin` once per call."""
    return x * cos + x.roll(x.size(-1) // 2, dims=-1) * signed_sin


@dataclass
class _Layer:
    norm1: tuple[torch.Tensor, float]
    qkv: _Projection
    q_norm: Optional[tuple[torch.Tensor, float]]
    k_norm: Optional[tuple[torch.Tensor, float]]
    out: _Projection
    norm2: tuple[torch.Tensor, float]
    gate_up: _Projection
    down: _Projection


def _norm(module: torch.nn.Module) -> tuple[torch.Tensor, float]:
    return module.weight.detach(), module.variance_epsilon


class KVDecoder:
    """Prefill and one-token decoding for `batch` rows of at most `max_length` tokens.

    `prefill(input_ids, attention_mask)` takes left-padded prompts and returns the next-token
    logits `[B, V]`; `decode(tokens)` appends one token per row and returns the next logits. The
    weights are read when the decoder is built: build a new one after every optimizer step.
    `pack` packs the projections (see the module docstring; default: on CPU only), in oneDNN's
    layout where available unless `onednn` is False (True: required). `static` decodes
    with fixed shapes (the whole cache, masked; see the module docstring) and `graph` captures that
    step as a CUDA graph (default for both: on CUDA only; `graph` needs `static` and CUDA).
    """

    def __init__(
        self, model: torch.nn.Module, batch: int, max_length: int, pack: Optional[bool] = None,
        static: Optional[bool] = None, graph: Optional[bool] = None, onednn: Optional[bool] = None,
    ) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"KVDecoder does not support this model: {reason}")
        model = unwrapped(model)
        body = model.model
        self.embed = body.embed_tokens.weight.detach()
        device, dtype = self.embed.device, self.embed.dtype
        packed = device.type == "cpu" if pack is None else pack
        self.layers = []
        for layer in body.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(_Layer(
                norm1=_norm(layer.input_layernorm),
                qkv=_Projection([attn.q_proj, attn.k_proj, attn.v_proj], packed, batch, onednn),
                q_norm=_norm(attn.q_norm) if hasattr(attn, "q_norm") else None,
                k_norm=_norm(attn.k_norm) if hasattr(attn, "k_norm") else None,
                out=_Projection([attn.o_proj], packed, batch, onednn),
                norm2=_norm(layer.post_attention_layernorm),
                gate_up=_Projection([mlp.gate_proj, mlp.up_proj], packed, batch, onednn),
                down=_Projection([mlp.down_proj], packed, batch, onednn),
            ))
        first = body.layers[0].self_attn
        self.head_dim = first.head_dim
        q_width, k_width, _ = self.layers[0].qkv.sizes
        self.heads, self.kv_heads = q_width // self.head_dim, k_width // self.head_dim
        self.scaling = first.scaling
        self.final_norm = _norm(body.norm)
        self.lm_head = _Projection([model.lm_head], packed, batch, onednn)
        positions = torch.arange(max_length, device=device)[None]
        cos, sin = body.rotary_emb(self.embed[:1, None], positions)  # [1, T, D], in the model's dtype
        half = self.head_dim // 2
        self.cos, self.signed_sin = cos[0], torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)
        shape = (batch, self.kv_heads, max_length, self.head_dim)
        self.static = device.type == "cuda" if static is None else static
        self.graph = self.static and device.type == "cuda" if graph is None else graph
        if self.graph and not (self.static and device.type == "cuda"):
            raise ValueError("graph=True needs static=True and a CUDA model")
        # static steps read the whole cache (masked), so unwritten entries must be finite: zeros
        new = torch.zeros if self.static else torch.empty
        self.keys = [new(shape, device=device, dtype=dtype) for _ in self.layers]
        self.values = [new(shape, device=device, dtype=dtype) for _ in self.layers]
        self.valid = torch.zeros(batch, max_length, dtype=torch.bool, device=device)  # which cached positions are real tokens
        self.length = 0
        self.padded = False
        self.positions: Optional[torch.Tensor] = None  # [B] the last token's position
        # static mode: the step's input token and output logits live at fixed addresses, and the
        # write position is a device tensor, so that one captured step can be replayed
        self._token = torch.zeros(batch, dtype=torch.long, device=device)
        self._at = torch.zeros(1, dtype=torch.long, device=device)
        self._logits: Optional[torch.Tensor] = None
        self._cuda_graph: Optional[torch.cuda.CUDAGraph] = None
        self.graph_replays = 0

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.bool()
        length = input_ids.size(1)
        self.valid[:, :length] = mask
        self.padded = not bool(mask.all())
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        if self.padded:
            causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
            # A padding query may see nothing; letting it see itself keeps softmax finite (its output is never used).
            allowed = (causal & mask[:, None, :]) | torch.eye(length, dtype=torch.bool, device=mask.device)
            attn_mask: Optional[torch.Tensor] = allowed[:, None]
        else:
            attn_mask = None
        logits = self._forward(input_ids, positions, attn_mask)
        self.positions = positions[:, -1].clone()
        self._at.fill_(length)
        return logits

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """The next-token logits after appending `tokens` `[B]`. In static mode the result is a buffer
        that the next `decode` overwrites: use it (or copy it) before then. The caller may overwrite it."""
        if self.static:
            return self._decode_static(tokens)
        self.valid[:, self.length] = True
        self.positions = self.positions + 1
        attn_mask = self.valid[:, None, None, : self.length + 1] if self.padded else None
        return self._forward(tokens[:, None], self.positions[:, None], attn_mask)

    def _decode_static(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.length >= self.valid.size(1):
            raise RuntimeError(f"KVDecoder: all {self.valid.size(1)} cached positions are used")
        self._token.copy_(tokens)
        if self._cuda_graph is not None:
            self._cuda_graph.replay()
            self.graph_replays += 1
        elif self.graph and self._logits is None:
            # The first step runs eagerly on a side stream, as torch advises before a capture: it
            # initialises the kernels and library workspaces that a capture must not see.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._static_step()
            torch.cuda.current_stream().wait_stream(side)
        elif self.graph:
            self._capture_and_replay()
        else:
            self._static_step()
        self.length += 1
        return self._logits

    def _capture_and_replay(self) -> None:
        """Record one step as a CUDA graph, then replay it for this step. Capture records without
        running anything, so the cache and the counters stay untouched until the replay; if capture
        fails, this call (and every later one) runs the same step eagerly."""
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: CUDA work that other threads do meanwhile (a reward model, say) is not
            # an error for this capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._static_step()
        except RuntimeError as err:
            warnings.warn(f"KVDecoder: CUDA graph capture failed ({err}); decoding eagerly instead.", stacklevel=3)
            self.graph = False
            self._static_step()
            return
        self._cuda_graph = graph
        graph.replay()
        self.graph_replays += 1

    def _static_step(self) -> None:
        """One decoding step with fixed shapes and addresses (what the CUDA graph holds)."""
        self.valid.index_fill_(1, self._at, True)
        self.positions.add_(1)
        logits = self._forward(self._token[:, None], self.positions[:, None], self.valid[:, None, None, :], at=self._at)
        self._at.add_(1)
        if self._logits is None:
            self._logits = logits
        else:
            self._logits.copy_(logits)

    def _forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, attn_mask: Optional[torch.Tensor], at: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """`at`: static mode, one token written at that (device) position and attended over the whole
        cache under `attn_mask`; otherwise tokens are written after the cached ones and attend to them."""
        batch, width = tokens.shape
        start, end = self.length, self.length + width
        cos, sin = self.cos[positions].unsqueeze(2), self.signed_sin[positions].unsqueeze(2)  # [B, S, 1, D]
        hidden = F.embedding(tokens, self.embed)
        causal = attn_mask is None and width > 1
        for layer, keys, values in zip(self.layers, self.keys, self.values):
            normed = _rms_norm(hidden, *layer.norm1)
            if layer.qkv.packed and layer.q_norm is None:  # q's and k's heads are adjacent: rotate them at once
                heads = layer.qkv.output(normed).view(batch, width, -1, self.head_dim)  # [B, S, H + 2 KV, D]
                qk = _rotate(heads[:, :, : self.heads + self.kv_heads], cos, sin)
                q, k, v = qk[:, :, : self.heads], qk[:, :, self.heads :], heads[:, :, self.heads + self.kv_heads :]
            else:
                q, k, v = (t.view(batch, width, -1, self.head_dim) for t in layer.qkv(normed))
                if layer.q_norm is not None:  # Qwen3 normalises each head's query and key
                    q, k = _rms_norm(q, *layer.q_norm), _rms_norm(k, *layer.k_norm)
                q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            if at is None:
                keys[:, :, start:end] = k.transpose(1, 2)
                values[:, :, start:end] = v.transpose(1, 2)
                seen_keys, seen_values = keys[:, :, :end], values[:, :, :end]
            else:
                # under autocast (bf16-mixed) k and v may be bf16 over a float32 cache, and unlike
                # slice assignment index_copy_ does not cast
                keys.index_copy_(2, at, k.transpose(1, 2).to(keys.dtype))
                values.index_copy_(2, at, v.transpose(1, 2).to(values.dtype))
                seen_keys, seen_values = keys, values
            attended = F.scaled_dot_product_attention(
                q.transpose(1, 2), seen_keys, seen_values, attn_mask=attn_mask,
                is_causal=causal, scale=self.scaling, enable_gqa=self.kv_heads != self.heads,
            )
            hidden = hidden + layer.out(attended.transpose(1, 2).reshape(batch, width, -1))[0]
            gate, up = layer.gate_up(_rms_norm(hidden, *layer.norm2))
            hidden = hidden + layer.down(F.silu(gate) * up)[0]
        if at is None:
            self.length = end
        return self.lm_head(_rms_norm(hidden[:, -1], *self.final_norm))[0]


def _warpers(temperature: float, top_k: int, top_p: float) -> list:
    """`transformers`' own temperature, top-k and top-p warpers, in the order `generate` applies them."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = []
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


def sample(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_new_tokens: int = 0,
    with_logprobs: bool = False,
    draw: Draw = "inverse_cdf",
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """`[B, <= max_new_tokens]` sampled continuations of left-padded prompts (padding after a row's
    end-of-sequence token; shorter than `max_new_tokens` when every row has ended).

    With `with_logprobs`, also `[B, same]` float32 log-probs of each drawn token under the
    distribution it was drawn from (the warped one): the sampler's side of the mismatch metrics and
    off-policy corrections. They come from the probabilities already computed for the draw.

    `draw`: "inverse_cdf" (`retrain.rollout.draw`) or "generate" (`transformers`' warpers and
    `torch.multinomial`: the same tokens as `generate` for the same random state); see the module
    docstring.
    """
    if draw not in ("inverse_cdf", "generate"):
        raise ValueError(f"draw={draw!r}: use 'inverse_cdf' or 'generate'.")
    # Inference mode, not just no_grad: each op then skips version counting and view tracking, which
    # is ~6% of a CPU generation here (a decoding step is ~150 small ops). Safe because decoding never
    # writes the model's own tensors; the result is cloned out of it, so callers get a normal tensor.
    with torch.inference_mode():
        batch = input_ids.size(0)
        decoder = KVDecoder(model, batch, input_ids.size(1) + max_new_tokens)
        eos = torch.tensor(list(eos_token_ids), device=input_ids.device, dtype=torch.long)
        logits = decoder.prefill(input_ids, attention_mask)
        ended = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        warpers = _warpers(temperature, top_k, top_p) if draw == "generate" else []
        out, logprobs = [], []
        for step in range(max_new_tokens):
            logits = logits.float()  # the decoder's buffer or a fresh tensor, ours to overwrite
            if step < min_new_tokens and eos.numel():
                logits.index_fill_(-1, eos, float("-inf"))
            if draw == "inverse_cdf":
                tokens, token_logprobs = draws.draw(logits, temperature=temperature, top_k=top_k, top_p=top_p, overwrite=True)
            else:
                for warper in warpers:  # they read only the scores, not the ids
                    logits = warper(None, logits)
                probs = logits.softmax(-1)
                tokens = torch.multinomial(probs, 1).squeeze(1)
                token_logprobs = probs.gather(1, tokens[:, None]).squeeze(1).log() if with_logprobs else None
            if with_logprobs:
                logprobs.append(token_logprobs)
            tokens = tokens.masked_fill(ended, pad_token_id)
            out.append(tokens)
            ended |= torch.isin(tokens, eos)
            if step + 1 == max_new_tokens or bool(ended.all()):
                break
            logits = decoder.decode(tokens)
        tokens = torch.stack(out, dim=1)
        if with_logprobs:
            return tokens.clone(), torch.stack(logprobs, dim=1).clone()
    return tokens.clone()
