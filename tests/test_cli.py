"""The command line: every option explained, bad values refused before any engine starts."""

import subprocess
import sys

import pytest

from agentserve.cli import build_parser, main


def test_serve_help_explains_every_option():
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    for action in serve._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 10, action.option_strings


def test_help_runs_as_a_console_command():
    out = subprocess.run([sys.executable, "-m", "agentserve.cli", "serve", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("usage: agentserve serve")


@pytest.mark.parametrize("command", ["serve", "replay"])
def test_flags_default_to_the_options_modules_defaults(command):
    """Every command-line default is the options struct's own (one declaration per default); the
    replay's engine differs only where it says so (its standard 8k-token load)."""
    from agentserve.cli import REPLAY_KV_TOKENS
    from agentserve.options import EngineSettings, ProgramOptions, from_flags

    args = build_parser().parse_args([command])
    engine = EngineSettings(kv_tokens=REPLAY_KV_TOKENS) if command == "replay" else EngineSettings()
    assert from_flags(EngineSettings, args) == engine
    assert from_flags(ProgramOptions, args) == ProgramOptions()


@pytest.mark.parametrize("argv", [["serve", "--kv-tokens", "0"], ["serve", "--kv-tokens", "x"]])
def test_bad_numbers_exit_2(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2


def test_bad_settings_exit_2_with_a_message(capsys):
    assert main(["serve", "--model", "no-such-model", "--port", "1"]) == 2
    assert "no-such-model" in capsys.readouterr().err


def test_turn_times_is_refused_on_ray_serve_before_anything_starts():
    with pytest.raises(SystemExit, match="--turn-times is read from one engine"):
        main(["serve", "--replicas", "2", "--turn-times"])
