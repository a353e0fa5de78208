"""The pure parts of the command line's error reports: walking causes, suggesting names."""

from __future__ import annotations

import pytest

from retrain.cli.errors import causes, check_config_files, closest, config_files, find_retrain_error, report_for
from retrain.core.errors import ConfigError, TrainingFault


def test_causes_walk_chains_and_exception_groups():
    fault = TrainingFault("MCP server calculator died 3 times in a row")
    try:
        try:
            raise fault
        except TrainingFault as err:
            raise RuntimeError("unhandled errors in a TaskGroup") from err
    except RuntimeError as err:
        wrapped = err
    group = BaseExceptionGroup("unhandled errors in a TaskGroup (1 sub-exception)", [ValueError("x"), wrapped])
    assert find_retrain_error(group) is fault
    report = report_for(group)
    assert report is not None and report.exit_code == 1 and report.message == str(fault)
    assert report_for(RuntimeError("a bug")) is None  # not the user's: keeps its traceback


def test_a_cycle_in_the_chain_ends():
    a, b = ValueError("a"), ValueError("b")
    a.__context__, b.__context__ = b, a
    assert list(causes(a)) == [a, b]


@pytest.mark.parametrize("typo, choices, expected", [
    ("num_generation", ["num_generations", "eval_num_generations", "num_iterations"], ["num_generations"]),
    ("trainer.max_step", ["trainer.max_steps", "trainer.min_steps", "trainer.max_time"], ["trainer.max_steps"]),
    ("lr", ["learning_rate", "beta"], []),
])
def test_closest_offers_the_one_meant(typo, choices, expected):
    assert closest(typo, choices) == expected


def test_config_files_and_their_checks(tmp_path):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("trainer: {max_steps: 2}\n")
    bad.write_text("- just\n- a list\n")
    assert config_files(["fit", "--config", str(good), f"--config={bad}", "-c", "x"]) == [str(good), str(bad), "x"]
    check_config_files([str(good)])
    with pytest.raises(ConfigError, match="a config is a mapping of keys"):
        check_config_files([str(bad)])
