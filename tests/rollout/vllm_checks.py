"""Measurements on a real vLLM engine (the CPU build), run in a process of their own.

`tests/rollout/test_vllm_engine.py` runs this script once and asserts on what it prints: vLLM
initialises torch.distributed and pins memory for the whole process it runs in, which the test
process must not inherit. One engine serves every scenario (building one costs seconds).

    python tests/rollout/vllm_checks.py WORKDIR    # prints one JSON object on its last line
"""

from __future__ import annotations

import asyncio
import copy
import json
import sys
from pathlib import Path

import torch


def _trainer_logps(model, context: list[int], tokens: list[int], temperature: float) -> torch.Tensor:
    """The trainer's own log-probs of `tokens` after `context` (its loss path, `completion_logps`)."""
    from retrain.trainer.experience import completion_logps

    ids = torch.tensor([context + tokens])
    with torch.no_grad():
        logps, _ = completion_logps(model, ids, torch.ones_like(ids), len(tokens), temperature=temperature)
    return logps[0]


def _top_k_logps(model, context: list[int], tokens: list[int], temperature: float, k: int) -> torch.Tensor:
    """Log-probs of `tokens` under the top-k truncated, renormalised distribution (by hand)."""
    ids = torch.tensor([context + tokens])
    with torch.no_grad():
        logits = model(ids).logits[0, len(context) - 1 : -1].float() / temperature  # [C, V]
    kth = logits.topk(k, dim=-1).values[:, -1:]
    logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)


def _sample(sampler, contexts: list[list[int]]):
    async def run():
        sampler.active_episodes = len(contexts)
        return await asyncio.gather(*(sampler.generate(c) for c in contexts))

    return asyncio.run(run())


def _max_diff(model, contexts, generations, temperature: float) -> float:
    diffs = [
        (torch.tensor(g.logprobs) - _trainer_logps(model, c, g.token_ids, temperature)).abs().max().item()
        for c, g in zip(contexts, generations)
    ]
    return max(diffs)


def main(workdir: Path) -> dict:
    from retrain.models.loading import PolicyConfig, load_policy, load_tokenizer
    from retrain.models.tiny import TinyModelConfig, build_tiny_model
    from retrain.rollout.sampler import BatchingSampler
    from retrain.rollout.vllm_engine import VLLMEngine, VLLMOptions, policy_weights

    path = workdir / "tiny-h64"
    if not path.exists():
        build_tiny_model(path, TinyModelConfig(hidden_size=128, num_heads=2, num_layers=2, intermediate_size=256))
    config = PolicyConfig(name_or_path=str(path))
    tokenizer, model = load_tokenizer(config), load_policy(config)
    options = VLLMOptions(kv_cache_memory_bytes=64 * 2**20, enforce_eager=True)
    torch.manual_seed(0)
    engine = VLLMEngine(str(path), options, dtype=torch.float32, seed=0)
    threads_after_build = torch.get_num_threads()
    engine.sync(model, version=0)
    contexts = [tokenizer(f"repeat {c}: ")["input_ids"] for c in "abcdefgh"]
    out: dict = {"threads_after_build": threads_after_build, "torch_threads": torch.get_num_threads()}

    def sampler(**kwargs):
        return BatchingSampler(model, tokenizer, max_new_tokens=kwargs.pop("max_new_tokens", 24), backend="vllm", engine=engine, **kwargs)

    # 1. vLLM's log-probs are the trainer's, at two temperatures.
    for temperature in (1.0, 0.7):
        generations = _sample(sampler(temperature=temperature), contexts)
        out[f"diff_t{temperature}"] = _max_diff(model, contexts, generations, temperature)
        out[f"lengths_t{temperature}"] = [len(g.token_ids) for g in generations]

    # 2. After an optimizer step the engine samples from the new weights.
    old = copy.deepcopy(model)
    generations = _sample(sampler(), contexts)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-2)
    loss = -sum(_trainer_logps_grad(model, c, g.token_ids) for c, g in zip(contexts, generations))
    loss.backward()
    optimizer.step()
    engine.sync(model, version=1)
    generations = _sample(sampler(), contexts)
    out["after_step_diff_new"] = _max_diff(model, contexts, generations, 1.0)
    out["after_step_diff_old"] = _max_diff(old, contexts, generations, 1.0)
    engine.sync(model, version=1)  # the same version again: nothing is pushed
    out["pushes_skipped"] = engine.weights_version == 1

    # 3. top-k: the log-probs of the truncated distribution the engine drew from.
    generations = _sample(sampler(top_k=5), contexts)
    out["top_k_diff"] = max(
        (torch.tensor(g.logprobs) - _top_k_logps(model, c, g.token_ids, 1.0, 5)).abs().max().item() for c, g in zip(contexts, generations)
    )

    # 4. Seeded from torch's generator: the same seed draws the same tokens, identical prompts differ.
    same = [tokenizer("repeat z: ")["input_ids"]] * 8
    torch.manual_seed(123)
    first = [g.token_ids for g in _sample(sampler(), same)]
    torch.manual_seed(123)
    second = [g.token_ids for g in _sample(sampler(), same)]
    torch.manual_seed(124)
    third = [g.token_ids for g in _sample(sampler(), same)]
    out["same_seed_same_tokens"] = first == second
    out["other_seed_other_tokens"] = first != third
    out["distinct_in_batch"] = len({tuple(t) for t in first})

    # 5. End of sequence: make <eos> likely (its tied embedding row along the mean final hidden state),
    # push, and check the cut rule and min_new_tokens.
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        hidden = model(torch.tensor([contexts[0]]), output_hidden_states=True).hidden_states[-1][0].mean(0)
        model.get_input_embeddings().weight[eos] = 6.0 * hidden / hidden.norm() ** 2
    engine.sync(model, version=2)
    generations = _sample(sampler(), contexts)
    out["eos_ended"] = sum(1 for g in generations if g.token_ids and g.token_ids[-1] == eos and not g.truncated)
    out["eos_inside"] = sum(1 for g in generations if eos in g.token_ids[:-1])
    out["eos_diff"] = _max_diff(model, contexts, generations, 1.0)
    generations = _sample(sampler(min_new_tokens=5), contexts)
    out["min_new_tokens_lengths"] = [len(g.token_ids) for g in generations]

    # 6. A LoRA policy: merged weights pushed, the policy's own weights untouched.
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2)
    before = {name: tensor.clone() for name, tensor in lora.state_dict().items()}
    names = [name for name, _ in policy_weights(lora)]
    engine.sync(lora, version=3)
    generations = _sample(sampler(), contexts)
    out["lora_diff"] = _max_diff(lora, contexts, generations, 1.0)
    out["stamped_versions"] = sorted({g.policy_version for g in generations})
    out["lora_base_diff"] = _max_diff(model, contexts, generations, 1.0)  # the same weights without the adapter
    out["lora_weights_untouched"] = all(torch.equal(before[n], t) for n, t in lora.state_dict().items())
    out["lora_names_are_checkpoint_names"] = sorted(names) == sorted(model.state_dict())
    return out


def _trainer_logps_grad(model, context: list[int], tokens: list[int]) -> torch.Tensor:
    from retrain.trainer.experience import completion_logps

    ids = torch.tensor([context + tokens])
    logps, _ = completion_logps(model, ids, torch.ones_like(ids), len(tokens), temperature=1.0)
    return logps.sum()


if __name__ == "__main__":
    result = main(Path(sys.argv[1]))
    print(json.dumps(result))
