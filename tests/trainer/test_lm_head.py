"""Chunked LM-head log-probs and entropies (`retrain.trainer.lm_head`) against the full-logits path,
in float64 on small hand-sized tensors: values, gradients (hidden, weight, bias), temperature,
chunk sizes that do and do not divide the tokens, the entropy with and without its gradient, and
that no `[M, V]` tensor is ever created."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from trl.trainer.utils import entropy_from_logits, selective_log_softmax

from retrain.trainer.lm_head import chunked_logps, default_chunk_size

M, H, V = 7, 5, 11  # tokens, hidden size, vocabulary


def _inputs(bias: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(M, H, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float64, generator=generator, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, generator=generator, requires_grad=True) if bias else None
    targets = torch.randint(0, V, (M,), generator=generator)
    return hidden, weight, b, targets


def _full(hidden, weight, bias, targets, temperature):
    """The path it replaces: all logits, then TRL's log-softmax and entropy."""
    logits = hidden @ weight.t() + (0 if bias is None else bias)  # [M, V]
    logits = logits / temperature
    return selective_log_softmax(logits[None], targets[None])[0], entropy_from_logits(logits[None])[0]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [1, 3, M, 100])
@pytest.mark.parametrize("bias", [False, True])
def test_values_and_gradients_equal_the_full_logits_path(temperature, chunk, bias):
    hidden, weight, b, targets = _inputs(bias)
    weights_l = torch.linspace(-1, 2, M, dtype=torch.float64)  # arbitrary upstream gradients
    weights_e = torch.linspace(0.5, -1.5, M, dtype=torch.float64)
    params = [hidden, weight] + ([b] if bias else [])

    logps, entropy = chunked_logps(hidden, weight, b, targets, temperature=temperature, chunk_size=chunk, entropy_grad=True)
    ours = torch.autograd.grad((weights_l * logps).sum() + (weights_e * entropy).sum(), params)
    ref_logps, ref_entropy = _full(hidden, weight, b, targets, temperature)
    reference = torch.autograd.grad((weights_l * ref_logps).sum() + (weights_e * ref_entropy).sum(), params)

    torch.testing.assert_close(logps.double(), ref_logps, rtol=0, atol=1e-6)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=0, atol=1e-6)
    for mine, theirs in zip(ours, reference):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6)


def _truncated_reference(hidden, weight, targets, temperature, top_k, top_p):
    """By hand: transformers' own warpers pick the kept tokens, the target is added, and the
    log-softmax and entropy run over those alone (the mask a constant of the gradient)."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = (hidden @ weight.t()) / temperature  # [M, V]
    scores = logits.detach().float()
    for warper in ([TopKLogitsWarper(top_k)] if top_k else []) + ([TopPLogitsWarper(top_p)] if top_p < 1 else []):
        scores = warper(None, scores)
    keep = scores > float("-inf")
    keep[torch.arange(M), targets] = True
    log_probs = logits.masked_fill(~keep, float("-inf")).log_softmax(-1)
    logps = log_probs.gather(1, targets[:, None]).squeeze(1)
    entropy = -(log_probs.exp() * log_probs.masked_fill(~keep, 0)).sum(-1)
    return logps, entropy, keep


@pytest.mark.parametrize("nucleus_path", ["sort", "candidates-bracket", "candidates-bracket-batched"])
@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (0, 0.7), (5, 0.8), (0, 0.95)])
@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_truncated_log_probs_entropies_and_gradients_are_those_of_the_kept_tokens(top_k, top_p, chunk, nucleus_path, monkeypatch):
    """With the sampler's top-k / top-p, the log-probs are of the truncated, renormalized
    distribution; a target outside the kept tokens is kept with them (finite log-prob). The nucleus
    by a whole-row sort (this vocabulary's way), or as at a real vocabulary: 2 candidates, which hold
    some rows' nuclei, and the bracket search for the others, a row at a time or batched."""
    from retrain.rollout import draw as draws

    if nucleus_path != "sort":
        monkeypatch.setattr(draws, "_SORT_ALL_BELOW", 0)
        monkeypatch.setattr(draws, "_SORT_BELOW", 0)
        monkeypatch.setattr(draws, "CANDIDATES", (2,))
    if nucleus_path.endswith("batched"):
        monkeypatch.setattr(draws, "ROW_AT_A_TIME", ())
    hidden, weight, _, targets = _inputs(False, seed=4)
    weights_l = torch.linspace(-1, 2, M, dtype=torch.float64)
    weights_e = torch.linspace(0.5, -1.5, M, dtype=torch.float64)
    logps, entropy = chunked_logps(hidden, weight, None, targets, temperature=0.8, chunk_size=chunk, entropy_grad=True,
                                   top_k=top_k, top_p=top_p)
    ours = torch.autograd.grad((weights_l * logps).sum() + (weights_e * entropy).sum(), [hidden, weight])
    ref_logps, ref_entropy, keep = _truncated_reference(hidden, weight, targets, 0.8, top_k, top_p)
    reference = torch.autograd.grad((weights_l * ref_logps).sum() + (weights_e * ref_entropy).sum(), [hidden, weight])

    assert (keep.sum(-1) < V).all()  # every row truncated, so the check means something
    full_logps, _ = _full(hidden, weight, None, targets, 0.8)
    assert (logps.detach() > full_logps.detach() + 1e-3).all()  # renormalized over fewer tokens
    torch.testing.assert_close(logps.double(), ref_logps, rtol=0, atol=1e-6)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=0, atol=1e-6)
    for mine, theirs in zip(ours, reference):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6)
        assert torch.isfinite(mine).all()


def test_without_entropy_grad_the_entropy_is_detached_and_the_log_prob_gradient_is_unchanged():
    hidden, weight, _, targets = _inputs(False, seed=1)
    logps, entropy = chunked_logps(hidden, weight, None, targets, chunk_size=2)
    assert not entropy.requires_grad
    ours = torch.autograd.grad(logps.sum(), [hidden, weight])
    reference = torch.autograd.grad(_full(hidden, weight, None, targets, 1.0)[0].sum(), [hidden, weight])
    for mine, theirs in zip(ours, reference):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6)


def test_any_leading_shape_is_kept():
    hidden, weight, _, targets = _inputs(False)
    logps, entropy = chunked_logps(hidden[:6].reshape(2, 3, H), weight, None, targets[:6].reshape(2, 3), chunk_size=4)
    assert logps.shape == entropy.shape == (2, 3)
    torch.testing.assert_close(logps.reshape(-1).double(), _full(hidden[:6], weight, None, targets[:6], 1.0)[0], rtol=0, atol=1e-6)


class _LargestTensor(TorchDispatchMode):
    """Records the most elements any op's output had."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


def test_no_tensor_of_all_tokens_by_the_vocabulary_is_created_forward_or_backward():
    generator = torch.Generator().manual_seed(0)
    tokens, vocab, width, chunk = 64, 1000, 8, 4
    hidden = torch.randn(tokens, width, generator=generator, requires_grad=True)
    weight = torch.randn(vocab, width, generator=generator, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    with _LargestTensor() as chunked:
        logps, entropy = chunked_logps(hidden, weight, None, targets, chunk_size=chunk, entropy_grad=True)
        (logps.sum() + entropy.sum()).backward()
    assert chunked.largest <= max(chunk * vocab, vocab * width)  # a chunk's logits, or the head's own gradient
    with _LargestTensor() as full:
        ref_logps, ref_entropy = _full(hidden, weight, None, targets, 1.0)
        (ref_logps.sum() + ref_entropy.sum()).backward()
    assert full.largest >= tokens * vocab  # the check can fail: the full path does create one


def test_the_default_chunk_bounds_a_chunks_logits():
    assert default_chunk_size(151_936) * 151_936 <= 2**24 < (default_chunk_size(151_936) + 1) * 151_936
    assert default_chunk_size(100) == 2**24 // 100
    assert default_chunk_size(10**9) == 1


# ---------------------------------------------------------------------- through real models
def _packed_batch(vocab: int):
    """Two left-padded rows of unequal prompt and completion lengths, as `pack_trajectories` lays them out."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(4, vocab, (2, 9), generator=generator)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # row 1: a shorter prompt
    mask[0, -1] = 0  # row 0: a shorter completion
    return ids, mask, 4


def _logps_and_grads(model, ids, mask, width, chunk, temperature=0.8, pack=False):
    """chunk=None: the full-logits path."""
    from retrain.trainer.experience import completion_logps

    model.zero_grad()
    logps, entropy = completion_logps(
        model, ids, mask, width, temperature=temperature, with_entropy=True, entropy_grad=True,
        full_logits=chunk is None, chunk_size=chunk, pack=pack,
    )
    ((logps * mask[:, -width:]).sum() + 0.1 * (entropy * mask[:, -width:]).sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), entropy.detach(), grads


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=60, n_embd=32, n_head=2, n_layer=2, n_positions=32, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))


def _lora(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("kind", ["llama", "gpt2", "lora"])
def test_the_trainers_log_probs_entropies_and_gradients_equal_the_full_logits_path(tiny_model_dir, kind):
    from transformers import AutoModelForCausalLM

    from retrain.trainer.experience import chunkable_head

    model = {"llama": lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir), "gpt2": _gpt2, "lora": lambda: _lora(tiny_model_dir)}[kind]()
    assert chunkable_head(model) is not None
    ids, mask, width = _packed_batch(model.config.vocab_size)
    full = _logps_and_grads(model, ids, mask, width, chunk=None)
    chunked = _logps_and_grads(model, ids, mask, width, chunk=3)
    keep = mask[:, -width:].bool()
    torch.testing.assert_close(chunked[0][keep], full[0][keep], rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked[1][keep], full[1][keep], rtol=0, atol=1e-5)
    assert chunked[2].keys() == full[2].keys() and full[2]
    for name, grad in full[2].items():
        torch.testing.assert_close(chunked[2][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("pack", [False, True])
def test_truncated_log_probs_through_the_chunked_head_equal_the_full_logits_path(tiny_model_dir, pack):
    from transformers import AutoModelForCausalLM

    from retrain.trainer.experience import completion_logps

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids, mask, width = _packed_batch(model.config.vocab_size)
    keep = mask[:, -width:].bool()
    results = {}
    for name, options in {"full": dict(full_logits=True), "chunked": dict(chunk_size=3), "untruncated": dict(chunk_size=3, top_p=1.0, top_k=0)}.items():
        model.zero_grad()
        logps, entropy = completion_logps(model, ids, mask, width, temperature=0.8, with_entropy=True, entropy_grad=True, pack=pack,
                                          **{"top_k": 4, "top_p": 0.9, **options})
        ((logps * keep).sum() + 0.1 * (entropy * keep).sum()).backward()
        results[name] = (logps.detach(), entropy.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    full, chunked = results["full"], results["chunked"]
    torch.testing.assert_close(chunked[0][keep], full[0][keep], rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked[1][keep], full[1][keep], rtol=0, atol=1e-5)
    for name, grad in full[2].items():
        torch.testing.assert_close(chunked[2][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert (chunked[0][keep] > results["untruncated"][0][keep]).all()  # top-k 4 of 100+ tokens: renormalized upwards
    for full_logits in (False, True):  # a top_k beyond the vocabulary truncates nothing
        wide, _ = completion_logps(model, ids, mask, width, temperature=0.8, top_k=10**6, full_logits=full_logits, pack=pack)
        torch.testing.assert_close(wide.detach()[keep], results["untruncated"][0][keep], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="lm_head_kernel 'retrain'"):
        completion_logps(model, ids, mask, width, top_p=0.9, kernel="trl")


def test_heads_the_chunked_path_does_not_cover_fall_back_to_the_full_logits(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from retrain.trainer.experience import chunkable_head

    adapted_head = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    assert chunkable_head(adapted_head) is None
    ids, mask, width = _packed_batch(adapted_head.config.vocab_size)
    full = _logps_and_grads(adapted_head, ids, mask, width, chunk=None)
    fallback = _logps_and_grads(adapted_head, ids, mask, width, chunk=3)
    torch.testing.assert_close(fallback[0], full[0], rtol=0, atol=0)


def test_grpo_loss_reference_and_gradients_are_unchanged_by_chunking(tiny_model_dir):
    from retrain import GRPOTrainer, PolicyConfig, RewardCalculator, RewardSpec
    from retrain.core.errors import ConfigError
    from retrain.core.records import PromptRecord

    def trainer(**options):
        t = GRPOTrainer(
            policy=PolicyConfig(name_or_path=str(tiny_model_dir)), reward=RewardCalculator([RewardSpec(name="regex_match", kwargs={"pattern": "[a-f]"})]),
            num_generations=4, max_completion_length=6, beta=0.1, temperature=0.9, **options,
        )
        t.configure_model()
        return t

    full, chunked = trainer(full_logits=True), trainer(logits_chunk_size=5)
    torch.manual_seed(0)
    experience = full.gather_experience([PromptRecord(prompt="repeat a: "), PromptRecord(prompt="repeat bb: ")])
    real = experience.attention_mask[:, -experience.completion_width :].bool()  # padding: 0 here, whatever the full logits give there
    torch.testing.assert_close(chunked.reference_logps(experience)[real], experience.ref_logps[real], rtol=0, atol=1e-5)
    assert (chunked.reference_logps(experience)[~real] == 0).all()
    results = []
    for t in (full, chunked):
        t.policy.zero_grad()
        loss, metrics = t.compute_loss(experience)
        loss.backward()
        results.append((loss.detach(), metrics["entropy"], {n: p.grad.clone() for n, p in t.policy.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-6)
    for name, grad in results[0][2].items():
        torch.testing.assert_close(results[1][2][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(ConfigError, match="logits_chunk_size=0"):
        trainer(logits_chunk_size=0)


# ---------------------------------------------------------------------- packed rows
def _multi_turn_batch(vocab: int):
    """Left-padded episodes of unequal length whose completions interleave policy and environment
    tokens (mask 0), laid out by `pack_trajectories` as the trainer does."""
    from retrain.core.episode import Trajectory
    from retrain.core.records import PromptRecord
    from retrain.trainer.experience import pack_trajectories

    generator = torch.Generator().manual_seed(5)

    def ids(n):
        return torch.randint(4, vocab, (n,), generator=generator).tolist()

    episodes = [
        Trajectory(PromptRecord(prompt="a"), ids(3), ids(7), [1, 1, 0, 0, 1, 1, 1]),
        Trajectory(PromptRecord(prompt="b"), ids(6), ids(2), [1, 1]),
        Trajectory(PromptRecord(prompt="c"), ids(1), ids(5), [1, 0, 0, 1, 1]),
    ]
    input_ids, attention_mask, completion_mask = pack_trajectories(episodes, pad_token_id=0)
    return input_ids, attention_mask, completion_mask


@pytest.mark.parametrize("kind", ["llama", "gpt2", "lora"])
@pytest.mark.parametrize("chunk", [None, 4])  # packed with the full logits and with the chunked head
def test_packed_rows_give_the_padded_log_probs_entropies_and_gradients(tiny_model_dir, kind, chunk):
    from transformers import AutoModelForCausalLM

    model = {"llama": lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir), "gpt2": _gpt2, "lora": lambda: _lora(tiny_model_dir)}[kind]()
    ids, mask, completion_mask = _multi_turn_batch(model.config.vocab_size)
    width = completion_mask.size(1)
    padded = _logps_and_grads(model, ids, mask, width, chunk=None)
    packed = _logps_and_grads(model, ids, mask, width, chunk=chunk, pack=True)
    keep = mask[:, -width:].bool()
    torch.testing.assert_close(packed[0][keep], padded[0][keep], rtol=0, atol=1e-5)
    torch.testing.assert_close(packed[1][keep], padded[1][keep], rtol=0, atol=1e-5)
    assert (packed[0][~keep] == 0).all()
    for name, grad in padded[2].items():
        torch.testing.assert_close(packed[2][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_packing_refuses_attention_that_would_mix_rows(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from retrain.trainer.experience import packing_problem

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert packing_problem(model) is None  # sdpa
    model.config._attn_implementation = "paged|sdpa"
    assert "does not keep packed rows apart" in packing_problem(model)
    model.config.model_type = "gemma2"  # checked only for the listed architectures
    assert "model_type 'gemma2'" in packing_problem(model)


# ---------------------------------------------------------------------- the trainer's default path
def test_the_trainers_default_loss_path_creates_no_tensor_of_all_completion_tokens_by_the_vocabulary(tiny_model_dir):
    """Every tensor an op creates in the loss's forward and backward (and the reference and old
    log-prob passes) is recorded: of those with a vocabulary-sized last dimension (logits and their
    kin), none is larger than one chunk's `[4, V]`, while the full path creates `[N, C, V]` ones
    (so the check can fail)."""
    from retrain import GRPOTrainer, PolicyConfig, RewardCalculator, RewardSpec
    from retrain.core.records import PromptRecord

    class LargestTensor(TorchDispatchMode):
        def __init__(self, vocab):
            super().__init__()
            self.vocab, self.largest = vocab, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.is_view:  # a view (the head's `weight.t()`) allocates nothing
                return out
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dim() and t.size(-1) == self.vocab:
                    self.largest = max(self.largest, t.numel())
            return out

    def largest(**options):
        t = GRPOTrainer(
            policy=PolicyConfig(name_or_path=str(tiny_model_dir)), reward=RewardCalculator([RewardSpec(name="regex_match", kwargs={"pattern": "[a-f]"})]),
            num_generations=8, max_completion_length=8, beta=0.1, num_iterations=2, logits_chunk_size=4, **options,
        )
        t.configure_model()
        torch.manual_seed(0)
        records = [PromptRecord(prompt="repeat a: "), PromptRecord(prompt="repeat bb: ")]
        experience = t.gather_experience(records)  # samples, then the old and reference log-prob passes
        vocab = t.policy.config.vocab_size
        with LargestTensor(vocab) as mode:
            t.generation_logps(t.policy, experience)
            t.reference_logps(experience)
            loss, _ = t.compute_loss(experience)
            loss.backward()
        return mode.largest, len(experience) * experience.completion_width * vocab, 4 * vocab

    chunked, logits, chunk = largest()
    full, _, _ = largest(full_logits=True)
    assert full >= logits  # the full path does create them
    assert chunked <= chunk < logits / 10


def test_the_run_says_which_log_prob_path_it_takes(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from retrain.trainer.experience import logps_path

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert logps_path(model, full_logits=False, pack=False) == "the LM head in chunks"
    assert logps_path(model, full_logits=True, pack=True) == "full logits (full_logits: true), rows packed"
    adapted = get_peft_model(model, LoraConfig(r=2, target_modules=["lm_head"]))
    assert logps_path(adapted, full_logits=False, pack=False) == "full logits (the head peft.tuners.lora.layer.Linear is not covered by the chunked head)"


@pytest.mark.parametrize("kind", ["llama", "gpt2", "lora"])
@pytest.mark.parametrize("pack", [False, True])
def test_trls_tiled_kernel_inside_the_same_head_gives_the_full_logits_results(tiny_model_dir, kind, pack):
    from transformers import AutoModelForCausalLM

    from retrain.trainer.experience import completion_logps

    model = {"llama": lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir), "gpt2": _gpt2, "lora": lambda: _lora(tiny_model_dir)}[kind]()
    ids, mask, completion_mask = _multi_turn_batch(model.config.vocab_size)
    width = completion_mask.size(1)
    full = _logps_and_grads(model, ids, mask, width, chunk=None)
    model.zero_grad()
    logps, entropy = completion_logps(
        model, ids, mask, width, temperature=0.8, with_entropy=True, entropy_grad=True, chunk_size=16, pack=pack, kernel="trl",
    )  # a vocabulary tile of 16: several tiles per row
    ((logps * mask[:, -width:]).sum() + 0.1 * (entropy * mask[:, -width:]).sum()).backward()
    keep = mask[:, -width:].bool()
    torch.testing.assert_close(logps.detach()[keep], full[0][keep], rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy.detach()[keep], full[1][keep], rtol=0, atol=1e-5)
    for name, parameter in model.named_parameters():
        if name in full[2]:
            torch.testing.assert_close(parameter.grad, full[2][name], rtol=1e-4, atol=1e-6, msg=name)
