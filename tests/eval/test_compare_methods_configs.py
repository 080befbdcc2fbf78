"""benchmarks/compare_methods.py builds a valid config for every method in every setting.

Before: QuantConfig(method="quartz", weights="nvfp4") raised in its own checks before
quartz_config could swap the formats, so the full comparison stopped after calibrating."""

from __future__ import annotations

from benchmarks.compare_methods import ORDER, SETTINGS, configs_for
from pqjax.methods import method_names, method_spec


def test_every_method_gets_a_config_in_every_setting():
    methods = [m for m in ORDER if m in method_names()]
    # the table's order names every method pqjax ships (tests register others of their own)
    shipped = {m for m in method_names() if method_spec(m).fn.__module__.startswith("pqjax.")}
    assert shipped and set(methods) == shipped, sorted(shipped ^ set(methods))
    for setting in SETTINGS:
        configs = configs_for(setting, methods)
        got = [c.method for c in configs]
        four_bit = setting[0].startswith("W4A4")
        assert got == [m for m in methods if four_bit or m != "quartz"], (setting, got)
        for c in configs:
            if c.method == "quartz":
                assert (c.weights, c.acts) == ("quartz", "quartz")
            else:
                assert (c.weights, c.acts, c.group) == setting[1:], c
