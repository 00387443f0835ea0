"""One exit-code scheme and one message prefix for every command of ``smd-dist``."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from smd_dist.cli import main


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run"], "Missing argument 'CONFIG'"),
        (["run", "--no-such-option", "x.yaml"], "No such option '--no-such-option'"),
        (["frobnicate"], "No such command 'frobnicate'"),
        (["status", "nowhere"], "/nowhere'"),
        (["run", "missing.yaml"], "run config 'missing.yaml' does not exist"),
        (["store", "ls", "nowhere"], "Directory 'nowhere' does not exist"),
        (["cluster", "job-script", "missing.yaml"], "run config 'missing.yaml' does not"),
        (["plot", "nowhere", "figs"], "Path 'nowhere' does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_prefix(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("smd-dist: error: ") and message in result.output
    assert "Traceback" not in result.output and "Usage:" not in result.output


def test_help_and_version_exit_0():
    runner = CliRunner()
    for args in (["--help"], ["--version"], ["run", "--help"], ["store", "--help"]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
    assert "--dry-run" in runner.invoke(main, ["run", "--help"]).output
    assert "130 interrupted" in runner.invoke(main, ["--help"]).output


def test_standalone_mode_off_returns_the_code():
    assert main.main(["status", "nowhere"], standalone_mode=False) == 2
    assert main.main(["--version"], standalone_mode=False) == 0
