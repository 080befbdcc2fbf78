"""Every bad `pqjax` command line: exit code 2, a one- or two-line message naming the argument,
nothing loaded and nothing written. No model is needed: the loaders are replaced by ones that
fail the test if called, and one valid command line shows that they are reached.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pqjax import cli, cli_args
from pqjax.checkpoint import META
from pqjax.cli import main


class Loaded(Exception):
    """Raised by the stand-in loaders: the command got past its checks."""


@pytest.fixture(autouse=True)
def no_loading(monkeypatch, tmp_path):
    import pqjax.api
    import pqjax.checkpoint
    import pqjax.pipelines.load

    def loader(*args, **kwargs):
        raise Loaded(f"loaded {args}")

    monkeypatch.setattr(pqjax.pipelines.load, "load_pipeline", loader)
    monkeypatch.setattr(pqjax.checkpoint, "restore", loader)
    monkeypatch.setattr(pqjax.api, "calibrate_pipeline", loader)
    monkeypatch.setenv("PQJAX_COMPILE_CACHE", "0")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def ckpt(tmp_path) -> Path:
    """A folder that passes the checkpoint check (restore itself is a stand-in here)."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / META).write_text("{}")
    return folder


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def refused(capsys, tmp_path: Path, argv: list[str], *needles: str) -> str:
    """Run argv; assert exit code 2, a 1-2 line message holding every needle, no file written."""
    before = _files(tmp_path)
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert 1 <= len(err.splitlines()) <= 2, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert _files(tmp_path) == before
    return err


def q(*extra: str) -> list[str]:
    return ["quantize", "--out", "q", *extra]


# quantize


def test_valid_arguments_reach_the_loader(tmp_path):
    with pytest.raises(Loaded):
        main(q("--weights", "int4", "--group", "64", "--no-compare"))
    assert not (tmp_path / "q").exists()


def test_unknown_method(capsys, tmp_path):
    refused(capsys, tmp_path, q("--method", "bogus"), "--method", "'bogus'", "permuquant")


def test_unknown_criterion(capsys, tmp_path):
    err = refused(capsys, tmp_path, q("--criterion", "activation,bad"), "--criterion", "'bad'")
    assert "joint_second_moment" in err


def test_alpha_not_a_number(capsys, tmp_path):
    refused(capsys, tmp_path, q("--alpha", "abc"), "--alpha", "'abc'")


def test_alpha_outside_0_1(capsys, tmp_path):
    refused(capsys, tmp_path, q("--alpha", "0.5,1.5"), "--alpha", "[0, 1]")


def test_tau_nan(capsys, tmp_path):
    refused(capsys, tmp_path, q("--tau", "nan"), "--tau", "finite")


def test_existing_out_is_refused_first(capsys, tmp_path):
    (tmp_path / "q").mkdir()
    err = refused(capsys, tmp_path, q("--rows", "8"), "--out", "exists", "--overwrite")
    assert "overwrite=True" not in err
    with pytest.raises(Loaded):  # --overwrite lets it through
        main(q("--overwrite", "--no-compare"))


def test_out_is_a_file(capsys, tmp_path):
    (tmp_path / "q").write_text("x")
    refused(capsys, tmp_path, q("--overwrite"), "--out", "is a file")


def test_group_for_a_fixed_group_format(capsys, tmp_path):
    refused(capsys, tmp_path, q("--weights", "nvfp4", "--group", "64"), "--group", "nvfp4", "16")


def test_group_not_offered_by_int(capsys, tmp_path):
    refused(capsys, tmp_path, q("--weights", "int4", "--group", "7"), "int4", "7")


def test_empty_calib_prompts_file(capsys, tmp_path):
    (tmp_path / "prompts.txt").write_text("\n  \n")
    refused(capsys, tmp_path, q("--calib-prompts", "prompts.txt"), "--calib-prompts", "no prompts")


def test_missing_calib_prompts_file(capsys, tmp_path):
    refused(capsys, tmp_path, q("--calib-prompts", "nope.txt"), "--calib-prompts", "nope.txt")


def test_rows_zero(capsys, tmp_path):
    refused(capsys, tmp_path, q("--rows", "0"), "--rows", ">= 1")


def test_unknown_model(capsys, tmp_path):
    refused(capsys, tmp_path, ["quantize", "no-such-model", "--out", "q"], "'no-such-model'")


def test_unknown_format(capsys, tmp_path):
    refused(capsys, tmp_path, q("--weights", "int17"), "--weights", "int17")


def test_demo_rows_zero(capsys, tmp_path):
    refused(capsys, tmp_path, ["demo", "--rows", "0"], "--rows")


# generate


def g(ckpt: Path, *extra: str, prompts=("a handwritten digit 7",)) -> list[str]:
    return ["generate", str(ckpt), *prompts, *extra]


def test_generate_valid_arguments_reach_the_loader(ckpt, tmp_path):
    with pytest.raises(Loaded):
        main(g(ckpt, "--out", "imgs", "--seed", str(2**70)))
    assert not (tmp_path / "imgs").exists()


def test_generate_not_a_checkpoint(capsys, tmp_path):
    refused(capsys, tmp_path, g(tmp_path, "--out", "x.png"), str(tmp_path), META)


def test_generate_out_in_a_missing_folder(capsys, tmp_path, ckpt):
    refused(capsys, tmp_path, g(ckpt, "--out", "missing/x.png"), "--out", "does not exist")


def test_generate_grid_out_without_extension(capsys, tmp_path, ckpt):
    refused(capsys, tmp_path, g(ckpt, "--grid", "--out", "grid"), "--out", "extension")


def test_generate_out_with_unknown_extension(capsys, tmp_path, ckpt):
    refused(capsys, tmp_path, g(ckpt, "--out", "x.imgx"), "--out", ".imgx", ".png")


def test_generate_one_file_for_several_prompts(capsys, tmp_path, ckpt):
    refused(capsys, tmp_path, g(ckpt, "--out", "x.png", prompts=("7", "3")), "{i}", "--grid")


def test_generate_existing_image(capsys, tmp_path, ckpt):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "1.png").write_bytes(b"old")
    refused(capsys, tmp_path, g(ckpt, "--out", "imgs", prompts=("7", "3")), "1.png", "--overwrite")
    assert (tmp_path / "imgs" / "1.png").read_bytes() == b"old"


@pytest.mark.parametrize("scale", ["0", "-2"])
def test_generate_scale_below_one(capsys, tmp_path, ckpt, scale):
    refused(capsys, tmp_path, g(ckpt, "--scale", scale), "--scale", ">= 1")


def test_generate_steps_zero(capsys, tmp_path, ckpt):
    refused(capsys, tmp_path, g(ckpt, "--steps", "0"), "--steps", ">= 1")


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_generate_guidance_not_finite_or_negative(capsys, tmp_path, ckpt, value):
    refused(capsys, tmp_path, g(ckpt, "--guidance", value), "--guidance")


def test_generate_negative_seed(capsys, tmp_path, ckpt):
    refused(capsys, tmp_path, g(ckpt, "--seed", "-1"), "--seed", ">= 0")


def test_generate_empty_prompt(capsys, tmp_path, ckpt):
    refused(capsys, tmp_path, g(ckpt, prompts=("7", " ")), "empty prompt")


def test_report_not_a_checkpoint(capsys, tmp_path):
    refused(capsys, tmp_path, ["report", str(tmp_path)], str(tmp_path), "report.json")


# help and version


@pytest.mark.parametrize("cmd", ["demo", "quantize", "generate", "report"])
def test_each_command_has_a_description_and_an_example(capsys, cmd):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert cli_args.EXAMPLES[cmd] in out and cli_args.EXAMPLES[cmd].startswith("example: pqjax ")
    with pytest.raises(SystemExit):
        main(["--help"])
    summary = out.split("\n\n")[1].strip()  # the line after the usage
    assert "\n" not in summary
    assert summary in " ".join(capsys.readouterr().out.split())  # listed by `pqjax --help`


def test_quantize_help_shows_defaults_and_choices(capsys):
    from pqjax import method_names
    from pqjax.permute import criterion_names

    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: permuquant)" in out and "(default: joint_second_moment)" in out
    for name in [*method_names(), *criterion_names()]:
        assert name in out


def test_version(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"pqjax {metadata.version('pqjax')}"


def test_pallas_off_gpu_warns(capsys):
    from pqjax.backends import dispatch

    if dispatch.mode() != "xla":
        pytest.skip("a CUDA GPU (or interpret mode) runs the kernels themselves")
    dispatch._warned.clear()  # the warning is once per process
    cli.warn_pallas_without_gpu("pallas")
    err = capsys.readouterr().err
    assert "--backend pallas" in err and "XLA" in err
    cli.warn_pallas_without_gpu("xla")
    assert capsys.readouterr().err == ""


def test_no_traceback_unless_debug(tmp_path):
    """A subprocess, as a user runs it: exit 2 and one line; with --debug, the traceback."""
    env = {**os.environ, "PQJAX_COMPILE_CACHE": "0"}
    root = Path(__file__).resolve().parents[1]
    argv = [sys.executable, "-m", "pqjax.cli", "quantize", "--out", str(tmp_path / "q")]
    plain = subprocess.run(
        [*argv, "--method", "bogus"], capture_output=True, text=True, cwd=root, env=env
    )
    assert plain.returncode == 2
    assert "Traceback" not in plain.stderr and len(plain.stderr.strip().splitlines()) == 1
    assert "'bogus'" in plain.stderr
    debug = subprocess.run(
        [*argv, "--method", "bogus", "--debug"], capture_output=True, text=True, cwd=root, env=env
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "UsageError" in debug.stderr
    assert not (tmp_path / "q").exists()
