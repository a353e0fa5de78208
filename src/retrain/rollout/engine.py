"""`RolloutEngine`: runs the episodes of a batch concurrently and scores them.

It owns one asyncio event loop for the trainer's life, so resources an environment opens in
`setup()` (a tool server, a client session) stay bound to the loop that uses them.
"""

from __future__ import annotations

import asyncio
from typing import Optional, Sequence

from retrain.core.records import PromptRecord
from retrain.environment.base import Environment, PolicyClient, Trajectory
from retrain.reward.calculator import RewardCalculator, RewardResult


class RolloutEngine:
    """Episodes for `num_generations` copies of each prompt, then rewards.

    Args:
        environment: the environment template (spawned once per episode).
        calculator: scores finished trajectories.
    """

    def __init__(self, environment: Environment, calculator: RewardCalculator) -> None:
        self.environment = environment
        self.calculator = calculator
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._ready = False

    def start(self) -> None:
        """Set the environment up (start its tool servers, ...) now; the trainer calls this before the
        model loads, so a server that cannot start fails the run in seconds, not after the loading."""
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._start())

    async def _start(self) -> None:
        if not self._ready:
            await self.environment.setup()
            self._ready = True

    def collect(
        self,
        records: Sequence[PromptRecord],
        num_generations: int,
        policy: PolicyClient,
        max_completion_tokens: Optional[int] = None,
    ) -> tuple[list[Trajectory], RewardResult]:
        """Roll out every record `num_generations` times; trajectories come grouped by prompt."""
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(self._collect(records, num_generations, policy, max_completion_tokens))

    async def _collect(
        self, records: Sequence[PromptRecord], num_generations: int, policy: PolicyClient, budget: Optional[int]
    ) -> tuple[list[Trajectory], RewardResult]:
        await self._start()
        episodes = [record for record in records for _ in range(num_generations)]
        if hasattr(policy, "active_episodes"):
            policy.active_episodes = len(episodes)

        async def run(record: PromptRecord) -> Trajectory:
            try:
                return await self.environment.spawn().rollout(record, policy, budget)
            finally:
                if hasattr(policy, "active_episodes"):
                    policy.active_episodes -= 1

        trajectories = list(await asyncio.gather(*(run(record) for record in episodes)))
        return trajectories, await self.calculator.ascore(trajectories)

    def close(self) -> None:
        if self._loop is None or self._loop.is_closed():
            return
        if self._ready:
            self._loop.run_until_complete(self.environment.close())
            self._ready = False
        self._loop.close()
