"""`AgentEnvironment`: train an agent that was written against the OpenAI SDK, unchanged.

Each episode runs the user's agent function with an `openai` client pointed at the policy
(`PolicyEndpoint`, served on loopback during rollouts):

    async def agent(client: openai.AsyncOpenAI, record: PromptRecord) -> AgentResult | float | dict | None:
        ...

(a plain `def` gets an `openai.OpenAI` client and runs in a worker thread). Whatever the agent does
between calls (tools, parsing, its own framework) is its business; the endpoint records the exact
tokens of every call (`agent_tokens`) and the episode becomes a trajectory: one training row, or
several when the agent rewrote its history (step-wise samples, counted in `train/env/samples` and
`train/env/fresh_renders`). The agent's return value is its result: a float is the reward, a dict
is data for the reward functions (`trajectory.info`; its "reward" key, if any, is the reward), an
`AgentResult` may also give one reward per model call (`step_rewards`, the step rewards). The
built-in reward `agent_reward` reads the reward.

Faults: an agent that raises or exceeds `episode_timeout` keeps the tokens it produced, gets
`error_reward`, and is counted (`train/env/agent_errors`, `agent_timeouts`) and reported once per
error type; an agent that raises before its first model call has nothing to train and stops the run
with its error (it is almost always a bug in the agent). A failure of the policy itself is
re-raised.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import secrets
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from retrain.core.errors import ConfigError, TrainingFault
from retrain.core.records import PromptRecord
from retrain.core.registry import import_function
from retrain.environment.base import Environment, EnvironmentObservation, LLMAction, PolicyClient, Trajectory
from retrain.environment.endpoint import EpisodeSession, PolicyEndpoint


@dataclass
class AgentResult:
    """What an agent reports about its episode.

    Attributes:
        reward: the episode's reward (what `agent_reward` returns); None to leave scoring to the
            other reward functions.
        step_rewards: one reward per model call, in call order (the step rewards).
        info: anything else, for the reward functions (`trajectory.info`).
    """

    reward: Optional[float] = None
    step_rewards: Optional[list[float]] = None
    info: dict[str, Any] = field(default_factory=dict)


class AgentEnvironment(Environment):
    """Episodes that run an OpenAI-SDK agent against the policy.

    Args:
        agent: the agent: a callable `(client, record)`, or its import path (`my_agent.py:run`,
            `package.module.run`). Async functions get an `openai.AsyncOpenAI`, plain functions an
            `openai.OpenAI` (run in a worker thread).
        model_name: the model id the endpoint lists (agents may pass any).
        episode_timeout: seconds one episode's agent may run.
        max_calls: the most model calls (choices) one episode may make; more get a 429.
        on_sampling_mismatch: "override" serves requests whose temperature/top_p/penalties differ
            from the trainer's with the trainer's (the response says so); "refuse" answers 400.
        error_reward: the reward of an episode whose agent raised or timed out.
        max_request_bytes: the largest request body the endpoint accepts.
        request_timeout: seconds the agent's client waits for one response.
    """

    def __init__(
        self,
        agent: Union[str, Callable[..., Any]],
        model_name: str = "policy",
        episode_timeout: float = 300.0,
        max_calls: int = 64,
        on_sampling_mismatch: str = "override",
        error_reward: float = 0.0,
        max_request_bytes: int = 4 << 20,
        request_timeout: float = 600.0,
    ) -> None:
        if isinstance(agent, str):
            try:
                agent = import_function(agent, "agent")
            except KeyError as err:
                raise ConfigError(f"AgentEnvironment.agent: {err.args[0]}") from None
        if not callable(agent):
            raise ConfigError(f"AgentEnvironment.agent must be a callable (client, record), got {type(agent).__name__}.")
        if episode_timeout <= 0 or max_calls < 1 or request_timeout <= 0:
            raise ConfigError("AgentEnvironment: episode_timeout and request_timeout must be > 0 and max_calls >= 1.")
        if on_sampling_mismatch not in ("override", "refuse"):
            raise ConfigError(f"AgentEnvironment.on_sampling_mismatch={on_sampling_mismatch!r}: use 'override' or 'refuse'.")
        self.agent = agent
        self.is_async = inspect.iscoroutinefunction(agent) or inspect.iscoroutinefunction(getattr(agent, "__call__", None))
        self.max_turns = max_calls
        self.max_calls = max_calls
        self.episode_timeout = episode_timeout
        self.error_reward = error_reward
        self.request_timeout = request_timeout
        self.endpoint = PolicyEndpoint(model_name, on_sampling_mismatch, max_request_bytes)  # type: ignore[arg-type]
        self._warned: set[str] = set()  # shared by every spawned episode
        self._threads: Optional[concurrent.futures.ThreadPoolExecutor] = None

    async def setup(self) -> None:
        try:
            import openai  # noqa: F401
        except ImportError:
            raise ConfigError("AgentEnvironment needs the openai SDK: pip install 'retrain[agents]' (or pip install openai).") from None
        await self.endpoint.start()
        if not self.is_async:  # every episode's agent at once: a small default pool would serialise them
            self._threads = concurrent.futures.ThreadPoolExecutor(max_workers=256, thread_name_prefix="retrain-agent")

    async def close(self) -> None:
        await self.endpoint.close()
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)

    async def reset(self, record: PromptRecord) -> EnvironmentObservation:
        raise NotImplementedError("AgentEnvironment runs the agent in rollout(); it has no reset/step of its own.")

    async def step(self, action: LLMAction) -> EnvironmentObservation:
        raise NotImplementedError("AgentEnvironment runs the agent in rollout(); it has no reset/step of its own.")

    # ------------------------------------------------------------------ one episode
    async def rollout(self, record: PromptRecord, policy: PolicyClient, max_completion_tokens: Optional[int] = None) -> Trajectory:
        if self.endpoint.port is None:
            await self.setup()  # used outside the trainer, which sets environments up first
        session = self.endpoint.open_episode(policy, max_completion_tokens, self.max_calls)
        try:
            result, fault = await self._run_agent(session, record)
        finally:
            self.endpoint.close_episode(session)
        if session.failure is not None:
            raise session.failure
        if not session.tokens.calls:
            raise TrainingFault(
                f"the agent {_name(self.agent)} returned without calling the model, so its episode has nothing to train"
                + (f"; it {fault.detail if fault.kind == 'timeout' else 'raised:' + chr(10) + fault.detail}" if fault else
                   ". Every episode must make at least one model call.")
            )
        if fault is not None:
            self._report(fault.kind, fault.summary)
            result = AgentResult(reward=self.error_reward, info={"agent_error": fault.detail})
        timed_out = fault is not None and fault.kind == "timeout"
        trajectory = session.tokens.trajectory(record, result.step_rewards)
        trajectory.info = {**result.info, "reward": result.reward}
        counts = dict(session.counts)
        counts.update(
            samples=float(len(trajectory.samples)), fresh_renders=float(session.tokens.fresh_renders),
            agent_errors=float(fault is not None and not timed_out), agent_timeouts=float(timed_out),
        )
        trajectory.metrics = counts
        return trajectory

    async def _run_agent(self, session: EpisodeSession, record: PromptRecord) -> tuple[AgentResult, Optional[_Fault]]:
        client = self._client(session)
        try:
            if self.is_async:
                outcome = await asyncio.wait_for(self.agent(client, record), self.episode_timeout)
            else:
                loop = asyncio.get_running_loop()
                outcome = await asyncio.wait_for(loop.run_in_executor(self._threads, self.agent, client, record), self.episode_timeout)
            return _as_result(outcome, self.agent), None
        except asyncio.TimeoutError:
            summary = f"an episode of the agent {_name(self.agent)} ran past episode_timeout={self.episode_timeout:g} s"
            return AgentResult(), _Fault("timeout", summary, f"timed out after {self.episode_timeout:g} s")
        except Exception as err:
            if isinstance(err, (ConfigError, TrainingFault)) and session.failure is None:
                raise
            detail = "".join(traceback.format_exception(err)[-3:]).strip()
            return AgentResult(), _Fault(type(err).__name__, f"the agent {_name(self.agent)} raised {type(err).__name__}: {err}", detail)
        finally:
            close = client.close()
            if inspect.isawaitable(close):
                await close

    def _report(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(
                f"{message}. The episode keeps its tokens with error_reward={self.error_reward:g}; every such episode is "
                "counted in train/env/agent_errors (or agent_timeouts). Shown once per kind of error.",
                RuntimeWarning, stacklevel=2,
            )

    def _client(self, session: EpisodeSession) -> Any:
        import httpx
        import openai

        options = dict(base_url=session.base_url, api_key=session.api_key, max_retries=0, timeout=self.request_timeout)
        # A connection pool per episode: httpx's pool scans all its connections on every request, so
        # one pool shared by hundreds of concurrent episodes costs more than the requests. Plain HTTP
        # on loopback: no certificates to load (loading them costs ~40 ms per transport).
        if self.is_async:
            transport = _AsyncCountingTransport(httpx.AsyncHTTPTransport(verify=False), session)
            return openai.AsyncOpenAI(**options, http_client=httpx.AsyncClient(transport=transport, timeout=self.request_timeout))
        transport = _CountingTransport(httpx.HTTPTransport(verify=False), session)
        return openai.OpenAI(**options, http_client=httpx.Client(transport=transport, timeout=self.request_timeout))


@dataclass
class _Fault:
    kind: str  # "timeout" or the exception's type name: what is reported once
    summary: str
    detail: str


def _as_result(outcome: Any, agent: Any) -> AgentResult:
    if outcome is None or isinstance(outcome, AgentResult):
        return outcome or AgentResult()
    if isinstance(outcome, (int, float)) and not isinstance(outcome, bool):
        return AgentResult(reward=float(outcome))
    if isinstance(outcome, dict):
        reward = outcome.get("reward")
        return AgentResult(reward=None if reward is None else float(reward), info=dict(outcome))
    raise TypeError(f"the agent {_name(agent)} returned a {type(outcome).__name__}; return an AgentResult, a float reward, a dict or None.")


def _name(agent: Any) -> str:
    return getattr(agent, "__qualname__", None) or type(agent).__name__


# The agent's client marks each request on its way, so the sampler waits for it instead of serving a
# partial batch (`EpisodeSession.sent`); wrapping the transport (not event hooks) settles the mark
# however the request ends.
class _AsyncCountingTransport:
    def __init__(self, inner: Any, session: EpisodeSession) -> None:
        self.inner, self.session = inner, session

    async def handle_async_request(self, request: Any) -> Any:
        call_id = secrets.token_hex(8)
        request.headers["x-retrain-call"] = call_id
        self.session.sent(call_id)
        try:
            return await self.inner.handle_async_request(request)
        finally:
            self.session.arrived(call_id)

    async def aclose(self) -> None:
        await self.inner.aclose()


class _CountingTransport:
    def __init__(self, inner: Any, session: EpisodeSession) -> None:
        self.inner, self.session = inner, session

    def handle_request(self, request: Any) -> Any:
        call_id = secrets.token_hex(8)
        request.headers["x-retrain-call"] = call_id
        self.session.sent(call_id)
        try:
            return self.inner.handle_request(request)
        finally:
            self.session.arrived(call_id)

    def close(self) -> None:
        self.inner.close()
