"""The README stays true: every setting documented, the commands it gives exist."""

import re
from pathlib import Path

from ops.cli import build_parser
from strop.settings import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_readme_configuration_table_lists_every_setting():
    documented = set(re.findall(r"\| `STROP_([A-Z0-9_]+)` \|", README))
    assert documented == {name.upper() for name in Settings.model_fields}


def test_readme_strop_commands_exist():
    commands = set(re.findall(r"^\s*strop ([a-z]+)", README, flags=re.M))
    choices = build_parser()._subparsers._group_actions[0].choices
    assert commands and commands <= set(choices)


def test_ci_runs_the_readme_test_command():
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "python -m pytest -q" in README and "python -m pytest -q" in ci
