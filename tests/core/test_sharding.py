"""core/sharding.py in one process: which launches select FSDP and which are refused. The sharded runs
themselves need two processes: tests/apps/test_toy.py (1 vs 2 processes, resume) and the math CLI tests."""

import pytest

from core.sharding import fsdp_requested


@pytest.mark.parametrize(
    ("flag", "env", "expected"),
    [
        (False, {}, False),
        (True, {}, True),
        (False, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, True),  # accelerate's FSDP config
        (False, {"ACCELERATE_USE_FSDP": "false"}, False),
    ],
)
def test_fsdp_is_chosen_by_the_flag_or_accelerate(monkeypatch, flag, env, expected):
    for key in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert fsdp_requested(flag) is expected


def test_fsdp1_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        fsdp_requested(False)
