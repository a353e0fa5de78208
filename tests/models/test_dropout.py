"""`policy.disable_dropout`: a checkpoint that ships with dropout (GPT-2) gives the same log-probs in
train mode as the sampler sees in eval mode."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from retrain.models.loading import PolicyConfig, load_policy


def _gpt2_dir(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_head=2, n_layer=2, n_positions=64))  # dropout 0.1 everywhere
    model.save_pretrained(tmp_path)
    return str(tmp_path)


def _train_mode_logits(model, ids):
    model.train()
    with torch.no_grad():
        return model(ids).logits


def test_dropout_is_off_by_default_and_on_when_asked(tmp_path):
    path = _gpt2_dir(tmp_path)
    ids = torch.randint(0, 50, (2, 12))
    quiet = load_policy(PolicyConfig(name_or_path=path))
    eval_logits = quiet.eval()(ids).logits.detach()
    torch.testing.assert_close(_train_mode_logits(quiet, ids), eval_logits, rtol=0, atol=0)
    noisy = load_policy(PolicyConfig(name_or_path=path, disable_dropout=False))
    assert not torch.allclose(_train_mode_logits(noisy, ids), eval_logits, atol=1e-3)
