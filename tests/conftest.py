"""Shared by every test. Streamlit's AppTest (the dashboard page tests) leaves its script module in
sys.modules["__main__"]; the spawned workers of a process pool started later in the session (the public
goods sweep) re-run the parent's __main__ file, fail on the script's `__args` and break the pool. Each test
gets the real `__main__` back when it ends. Hypothesis draws the same examples on every run
(`derandomize`), so CI and a developer see the same result."""

import sys

import pytest
from hypothesis import settings

settings.register_profile("repeatable", derandomize=True)
settings.load_profile("repeatable")


@pytest.fixture(autouse=True)
def _restore_main_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])  # put back at teardown
