"""Where the CLI's persistent compilation cache lives, and how it is turned off."""

from __future__ import annotations

from pathlib import Path

import pytest

from pqjax import compile_cache


def test_default_folder_is_under_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("PQJAX_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.default_dir() == tmp_path / "pqjax" / "jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compile_cache.default_dir() == Path.home() / ".cache" / "pqjax" / "jax"


@pytest.mark.parametrize("value", ["0", "off", "FALSE", "no"])
def test_env_turns_it_off(monkeypatch, value):
    import jax

    monkeypatch.setenv("PQJAX_COMPILE_CACHE", value)
    assert compile_cache.default_dir() is None
    if not jax.config.jax_compilation_cache_dir:  # a test run may have its own cache
        assert compile_cache.enable() is None
        assert not jax.config.jax_compilation_cache_dir


def test_env_names_a_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("PQJAX_COMPILE_CACHE", str(tmp_path / "cc"))
    assert compile_cache.default_dir() == tmp_path / "cc"
    monkeypatch.setenv("PQJAX_COMPILE_CACHE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.default_dir() == tmp_path / "pqjax" / "jax"
