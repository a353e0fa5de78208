"""retrain's own decoder (`retrain.rollout.decoding`) against the model's own forward pass and
`transformers`' sampling rules, on small randomly initialised models of each supported family."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from retrain.rollout.decoding import KVDecoder, sample, supports, unsupported_reason
from retrain.rollout.sampler import BatchingSampler

FAMILIES = ["llama-gqa-bias", "qwen2", "qwen3", "mistral"]


def _reference_logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The model's own next-token logits for left-padded rows (positions follow the mask, as in generate)."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]


@pytest.mark.parametrize("mode", ["packed", "packed-mm", "in-place", "static"])
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_prefill_and_every_decoding_step_match_the_models_forward(family, mode, family_model, device):
    """static: fixed shapes (the whole cache, masked), and on CUDA every step after the second a
    replay of one captured CUDA graph."""
    model = family_model(family).to(device).eval()
    prompts = torch.randint(3, 40, (3, 7), device=device)
    mask = torch.ones_like(prompts)
    mask[0, :4] = 0  # left padding of different lengths, and one row without
    mask[1, :1] = 0
    packed = mode.startswith("packed")
    onednn = {"packed": None if device.type == "cuda" else True, "packed-mm": False}.get(mode, False)  # packed-mm: torch.mm, not oneDNN
    decoder = KVDecoder(model, batch=3, max_length=7 + 5, pack=packed, static=mode == "static", onednn=onednn)
    logits = decoder.prefill(prompts, mask)
    ids = prompts
    for _ in range(5):
        expected = _reference_logits(model, ids, mask)
        torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-4)
        token = expected.argmax(-1)
        ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        logits = decoder.decode(token)
    assert decoder.graph_replays == (4 if mode == "static" and device.type == "cuda" else 0)  # steps 2-5 replayed


def test_static_decoding_checks_its_capacity_and_cuda_graphs_need_cuda(family_model):
    model = family_model("qwen2").eval()
    decoder = KVDecoder(model, batch=1, max_length=3, static=True)
    decoder.prefill(torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.long))
    decoder.decode(torch.tensor([7]))
    with pytest.raises(RuntimeError, match="all 3 cached positions"):
        decoder.decode(torch.tensor([8]))
    with pytest.raises(ValueError, match="CUDA"):
        KVDecoder(model, batch=1, max_length=3, static=True, graph=True)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@torch.no_grad()
def test_bfloat16_policies_decode_like_their_forward(family_model, device, static):
    model = family_model("qwen2").to(device, torch.bfloat16).eval()
    prompts = torch.randint(3, 40, (2, 6), device=device)
    mask = torch.ones_like(prompts)
    mask[0, :2] = 0
    decoder = KVDecoder(model, batch=2, max_length=9, static=static)
    logits, ids = decoder.prefill(prompts, mask), prompts
    for _ in range(3):
        expected = _reference_logits(model, ids, mask)
        assert logits.dtype == torch.bfloat16
        torch.testing.assert_close(logits.float(), expected.float(), atol=3e-2, rtol=3e-2)
        token = expected.argmax(-1)
        ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        logits = decoder.decode(token)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@torch.no_grad()
def test_mixed_precision_decoding_matches_the_forward_under_autocast(tiny_model_dir, device, static):
    """`precision: bf16-mixed` samples under autocast: float32 weights and cache, bf16 products."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).to(device).eval()
    prompts = torch.randint(4, 90, (3, 6), device=device)
    mask = torch.ones_like(prompts)
    mask[0, :2] = 0
    with torch.autocast(device.type, dtype=torch.bfloat16):
        decoder = KVDecoder(model, batch=3, max_length=9, static=static)
        logits, ids = decoder.prefill(prompts, mask), prompts
        for _ in range(3):
            expected = _reference_logits(model, ids, mask)
            torch.testing.assert_close(logits.float(), expected.float(), atol=3e-2, rtol=3e-2)
            token = expected.argmax(-1)
            ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            logits = decoder.decode(token)
    assert decoder.keys[0].dtype == torch.float32


@torch.no_grad()
def test_tiny_local_model_decodes_identically_with_padding(tiny_model_dir, device):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).to(device).eval()
    prompts = torch.randint(4, 90, (2, 9), device=device)
    mask = torch.ones_like(prompts)
    mask[1, :5] = 0
    decoder = KVDecoder(model, batch=2, max_length=12)
    torch.testing.assert_close(decoder.prefill(prompts, mask), _reference_logits(model, prompts, mask), atol=2e-5, rtol=1e-4)


def test_rows_end_at_their_first_eos_and_pad_after_it(tiny_model_dir, device):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).to(device).eval()
    vocab = model.config.vocab_size
    keep, pad = 10, 0
    eos = [t for t in range(vocab) if t != keep]  # every token but one ends a row: rows end almost at once
    prompts = torch.randint(4, 90, (16, 5), device=device)
    torch.manual_seed(0)
    out = sample(model, prompts, torch.ones_like(prompts), max_new_tokens=20, eos_token_ids=eos, pad_token_id=pad, min_new_tokens=3)
    assert (out[:, :3] == keep).all()  # end-of-sequence is suppressed before min_new_tokens
    ended_at = []
    for row in out.tolist():
        first = next(i for i, t in enumerate(row) if t in eos) if any(t in eos for t in row) else None
        assert first is not None, row
        assert all(t == pad for t in row[first + 1 :]), row
        ended_at.append(first)
    assert out.size(1) == max(ended_at) + 1  # the loop stops once every row has ended
    # decoding runs in inference mode, but what it returns is an ordinary tensor: training may use it
    assert not out.is_inference()
    out.add_(0)


def test_sampler_backends_draw_the_same_tokens(tiny_model_dir, device):
    """Same weights, same rules, same random draws (`draw="generate"`): both backends produce the
    same rollouts, and a checkpoint's own generation defaults (as hub models ship them) change neither."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).to(device)
    model.generation_config.update(repetition_penalty=5.0, min_p=0.5, suppress_tokens=[5, 6], top_k=3)
    contexts = [tokenizer("repeat a: ")["input_ids"], tokenizer("a much longer prompt: ")["input_ids"], tokenizer("x")["input_ids"]]
    outputs = {}
    for backend in ("auto", "transformers"):
        sampler = BatchingSampler(model, tokenizer, max_new_tokens=12, temperature=0.9, top_k=20, top_p=0.95, backend=backend, draw="generate")
        assert sampler.uses_own_decoder == (backend == "auto")
        torch.manual_seed(3)
        outputs[backend] = sampler._generate_batch(contexts * 4, 12)
    assert outputs["auto"] == outputs["transformers"]


def test_unsupported_models_use_generate(tiny_model_dir, family_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, padding_side="left")
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=tokenizer.vocab_size + 4, n_embd=16, n_layer=1, n_head=2))
    assert "GPT2LMHeadModel" in unsupported_reason(gpt2)
    sampler = BatchingSampler(gpt2, tokenizer, max_new_tokens=4)
    assert not sampler.uses_own_decoder
    assert len(sampler._generate_batch([tokenizer("abc")["input_ids"]], 4)[0]) <= 4

    peft = pytest.importorskip("peft")
    dora = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    assert "variant" in unsupported_reason(dora)
    with pytest.raises(ValueError, match="variant"):
        KVDecoder(dora, 1, 4)
    embedding = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), peft.LoraConfig(r=2, target_modules=["embed_tokens"]))
    assert "embed_tokens" in unsupported_reason(embedding)

    assert "dynamic" in unsupported_reason(family_model("llama-dynamic-rope"))


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "in-place"])
@torch.no_grad()
def test_lora_policies_decode_with_their_adapter(tiny_model_dir, pack, device):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_bias=True)).to(device).eval()
    for name, param in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; a trained adapter is not
            param.normal_(0, 0.5)
    assert supports(model) and BatchingSampler(model, AutoTokenizer.from_pretrained(tiny_model_dir), max_new_tokens=2).uses_own_decoder
    prompts = torch.randint(4, 90, (3, 8), device=device)
    mask = torch.ones_like(prompts)
    mask[2, :3] = 0
    adapted = _reference_logits(model, prompts, mask)
    with model.disable_adapter():
        plain = _reference_logits(model, prompts, mask)
        torch.testing.assert_close(KVDecoder(model, 3, 8, pack=pack).prefill(prompts, mask), plain, atol=2e-5, rtol=1e-4)
    assert (adapted - plain).abs().max() > 1e-2  # the adapter matters...
    decoder = KVDecoder(model, 3, 12, pack=pack)
    torch.testing.assert_close(decoder.prefill(prompts, mask), adapted, atol=2e-5, rtol=1e-4)  # ...and is applied
    token = adapted.argmax(-1)
    ids, mask = torch.cat([prompts, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    torch.testing.assert_close(decoder.decode(token), _reference_logits(model, ids, mask), atol=2e-5, rtol=1e-4)
