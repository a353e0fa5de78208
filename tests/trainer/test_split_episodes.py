"""Episodes that train as several rows (an agent rewrote its history: `Trajectory.earlier_samples`):
every row gets its episode's advantage, RLOO's KL penalty sums over an episode's rows, optimizer
steps split by episodes; and such episodes train end to end."""

import math

import pytest
import torch

from retrain import GRPOTrainer, PolicyConfig, PromptDataModule, RewardCalculator, RewardSpec, RLOOTrainer, TinyModelConfig
from retrain.core.episode import Trajectory
from retrain.core.records import PromptRecord
from retrain.environment.agent import AgentEnvironment
from retrain.reward.calculator import RewardResult
from retrain.trainer.experience import Experience, episode_rows, pack_trajectories


def _episode(prompt, completions):
    """An episode whose samples have these completion token lists (the last is the trajectory itself)."""
    record = PromptRecord(prompt=prompt)
    rows = [Trajectory(record=record, prompt_ids=[5, 6], completion_ids=c, completion_mask=[1] * len(c)) for c in completions]
    main = rows[-1]
    main.earlier_samples = rows[:-1]
    return main


def _experience(episodes, rewards):
    rows, owner = episode_rows(episodes)
    input_ids, attention_mask, mask = pack_trajectories(rows, 0)
    n = len(rows)
    return Experience(
        input_ids=input_ids, attention_mask=attention_mask, completion_mask=mask,
        rewards=torch.tensor(rewards)[owner] if owner is not None else torch.tensor(rewards),
        advantages=torch.zeros(n), group_std=torch.zeros(n), trajectories=rows, row_episode=owner, episodes=list(episodes),
        reward_result=RewardResult(total=list(rewards), components={}, verifier_passed={}),
    )


def test_rows_map_to_their_episodes():
    # Episodes: A (2 samples), B (1), C (1), D (3) -> rows A0 A1 B C D0 D1 D2.
    episodes = [_episode("a", [[1], [2]]), _episode("b", [[3]]), _episode("c", [[4]]), _episode("d", [[5], [6], [7]])]
    experience = _experience(episodes, [1.0, 2.0, 3.0, 4.0])
    assert experience.row_episode.tolist() == [0, 0, 1, 2, 3, 3, 3]
    assert experience.per_row(torch.tensor([10.0, 20.0, 30.0, 40.0])).tolist() == [10, 10, 20, 30, 40, 40, 40]
    assert experience.episode_sum(torch.arange(7.0)).tolist() == [0 + 1, 2, 3, 4 + 5 + 6]
    first, second = experience.split(2)  # by episodes: A, B | C, D
    assert first.row_episode.tolist() == [0, 0, 1] and second.row_episode.tolist() == [2, 3, 3, 3]
    assert [t.completion_ids for t in second.trajectories] == [[4], [5], [6], [7]]
    # Episodes of one row each need none of this.
    plain = _experience([_episode("x", [[1]]), _episode("y", [[2]])], [0.0, 1.0])
    assert plain.row_episode is None and len(plain.split(2)[1]) == 1


def test_grpo_and_rloo_give_every_row_its_episode_advantage():
    tiny = PolicyConfig(name_or_path="unused", tiny=TinyModelConfig())
    reward = RewardCalculator([RewardSpec(name="length_penalty")])
    # Two groups of two episodes (num_generations=2); episodes 0 and 3 split into 2 and 3 rows.
    episodes = [_episode("p", [[1], [2]]), _episode("p", [[3]]), _episode("q", [[4]]), _episode("q", [[5], [6], [7]])]
    experience = _experience(episodes, [1.0, 0.0, 0.0, 2.0])
    grpo = GRPOTrainer(policy=tiny, reward=reward, num_generations=2, scale_rewards="none")
    advantages, _ = grpo.compute_advantages(torch.tensor([1.0, 0.0, 0.0, 2.0]), experience)
    # Group means 0.5 and 1.0: episode advantages 0.5, -0.5, -1.0, 1.0, repeated over their rows.
    assert advantages.tolist() == [0.5, 0.5, -0.5, -1.0, 1.0, 1.0, 1.0]

    rloo = RLOOTrainer(policy=tiny, reward=reward, num_generations=2, beta=0.5, normalize_advantages=False)
    experience.old_logps = torch.full((7, 1), -1.0)
    experience.ref_logps = torch.full((7, 1), -1.5)  # KL 0.5 per token, one token per row
    advantages, _ = rloo.compute_advantages(torch.tensor([1.0, 0.0, 0.0, 2.0]), experience)
    # Penalised rewards r - 0.5 * 0.5 * rows: 1 - 0.5, 0 - 0.25, 0 - 0.25, 2 - 0.75 = 0.5, -0.25, -0.25, 1.25;
    # leave-one-out in groups of two: 0.75, -0.75, -1.5, 1.5.
    assert advantages.tolist() == pytest.approx([0.75, 0.75, -0.75, -1.5, 1.5, 1.5, 1.5])


async def two_questions(client, record):
    """An agent whose second call does not continue the first: every episode is two samples."""
    for question in (record.prompt, record.prompt[::-1]):
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": question}], max_tokens=6)
    return 1.0 if len(record.prompt) % 2 else 0.5


def test_split_episodes_train_in_several_steps_and_passes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    algo = GRPOTrainer(
        policy=PolicyConfig(name_or_path="outputs/tiny", tiny=TinyModelConfig(hidden_size=32, intermediate_size=64)),
        reward=RewardCalculator([RewardSpec(name="agent_reward")]), environment=AgentEnvironment(two_questions),
        num_generations=2, max_completion_length=12, steps_per_generation=2, micro_batch_size=3, learning_rate=1e-3,
    )
    data = PromptDataModule(prompts=["abc", "abcd", "xy", "xyz"], batch_size=2)
    trainer = algo.fit(data, max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    metrics = trainer.callback_metrics
    assert trainer.global_step == 2
    assert float(metrics["train/env/samples"]) == 2.0 and float(metrics["train/env/fresh_renders"]) == 1.0
    assert math.isfinite(float(metrics["train/loss"]))
    assert len(algo._last_trajectories) == 8  # 4 episodes, 2 rows each
