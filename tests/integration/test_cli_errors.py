"""Every kind of mistake ends in one short report through the real console script: what is wrong,
where, the choices, the fix; exit status 2 (1 for a fault that stopped training); no traceback,
no usage text; the model is never built first."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from cli_config import quick_config, run_retrain


def _fails_cleanly(result, code: int = 2) -> list[str]:
    """The report's lines, after checking it is short, traceback-free and ends the output."""
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr and "usage:" not in result.stderr, result.stderr[-3000:]
    assert "Given value" not in result.stderr and "Subtypes" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    report = lines[next(i for i, line in enumerate(lines) if line.startswith("retrain ")):]
    assert len(report) <= 8, report
    assert report[-1].strip() == "(RETRAIN_DEBUG=1 shows the traceback)"
    return report


@pytest.mark.parametrize(
    "override, expected",
    [
        (["--trainer.max_stpes", "3"], "trainer.max_stpes: `retrain` has no key 'trainer.max_stpes'. Did you mean 'trainer.max_steps'?"),
        (["--model.init_args.num_generation", "4"], "Did you mean 'num_generations'?"),
        (["--model.init_args.num_generations", "four"], "model.init_args.num_generations: expected int, got 'four'."),
        (["--model.init_args.loss_type", "grpoo"], "'grpoo' is not one of the choices: grpo, bnpo, dr_grpo, dapo, cispo, sapo. Did you mean 'grpo'?"),
        (["--model.init_args.num_generations", "1"], "num_generations=1: a group needs at least 2 rollouts"),
        (["--data.init_args.path", "missing.jsonl"], "data.path: prompt file 'missing.jsonl' does not exist"),
        (["--model.init_args.reward.rewards", "[{name: letter_fractoin}]"], "reward.rewards[0]: Unknown reward 'letter_fractoin'"),
        (["--model.init_args.environment", "retrain.environment.GymEnvironmnt"],
         "model.init_args.environment: class_path 'retrain.environment.GymEnvironmnt' cannot be imported"),
    ],
    ids=["trainer-key", "model-option", "type", "literal", "trainer-option", "data-file", "reward-name", "class-path"],
)
def test_a_config_mistake_is_one_short_block(tmp_path, override, expected):
    config = quick_config(tmp_path)
    result = run_retrain(tmp_path, "fit", "--config", str(config), *override)
    report = _fails_cleanly(result)
    assert report[0] == f"retrain fit: configuration error (config: {config})"
    assert expected in result.stderr
    assert not (tmp_path / "model").exists(), "the model was built before the config error was reported"


def test_an_unknown_class_suggests_the_class_meant(tmp_path):
    result = run_retrain(tmp_path, "fit", "--config", str(quick_config(tmp_path)), "--model.init_args.environment", "retrain.environment.GymEnvironmnt")
    assert "Did you mean retrain.environment.GymEnvironment?" in "\n".join(_fails_cleanly(result))


def test_a_constructor_refusing_its_arguments_is_named_after_its_class(tmp_path):
    # MountainCarContinuous has a Box action space: GymEnvironment refuses it in its constructor.
    environment = {"class_path": "retrain.environment.GymEnvironment", "init_args": {"env_id": "MountainCarContinuous-v0"}}
    result = run_retrain(tmp_path, "fit", "--config", str(quick_config(tmp_path)), "--model.init_args.environment", yaml.safe_dump(environment))
    report = "\n".join(_fails_cleanly(result))
    assert "retrain.environment.gym.GymEnvironment: GymEnvironment needs a Discrete action space" in report


def test_invalid_yaml_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_steps: 3\n  callbacks: [1,\n")
    result = run_retrain(tmp_path, "fit", "--config", str(quick_config(tmp_path)), "--config", str(bad))
    report = "\n".join(_fails_cleanly(result))
    assert f"{bad}, line 4, column 1: invalid YAML" in report


def test_a_missing_config_file_says_so(tmp_path):
    result = run_retrain(tmp_path, "fit", "--config", "configs/nope.yaml")
    assert "--config configs/nope.yaml: no such file" in "\n".join(_fails_cleanly(result))


def test_debug_switch_shows_the_traceback(tmp_path):
    config = quick_config(tmp_path)
    result = run_retrain(tmp_path, "fit", "--config", str(config), "--model.init_args.num_generations", "1", env={"RETRAIN_DEBUG": "1"})
    assert result.returncode == 1 and "Traceback" in result.stderr and "num_generations=1" in result.stderr


def test_a_reward_raising_stops_training_with_its_message_last_and_keeps_the_checkpoint(tmp_path):
    (tmp_path / "grader.py").write_text(
        "calls = 0\n\n"
        "def flaky(completion, **kwargs):\n"
        "    global calls\n    calls += 1\n"
        "    if calls > 8:  # the second step's rollouts (2 prompts x 4): one update has happened\n"
        "        raise RuntimeError('the grader database is down')\n"
        "    return 0.5\n"
    )
    config = quick_config(tmp_path)
    content = yaml.safe_load(config.read_text())
    content["model"]["init_args"]["reward"]["rewards"] = [{"name": "grader.py:flaky"}]
    content["trainer"]["callbacks"][0]["init_args"]["save_on_exception"] = True
    config.write_text(yaml.safe_dump(content))
    result = run_retrain(tmp_path, "fit", "--config", str(config))
    report = _fails_cleanly(result, code=1)
    assert report[0] == f"retrain fit: training stopped (config: {config})"
    assert "reward 'flaky' raised RuntimeError: the grader database is down" in report[1]
    saved = torch.load(tmp_path / "out" / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 1, "the checkpoint on exception was lost"


def test_version_and_fit_help(tmp_path):
    version = run_retrain(tmp_path, "--version")
    assert version.returncode == 0 and version.stdout.startswith("retrain 0.") and "torch 2." in version.stdout
    help_text = run_retrain(tmp_path, "fit", "--help").stdout
    assert "retrain.GRPOTrainer" in help_text and "retrain.RLOOTrainer" in help_text
    assert "--model.help retrain.GRPOTrainer" in help_text and "retrain export" in help_text


def test_a_tool_server_that_cannot_start_fails_before_the_model_loads(tmp_path):
    server = Path(__file__).resolve().parents[1] / "environment" / "servers" / "mcp_test_server.py"
    (tmp_path / "refuse").write_text("")
    environment = {
        "class_path": "retrain.environment.ToolEnvironment",
        "init_args": {"tools": [{"class_path": "retrain.environment.mcp.MCPToolProvider", "init_args": {
            "command": sys.executable, "args": [str(server), "--refuse-start-if", str(tmp_path / "refuse")], "startup_timeout": 20}}]},
    }
    result = run_retrain(tmp_path, "fit", "--config", str(quick_config(tmp_path)), "--model.init_args.environment", yaml.safe_dump(environment))
    report = "\n".join(_fails_cleanly(result))
    assert "model.init_args.environment could not be set up, so training did not start" in report
    assert "refuse-4712" in report  # the server's own last words
    assert not (tmp_path / "model").exists(), "the model was built before the server was started"


CRASHING_ENVIRONMENT = '''
import os, sys
from retrain.environment import SingleTurnEnvironment
from retrain.environment.mcp import MCPToolProvider


class CrashingServerEnvironment(SingleTurnEnvironment):
    """Each step calls a real MCP server's `crash` tool once the refuse file exists: the server dies,
    its restart is refused, and the provider gives up (MCPServerError) in the middle of training."""

    def __init__(self, server: str, refuse: str) -> None:
        super().__init__()
        self.server, self.refuse = server, refuse

    async def setup(self) -> None:
        self.provider = MCPToolProvider(command=sys.executable, args=[self.server, "--refuse-start-if", self.refuse], startup_timeout=20)
        await self.provider.start()

    async def close(self) -> None:
        await self.provider.close()

    async def step(self, action):
        # One episode crashes the server; the others never call it, so exactly one crash reaches its
        # stderr (concurrent crash calls could each print before the process dies).
        if not getattr(self, "crashed", False):
            self.crashed = True
            open(self.refuse, "w").close()
            await self.provider.call("crash", {})
        return await super().step(action)
'''


def test_a_tool_server_that_cannot_be_restarted_stops_training_with_its_message_last(tmp_path):
    (tmp_path / "crashing.py").write_text(CRASHING_ENVIRONMENT)
    server = Path(__file__).resolve().parents[1] / "environment" / "servers" / "mcp_test_server.py"
    environment = {"class_path": "crashing.CrashingServerEnvironment", "init_args": {"server": str(server), "refuse": str(tmp_path / "refuse")}}
    result = run_retrain(tmp_path, "fit", "--config", str(quick_config(tmp_path)), "--model.init_args.environment", yaml.safe_dump(environment))
    report = _fails_cleanly(result, code=1)
    assert report[0].startswith("retrain fit: training stopped")
    text = "\n".join(report)
    assert "restarting it failed too" in text and "boom-4711" in text and "refuse-4712" in text
    assert "ExceptionGroup" not in result.stderr
