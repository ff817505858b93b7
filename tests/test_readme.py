"""The README's test command is the one CI runs, so a newcomer and CI test the same way."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    """Indented command lines on the README's first screen (before the first heading)."""
    first_screen = (ROOT / "README.md").read_text().split("\n## ", 1)[0]
    return [line.strip() for line in first_screen.splitlines() if line.startswith("    ")]


def test_first_screen_gives_a_run_and_a_test_command():
    commands = readme_commands()
    assert any(c.endswith("python -m bank") for c in commands)
    assert any(c.endswith("python -m pytest") for c in commands)


def test_ci_runs_the_readme_test_command():
    test_command = next(c for c in readme_commands() if c.endswith("python -m pytest"))
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines
