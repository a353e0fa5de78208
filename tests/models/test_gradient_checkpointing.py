import torch

from retrain.models.loading import PolicyConfig, load_policy
from retrain.trainer.experience import completion_logps


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir):
    ids = torch.tensor([[0, 0, 10, 11, 12, 13], [14, 15, 16, 17, 18, 19]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    grads = []
    for checkpointing in (False, True):
        model = load_policy(PolicyConfig(name_or_path=str(tiny_model_dir), gradient_checkpointing=checkpointing)).train()
        assert model.is_gradient_checkpointing == checkpointing
        logps, _ = completion_logps(model, ids, mask, 3)
        logps.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])
