"""The command line: --help everywhere, `vift info --json`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vift.cli import build_parser, main


def _commands(parser, prefix=()):
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        for name, sub in action.choices.items():
            yield (*prefix, name)
            yield from _commands(sub, (*prefix, name))


def test_every_command_has_help(capsys):
    commands = list(_commands(build_parser()))
    assert ("stage",) in commands and ("params", "validate") in commands
    for command in commands:
        with pytest.raises(SystemExit) as exited:
            main([*command, "--help"])
        assert exited.value.code == 0
        assert "usage: vift" in capsys.readouterr().out


def test_info_json_has_the_documented_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["params", "use", "ci"]) == 0
    out = subprocess.run(
        [sys.executable, "-m", "vift.cli", "info", "--json"], capture_output=True, text=True, check=True, cwd=tmp_path
    ).stdout
    info = json.loads(out)
    assert {"tracking_uri", "registered_model", "dvc_remote", "params_file", "preset"} <= set(info)
    assert info["preset"] == "ci"
    assert info["params_file"] == "params/params.yaml"
    assert info["tracking_uri"].startswith("sqlite:///") and info["tracking_uri"].endswith("mlflow.db")


def test_unknown_stage_is_a_usage_error():
    with pytest.raises(SystemExit) as exited:
        main(["stage", "no_such_stage"])
    assert exited.value.code == 2
