"""Tests for retrain.environment.gym: gymnasium's own toy-text environments played through text.

The policy is a scripted PolicyClient (one token per character, replies from a list). Nothing here
mocks gymnasium: every episode runs the real FrozenLake, Blackjack, Taxi or CliffWalking.
"""

from __future__ import annotations

import asyncio
from typing import Optional, Sequence, Union

import pytest

import gymnasium  # noqa: E402  (a test dependency: installed by the test extra)

from retrain.core.records import Message, PromptRecord  # noqa: E402
from retrain.environment.base import Environment, Generation, LLMAction, Trajectory  # noqa: E402
from retrain.environment.gym import GymEnvironment  # noqa: E402
from retrain.reward.builtins import step_reward_sum as episode_return  # noqa: E402
from retrain.reward.calculator import RewardCalculator, RewardSpec  # noqa: E402
from retrain.reward.registry import REWARDS  # noqa: E402

# Default 4x4 map:  SFFF / FHFH / FFFH / HFFG  (start at 0, goal at 15, holes at 5, 7, 11, 12).
WINNING_PATH = ["right", "right", "down", "down", "down", "right"]  # 0 1 2 6 10 14 15
FROZEN = {"map_name": "4x4", "is_slippery": False}
TAXI_ID = "Taxi-v3" if "Taxi-v3" in gymnasium.registry else "Taxi-v4"  # v3 is retired in gymnasium 1.4


class ScriptedPolicy:
    """Plays back `replies` in order, one token per character."""

    def __init__(self, replies: Sequence[str]) -> None:
        self.replies = list(replies)
        self.calls = 0

    def encode(self, content: Union[str, list[Message]], *, add_generation_prompt: bool = True) -> list[int]:
        if not isinstance(content, str):
            content = "".join(f"{m['role']}: {m['content']}\n" for m in content)
        return [ord(c) for c in content]

    async def generate(self, context_ids: Sequence[int], max_new_tokens: Optional[int] = None) -> Generation:
        await asyncio.sleep(0)  # let concurrent episodes interleave
        self.calls += 1
        text = self.replies.pop(0)
        return Generation(token_ids=[ord(c) for c in text], text=text, truncated=False)


def frozen_lake(**kwargs) -> GymEnvironment:
    return GymEnvironment("FrozenLake-v1", env_kwargs=dict(FROZEN), **kwargs)


def play(env: Environment, replies: Sequence[str], record: Optional[PromptRecord] = None) -> Trajectory:
    record = record or PromptRecord(prompt="Play FrozenLake.", metadata={"seed": 0})
    return asyncio.run(env.spawn().rollout(record, ScriptedPolicy(replies)))


# --- FrozenLake ----------------------------------------------------------------------------------


def test_frozen_lake_winning_path_returns_one_and_ends_on_the_goal():
    trajectory = play(frozen_lake(), WINNING_PATH + ["left"] * 5)
    assert len(trajectory.turns) == len(WINNING_PATH)
    assert trajectory.step_rewards == [0.0] * 5 + [1.0]
    assert sum(trajectory.step_rewards) == 1.0
    last = trajectory.turns[-1].observation
    assert last.done and last.info["terminated"] is True and last.info["action"] == 2  # right
    assert "row 3, column 3" in last.content and "observation 15" in last.content
    assert [turn.observation.info["action"] for turn in trajectory.turns] == [2, 2, 1, 1, 1, 2]
    assert not any(turn.observation.done for turn in trajectory.turns[:-1])


def test_frozen_lake_hole_ends_with_return_zero():
    trajectory = play(frozen_lake(), ["right", "down", "down"])  # 0 -> 1 -> 5 (a hole)
    assert len(trajectory.turns) == 2
    assert sum(trajectory.step_rewards) == 0.0
    assert trajectory.turns[-1].observation.done and trajectory.turns[-1].observation.info["terminated"]
    assert "observation 5" in trajectory.turns[-1].observation.content


def test_first_observation_is_prompt_board_and_instructions():
    env = frozen_lake().spawn()
    first = asyncio.run(env.reset(PromptRecord(prompt="Reach the goal.", metadata={"seed": 0})))
    text = first.content
    assert isinstance(text, str)
    assert text.startswith("Reach the goal.")
    assert "SFFF\nFHFH\nFFFH\nHFFG" in text and "\x1b" not in text  # ansi rendering, colours removed
    assert "row 0, column 0" in text
    assert text.rstrip().endswith("Valid actions: left, down, right, up. Reply with exactly one of them.")


def test_system_prompt_makes_chat_messages():
    env = frozen_lake(system_prompt="You play grid games.", instructions="Answer with one move.").spawn()
    first = asyncio.run(env.reset(PromptRecord(prompt="Play.")))
    assert first.content[0] == {"role": "system", "content": "You play grid games."}
    assert first.content[1]["role"] == "user"
    assert first.content[1]["content"].startswith("Play.\n\nSFFF") and first.content[1]["content"].endswith("Answer with one move.")


# --- Blackjack -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 7])
def test_blackjack_stick_ends_in_one_step_like_gymnasium(seed):
    trajectory = play(GymEnvironment("Blackjack-v1"), ["I will stick.", "hit"], PromptRecord("Play.", metadata={"seed": seed}))
    reference = gymnasium.make("Blackjack-v1")
    obs, _ = reference.reset(seed=seed)
    _, expected, terminated, _, _ = reference.step(0)
    assert len(trajectory.turns) == 1
    assert trajectory.turns[0].observation.done and terminated
    assert trajectory.step_rewards == [float(expected)]
    assert expected in (-1.0, 0.0, 1.0)
    player, dealer, ace = obs
    shown = "an ace" if dealer == 1 else str(dealer)
    expected_text = f"Your sum is {player}, the dealer shows {shown}, usable ace: {'yes' if ace else 'no'}."
    first = asyncio.run(GymEnvironment("Blackjack-v1").spawn().reset(PromptRecord("", metadata={"seed": seed})))
    assert first.content.startswith(expected_text)


def test_seed_from_integer_answer_pins_the_deal():
    env = GymEnvironment("Blackjack-v1")
    a = asyncio.run(env.spawn().reset(PromptRecord("Play.", answer=11)))
    b = asyncio.run(env.spawn().reset(PromptRecord("Play.", metadata={"seed": "11"})))
    assert a.content == b.content


# --- Taxi, CliffWalking --------------------------------------------------------------------------


def test_taxi_renders_the_grid_as_text():
    env = GymEnvironment(TAXI_ID).spawn()
    assert env.action_names == ["south", "north", "east", "west", "pickup", "dropoff"]
    first = asyncio.run(env.reset(PromptRecord("Drive.", metadata={"seed": 0})))
    assert "+---------+" in first.content and "|R: | : :G|" in first.content
    assert "\x1b" not in first.content
    assert "Taxi at row" in first.content and "destination" in first.content
    after = asyncio.run(env.step(LLMAction(text="north")))
    assert after.reward == -1.0 and "+---------+" in after.content


def test_cliff_walking_names_and_cliff_penalty():
    env = GymEnvironment("CliffWalking-v1").spawn()
    assert env.action_names == ["up", "right", "down", "left"]
    first = asyncio.run(env.reset(PromptRecord("Walk.")))
    assert "x  C  C" in first.content
    step = asyncio.run(env.step(LLMAction(text="right")))  # off the start, into the cliff
    assert step.reward == -100.0


# --- invalid actions, limits ---------------------------------------------------------------------


def test_invalid_text_is_penalised_and_leaves_the_gym_state_unchanged():
    env = frozen_lake(invalid_action_reward=-0.25).spawn()
    asyncio.run(env.reset(PromptRecord("Play.", metadata={"seed": 0})))
    asyncio.run(env.step(LLMAction(text="right")))
    state = int(env._env.unwrapped.s)
    observation = asyncio.run(env.step(LLMAction(text="I am not sure what to do")))
    assert observation.reward == -0.25 and not observation.done
    assert observation.info["invalid_action"] is True
    for name in ("left", "down", "right", "up"):
        assert name in observation.content
    assert int(env._env.unwrapped.s) == state == 1
    moved = asyncio.run(env.step(LLMAction(text="down")))  # continues from where it was
    assert "observation 5" in moved.content and moved.done
    assert env.episode_metrics() == {"gym_return": 0.0, "terminated": 1.0, "invalid_actions": 1.0}
    with pytest.raises(RuntimeError, match="after the episode ended"):
        asyncio.run(env.step(LLMAction(text="up")))


def test_max_invalid_actions_ends_the_episode():
    trajectory = play(frozen_lake(max_invalid_actions=3), ["hmm", "right", "???", "no idea", "down"])
    assert trajectory.step_rewards == [-0.1, 0.0, -0.1, -0.1]
    assert trajectory.turns[-1].observation.done
    assert "the episode is over" in trajectory.turns[-1].observation.content
    assert sum(trajectory.step_rewards) == pytest.approx(-0.3)


def test_max_turns_stops_a_long_episode():
    trajectory = play(frozen_lake(max_turns=5), ["left"] * 50)
    assert len(trajectory.turns) == 5
    assert not trajectory.turns[-1].observation.done  # stopped by max_turns, not by the environment


def test_gymnasium_time_limit_truncates():
    trajectory = play(frozen_lake(max_turns=500), ["left"] * 500)  # FrozenLake's 4x4 limit: 100 steps
    assert len(trajectory.turns) == 100
    last = trajectory.turns[-1].observation
    assert last.done and last.info["truncated"] and not last.info["terminated"]


# --- concurrency, lifecycle ----------------------------------------------------------------------


def test_concurrent_episodes_do_not_share_state(monkeypatch):
    template = frozen_lake(max_turns=6)
    scripts = [
        WINNING_PATH,
        ["right", "down"],  # hole at 5
        ["down", "down", "right", "down", "right", "right"],  # 0 4 8 9 13 14 15
        ["left", "up"] * 3,  # stays at the start until max_turns
    ]
    episodes = [template.spawn() for _ in scripts]

    async def run_all():
        return await asyncio.gather(
            *(ep.rollout(PromptRecord("Play.", metadata={"seed": i}), ScriptedPolicy(s)) for i, (ep, s) in enumerate(zip(episodes, scripts)))
        )

    made = []
    original = GymEnvironment.make_env

    def tracking_make_env(self):
        env = original(self)
        made.append(env)
        return env

    monkeypatch.setattr(GymEnvironment, "make_env", tracking_make_env)
    trajectories = asyncio.run(run_all())
    assert [sum(t.step_rewards) for t in trajectories] == [1.0, 0.0, 1.0, 0.0]
    assert [len(t.turns) for t in trajectories] == [6, 2, 6, 6]
    assert [t.turns[-1].observation.done for t in trajectories] == [True, True, True, False]
    assert len(made) == 4 and len({id(e) for e in made}) == 4
    assert template._env is None and all(ep._env is None for ep in episodes)  # closed after rollout


def test_spawn_does_not_share_the_templates_gym_env():
    template = frozen_lake()
    asyncio.run(template.reset(PromptRecord("Play.")))
    episode = template.spawn()
    assert template._env is not None and episode._env is None
    asyncio.run(episode.reset(PromptRecord("Play.")))
    assert episode._env is not template._env
    asyncio.run(template.close())
    assert template._env is None


# --- parsing -------------------------------------------------------------------------------------


def test_parse_action_text():
    env = frozen_lake()
    parse = env.parse_action_text
    assert parse("right") == 2
    assert parse("  UP ") == 3
    assert parse("Going left would be bad, so I go Down.") == 1  # the last valid name wins
    assert parse("upward and leftover") is None  # whole words only
    assert parse("Action: 2") == 2
    assert parse("3 or 1? I choose 0.") == 0  # the last in-range integer
    assert parse("row 9, then 7") is None  # out of range
    assert parse("2.5") is None and parse("-1") is None
    assert parse("2, no wait: up") == 3  # a name beats an integer
    assert parse("") is None

    taxi = GymEnvironment(TAXI_ID)
    assert taxi.parse_action_text("drive SOUTH then pickup") == 4


def test_custom_and_default_action_names():
    env = GymEnvironment("FrozenLake-v1", env_kwargs=FROZEN, action_names=["west", "south", "east", "north"])
    assert env.parse_action_text("go east") == 2 and env.parse_action_text("right") is None
    assert GymEnvironment("Blackjack-v1").action_names == ["stick", "hit"]
    assert GymEnvironment("CartPole-v1").action_names == ["0", "1"]  # no built-in names: digits
    assert GymEnvironment("FrozenLake8x8-v1").action_names == ["left", "down", "right", "up"]


def test_configuration_errors():
    with pytest.raises(ValueError, match="3 names but"):
        GymEnvironment("FrozenLake-v1", action_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="Discrete"):
        GymEnvironment("Pendulum-v1")
    with pytest.raises(ValueError, match="max_invalid_actions"):
        GymEnvironment("FrozenLake-v1", max_invalid_actions=0)
    with pytest.raises(gymnasium.error.Error):
        GymEnvironment("NoSuchEnv-v0")


def test_built_from_a_config_by_jsonargparse():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--environment", type=Environment)
    config = parser.parse_object(
        {
            "environment": {
                "class_path": "retrain.environment.gym.GymEnvironment",
                "init_args": {"env_id": "FrozenLake-v1", "env_kwargs": {"is_slippery": False}, "max_turns": 8},
            }
        }
    )
    env = parser.instantiate_classes(config).environment
    assert isinstance(env, GymEnvironment) and env.max_turns == 8 and env.env_kwargs["is_slippery"] is False


# --- rewards -------------------------------------------------------------------------------------


def test_episode_return_is_registered_and_sums_step_rewards():
    assert REWARDS.get("step_reward_sum") is episode_return
    trajectory = play(frozen_lake(), ["hmm"] + WINNING_PATH)
    assert episode_return(trajectory=trajectory) == pytest.approx(sum(trajectory.step_rewards)) == pytest.approx(0.9)
    with pytest.raises(ValueError):
        episode_return()


def test_reward_calculator_scores_frozen_lake_with_episode_return():
    calculator = RewardCalculator([RewardSpec(name="step_reward_sum")])
    won = play(frozen_lake(), WINNING_PATH)
    fell = play(frozen_lake(), ["right", "down"])
    sloppy = play(frozen_lake(), ["right", "what?"] + WINNING_PATH[1:])
    result = calculator.score([won, fell, sloppy])
    assert result.total == pytest.approx([1.0, 0.0, 0.9])
    assert result.components["step_reward_sum"] == pytest.approx([1.0, 0.0, 0.9])
