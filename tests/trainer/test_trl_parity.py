"""Numerical parity of retrain's pure GRPO/RLOO math with TRL 1.16, driven through real TRL trainers.

Nothing here re-derives TRL's math: every TRL number comes from a method of a real `trl.GRPOTrainer` or
`trl.RLOOTrainer` built on the tiny local model (float64), and every retrain number from the pure
functions in `retrain.trainer` fed with log-probs from our own `completion_logps`.

How the TRL side is driven
--------------------------
* One trainer of each kind per module (`grpo_trainer`, `rloo_trainer`). Per case, `monkeypatch` sets the
  attributes TRL reads *at call time* (checked in TRL's source) and restores them afterwards:
  - `GRPOTrainer._compute_loss`: `loss_type`, `importance_sampling_level`, `beta`, `epsilon_low`,
    `epsilon_high`, `top_entropy_quantile`, `current_gradient_accumulation_steps`,
    `args.steps_per_generation`, `args.sapo_temperature_pos/neg`. Also read there and left as
    constructed: `max_completion_length` (8), `args.use_bias_correction_kl` (TRL's default, True),
    `args.delta` (None), `off_policy_mask_threshold` (None), `use_vllm` (False), `model.training` (True).
  - `GRPOTrainer._generate_and_score_completions`: `scale_rewards` (`beta` stays 0.04, so TRL also
    returns reference log-probs for the generated batch).
  - `RLOOTrainer._generate_and_score_completions`: `beta` (KL in the reward), `normalize_advantages`.
  - `RLOOTrainer._compute_loss`: `epsilon_low`, `epsilon_high`.
  The sampling temperature is baked into TRL's fused LM head at construction, so it is a constructor
  argument (`TEMPERATURE`, not 1, so the temperature scaling is checked too).
* Normalisers: in train mode TRL divides the `grpo`/`bnpo`/`dr_grpo`/`sapo` losses by
  `current_gradient_accumulation_steps`, and divides the `dapo`/`cispo` sum by
  `num_items_in_batch / num_processes * current_gradient_accumulation_steps / steps_per_generation`.
  We set `current_gradient_accumulation_steps = steps_per_generation = 1` (one process), so TRL's
  returned loss is the per-micro-batch loss that `policy_loss` computes, and `num_items_in_batch` reaches
  the `dapo`/`cispo` denominator unchanged. `num_items_in_batch` is deliberately larger than the local
  token count (as when it spans a bigger generation batch) so the two cannot be confused.
  `RLOOTrainer._compute_loss` applies no normaliser (the HF Trainer does).

Tolerances
----------
TRL 1.16 computes log-probs and entropies with a fused, chunked LM-head kernel whose accumulators are
float32 even for a float64 model (`trl/kernels/chunked_logprob.py`), so TRL's per-token log-probs carry
~1e-7 relative error against our float64 ones. Losses and advantages are compared with an absolute
tolerance of 1e-6 (observed: < 1e-7 where the math agrees); parameter gradients, whose LM-head part TRL
also accumulates in float32, with a tolerance of 1e-5 relative to the largest gradient entry.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from retrain.trainer.advantages import group_advantages, kl_penalized_rewards, rloo_advantages  # noqa: E402
from retrain.trainer.experience import completion_logps  # noqa: E402
from retrain.trainer.losses import high_entropy_mask, policy_loss, rloo_loss  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")  # TRL/transformers warn about CPU-only and experimental options

TEMPERATURE = 0.8
G = 4  # num_generations
MAX_COMPLETION_LENGTH = 8  # TRL's constant for dr_grpo; wider than the hand-made batch's completions (6)
LOSS_ATOL = 1e-6
GRAD_RTOL = 1e-5
EPSILON = 0.2
EPSILON_HIGH = 0.28  # DAPO's clip-higher, for the clipped objectives
CISPO_CAP = 1.2  # for cispo `epsilon_high` is the cap on the ratio itself
NUM_ITEMS_EXTRA = 7  # num_items_in_batch = local tokens + this (tokens of other micro-batches)
# TRL 1.16's default: the per-token KL is multiplied by the (differentiable) importance ratio. The GRPO
# loss cases are held to TRL as it ships; set False only to compare against the uncorrected KL.
TRL_USE_BIAS_CORRECTION_KL = True

# Pre-chosen rewards, keyed by the dataset column `row` that each rollout carries into the reward function,
# so we know exactly which reward went to which output row. Three prompts x G = 4 rollouts; the middle
# group has zero variance (its GRPO advantages must be 0, not NaN).
PROMPTS = ["abc", "hello there", "xy"]
REWARDS = [0.5, 1.0, -1.0, 2.0, 3.0, 3.0, 3.0, 3.0, 0.0, 0.25, 0.0, 1.5]
REWARD_CALLS: list[list[int]] = []


def reward_by_row(prompts, completions, row, **kwargs):
    REWARD_CALLS.append(list(row))
    return [REWARDS[r] for r in row]


def _rollout_inputs() -> list[dict]:
    # G consecutive copies of each prompt, the layout TRL's sampler gives `_generate_and_score_completions`
    return [{"prompt": PROMPTS[i // G], "row": i} for i in range(len(REWARDS))]


# --------------------------------------------------------------------------------------------------------
# Fixtures: one model, tokenizer and trainer of each kind per module
# --------------------------------------------------------------------------------------------------------


def _policy_model(model_dir) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(model_dir).double()
    # A random 100-token model almost never samples <eos> in 8 tokens. Scaling the (tied) <eos> row makes
    # some generated completions stop early, so the generated batches have right padding too.
    with torch.no_grad():
        model.get_output_embeddings().weight[model.config.eos_token_id] *= 6.0
    return model


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def dataset():
    return datasets.Dataset.from_list(_rollout_inputs())


def _common_args(output_dir) -> dict:
    return dict(
        output_dir=str(output_dir),
        report_to="none",
        per_device_train_batch_size=G,
        num_generations=G,
        max_completion_length=MAX_COMPLETION_LENGTH,
        temperature=TEMPERATURE,
        use_cpu=True,
        bf16=False,
        logging_strategy="no",
        save_strategy="no",
        seed=0,
    )


@pytest.fixture(scope="module")
def grpo_trainer(tiny_model_dir, tokenizer, dataset, tmp_path_factory):
    # beta > 0 at construction so TRL builds its reference model (loaded from the same directory, float64)
    args = trl.GRPOConfig(**_common_args(tmp_path_factory.mktemp("grpo")), beta=0.04, use_bias_correction_kl=TRL_USE_BIAS_CORRECTION_KL)
    trainer = trl.GRPOTrainer(
        model=_policy_model(tiny_model_dir), reward_funcs=reward_by_row, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.model.train()
    assert trainer.ref_model is not None and trainer.model.dtype == torch.float64
    assert trl.GRPOConfig.use_bias_correction_kl is True  # still TRL's default (see TRL_USE_BIAS_CORRECTION_KL)
    return trainer


@pytest.fixture(scope="module")
def rloo_trainer(tiny_model_dir, tokenizer, dataset, tmp_path_factory):
    args = trl.RLOOConfig(**_common_args(tmp_path_factory.mktemp("rloo")), beta=0.05)
    trainer = trl.RLOOTrainer(
        model=_policy_model(tiny_model_dir), reward_funcs=reward_by_row, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.model.train()
    # TRL's reference model is the untouched checkpoint; move it away from the policy so the KL is not ~0
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainer.ref_model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return trainer


# --------------------------------------------------------------------------------------------------------
# A hand-made batch: left-padded prompts, right-padded completions of lengths 6, 4, 1, 5 (16 tokens)
# --------------------------------------------------------------------------------------------------------

PROMPT_LENGTHS = [5, 3, 4, 2]
COMPLETION_LENGTHS = [6, 4, 1, 5]
ADVANTAGES = [1.3, -0.7, 0.4, -1.1]
# old = current + offset (per row): ratio = exp(-offset). Row 0 (A > 0): ratio ~1.5, clipped high; row 1
# (A < 0): ~0.70, clipped low; rows 2 and 3 move the other way and stay unclipped. Token noise on top.
OLD_OFFSETS = [-0.4, 0.35, 0.25, -0.1]


@dataclass
class Batch:
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    advantages: torch.Tensor  # [N] float64
    logps: torch.Tensor  # [N, C] our on-policy log-probs (no grad)
    old_logps: torch.Tensor  # [N, C] perturbed per token
    old_logps_seq: torch.Tensor  # [N, C] perturbed so that each *sequence* log-ratio is exactly -offset
    ref_logps: torch.Tensor  # [N, C]

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def width(self) -> int:
        return self.completion_ids.size(1)

    @property
    def num_items_in_batch(self) -> torch.Tensor:  # int64, as TRL's generation step makes it
        return self.completion_mask.sum() + NUM_ITEMS_EXTRA


def _make_batch(model, tokenizer) -> Batch:
    gen = torch.Generator().manual_seed(0)
    n, p, c = len(PROMPT_LENGTHS), max(PROMPT_LENGTHS), max(COMPLETION_LENGTHS)
    vocab = len(tokenizer)
    prompt_ids = torch.full((n, p), tokenizer.pad_token_id)
    prompt_mask = torch.zeros((n, p), dtype=torch.long)
    completion_ids = torch.full((n, c), tokenizer.pad_token_id)
    completion_mask = torch.zeros((n, c), dtype=torch.long)
    for i, (pl, cl) in enumerate(zip(PROMPT_LENGTHS, COMPLETION_LENGTHS)):
        prompt_ids[i, p - pl :] = torch.randint(4, vocab, (pl,), generator=gen)  # 0-3 are the special tokens
        prompt_mask[i, p - pl :] = 1
        completion_ids[i, :cl] = torch.randint(4, vocab, (cl,), generator=gen)
        completion_mask[i, :cl] = 1
    with torch.no_grad():
        logps, _ = completion_logps(
            model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1), c, temperature=TEMPERATURE
        )
    offsets = torch.tensor(OLD_OFFSETS, dtype=torch.float64).unsqueeze(1)
    maskf = completion_mask.double()
    old = logps + offsets + 0.15 * torch.randn((n, c), generator=gen, dtype=torch.float64)
    old_seq = logps + offsets * maskf / maskf.sum(1, keepdim=True)  # sum_t (logp - old) = -offset per row
    ref = logps + 0.3 * torch.randn((n, c), generator=gen, dtype=torch.float64)
    return Batch(prompt_ids, prompt_mask, completion_ids, completion_mask, torch.tensor(ADVANTAGES, dtype=torch.float64), logps, old, old_seq, ref)


@pytest.fixture(scope="module")
def grpo_batch(grpo_trainer, tokenizer) -> Batch:
    return _make_batch(grpo_trainer.model, tokenizer)


@pytest.fixture(scope="module")
def rloo_batch(rloo_trainer, tokenizer) -> Batch:
    return _make_batch(rloo_trainer.model, tokenizer)


def _grads(model) -> torch.Tensor:
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return grads


def _assert_grads_close(trl_grads: torch.Tensor, our_grads: torch.Tensor):
    scale = our_grads.abs().max()
    assert scale > 0
    err = (trl_grads - our_grads).abs().max() / scale
    assert err <= GRAD_RTOL, f"max |grad difference| / max |grad| = {err:.3e}"


# --------------------------------------------------------------------------------------------------------
# Log-probs and entropies
# --------------------------------------------------------------------------------------------------------


def test_completion_logps_match_trl(grpo_trainer, grpo_batch):
    b = grpo_batch
    ours, our_entropy = completion_logps(grpo_trainer.model, b.input_ids, b.attention_mask, b.width, temperature=TEMPERATURE, with_entropy=True)
    with torch.no_grad():
        theirs, their_entropy, _ = grpo_trainer._get_per_token_logps_and_entropies(
            grpo_trainer.model, b.input_ids, b.attention_mask, b.width, compute_entropy=True
        )
    mask = b.completion_mask.bool()  # TRL scores only attended completion tokens (padding -> 0)
    torch.testing.assert_close(ours[mask], theirs[mask].to(ours.dtype), rtol=0, atol=1e-6)
    torch.testing.assert_close(our_entropy[mask], their_entropy[mask].to(our_entropy.dtype), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------------
# GRPO loss: every loss_type x importance_sampling_level x beta x on/off-policy x entropy masking
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossCase:
    loss_type: str
    level: str = "token"
    beta: float = 0.0
    off_policy: bool = False
    top_entropy_quantile: float = 1.0

    @property
    def epsilon_high(self) -> float:
        return CISPO_CAP if self.loss_type == "cispo" else EPSILON_HIGH

    def __str__(self) -> str:
        policy = "off" if self.off_policy else "on"
        return f"{self.loss_type}-{self.level}-beta{self.beta}-{policy}policy-q{self.top_entropy_quantile}"


LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"]
# q = 0.5 over 16 tokens puts TRL's quantile (position 7.5) between two entropies; an exact-boundary
# quantile is tested on its own in `test_entropy_mask_at_an_exact_quantile_matches_trl_pipeline`.
LOSS_CASES = [
    LossCase(lt, level, beta, off, q)
    for lt, level, beta, off, q in itertools.product(LOSS_TYPES, ["token", "sequence"], [0.0, 0.04], [False, True], [1.0, 0.5])
]
SAPO_TEMPERATURES = (0.9, 1.3)  # not TRL's defaults, so the plumbing is checked


def _configure_grpo(monkeypatch, trainer, case: LossCase):
    monkeypatch.setattr(trainer, "loss_type", case.loss_type)
    monkeypatch.setattr(trainer, "importance_sampling_level", case.level)
    monkeypatch.setattr(trainer, "beta", case.beta)
    monkeypatch.setattr(trainer, "epsilon_low", EPSILON)
    monkeypatch.setattr(trainer, "epsilon_high", case.epsilon_high)
    monkeypatch.setattr(trainer, "top_entropy_quantile", case.top_entropy_quantile)
    monkeypatch.setattr(trainer, "current_gradient_accumulation_steps", 1, raising=False)  # set by HF's loop
    monkeypatch.setattr(trainer.args, "steps_per_generation", 1)
    monkeypatch.setattr(trainer.args, "sapo_temperature_pos", SAPO_TEMPERATURES[0])
    monkeypatch.setattr(trainer.args, "sapo_temperature_neg", SAPO_TEMPERATURES[1])
    trainer._metrics["train"].clear()


def _trl_grpo_loss(trainer, b: Batch, case: LossCase) -> torch.Tensor:
    inputs = {
        "prompt_ids": b.prompt_ids,
        "prompt_mask": b.prompt_mask,
        "completion_ids": b.completion_ids,
        "completion_mask": b.completion_mask,
        "advantages": b.advantages,
        "num_items_in_batch": b.num_items_in_batch,
    }
    if case.off_policy:
        inputs["old_per_token_logps"] = b.old_logps
    # else: no old log-probs, so TRL uses per_token_logps.detach() (ratio exactly 1), as policy_loss does
    if case.beta:
        inputs["ref_per_token_logps"] = b.ref_logps
    return trainer._compute_loss(trainer.model, inputs)


def _our_grpo_loss(trainer, b: Batch, case: LossCase):
    logps, entropy = completion_logps(trainer.model, b.input_ids, b.attention_mask, b.width, temperature=TEMPERATURE, with_entropy=True)
    entropy_mask = high_entropy_mask(entropy, b.completion_mask, case.top_entropy_quantile) if case.top_entropy_quantile < 1 else None
    return policy_loss(
        logps,
        b.advantages,
        b.completion_mask,
        old_logps=b.old_logps if case.off_policy else None,
        ref_logps=b.ref_logps if case.beta else None,
        beta=case.beta,
        epsilon=EPSILON,
        epsilon_high=case.epsilon_high,
        loss_type=case.loss_type,
        importance_sampling_level=case.level,
        entropy_mask=entropy_mask,
        sapo_temperature_pos=SAPO_TEMPERATURES[0],
        sapo_temperature_neg=SAPO_TEMPERATURES[1],
        max_completion_length=trainer.max_completion_length,
        num_items_in_batch=b.num_items_in_batch,
    )


@pytest.mark.parametrize("case", LOSS_CASES, ids=str)
def test_grpo_loss_matches_trl(grpo_trainer, grpo_batch, monkeypatch, case):
    _configure_grpo(monkeypatch, grpo_trainer, case)
    with torch.no_grad():
        theirs = _trl_grpo_loss(grpo_trainer, grpo_batch, case)
        ours, stats = _our_grpo_loss(grpo_trainer, grpo_batch, case)
    if case.off_policy and case.loss_type != "sapo":  # the perturbation must clip something (sapo never clips)
        assert stats.clip_ratio > 0
    assert abs(theirs.item() - ours.item()) <= LOSS_ATOL, f"TRL {theirs.item():.10f} vs retrain {ours.item():.10f}"


GRAD_CASES = [
    LossCase("grpo", "token", 0.0, True),
    LossCase("bnpo", "token", 0.0, True, 0.5),
    LossCase("dr_grpo", "sequence", 0.0, True),
    LossCase("dapo", "token", 0.0, True),
    LossCase("dapo", "sequence", 0.0, True),
    LossCase("cispo", "token", 0.0, True),
    LossCase("sapo", "token", 0.0, True),
    LossCase("sapo", "sequence", 0.0, True, 0.5),
    # with a KL term: on-policy the loss *values* agree, the gradients are what tells the KL terms apart
    LossCase("grpo", "token", 0.04, False),
    LossCase("dapo", "token", 0.04, True),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=str)
def test_grpo_loss_gradients_match_trl(grpo_trainer, grpo_batch, monkeypatch, case):
    _configure_grpo(monkeypatch, grpo_trainer, case)
    model = grpo_trainer.model
    model.zero_grad(set_to_none=True)
    _trl_grpo_loss(grpo_trainer, grpo_batch, case).backward()
    trl_grads = _grads(model)
    _our_grpo_loss(grpo_trainer, grpo_batch, case)[0].backward()
    _assert_grads_close(trl_grads, _grads(model))


STATS_CASES = [
    LossCase("grpo", "token", 0.0, True),
    LossCase("dapo", "sequence", 0.0, True),
    LossCase("cispo", "token", 0.0, True),
    LossCase("cispo", "sequence", 0.0, True),
    LossCase("bnpo", "token", 0.04, False),
    LossCase("bnpo", "token", 0.04, True),
]


@pytest.mark.parametrize("case", STATS_CASES, ids=str)
def test_grpo_loss_stats_match_trl_metrics(grpo_trainer, grpo_batch, monkeypatch, case):
    """Our `LossStats` against the metrics `_compute_loss` logs (single process, so `gather` is the identity).

    TRL's conventions: token-level clip indicators are averaged over policy tokens, sequence-level ones
    (shape `[N, 1]`) over sequences; the logged `kl` is the KL term as it enters the loss (with
    `use_bias_correction_kl`, multiplied by the importance ratio).
    """
    _configure_grpo(monkeypatch, grpo_trainer, case)
    with torch.no_grad():
        _trl_grpo_loss(grpo_trainer, grpo_batch, case)
        _, stats = _our_grpo_loss(grpo_trainer, grpo_batch, case)
    logged = {k: v[-1] for k, v in grpo_trainer._metrics["train"].items()}
    if case.loss_type == "cispo":
        expected = {"clip_ratio_high": logged["cispo_clip_ratio"], "clip_ratio": logged["cispo_clip_ratio"]}
    else:
        expected = {
            "clip_ratio_low": logged["clip_ratio/low_mean"],
            "clip_ratio_high": logged["clip_ratio/high_mean"],
            "clip_ratio": logged["clip_ratio/region_mean"],
        }
    if case.beta:
        expected["kl"] = logged["kl"]
    ours = {name: getattr(stats, name).item() for name in expected}
    assert ours == pytest.approx(expected, abs=1e-6)


def test_entropy_mask_at_an_exact_quantile_matches_trl_pipeline(grpo_trainer, grpo_batch):
    """Where TRL's entropy quantile lands exactly on a token's entropy, that token must be kept by both.

    Rows 1 and 3 hold 4 + 5 = 9 tokens, so `torch.quantile` at k / 8 (exact in binary) returns the k-th
    smallest entropy itself. TRL's pipeline masks its own (float32) entropies; ours masks the entropies
    `completion_logps` returns (float64 for this float64 model).
    """
    trainer, b = grpo_trainer, grpo_batch
    rows = [1, 3]
    input_ids, attention_mask, mask = b.input_ids[rows], b.attention_mask[rows], b.completion_mask[rows]
    with torch.no_grad():
        _, our_entropy = completion_logps(trainer.model, input_ids, attention_mask, b.width, temperature=TEMPERATURE, with_entropy=True)
        _, their_entropy, _ = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask, b.width, compute_entropy=True)
    n = int(mask.sum())
    assert n == 9
    mismatches = []
    for k in range(1, n - 1):
        top_quantile = 1 - k / (n - 1)
        theirs = trainer.get_high_entropy_mask(their_entropy, mask, 1 - top_quantile)  # TRL passes 1 - q
        ours = high_entropy_mask(our_entropy, mask, top_quantile)
        assert int(theirs.sum()) == n - k  # the boundary token is kept by TRL
        if not torch.equal(ours, theirs):
            mismatches.append((top_quantile, int(ours.sum()), int(theirs.sum())))
    assert not mismatches, f"(top_quantile, tokens kept by retrain, by TRL): {mismatches}"


# --------------------------------------------------------------------------------------------------------
# Advantages through real generation
# --------------------------------------------------------------------------------------------------------


def _generate(trainer) -> dict:
    REWARD_CALLS.clear()
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions(_rollout_inputs())
    assert REWARD_CALLS == [list(range(len(REWARDS)))]  # one call, rows in output order
    return out


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_grpo_advantages_match_trl(grpo_trainer, monkeypatch, scale_rewards):
    monkeypatch.setattr(grpo_trainer, "scale_rewards", scale_rewards)
    out = _generate(grpo_trainer)
    ours = group_advantages(torch.tensor(REWARDS, dtype=torch.float64), G, scale_rewards).advantages
    torch.testing.assert_close(ours, out["advantages"].to(ours.dtype), rtol=0, atol=1e-6)


def test_grpo_generated_batch_is_padded_and_ref_logps_match(grpo_trainer):
    """The generated batch has left- and right-padding, and TRL's reference log-probs on it are ours."""
    out = _generate(grpo_trainer)
    mask = out["completion_mask"]
    assert (out["prompt_mask"] == 0).any() and (mask == 0).any()
    assert int(out["num_items_in_batch"]) == int(mask.sum())
    input_ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    attention_mask = torch.cat([out["prompt_mask"], mask], 1)
    with torch.no_grad():
        ref, _ = completion_logps(grpo_trainer.ref_model, input_ids, attention_mask, mask.size(1), temperature=TEMPERATURE)
    torch.testing.assert_close(ref[mask.bool()], out["ref_per_token_logps"][mask.bool()].to(ref.dtype), rtol=0, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.05])
@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_advantages_match_trl(rloo_trainer, monkeypatch, normalize, beta):
    monkeypatch.setattr(rloo_trainer, "normalize_advantages", normalize)
    monkeypatch.setattr(rloo_trainer, "beta", beta)
    out = _generate(rloo_trainer)
    rewards = torch.tensor(REWARDS, dtype=torch.float64)
    mask = out["completion_mask"]
    input_ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    attention_mask = torch.cat([out["prompt_mask"], mask], 1)
    with torch.no_grad():
        old, _ = completion_logps(rloo_trainer.model, input_ids, attention_mask, mask.size(1), temperature=TEMPERATURE)
    # TRL hands the sequence-level old log-probs to the loss
    torch.testing.assert_close((old * mask).sum(1), out["old_logps"].to(old.dtype), rtol=0, atol=1e-5)
    if beta:
        with torch.no_grad():
            ref, _ = completion_logps(rloo_trainer.ref_model, input_ids, attention_mask, mask.size(1), temperature=TEMPERATURE)
        penalized = kl_penalized_rewards(rewards, old, ref, mask, beta)
        assert (penalized - rewards).abs().max() > 1e-3  # the KL term is not negligible
        rewards = penalized
    ours = rloo_advantages(rewards, G, normalize=normalize).advantages
    torch.testing.assert_close(ours, out["advantages"].to(ours.dtype), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------------
# RLOO loss
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RlooCase:
    epsilon_high: Optional[float]
    off_policy: bool

    def __str__(self) -> str:
        return f"eps_high{self.epsilon_high}-{'off' if self.off_policy else 'on'}policy"


RLOO_CASES = [RlooCase(eh, off) for eh in (None, 0.6) for off in (False, True)]


def _rloo_losses(trainer, b: Batch, case: RlooCase, monkeypatch):
    monkeypatch.setattr(trainer, "epsilon_low", EPSILON)
    monkeypatch.setattr(trainer, "epsilon_high", EPSILON if case.epsilon_high is None else case.epsilon_high)
    mask = b.completion_mask
    if case.off_policy:
        old_seq = (b.old_logps_seq * mask).sum(1)
    else:  # on-policy from TRL's own point of view: its own log-probs, as its generation step would store
        with torch.no_grad():
            trl_logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, b.input_ids, b.attention_mask, b.width)
        old_seq = (trl_logps * mask).sum(1)
    inputs = {
        "prompt_ids": b.prompt_ids,
        "prompt_mask": b.prompt_mask,
        "completion_ids": b.completion_ids,
        "completion_mask": mask,
        "old_logps": old_seq,
        "advantages": b.advantages,
    }
    trainer._metrics["train"].clear()
    theirs = trainer._compute_loss(trainer.model, inputs)
    logps, _ = completion_logps(trainer.model, b.input_ids, b.attention_mask, b.width, temperature=TEMPERATURE)
    ours, stats = rloo_loss(
        logps, b.advantages, mask, old_logps=b.old_logps_seq if case.off_policy else None, epsilon=EPSILON, epsilon_high=case.epsilon_high
    )
    return theirs, ours, stats


@pytest.mark.parametrize("case", RLOO_CASES, ids=str)
def test_rloo_loss_matches_trl(rloo_trainer, rloo_batch, monkeypatch, case):
    with torch.no_grad():
        theirs, ours, stats = _rloo_losses(rloo_trainer, rloo_batch, case, monkeypatch)
    assert abs(theirs.item() - ours.item()) <= LOSS_ATOL, f"TRL {theirs.item():.10f} vs retrain {ours.item():.10f}"
    logged = {k: v[-1] for k, v in rloo_trainer._metrics["train"].items()}
    expected = {
        "clip_ratio_low": logged["clip_ratio/low_mean"],
        "clip_ratio_high": logged["clip_ratio/high_mean"],
        "clip_ratio": logged["clip_ratio/region_mean"],
    }
    assert {k: getattr(stats, k).item() for k in expected} == pytest.approx(expected, abs=1e-6)
    if case.off_policy:
        # row 1 (A < 0, ratio 0.70) is clipped low; row 0 (A > 0, ratio 1.49) only when epsilon_high = 0.2
        assert stats.clip_ratio_low.item() == 0.25
        assert stats.clip_ratio_high.item() == (0.25 if case.epsilon_high is None else 0.0)


@pytest.mark.parametrize("case", [RlooCase(None, True), RlooCase(0.6, True)], ids=str)
def test_rloo_loss_gradients_match_trl(rloo_trainer, rloo_batch, monkeypatch, case):
    model = rloo_trainer.model
    model.zero_grad(set_to_none=True)
    theirs, ours, _ = _rloo_losses(rloo_trainer, rloo_batch, case, monkeypatch)
    theirs.backward()
    trl_grads = _grads(model)
    ours.backward()
    _assert_grads_close(trl_grads, _grads(model))


# --------------------------------------------------------------------------------------------------------
# High-entropy mask on random inputs
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("top_quantile", [0.0, 0.05, 0.2, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_high_entropy_mask_matches_trl(grpo_trainer, dtype, top_quantile, seed):
    """TRL's `get_high_entropy_mask` (single process) on random entropies, ties and an empty row.

    In TRL's pipeline the entropies reaching `get_high_entropy_mask` are always float32 (its fused LM-head
    kernel returns float32 whatever the model dtype), so float64 entropies are handed to TRL as float32:
    that is the mask TRL would train with for this batch. (Fed float64 directly, TRL's function computes a
    float32 threshold and compares float64 values to it, so at quantile 0 or 1 it can drop the max or min
    token itself, e.g. keep nothing at `top_quantile=0`.)
    """
    gen = torch.Generator().manual_seed(seed)
    entropy = (3 * torch.rand((5, 7), generator=gen, dtype=torch.float64)).to(dtype)
    if seed == 2:  # heavy ties
        entropy = (entropy * 2).round() / 2
    mask = (torch.rand((5, 7), generator=gen) < 0.7).long()
    mask[0] = 0  # an empty row
    theirs = grpo_trainer.get_high_entropy_mask(entropy.float(), mask, 1 - top_quantile)
    ours = high_entropy_mask(entropy, mask, top_quantile)
    assert ours.dtype == torch.bool
    assert torch.equal(ours, theirs), f"tokens kept: retrain {int(ours.sum())}, TRL {int(theirs.sum())}"
    if top_quantile == 1.0:
        assert torch.equal(ours, mask.bool())  # keep every policy token


def test_high_entropy_mask_of_an_empty_mask_matches_trl(grpo_trainer):
    entropy, mask = torch.rand(2, 3), torch.zeros(2, 3)
    assert torch.equal(high_entropy_mask(entropy, mask, 0.2), grpo_trainer.get_high_entropy_mask(entropy, mask, 0.8))


# --------------------------------------------------------------------------------------------------------
# The sampler correction and the off-policy mask (TRL's vLLM importance sampling, for any sampler)
# --------------------------------------------------------------------------------------------------------
# TRL computes its importance weights inline in `_generate_and_score_completions`, which needs a vLLM
# engine; what TRL's code does with them is driven here: `_compute_loss` multiplies its per-token loss by
# `inputs["importance_sampling_ratio"]` when `use_vllm` and `vllm_importance_sampling_correction` are set,
# and `get_off_policy_mask` (a static method) is called as is. The weights themselves are checked by hand
# in tests/trainer/test_off_policy.py.

from retrain.trainer.off_policy import off_policy_sequence_mask, sampler_correction_weights  # noqa: E402

CORRECTION_MODES = ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


def _batch_inputs(b: Batch) -> dict:
    """The batch as TRL's `_compute_loss` reads it (the correction tests add their own entries)."""
    return {
        "prompt_ids": b.prompt_ids, "prompt_mask": b.prompt_mask, "completion_ids": b.completion_ids,
        "completion_mask": b.completion_mask, "advantages": b.advantages, "num_items_in_batch": b.num_items_in_batch,
    }


def _sampler_logps(b: Batch) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return b.old_logps + 0.4 * torch.randn(b.old_logps.shape, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("mode", CORRECTION_MODES)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo"])
def test_sampler_corrected_loss_matches_trl(grpo_trainer, grpo_batch, monkeypatch, mode, loss_type):
    case = LossCase(loss_type, "token", 0.04, True)
    _configure_grpo(monkeypatch, grpo_trainer, case)
    monkeypatch.setattr(grpo_trainer, "use_vllm", True)
    monkeypatch.setattr(grpo_trainer, "vllm_importance_sampling_correction", True)
    mask = grpo_batch.completion_mask.double()
    # A range that keeps some and corrects (clamps or drops) others: per token, and per sequence.
    low, high = (0.5, 1.5) if mode.startswith("token") else (0.3, 2.0)
    weights = sampler_correction_weights(grpo_batch.old_logps, _sampler_logps(grpo_batch), mask, mode, low, high)
    inside = (weights > low) & (weights < high)
    assert bool(inside.any()) and not bool(inside.all()), weights  # the range bites, and not everywhere
    inputs = {**_batch_inputs(grpo_batch), "old_per_token_logps": grpo_batch.old_logps, "ref_per_token_logps": grpo_batch.ref_logps,
              "importance_sampling_ratio": weights}
    with torch.no_grad():
        theirs = grpo_trainer._compute_loss(grpo_trainer.model, inputs)
        logps, _ = completion_logps(grpo_trainer.model, grpo_batch.input_ids, grpo_batch.attention_mask, grpo_batch.width, temperature=TEMPERATURE)
        ours, _ = policy_loss(
            logps, grpo_batch.advantages, grpo_batch.completion_mask, old_logps=grpo_batch.old_logps, ref_logps=grpo_batch.ref_logps,
            beta=case.beta, epsilon=EPSILON, epsilon_high=case.epsilon_high, loss_type=loss_type,
            max_completion_length=grpo_trainer.max_completion_length, num_items_in_batch=grpo_batch.num_items_in_batch,
            token_weights=weights,
        )
        uncorrected, _ = policy_loss(
            logps, grpo_batch.advantages, grpo_batch.completion_mask, old_logps=grpo_batch.old_logps, ref_logps=grpo_batch.ref_logps,
            beta=case.beta, epsilon=EPSILON, epsilon_high=case.epsilon_high, loss_type=loss_type,
            max_completion_length=grpo_trainer.max_completion_length, num_items_in_batch=grpo_batch.num_items_in_batch,
        )
    assert abs(theirs.item() - ours.item()) <= LOSS_ATOL, f"TRL {theirs.item():.10f} vs retrain {ours.item():.10f}"
    assert abs(ours.item() - uncorrected.item()) > 1e-4  # the correction changed something


def test_off_policy_mask_matches_trl(grpo_trainer, grpo_batch, monkeypatch):
    mask = grpo_batch.completion_mask.double()
    sampled = _sampler_logps(grpo_batch)
    with torch.no_grad():
        logps, _ = completion_logps(grpo_trainer.model, grpo_batch.input_ids, grpo_batch.attention_mask, grpo_batch.width, temperature=TEMPERATURE)
    advantages = grpo_batch.advantages.unsqueeze(1)
    for threshold in (0.0, 0.05, 0.5):
        theirs = trl.GRPOTrainer.get_off_policy_mask(advantages, logps, sampled, mask, threshold)
        ours = off_policy_sequence_mask(grpo_batch.advantages, logps, sampled, mask, threshold)
        assert torch.equal(theirs, ours), threshold
    # And through the loss: TRL masks with `sampling_per_token_logps` when given.
    case = LossCase("dapo", "token", 0.0, True)
    _configure_grpo(monkeypatch, grpo_trainer, case)
    monkeypatch.setattr(grpo_trainer, "off_policy_mask_threshold", 0.05)
    inputs = {**_batch_inputs(grpo_batch), "old_per_token_logps": grpo_batch.old_logps, "sampling_per_token_logps": sampled}
    with torch.no_grad():
        theirs = grpo_trainer._compute_loss(grpo_trainer.model, inputs)
        keep = off_policy_sequence_mask(grpo_batch.advantages, logps, sampled, mask, 0.05)
        assert 0 < float(keep.mean()) < 1  # some sequences dropped, some kept
        ours, _ = policy_loss(
            logps, grpo_batch.advantages, grpo_batch.completion_mask, old_logps=grpo_batch.old_logps, epsilon=EPSILON,
            epsilon_high=case.epsilon_high, loss_type="dapo", num_items_in_batch=grpo_batch.num_items_in_batch, token_weights=keep,
        )
    assert abs(theirs.item() - ours.item()) <= LOSS_ATOL
