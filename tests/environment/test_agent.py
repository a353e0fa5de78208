"""AgentEnvironment and the policy endpoint, with the real `openai` SDK over real HTTP on loopback.

The token-exact tests script the policy's choice of tokens (a tiny random model never writes a tool
call) on the real BatchingSampler, tokenizer and chat template; the batching test samples from the
real tiny model."""

import asyncio
import json
import math

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from retrain.core.errors import TrainingFault
from retrain.core.records import PromptRecord
from retrain.environment.agent import AgentEnvironment, AgentResult
from retrain.models.tiny import TinyModelConfig, build_tiny_model
from retrain.reward.calculator import RewardCalculator, RewardSpec
from retrain.rollout.engine import RolloutEngine
from retrain.rollout.sampler import BatchingSampler

TOOLS = [{"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]},
}}]


def call(name, **arguments):
    return f'<tool_call>{json.dumps({"name": name, "arguments": arguments})}</tool_call>'


class ScriptedSampler(BatchingSampler):
    """The real sampler with the model's choice scripted: reply k is `script[k]`, k = the number of
    tool results in the context. Records every context it was asked to continue."""

    def __init__(self, tokenizer, script, max_new_tokens=256):
        super().__init__(model=None, tokenizer=tokenizer, max_new_tokens=max_new_tokens)
        self.script = script
        self.contexts = []

    def _sample_batch(self, contexts, max_new_tokens):
        self.generate_calls += 1
        replies, logprobs = [], []
        for context in contexts:
            self.contexts.append(list(context))
            turn = self.tokenizer.decode(context).count("tool: ")
            reply = self.tokenizer(self.script[min(turn, len(self.script) - 1)], add_special_tokens=False)["input_ids"]
            reply = (reply + [self.tokenizer.eos_token_id])[:max_new_tokens]
            replies.append(reply)
            logprobs.append([-0.5 - 0.01 * i for i in range(len(reply))])
        return replies, logprobs


@pytest.fixture(scope="module")
def tools_model_dir(tmp_path_factory):
    config = TinyModelConfig(hidden_size=32, intermediate_size=64, chat_template="tools", max_position_embeddings=2048)
    return build_tiny_model(tmp_path_factory.mktemp("tiny_tools") / "model", config)


@pytest.fixture
def tokenizer(tools_model_dir):
    return AutoTokenizer.from_pretrained(tools_model_dir, padding_side="left")


def _episodes(environment, sampler, records, g=1, budget=512):
    engine = RolloutEngine(environment, RewardCalculator([RewardSpec(name="agent_reward")]))
    try:
        return engine.collect(records, g, sampler, budget)
    finally:
        engine.close()


async def tool_loop(client: openai.AsyncOpenAI, record):
    """A plain SDK agent: call, run the tool calls, repeat until a plain answer."""
    messages = [{"role": "user", "content": record.prompt}]
    for _ in range(4):
        response = await client.chat.completions.create(model="anything", messages=messages, tools=TOOLS)
        message = response.choices[0].message
        messages.append(message.model_dump(exclude_none=True))
        if not message.tool_calls:
            break
        for c in message.tool_calls:
            arguments = json.loads(c.function.arguments)
            messages.append({"role": "tool", "tool_call_id": c.id, "content": str(arguments["a"] + arguments["b"])})
    return AgentResult(reward=float(messages[-1]["content"] == "15"), step_rewards=[0.1 * i for i in range(len(messages))], info={"n": len(messages)})


def test_a_multi_turn_tool_calling_episode_is_token_exact(tokenizer):
    script = [call("add", a=2, b=3), call("add", a=5, b=10), "15"]
    sampler = ScriptedSampler(tokenizer, script)
    [episode], scored = _episodes(AgentEnvironment(tool_loop), sampler, [PromptRecord(prompt="2+3+10?")])

    assert [t.action.text for t in episode.turns] == script
    assert [len(t.action.tool_calls) for t in episode.turns] == [1, 1, 0]
    assert scored.total == [1.0] and episode.info["reward"] == 1.0 and episode.info["n"] == 6
    assert episode.step_rewards == pytest.approx([0.0, 0.1, 0.2])
    assert episode.earlier_samples == [] and episode.metrics["samples"] == 1.0 and episode.metrics["fresh_renders"] == 0.0

    # Rebuild the token stream by hand. The prompt: the template's rendering of the first request.
    # Each reply + <eos> is the policy's, exactly as sampled (mask 1); between replies, the
    # template's rendering of the tool message and the next "assistant: " (mask 0) -- the policy's
    # own tokens are never re-tokenized from the text the agent sent back.
    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "2+3+10?"}], tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert episode.prompt_ids == encode(rendered)
    eos = [tokenizer.eos_token_id]
    expected_ids, expected_mask, expected_turns = [], [], []
    for turn, (reply, result) in enumerate(zip(script, ["5", "15", None])):
        expected_ids += encode(reply) + eos
        expected_mask += [1] * (len(encode(reply)) + 1)
        expected_turns += [turn] * (len(encode(reply)) + 1)
        if result is not None:
            # The template renders the history up to the assistant turn's end; the new part starts after it.
            between = encode(f"tool: {result}\nassistant: ")
            expected_ids += between
            expected_mask += [0] * len(between)
            expected_turns += [turn] * len(between)
    assert episode.completion_ids == expected_ids
    assert episode.completion_mask == expected_mask
    assert episode.completion_turns == expected_turns
    # What the policy was asked to continue each turn is exactly the trajectory's prefix.
    full = episode.prompt_ids + episode.completion_ids
    assert [len(c) for c in sampler.contexts] == [len(episode.prompt_ids) + start for start in _turn_starts(expected_mask)]
    for context in sampler.contexts:
        assert full[: len(context)] == context
    # The sampler's log-probs are kept on the policy's tokens, NaN elsewhere.
    policy_logprobs = [lp for lp, m in zip(episode.completion_logprobs, expected_mask) if m]
    assert policy_logprobs[0] == pytest.approx(-0.5) and all(math.isfinite(lp) for lp in policy_logprobs)
    assert all(math.isnan(lp) for lp, m in zip(episode.completion_logprobs, expected_mask) if not m)


def _turn_starts(mask):
    """Indices where a run of 1s starts."""
    return [i for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1])]


async def forgetful(client, record):
    """Rewrites its history after the first tool call: drops the call and keeps only the result."""
    messages = [{"role": "user", "content": record.prompt}]
    first = (await client.chat.completions.create(model="m", messages=messages, tools=TOOLS)).choices[0].message
    assert first.tool_calls
    summary = [{"role": "user", "content": record.prompt + " (2+3 is 5)"}]
    second = (await client.chat.completions.create(model="m", messages=summary, tools=TOOLS)).choices[0].message
    return {"reward": 1.0, "answer": second.content}


def test_an_agent_that_rewrites_its_history_splits_the_episode_into_exact_samples(tokenizer):
    sampler = ScriptedSampler(tokenizer, [call("add", a=2, b=3), "5"])
    [episode], _ = _episodes(AgentEnvironment(forgetful), sampler, [PromptRecord(prompt="2+3?")])
    assert episode.metrics["samples"] == 2.0 and episode.metrics["fresh_renders"] == 1.0
    first, second = episode.samples
    for sample, context in zip((first, second), sampler.contexts):
        assert sample.prompt_ids == context  # each sample's prompt: the context its call really had
        assert sample.completion_mask == [1] * len(sample.completion_ids)
    reply = tokenizer(call("add", a=2, b=3), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert first.completion_ids == reply and second.completion_ids == reply  # no tool result in either context: script[0]
    assert sampler.contexts[1] == tokenizer(
        tokenizer.apply_chat_template([{"role": "user", "content": "2+3? (2+3 is 5)"}], tools=TOOLS, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )["input_ids"]
    assert len(episode.turns) == 2 and [len(s.turns) for s in episode.samples] == [1, 2]


def test_concurrent_sdk_calls_cost_one_generate_call(tiny_model_dir):
    """Eight episodes, each one chat call over HTTP, sampled from the real tiny model: one batch."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, padding_side="left")
    sampler = BatchingSampler(model, tokenizer, max_new_tokens=8)

    async def once(client, record):
        response = await client.chat.completions.create(model="policy", messages=[{"role": "user", "content": record.prompt}], logprobs=True)
        choice = response.choices[0]
        assert choice.logprobs.content and all(e.logprob <= 0 for e in choice.logprobs.content)
        return 0.0

    episodes, _ = _episodes(AgentEnvironment(once), sampler, [PromptRecord(prompt="hi"), PromptRecord(prompt="yo")], g=4)
    assert len(episodes) == 8 and sampler.generate_calls == 1
    assert all(e.num_policy_tokens >= 1 and not math.isnan(e.completion_logprobs[0]) for e in episodes)


def test_a_sync_agent_runs_in_a_thread_with_the_sync_client(tokenizer):
    def agent(client: openai.OpenAI, record):
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": record.prompt}])
        return float(reply.choices[0].message.content == "15")

    sampler = ScriptedSampler(tokenizer, ["15"])
    episodes, scored = _episodes(AgentEnvironment(agent), sampler, [PromptRecord(prompt="q")], g=3)
    assert scored.total == [1.0, 1.0, 1.0] and sampler.generate_calls == 1


def test_streaming_and_text_completions(tokenizer):
    async def agent(client, record):
        stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "a"}], stream=True)
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
        completion = await client.completions.create(model="m", prompt="user: b\nassistant: ", extra_body={"return_token_ids": True})
        models = await client.models.list()
        return {"reward": 1.0, "text": text, "completion": completion.choices[0].text, "ids": completion.choices[0].model_extra["token_ids"], "models": [m.id for m in models.data]}

    [episode], _ = _episodes(AgentEnvironment(agent, model_name="tiny"), ScriptedSampler(tokenizer, ["15"]), [PromptRecord(prompt="q")])
    assert episode.info["text"] == "15" and episode.info["completion"] == "15" and episode.info["models"] == ["tiny"]
    assert episode.info["ids"] == tokenizer("15", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert episode.metrics["samples"] == 2.0  # two unrelated prompts: two samples


def test_sampling_options_are_overridden_and_said_or_refused(tokenizer):
    async def agent(client, record):
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "a"}], temperature=0.2, frequency_penalty=0.5, seed=3,
        )
        return {"reward": 0.0, "retrain": json.loads(raw.text)["retrain"]}

    [episode], _ = _episodes(AgentEnvironment(agent), ScriptedSampler(tokenizer, ["1"]), [PromptRecord(prompt="q")])
    notes = episode.info["retrain"]
    assert notes["overridden"]["temperature"] == {"requested": 0.2, "used": 1.0}
    assert notes["overridden"]["frequency_penalty"]["used"] == 0 and notes["ignored"] == ["seed"]
    assert episode.metrics["overridden_options"] == 2.0

    async def refused(client, record):
        try:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "a"}], temperature=0.2)
        except openai.BadRequestError as err:
            reply = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "a"}], temperature=1.0)
            return {"reward": 0.0, "error": err.body, "ok": reply.choices[0].message.content}

    [episode], _ = _episodes(AgentEnvironment(refused, on_sampling_mismatch="refuse"), ScriptedSampler(tokenizer, ["1"]), [PromptRecord(prompt="q")])
    assert episode.info["error"]["param"] == "temperature" and "trainer's settings" in episode.info["error"]["message"]
    assert episode.info["ok"] == "1" and episode.metrics["refused_requests"] == 1.0


def test_the_endpoint_checks_the_key_the_episode_the_size_and_the_json(tokenizer):
    async def agent(client, record):
        base, key = str(client.base_url).rstrip("/"), client.api_key
        statuses = {}
        async with httpx.AsyncClient() as http:
            body = {"model": "m", "messages": [{"role": "user", "content": "a"}]}
            statuses["no key"] = (await http.post(f"{base}/chat/completions", json=body)).status_code
            statuses["wrong key"] = (await http.post(f"{base}/chat/completions", json=body, headers={"authorization": "Bearer nope"})).status_code
            auth = {"authorization": f"Bearer {key}"}
            other = base.replace("/e/", "/e/x")
            statuses["other episode"] = (await http.post(f"{other}/chat/completions", json=body, headers=auth)).status_code
            statuses["too large"] = (await http.post(f"{base}/chat/completions", content=b"{" + b" " * 5000 + b"}", headers=auth)).status_code
            bad_json = await http.post(f"{base}/chat/completions", content=b"{nope", headers=auth)
            statuses["bad json"] = bad_json.status_code
            statuses["no messages"] = (await http.post(f"{base}/chat/completions", json={"model": "m"}, headers=auth)).status_code
            statuses["bad role"] = (await http.post(f"{base}/chat/completions", json={"messages": [{"role": "x"}]}, headers=auth)).status_code
            statuses["n too big"] = (await http.post(f"{base}/chat/completions", json={**body, "n": 99}, headers=auth)).status_code
            statuses["no route"] = (await http.get(f"{base}/nothing", headers=auth)).status_code
            error = bad_json.json()["error"]
        reply = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "a"}])
        return {"reward": 0.0, "statuses": statuses, "error": error, "reply": reply.choices[0].message.content}

    environment = AgentEnvironment(agent, max_request_bytes=4096)
    [episode], _ = _episodes(environment, ScriptedSampler(tokenizer, ["1"]), [PromptRecord(prompt="q")])
    assert episode.info["statuses"] == {
        "no key": 401, "wrong key": 401, "other episode": 404, "too large": 413, "bad json": 400,
        "no messages": 400, "bad role": 400, "n too big": 400, "no route": 404,
    }
    assert episode.info["error"]["type"] == "invalid_request_error" and "not valid JSON" in episode.info["error"]["message"]
    assert episode.info["reply"] == "1"  # none of that hurt the episode
    assert environment.endpoint.url.startswith("http://127.0.0.1:")


def test_agent_faults_are_counted_and_an_agent_that_never_calls_stops_the_run(tokenizer):
    async def crashes_after_a_call(client, record):
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "a"}])
        raise KeyError("oops")

    with pytest.warns(RuntimeWarning, match="raised KeyError"):
        [episode], scored = _episodes(AgentEnvironment(crashes_after_a_call, error_reward=-1.0), ScriptedSampler(tokenizer, ["1"]), [PromptRecord(prompt="q")])
    assert scored.total == [-1.0] and episode.metrics["agent_errors"] == 1.0 and "KeyError" in episode.info["agent_error"]

    async def slow(client, record):
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "a"}])
        await asyncio.Event().wait()  # never set: only the episode timeout ends this

    with pytest.warns(RuntimeWarning, match="episode_timeout"):
        [episode], _ = _episodes(AgentEnvironment(slow, episode_timeout=0.5), ScriptedSampler(tokenizer, ["1"]), [PromptRecord(prompt="q")])
    assert episode.metrics["agent_timeouts"] == 1.0 and episode.num_policy_tokens == 2

    async def never_calls(client, record):
        raise ImportError("no module named my_helper")

    with pytest.raises(TrainingFault, match="(?s)without calling the model.*my_helper"):
        _episodes(AgentEnvironment(never_calls), ScriptedSampler(tokenizer, ["1"]), [PromptRecord(prompt="q")])


def test_the_episode_budget_bounds_every_sample(tokenizer):
    async def chatty(client, record):
        messages = [{"role": "user", "content": "a"}]
        reasons = []
        for _ in range(6):
            choice = (await client.chat.completions.create(model="m", messages=messages)).choices[0]
            reasons.append(choice.finish_reason)
            messages += [choice.message.model_dump(exclude_none=True), {"role": "user", "content": "more"}]
        return {"reward": 0.0, "reasons": reasons}

    [episode], _ = _episodes(AgentEnvironment(chatty), ScriptedSampler(tokenizer, ["abcdefghij"]), [PromptRecord(prompt="q")], budget=40)
    assert len(episode.completion_ids) <= 40 and episode.truncated
    assert episode.info["reasons"][0] == "stop" and episode.info["reasons"][-1] == "length"


def test_n_choices_stop_strings_tool_choice_and_limits(tokenizer):
    async def agent(client, record):
        out = {"reward": 0.0}
        many = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "a"}], n=2, stop=["c"])
        out["n"] = [(c.index, c.message.content, c.finish_reason) for c in many.choices]
        forced = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "b"}], tool_choice="required",
        )
        out["forced"] = json.loads(forced.text)["retrain"]["overridden"]["tool_choice"]
        try:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x" * 80}])
        except openai.BadRequestError as err:
            out["long"] = err.body["code"]
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "d"}])  # the 4th call
        try:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "e"}])
        except openai.RateLimitError as err:
            out["limit"] = err.body["code"]
        return out

    sampler = ScriptedSampler(tokenizer, ["abcde"])
    sampler.context_limit = 60  # a model that reads 60 tokens: the 80-character message does not fit
    [episode], _ = _episodes(AgentEnvironment(agent, max_calls=4), sampler, [PromptRecord(prompt="q")])
    info = episode.info
    assert info["n"] == [(0, "ab", "stop"), (1, "ab", "stop")]  # the text before the stop string
    assert info["forced"] == {"requested": "required", "used": "auto"}
    assert info["long"] == "context_length_exceeded" and info["limit"] == "episode_call_limit"
    # The tokens through the one that completed the stop string are what was sampled and trained.
    assert [t.action.token_ids for t in episode.samples[0].turns] == [tokenizer("abc", add_special_tokens=False)["input_ids"]]
    assert episode.metrics["calls"] == 4.0 and episode.metrics["refused_requests"] == 2.0
    assert len(episode.samples) == 4  # choices 0 and 1 share a context: the second is a sample of its own


def test_a_body_that_does_not_arrive_in_time_gets_408_and_the_server_keeps_serving(tokenizer):
    from retrain.environment.endpoint import PolicyEndpoint

    async def scenario():
        endpoint = PolicyEndpoint(read_timeout=0.3)
        await endpoint.start()
        try:
            session = endpoint.open_episode(ScriptedSampler(tokenizer, ["1"]), budget=16)
            path = session.base_url.split(str(endpoint.port), 1)[1] + "/chat/completions"
            reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
            writer.write(
                f"POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {endpoint.api_key}\r\n"
                "content-type: application/json\r\ncontent-length: 100\r\n\r\n{\"mod".encode()
            )
            await writer.drain()
            status = (await asyncio.wait_for(reader.readline(), 10)).decode()
            writer.close()
            async with httpx.AsyncClient() as http:
                again = await http.post(
                    session.base_url + "/chat/completions", headers={"authorization": f"Bearer {endpoint.api_key}"},
                    json={"messages": [{"role": "user", "content": "a"}]},
                )
            return status, again.status_code
        finally:
            await endpoint.close()

    status, again = asyncio.run(scenario())
    assert " 408 " in status and again == 200
