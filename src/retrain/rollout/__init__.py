"""Generation: the sampler behind the `PolicyClient` contract, its decoding backends, the batching
of concurrent episodes' requests, the rollout engine, and sampling from a sharded policy.

`trainer` uses this package; this package never imports `trainer`.
"""

from retrain.rollout.context import ContextOverflowError, context_length
from retrain.rollout.engine import RolloutEngine
from retrain.rollout.sampler import Backend, BatchingSampler

__all__ = ["Backend", "BatchingSampler", "ContextOverflowError", "RolloutEngine", "context_length"]
