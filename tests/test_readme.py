"""The README's commands are the ones CI and users run."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    lines = (REPO / ".ci" / "run").read_text().splitlines()
    command = lines[lines.index("# test-command") + 1]
    assert command in (REPO / "README.md").read_text(), f"README.md does not show CI's command: {command}"


def test_readme_names_only_configs_that_exist():
    readme = (REPO / "README.md").read_text()
    for word in readme.split():
        if word.startswith("configs/") and word.endswith(".yaml"):
            assert (REPO / word).is_file(), f"README names {word}, which does not exist"
