"""The README's set-up commands are what CI runs, and they point at files that exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_exactly_two_setup_commands_each_making_its_own_venv():
    commands = _readme_commands()
    assert len(commands) == 2
    for command in commands:
        assert command.startswith("python3 -m venv ")
        assert "\n" not in command


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = next(command for command in _readme_commands() if "pytest" in command)
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_main_command_runs_the_quickstart_recipe_that_exists():
    main_command = next(command for command in _readme_commands() if "run_qa.py" in command)
    recipe = main_command.rsplit(" ", 1)[1]
    assert (ROOT / recipe).is_file()
