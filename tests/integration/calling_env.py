"""A tool environment whose first turn always calls the calculator, for tests on random tiny models.

A random tiny model never writes a well-formed tool call, so a test of multi-turn rollouts would
otherwise see one-turn episodes. Whatever the policy writes in its first turn is kept as its
tokens; the environment then acts as if it had asked for `calculate("2 + 3")`, runs the real tool,
and the episode continues with a second policy turn (when the first one ended before the token
budget, as a policy that often writes <eos> does). Imported by class path from a `retrain fit`
subprocess (the test puts this directory on PYTHONPATH).
"""

from __future__ import annotations

from retrain.core.episode import Generation, LLMAction, ToolCall
from retrain.environment import ToolEnvironment


class FirstTurnCallsCalculator(ToolEnvironment):
    async def reset(self, record):
        self.turn = 0
        return await super().reset(record)

    def parse_action(self, generation: Generation) -> LLMAction:
        action = super().parse_action(generation)
        self.turn += 1
        action.parse_error = None
        action.tool_calls = [ToolCall(name="calculate", arguments={"expression": "2 + 3"})] if self.turn == 1 else []
        return action
