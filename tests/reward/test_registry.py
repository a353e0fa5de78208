"""Tests for retrain.reward.registry: registration, lookup by name / import path / file path."""

from __future__ import annotations

import textwrap
import uuid

import pytest

import retrain.tasks.repeat_letter  # noqa: F401  (registers letter_fraction before the registry snapshot)
from retrain.reward import builtins
from retrain.reward.registry import REWARDS, VERIFIERS, Registry, call_with_accepted, reward, verifier


def _unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


@pytest.fixture(autouse=True)
def _restore_registries():
    """Each test may register functions; put both global registries back as they were afterwards.

    Modules that register on import must be imported before this snapshot (see the imports above),
    or their registrations would be dropped here while the module stays cached in sys.modules.
    """
    saved_rewards, saved_verifiers = dict(REWARDS._functions), dict(VERIFIERS._functions)
    yield
    REWARDS._functions.clear()
    REWARDS._functions.update(saved_rewards)
    VERIFIERS._functions.clear()
    VERIFIERS._functions.update(saved_verifiers)


# --------------------------------------------------------------------------- registration


def test_bare_decorator_registers_under_function_name_and_returns_function():
    def bare_reward_for_registry_test(completion):
        return 0.25

    decorated = reward(bare_reward_for_registry_test)  # what `@reward` does

    assert decorated is bare_reward_for_registry_test
    assert "bare_reward_for_registry_test" in REWARDS
    assert REWARDS.get("bare_reward_for_registry_test") is bare_reward_for_registry_test
    assert "bare_reward_for_registry_test" not in VERIFIERS


def test_decorator_syntax_bare_and_empty_parentheses():
    @reward
    def syntax_bare_reward(completion):
        return 1.0

    @reward()
    def syntax_parens_reward(completion):
        return 2.0

    assert REWARDS.get("syntax_bare_reward") is syntax_bare_reward
    assert REWARDS.get("syntax_parens_reward") is syntax_parens_reward
    assert syntax_parens_reward("x") == 2.0  # the decorator leaves the function callable as before


def test_decorator_with_positional_name():
    name = _unique("positional")

    @reward(name)
    def some_function(completion):
        return 1.0

    assert REWARDS.get(name) is some_function
    # Registered only under the given name, not under __name__.
    assert "some_function" not in REWARDS


def test_decorator_with_keyword_name():
    name = _unique("keyword")

    @reward(name=name)
    def another_function(completion):
        return 1.0

    assert REWARDS.get(name) is another_function
    assert "another_function" not in REWARDS


def test_verifier_decorator_uses_its_own_registry():
    name = _unique("check")

    @verifier(name)
    def check(completion):
        return True

    @verifier
    def bare_verifier_for_registry_test(completion):
        return True

    @verifier(name=_unique("kwcheck"))
    def kw_check(completion):
        return True

    assert VERIFIERS.get(name) is check
    assert VERIFIERS.get("bare_verifier_for_registry_test") is bare_verifier_for_registry_test
    assert kw_check in VERIFIERS._functions.values()
    assert name not in REWARDS
    assert "bare_verifier_for_registry_test" not in REWARDS


def test_builtins_are_registered():
    for name in ("exact_match", "numeric_match", "regex_match", "length_penalty", "contains_penalty"):
        assert REWARDS.get(name) is getattr(builtins, name)
    for name in ("matches_regex", "not_truncated", "non_empty"):
        assert VERIFIERS.get(name) is getattr(builtins, name)


def test_names_are_sorted():
    registry = Registry("reward")
    registry.add(lambda: 0, name="zeta")
    registry.add(lambda: 0, name="alpha")
    assert registry.names() == ["alpha", "zeta"]


def test_duplicate_name_for_a_different_function_raises():
    name = _unique("dup")

    @reward(name)
    def first(completion):
        return 1.0

    def second(completion):
        return 2.0

    with pytest.raises(ValueError) as err:
        reward(name)(second)
    message = str(err.value)
    assert name in message
    assert "already registered" in message
    assert "first" in message and "second" in message  # both functions are named
    assert "name=" in message  # and the fix is suggested
    # The original registration is untouched.
    assert REWARDS.get(name) is first


def test_reregistering_the_same_function_is_allowed():
    name = _unique("same")

    def fn(completion):
        return 1.0

    reward(name)(fn)
    reward(name)(fn)  # e.g. a module imported twice: same qualified name, no error
    assert REWARDS.get(name) is fn


def test_same_name_in_the_other_registry_does_not_conflict():
    name = _unique("shared")

    @reward(name)
    def as_reward(completion):
        return 1.0

    @verifier(name)
    def as_verifier(completion):
        return True

    assert REWARDS.get(name) is as_reward
    assert VERIFIERS.get(name) is as_verifier


# --------------------------------------------------------------------------- lookup by path


def test_lookup_by_import_path_colon_and_dot(tmp_path, monkeypatch):
    module_name = _unique("user_rewards")
    (tmp_path / f"{module_name}.py").write_text(
        textwrap.dedent(
            """
            def brevity(completion):
                return -len(completion)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    by_colon = REWARDS.get(f"{module_name}:brevity")
    by_dot = REWARDS.get(f"{module_name}.brevity")

    assert by_colon is by_dot  # the same module object, imported once
    assert by_colon("abc") == -3
    # Import-path lookup does not register the function.
    assert "brevity" not in REWARDS


def test_lookup_by_import_path_of_a_package_module():
    # A dotted package path with ':' and with '.' both find the same function.
    assert REWARDS.get("retrain.tasks.repeat_letter:letter_fraction").__name__ == "letter_fraction"
    assert REWARDS.get("retrain.reward.builtins.length_penalty") is builtins.length_penalty
    assert VERIFIERS.get("retrain.reward.builtins:non_empty") is builtins.non_empty


def test_lookup_by_absolute_file_path(tmp_path):
    file = tmp_path / "my_rewards.py"
    file.write_text("def shout(completion):\n    return float(completion.isupper())\n")

    function = REWARDS.get(f"{file}:shout")

    assert function("ABC") == 1.0
    assert function("abc") == 0.0
    # Loading the same file again reuses the module instead of executing it twice.
    assert REWARDS.get(f"{file}:shout") is function


def test_lookup_by_relative_file_path(tmp_path, monkeypatch):
    (tmp_path / "some").mkdir()
    (tmp_path / "some" / "file.py").write_text("def function(completion):\n    return 7.0\n")
    monkeypatch.chdir(tmp_path)

    function = VERIFIERS.get("some/file.py:function")

    assert function("anything") == 7.0


# --------------------------------------------------------------------------- error messages


def test_unknown_name_lists_registered_names():
    registered = _unique("known")
    reward(registered)(lambda completion: 1.0)
    missing = _unique("missing")

    with pytest.raises(KeyError) as err:
        REWARDS.get(missing)
    message = err.value.args[0]
    assert f"Unknown reward '{missing}'" in message
    assert registered in message
    assert "exact_match" in message
    assert "package.module:function" in message  # the alternative forms are suggested


def test_unknown_verifier_lists_verifier_names_only():
    with pytest.raises(KeyError) as err:
        VERIFIERS.get(_unique("missing"))
    message = err.value.args[0]
    assert message.startswith("Unknown verifier")
    assert "non_empty" in message and "not_truncated" in message
    assert "exact_match" not in message  # a reward, not a verifier


def test_empty_registry_says_none():
    with pytest.raises(KeyError) as err:
        Registry("reward").get("anything")
    assert "Registered rewards: none" in err.value.args[0]


def test_missing_attribute_in_module():
    with pytest.raises(KeyError) as err:
        REWARDS.get("retrain.reward.builtins:no_such_function")
    message = err.value.args[0]
    assert "Cannot import reward 'retrain.reward.builtins:no_such_function'" in message
    assert "has no callable named 'no_such_function'" in message


def test_non_callable_attribute_is_rejected():
    with pytest.raises(KeyError) as err:
        REWARDS.get("math:pi")
    assert "has no callable named 'pi'" in err.value.args[0]


def test_missing_module():
    name = _unique("no_such_module")
    with pytest.raises(KeyError) as err:
        REWARDS.get(f"{name}:fn")
    assert f"Cannot import reward '{name}:fn'" in err.value.args[0]


def test_missing_file(tmp_path):
    path = tmp_path / "absent.py"
    with pytest.raises(KeyError) as err:
        REWARDS.get(f"{path}:fn")
    message = err.value.args[0]
    assert "no file" in message
    assert str(path) in message


def test_missing_attribute_in_file(tmp_path):
    file = tmp_path / "rewards_without_fn.py"
    file.write_text("x = 1\n")
    with pytest.raises(KeyError) as err:
        REWARDS.get(f"{file}:fn")
    assert "has no callable named 'fn'" in err.value.args[0]


# --------------------------------------------------------------------------- call_with_accepted


def test_call_with_accepted_passes_only_named_parameters():
    seen = {}

    def fn(completion, answer=None, *, pattern="p"):
        seen.update(completion=completion, answer=answer, pattern=pattern)
        return 1.0

    result = call_with_accepted(fn, {"completion": "c", "answer": "a", "pattern": "q", "prompt": "x", "trajectory": None})

    assert result == 1.0
    # keyword-only parameters count as accepted; unknown keys (prompt, trajectory) are dropped.
    assert seen == {"completion": "c", "answer": "a", "pattern": "q"}


def test_call_with_accepted_passes_everything_to_var_keyword():
    seen = {}

    def fn(completion, **kwargs):
        seen.update(kwargs, completion=completion)

    kwargs = {"completion": "c", "answer": 1, "difficulty": 3}
    call_with_accepted(fn, kwargs)

    assert seen == kwargs


def test_call_with_accepted_missing_required_argument_raises():
    def fn(completion, needed):
        return 0.0

    with pytest.raises(TypeError):
        call_with_accepted(fn, {"completion": "c"})


def test_call_with_accepted_returns_coroutine_for_async_function():
    import asyncio
    import inspect

    async def fn(completion):
        return len(completion)

    result = call_with_accepted(fn, {"completion": "abcd", "extra": 1})
    assert inspect.isawaitable(result)
    assert asyncio.run(result) == 4
