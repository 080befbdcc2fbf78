"""`convert_and_quantize` picks its path from the memory budget and says why. On the streamed
path the trajectories and the quantization read the transformer one block at a time, the
quantized model equals the engine's on the same calibration inputs, the pipeline generates,
saves and restores, and a rerun of the same call resumes its work folder."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

import convert
import pqjax
from pqjax import engine
from pqjax.api import default_calib_prompts
from pqjax.engine.result import StoredModel, load_result
from pqjax.engine.sources import CheckpointSource
from pqjax.engine.streamed import StreamedModel
from pqjax.models.flux import FluxTransformer2DModel
from pqjax.pipelines.load import EMBEDDED, load_pipeline
from tests.engine.test_paths_agree import arrays

KW = dict(calib_steps=2, n_rows=32, progress=False)
PROMPTS = ["a handwritten digit 7", "a handwritten digit 3"]


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    """(pipeline, its work folder, what the call printed) of a budget far below the model."""
    work = tmp_path_factory.mktemp("api") / "work"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        pipe = pqjax.convert_and_quantize(max_memory="1MB", work_dir=work, **KW)
    return pipe, work, err.getvalue()


def test_the_default_budget_quantizes_the_embedded_model_in_memory(capsys):
    pipe = pqjax.convert_and_quantize(**KW)
    err = capsys.readouterr().err
    assert "in memory" in err and "within" in err
    assert isinstance(pipe.transformer, FluxTransformer2DModel)


def test_a_tiny_budget_streams_and_says_so(streamed):
    pipe, work, err = streamed
    assert "block by block" in err and "over the budget of 976.6 KiB" in err
    assert f"work folder {work}" in err
    assert "stays in" in err and "loads to sample" in err
    assert isinstance(pipe.transformer, StoredModel)  # kept on disk: it and the encoder
    images = pipe.generate(PROMPTS, seed=0)           # would not fit together
    assert images.shape == (2, 16, 16) and np.isfinite(images).all()
    assert pipe.report.summary["n_layers"] == 40 and pipe.quant_config == pqjax.QuantConfig()


def test_the_streamed_model_is_the_engines_on_the_same_trajectories(streamed):
    """Trajectories sampled with the transformer read block by block, then the in-memory
    engine on them: the same quantized model as the call's, bit for bit."""
    _, work, _ = streamed
    source = CheckpointSource(EMBEDDED)
    eager = load_pipeline(EMBEDDED, transformer=StreamedModel(source))
    batches = eager.calibration_batches(default_calib_prompts(eager), seed=0, num_steps=2)
    model = convert.load_transformer(EMBEDDED)
    qmodel, _ = engine.quantize_blocks(model, batches, pqjax.QuantConfig(), n_rows=32,
                                       progress=False)
    a, b = arrays(qmodel), arrays(load_result(work))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_a_rerun_resumes_the_finished_work(streamed, capsys):
    pipe, work, _ = streamed
    again = pqjax.convert_and_quantize(max_memory="1MB", work_dir=work, **KW)
    assert "a rerun of this call resumes there" in capsys.readouterr().err
    np.testing.assert_array_equal(again.generate(PROMPTS, seed=1), pipe.generate(PROMPTS, seed=1))


def test_a_streamed_pipeline_saves_and_restores(streamed, tmp_path):
    pipe, _, _ = streamed
    out = pqjax.save(pipe, tmp_path / "q")
    back = pqjax.restore(out)
    assert isinstance(back.transformer, FluxTransformer2DModel)
    # The same quantized model, sampled as one program (restored, in memory) or one jitted
    # block at a time (kept on disk): float32 sums fused differently, pixels in [0, 1] agree
    # to float32 rounding carried through the steps.
    np.testing.assert_allclose(back.generate(PROMPTS, seed=2), pipe.generate(PROMPTS, seed=2),
                               atol=1e-5)


def test_the_cli_streams_under_max_memory(tmp_path, capsys):
    from pqjax.cli import main

    ckpt = tmp_path / "q"
    assert main(["quantize", "--out", str(ckpt), "--max-memory", "1MB", "--steps", "2",
                 "--rows", "32", "--work-dir", str(tmp_path / "work"),
                 "--no-compile-cache"]) == 0
    out = capsys.readouterr()
    assert "block by block" in out.err
    assert "comparison skipped: the full-precision model does not fit --max-memory" in out.out
    assert main(["generate", str(ckpt), "7", "--out", str(tmp_path / "img"),
                 "--no-compile-cache"]) == 0
