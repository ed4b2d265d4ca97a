"""Issue 21.3: each command and example says how many torch threads it uses and which flag
changes it (highwaybp.threads owns the rule); the examples keep torch's default unless
asked."""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys

import pytest
import torch

from highwaybp import cli
from highwaybp.train import threads


@pytest.fixture(autouse=True)
def _restore_threads():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def test_use_threads_applies_and_prints(capsys):
    torch.set_num_threads(2)
    assert threads.use_threads(None, "cmd") == 2  # None: torch's count is kept
    assert torch.get_num_threads() == 2
    err = capsys.readouterr().err
    assert "cmd: 2 torch thread(s) (torch's default); change with --threads N" in err
    assert threads.use_threads(1, "cmd") == 1
    assert torch.get_num_threads() == 1
    assert "cmd: 1 torch thread(s) (--threads 1)" in capsys.readouterr().err


def test_example_threads_reads_only_its_flag(capsys, monkeypatch):
    torch.set_num_threads(2)
    monkeypatch.setattr(sys, "argv", ["residual_chain.py"])
    assert threads.example_threads([]) == 2  # torch's default unless asked
    assert threads.example_threads(["--other", "x", "--threads", "1"]) == 1
    err = capsys.readouterr().err
    assert "residual_chain.py: 2 torch thread(s) (torch's default)" in err
    assert "residual_chain.py: 1 torch thread(s) (--threads 1)" in err


def test_a_command_prints_its_thread_count(tmp_path, capsys):
    out = tmp_path / "scan.json"
    assert cli.main(["bench", "scan", "--lengths", "4", "--width", "8", "--repeats", "1",
                     "--kinds", "diagonal", "--threads", "1", "--out", str(out)]) == 0
    assert "highwaybp bench scan: 1 torch thread(s) (--threads 1); change with --threads N" \
        in capsys.readouterr().err


def _parsers_with_threads(parser: argparse.ArgumentParser, path=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers_with_threads(sub, (*path, name))
        elif "--threads" in action.option_strings:
            yield path, parser.get_default("func")


def test_every_command_with_threads_prints_them():
    """Every subcommand that has --threads runs it through use_threads (one owner), so the
    count it uses is printed."""
    found = list(_parsers_with_threads(cli.build_parser()))
    assert len(found) >= 8
    for path, func in found:
        source = inspect.getsource(importlib.import_module(func.__module__))
        called = re.findall(r"use_threads\(args\.threads, \"highwaybp ([a-z0-9 -]+)\"", source)
        assert " ".join(path) in called or "ddg" in path or "layer-parallel" in path, (
            path, called)


def test_single_process_examples_print_their_threads():
    """The examples keep torch's default and print it (the multi-process ones set one
    thread per rank through their launcher)."""
    root = inspect.getfile(cli).rsplit("/src/", 1)[0]
    for name in ("residual_chain", "gru_language_model", "huggingface_gpt2"):
        with open(f"{root}/examples/{name}.py") as f:
            assert "\nexample_threads()" in f.read(), name
