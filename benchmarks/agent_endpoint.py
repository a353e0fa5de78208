"""What an agent's HTTP round trips cost: the same multi-turn rollouts through a built-in environment
and through `AgentEnvironment` (the real `openai` SDK over real HTTP to the policy endpoint).

    python benchmarks/agent_endpoint.py                          # small model, 8 prompts x 4 episodes x 3 turns x 32 tokens
    python benchmarks/agent_endpoint.py --model-size tiny --prompts 2 --generations 2 --turns 2 --tokens 4 --repeats 1
                                                                 # smoke test (tests/test_benchmarks.py)

Both sides run `--prompts x --generations` episodes of `--turns` chat turns on the same policy, the
same `BatchingSampler` (forced to exactly `--tokens` tokens per turn: equal work) and the same
tokens: the built-in side is an `Environment` that appends a user message each turn through the chat
template (`encode_continuation`, as `ToolEnvironment` does); the agent side is an async function
that sends the growing conversation with `client.chat.completions.create` each turn, and the
endpoint continues each call's exact tokens. Each timed phase is one `RolloutEngine.collect` (all
episodes, concurrent), alternating the two sides, after one warm-up phase each. Reported: median
seconds per phase, the agent/built-in ratio, generate calls per phase (batching: `--turns` each when
every turn's calls form one batch), and whether both sides did the same work (every episode's
prompt length and its layout of policy and context tokens).

Prints a Markdown table, then one line of JSON; writes benchmarks/results/agent_endpoint.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_arguments, commit, machine, write_results  # noqa: E402
from throughput import MODEL_SIZES  # noqa: E402

import torch  # noqa: E402

from retrain.core.records import PromptRecord  # noqa: E402
from retrain.environment import AgentEnvironment, Environment, EnvironmentObservation, LLMAction  # noqa: E402
from retrain.models.tiny import TinyModelConfig, build_tiny_model  # noqa: E402
from retrain.reward.calculator import RewardCalculator, RewardSpec  # noqa: E402
from retrain.rollout.engine import RolloutEngine  # noqa: E402
from retrain.rollout.sampler import BatchingSampler  # noqa: E402

FOLLOW_UP = {"role": "user", "content": "go on"}


class ChatTurns(Environment):
    """The built-in side: a user prompt, then "go on" after each reply, for `max_turns` replies."""

    def __init__(self, turns: int) -> None:
        self.max_turns = turns

    async def reset(self, record: PromptRecord) -> EnvironmentObservation:
        self.messages = [{"role": "user", "content": record.prompt}]
        return EnvironmentObservation(content=list(self.messages))

    async def step(self, action: Any) -> EnvironmentObservation:
        self.messages.append({"role": "assistant", "content": action.text})
        return EnvironmentObservation(content=[FOLLOW_UP])

    def parse_action(self, generation: Any) -> LLMAction:
        # Every turn is forced to --tokens tokens (no end-of-sequence), which would end the episode as
        # truncated; the agent side carries on after a "length" finish, so this side does too.
        return LLMAction(text=generation.text, token_ids=list(generation.token_ids), truncated=False)

    def encode_observation(self, policy: Any, observation: EnvironmentObservation) -> list[int]:
        history, self.messages = self.messages, [*self.messages, FOLLOW_UP]
        return policy.encode_continuation(history, [FOLLOW_UP])


def make_agent(turns: int) -> Any:
    async def agent(client: Any, record: PromptRecord) -> float:
        messages: list[dict[str, Any]] = [{"role": "user", "content": record.prompt}]
        for turn in range(turns):
            reply = (await client.chat.completions.create(model="policy", messages=messages)).choices[0].message
            messages.append({"role": "assistant", "content": reply.content})
            if turn < turns - 1:
                messages.append(FOLLOW_UP)
        return 0.0

    return agent


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch:
        directory = build_tiny_model(Path(scratch) / "model", TinyModelConfig(**MODEL_SIZES[args.model_size], max_position_embeddings=2048))
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(directory, padding_side="left")
    records = [PromptRecord(prompt=f"tell me about {chr(97 + i % 26)}") for i in range(args.prompts)]
    reward = RewardCalculator([RewardSpec(name="length_penalty")])
    budget = args.turns * (args.tokens + 16)
    sides = {"built-in": RolloutEngine(ChatTurns(args.turns), reward), "agent": RolloutEngine(AgentEnvironment(make_agent(args.turns)), reward)}
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    calls: dict[str, list[int]] = {name: [] for name in sides}
    sequences: dict[str, list[list[int]]] = {}
    try:
        for repeat in range(args.repeats + 1):
            order = list(sides) if repeat % 2 == 0 else list(sides)[::-1]
            for name in order:
                sampler = BatchingSampler(model, tokenizer, max_new_tokens=args.tokens, min_new_tokens=args.tokens)
                torch.manual_seed(repeat)
                start = time.perf_counter()
                trajectories, _ = sides[name].collect(records, args.generations, sampler, budget)
                elapsed = time.perf_counter() - start
                if repeat == 0:  # warm-up
                    sequences[name] = sorted((len(t.prompt_ids), t.completion_mask) for t in trajectories)
                    continue
                seconds[name].append(elapsed)
                calls[name].append(sampler.generate_calls)
    finally:
        for engine in sides.values():
            engine.close()
    median = {name: statistics.median(values) for name, values in seconds.items()}
    results = {
        name: {"seconds_per_phase": median[name], "seconds_all": seconds[name], "generate_calls_per_phase": max(calls[name])}
        for name in sides
    }
    # Equal work: the same prompt lengths and the same policy/context token layout on both sides (the
    # draws themselves differ: requests reach the batch in another order over HTTP).
    same = sequences["built-in"] == sequences["agent"]
    episodes = args.prompts * args.generations
    return {
        "benchmark": "agent_endpoint", "commit": commit(), "machine": machine(load, args.threads),
        "config": {"model_size": args.model_size, **MODEL_SIZES[args.model_size], "prompts": args.prompts, "generations": args.generations,
                   "episodes": episodes, "turns": args.turns, "tokens_per_turn": args.tokens, "repeats": args.repeats},
        "results": results, "agent_over_builtin": median["agent"] / median["built-in"], "same_work": same,
        "http_calls_per_phase": episodes * args.turns,
        "overhead_ms_per_call": 1000 * (median["agent"] - median["built-in"]) / (episodes * args.turns),
    }


def markdown(record: dict[str, Any]) -> str:
    c = record["config"]
    lines = [
        f"# Agent endpoint vs built-in environment ({c['model_size']} model, {c['episodes']} episodes x {c['turns']} turns x "
        f"{c['tokens_per_turn']} tokens; commit {record['commit']}; {record['machine']['summary']})",
        "",
        "| side | s / rollout phase | generate calls / phase |",
        "| --- | --- | --- |",
    ]
    for name, row in record["results"].items():
        lines.append(f"| {name} | {row['seconds_per_phase']:.3f} | {row['generate_calls_per_phase']} |")
    lines += [
        "",
        f"agent / built-in time: **{record['agent_over_builtin']:.2f}x**; {record['http_calls_per_phase']} HTTP calls per phase, "
        f"{record['overhead_ms_per_call']:.2f} ms extra per call; same work on both sides (token layout of every episode): {record['same_work']}",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="small")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2)))
    add_common_arguments(parser, ())
    args = parser.parse_args(argv)
    record = run(args)
    table = markdown(record)
    write_results(args.out_dir, "agent_endpoint", record, table)
    print(table)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
