"""The `edgesparse` command runs every command that times sparse products between torch
ops under OMP_WAIT_POLICY=PASSIVE: OpenMP reads it only when torch loads, so the command
starts itself again with it set, keeping its arguments."""

import sys

import pytest

from edgesparse import cli


class _Restarted(Exception):
    pass


@pytest.mark.parametrize("argv", [
    ["train", "--quick"],
    ["bench", "--quick"],
    ["map", "--model", "mlp", "--out", "m.json"],
    ["tune", "--layer", "8,64,64"],
])
def test_timed_commands_restart_with_passive_openmp(monkeypatch, argv):
    calls = []

    def execve(path, args, env):
        calls.append((path, args, env))
        raise _Restarted

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(sys, "argv", ["edgesparse", *argv])
    monkeypatch.setattr(cli.os, "execve", execve)
    with pytest.raises(_Restarted):
        cli.main()
    (path, args, env), = calls
    assert path == sys.executable and args == [sys.executable, "-m", "edgesparse.cli", *argv]
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"


def test_a_policy_the_user_set_is_kept(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.setattr(sys, "argv", ["edgesparse", "bench", "--rounds", "0"])
    monkeypatch.setattr(cli.os, "execve", lambda *a: pytest.fail("restarted although OMP_WAIT_POLICY was set"))
    assert cli.main() == 2  # ran here: the bad --rounds is reported by this process
