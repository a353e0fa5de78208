"""ToolEnvironment with a scripted policy: real tokenizer, real chat template, real batching sampler;
only the model's choice of tokens is scripted (a tiny random model never writes a tool call)."""

import asyncio
import json

import pytest
from transformers import AutoTokenizer

from retrain.core.records import PromptRecord
from retrain.environment.tool_env import ToolEnvironment
from retrain.environment.tools import FunctionToolProvider
from retrain.rollout.engine import RolloutEngine
from retrain.reward.calculator import RewardCalculator, RewardSpec
from retrain.rollout.sampler import BatchingSampler


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: first.
        b: second.
    """
    return a + b


def explode(x: int) -> int:
    """Always raises.

    Args:
        x: ignored.
    """
    raise RuntimeError("kaboom")


async def hang(x: int) -> int:
    """Never returns in time.

    Args:
        x: ignored.
    """
    await asyncio.sleep(3600)  # only the tool timeout ends this
    return x


async def nap(x: int) -> int:
    """Sleeps a moment.

    Args:
        x: returned.
    """
    await asyncio.sleep(0.01)
    return x


def call(name, **arguments):
    return f'<tool_call>{json.dumps({"name": name, "arguments": arguments})}</tool_call>'


class ScriptedSampler(BatchingSampler):
    """The real BatchingSampler with generation replaced by a script: reply k of an episode is
    `script[k]`, where k = the number of tool results already in the context."""

    def __init__(self, tokenizer, script):
        super().__init__(model=None, tokenizer=tokenizer, max_new_tokens=256)
        self.script = script
        self.batch_sizes = []

    def _sample_batch(self, contexts, max_new_tokens):
        self.generate_calls += 1
        self.batch_sizes.append(len(contexts))
        replies = []
        for context in contexts:
            turn = self.tokenizer.decode(context).count("tool: ")
            text = self.script[min(turn, len(self.script) - 1)]
            replies.append(self.tokenizer(text, add_special_tokens=False)["input_ids"][:max_new_tokens] + [self.tokenizer.eos_token_id])
        return replies, []  # a script has no sampler log-probs


@pytest.fixture
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir, padding_side="left")


def _rollouts(environment, sampler, records, g=1, budget=512):
    engine = RolloutEngine(environment, RewardCalculator([RewardSpec(name="length_penalty")]))
    try:
        return engine.collect(records, g, sampler, budget)[0]
    finally:
        engine.close()


def test_three_turn_episode_masks_exactly_the_policy_tokens(tokenizer):
    script = [call("add", a=2, b=3), call("add", a=5, b=10), "15"]
    sampler = ScriptedSampler(tokenizer, script)
    [trajectory] = _rollouts(ToolEnvironment(FunctionToolProvider([add])), sampler, [PromptRecord(prompt="2+3+10?")])

    assert [t.action.text for t in trajectory.turns] == script
    assert trajectory.completion_text == "".join(script)
    assert trajectory.metrics == {"tool_calls": 2.0, "tool_errors": 0.0, "tool_timeouts": 0.0, "parse_errors": 0.0}
    assert trajectory.turns[0].observation.info["tool_results"] == ["5"]
    # Rebuild the expected token stream by hand: each reply + <eos> is the policy's (mask 1); the
    # chat template's rendering of each tool result and the next "assistant: " prompt is context (mask 0).
    eos = [tokenizer.eos_token_id]

    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    expected_ids, expected_mask = [], []
    for reply, result in zip(script, ["5", "15", None]):
        expected_ids += encode(reply) + eos
        expected_mask += [1] * (len(encode(reply)) + 1)
        if result is not None:
            observation = encode(f"tool: {result}\nassistant: ")
            expected_ids += observation
            expected_mask += [0] * len(observation)
    assert trajectory.prompt_ids == encode("user: 2+3+10?\nassistant: ")
    assert trajectory.completion_ids == expected_ids
    assert trajectory.completion_mask == expected_mask


@pytest.mark.parametrize(
    "reply, metric, shown",
    [
        (call("explode", x=1), "tool_errors", "Error: RuntimeError: kaboom"),
        (call("missing"), "tool_errors", "Error: unknown tool 'missing'"),
        (call("add", a=1), "tool_errors", "bad arguments for 'add'"),
        ('<tool_call>{"name": "add", "arguments": {"a": 1,</tool_call>', "parse_errors", "not valid JSON"),
        (call("hang", x=1), "tool_timeouts", "timed out after 0.2 s"),
    ],
)
def test_faults_become_error_observations_and_counts(tokenizer, reply, metric, shown):
    sampler = ScriptedSampler(tokenizer, [reply, "done"])
    environment = ToolEnvironment(FunctionToolProvider([add, explode, hang]), tool_timeout=0.2)
    [trajectory] = _rollouts(environment, sampler, [PromptRecord(prompt="go")])
    [result] = trajectory.turns[0].observation.info["tool_results"]
    assert shown in result
    assert trajectory.metrics[metric] == 1.0
    assert trajectory.turns[-1].action.text == "done" and len(trajectory.turns) == 2  # the episode went on


def test_g_episodes_of_t_turns_cost_t_batched_calls_and_tools_overlap(tokenizer, meeting):
    g, records = 4, [PromptRecord(prompt="a"), PromptRecord(prompt="b")]
    all_episodes = meeting(8)

    async def nap(x: int) -> int:
        """Returns once the other episodes' calls of this turn are in flight too.

        Args:
            x: returned.
        """
        await all_episodes.attend()
        return x

    sampler = ScriptedSampler(tokenizer, [call("nap", x=1), call("nap", x=2), "answer"])
    trajectories = _rollouts(ToolEnvironment(FunctionToolProvider([nap])), sampler, records, g=g)
    assert len(trajectories) == 8 and all(len(t.turns) == 3 for t in trajectories)
    assert sampler.generate_calls == 3, "one batched generate per turn, not one per episode"
    assert sampler.batch_sizes == [8, 8, 8]
    assert all_episodes.rounds == 2  # each turn's 8 tool calls were in flight at once (serially: a timeout)



def test_max_turns_and_token_budget_end_the_episode(tokenizer):
    forever = [call("add", a=1, b=1)]
    [capped] = _rollouts(ToolEnvironment(FunctionToolProvider([add]), max_turns=2), ScriptedSampler(tokenizer, forever), [PromptRecord(prompt="x")])
    assert len(capped.turns) == 2 and capped.completion_mask[-1] == 1  # no tool result after the last allowed turn
    [cut] = _rollouts(ToolEnvironment(FunctionToolProvider([add])), ScriptedSampler(tokenizer, forever), [PromptRecord(prompt="x")], budget=60)
    assert len(cut.completion_ids) <= 60 and cut.truncated


def test_tool_schemas_reach_the_chat_template(tokenizer):
    tokenizer.chat_template = (
        "{% if tools %}tools: {{ tools | map(attribute='function.name') | join(',') }}\n{% endif %}"
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    sampler = ScriptedSampler(tokenizer, ["4"])
    [trajectory] = _rollouts(ToolEnvironment(FunctionToolProvider([add, nap])), sampler, [PromptRecord(prompt="2+2")])
    assert tokenizer.decode(trajectory.prompt_ids) == "tools: add,nap\nuser: 2+2\nassistant: "


def test_a_template_that_ignores_tools_is_reported_and_the_system_prompt_can_carry_them(tokenizer, recwarn):
    # The tiny model's template drops `tools=`: the policy would never learn the tools exist.
    [plain] = _rollouts(ToolEnvironment(FunctionToolProvider([add])), ScriptedSampler(tokenizer, ["4"]), [PromptRecord(prompt="2+2")])
    ignored = [w for w in recwarn if "ignores `tools=`" in str(w.message)]
    assert ignored and "tools_in_system_prompt: true" in str(ignored[0].message)
    assert "add" not in tokenizer.decode(plain.prompt_ids)
    recwarn.clear()

    environment = ToolEnvironment(FunctionToolProvider([add]), system_prompt="Be exact.", tools_in_system_prompt=True)
    [carried] = _rollouts(environment, ScriptedSampler(tokenizer, ["4"]), [PromptRecord(prompt="2+2")])
    prompt = tokenizer.decode(carried.prompt_ids)
    assert prompt.startswith("system: Be exact.\n\nYou may call these tools:\n<tools>\n") and '"name": "add"' in prompt
    assert "<tool_call>" in prompt and prompt.endswith("user: 2+2\nassistant: ")
    assert not [w for w in recwarn if "ignores `tools=`" in str(w.message)]


def test_a_template_that_renders_tools_is_not_reported(tokenizer, recwarn):
    tokenizer.chat_template = (
        "{% if tools %}tools: {{ tools | map(attribute='function.name') | join(',') }}\n{% endif %}"
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    _rollouts(ToolEnvironment(FunctionToolProvider([add])), ScriptedSampler(tokenizer, ["4"]), [PromptRecord(prompt="2+2")])
    assert not [w for w in recwarn if "ignores `tools=`" in str(w.message)]
