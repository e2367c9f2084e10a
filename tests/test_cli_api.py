"""The command line and the package's surface: help on every option, --version, --gpus, the import check."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys

import pytest

from detkd.cli import build_parser, main, torchrun_command


def _options_without_help(parser: argparse.ArgumentParser, path: str) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                if not helps.get(name):
                    missing.append(f"{path} {name} (the command)")
                missing += _options_without_help(sub, f"{path} {name}")
        elif not action.help or action.help == argparse.SUPPRESS:
            missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_option_of_every_command_has_help():
    parser = build_parser()
    assert _options_without_help(parser, "detkd") == []
    # The walk reaches the nested commands and their options (so an empty result means something).
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"train", "distill", "eval", "predict", "data", "list"} <= set(sub.choices)
    bare = argparse.ArgumentParser()
    bare.add_argument("--x")
    assert _options_without_help(bare, "p") == ["p --x"]


def test_version_comes_from_the_package_metadata(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"detkd {importlib.metadata.version('detkd')}"
    import detkd

    assert detkd.__version__ == importlib.metadata.version("detkd")


def test_gpus_restarts_the_same_command_under_torchrun():
    argv = ["distill", "--method", "kd", "--gpus", "4", "--teacher", "t.pt", "train.iters=10"]
    command = torchrun_command(argv, 4)
    assert command[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert command[5:] == ["-m", "detkd", "distill", "--method", "kd", "--teacher", "t.pt", "train.iters=10"]
    assert torchrun_command(["train", "--gpus=2", "--iters", "5"], 2)[5:] == ["-m", "detkd", "train", "--iters", "5"]


def test_gpus_starts_torchrun_with_the_command(monkeypatch, tmp_path):
    import subprocess

    calls = []
    monkeypatch.setattr(subprocess, "call", lambda command: calls.append(command) or 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--gpus", "3", "train.device=cpu"]
    assert main(argv) == 0
    assert calls == [torchrun_command(argv, 3)]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value, message", [("0", "--gpus must be >= 1"), ("two", "a number or 'all'")])
def test_bad_gpus_is_one_line(value, message, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["train", "--data", str(tmp_path), "--gpus", value]) == 2
    assert message in capsys.readouterr().err


def test_gpus_under_torchrun_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--data", str(tmp_path), "--gpus", "2"]) == 2
    assert "under torchrun, leave it out" in capsys.readouterr().err


def test_mismatched_torchvision_raises_import_error_not_exit(monkeypatch):
    import detkd._check as check

    def broken() -> None:
        raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setattr(check, "probe_torchvision_ops", broken)
    monkeypatch.delitem(sys.modules, "detkd")  # restored after the test
    with pytest.raises(ImportError) as exc:
        import detkd  # noqa: F401
    assert isinstance(exc.value, check.TorchMismatchError)
    assert "reinstall them as a pair" in str(exc.value)
    assert "torchvision::nms does not exist" in str(exc.value)
