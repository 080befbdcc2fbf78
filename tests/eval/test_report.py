"""The report on the embedded model: one RTN error per layer in every run, a comparison that
reuses the run it is given, and a self-contained HTML page with every section.

One small comparison (2 calibration prompts over 2 steps, 16 rows, 3 images of 2 steps) is
shared by the module; the numbers it shows are not the README's, only their consistency is.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pqjax.eval.compare as compare_mod
from pqjax.api import calibrate_pipeline, quantize_pipeline
from pqjax.eval.compare import EvalSpec, compare, run_name, summary_table
from pqjax.eval.plots import group_ranges
from pqjax.pipelines.load import EMBEDDED, load_pipeline
from pqjax.quantize import QuantConfig
from pqjax.report import QuantReport, model_order

SECTIONS = ("config", "versions", "summary", "images", "layers", "worst", "channels")
RTN = QuantConfig(weights="int4", acts="int4", group=64, method="rtn")
PQ = QuantConfig(weights="int4", acts="int4", group=64, method="permuquant")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    fp = load_pipeline(EMBEDDED)
    calib = calibrate_pipeline(fp, ["a handwritten digit 3", "a handwritten digit 8"],
                               num_steps=2, n_rows=16, progress=False)
    pq = quantize_pipeline(fp, calib, PQ)
    spec = EvalSpec(tuple(f"a handwritten digit {d}" for d in (1, 4, 7)), (1, 4, 7),
                    seed=5, num_steps=2)
    quantized = []  # the configs compare quantizes itself
    real = compare_mod.quantize_pipeline
    compare_mod.quantize_pipeline = lambda p, c, cfg: quantized.append(cfg) or real(p, c, cfg)
    try:
        results = compare(fp, calib, [RTN, PQ], spec, out, quantized={run_name(PQ): pq})
    finally:
        compare_mod.quantize_pipeline = real
    return {"out": out, "fp": fp, "calib": calib, "pq": pq, "results": results,
            "quantized": quantized}


def _layers(path: Path) -> dict[str, dict]:
    return {r["layer"]: r for r in json.loads(path.read_text())["layers"]}


def test_rtn_error_of_every_layer_is_the_same_in_both_runs(run):
    rtn = _layers(run["out"] / run_name(RTN) / "report.json")
    pq = _layers(run["out"] / run_name(PQ) / "report.json")
    assert set(rtn) == set(pq) and len(rtn) > 10
    # The same function of the same rows and weights: bit-identical, not merely close. The
    # exception: the AdaLN linears, which read temb, a site spanning blocks, are scored in the
    # engine's model stage, after their block's norm sites moved their output columns
    # (modulation chunks); the same error summed in another column order agrees to float32
    # rounding of a sum of ~1e3 positive terms (relative 1e-6).
    late = {k for k in rtn if k.endswith(("norm1.linear", "norm1_context.linear",
                                          "norm.linear"))}
    assert late
    assert ({k: r["err_rtn"] for k, r in pq.items() if k not in late}
            == {k: r["err_rtn"] for k, r in rtn.items() if k not in late})
    for k in late:
        assert pq[k]["err_rtn"] == pytest.approx(rtn[k]["err_rtn"], rel=1e-6), k
    assert all(r["err"] == r["err_rtn"] for r in rtn.values())
    assert any(r["accepted"] for r in pq.values())  # the permuquant column is not all RTN
    assert all(r["err"] <= r["err_rtn"] for r in pq.values())
    # to_add_out reads the text part of the attention output, not to_out.0's image part.
    out0 = "transformer_blocks.0.attn.to_out.0"
    add = "transformer_blocks.0.attn.to_add_out"
    assert pq[add]["site"] == pq[out0]["site"] == "transformer_blocks.0.attn.out"


def test_readers_of_one_tensor_keep_the_same_rows(run):
    calib = run["calib"]
    p = "transformer_blocks.0.attn."
    q = np.asarray(calib[p + "to_q"].rows)
    for name in ("to_k", "to_v"):
        np.testing.assert_array_equal(np.asarray(calib[p + name].rows), q)
    s = "single_transformer_blocks.0."
    ref = np.asarray(calib[s + "attn.to_q"].rows)
    np.testing.assert_array_equal(np.asarray(calib[s + "proj_mlp"].rows), ref)
    assert not np.array_equal(np.asarray(calib[p + "add_q_proj"].rows)[:4], q[:4])


def test_comparison_reuses_the_quantized_run_and_states_its_image_count(run):
    assert [c.method for c in run["quantized"]] == ["rtn"]  # permuquant was not redone
    res = run["results"][run_name(PQ)]
    assert res["reused"] is True and res["quantize_seconds"] == run["pq"].report.seconds
    assert res["n_images"] == 3 and run["results"]["full_precision"]["n_images"] == 3
    table = summary_table(run["results"])
    assert table.startswith("Comparison on 3 images per run (seed 5)")
    assert (run["out"] / "summary.md").read_text().strip() == table
    page = (run["out"] / "index.html").read_text()
    assert "3 images per run (seed 5, 2 steps)" in page
    # PSNR and SSIM with their intervals over the 3 images, in the results, table and page
    assert 0 < res["ssim_vs_fp"] < 1 and res["ssim_ci95"] > 0 and res["psnr_ci95"] > 0
    assert len(res["psnr_per_image"]) == 3
    assert f"{res['ssim_vs_fp']:.3f} ± {res['ssim_ci95']:.3f}" in table
    assert f"{res['psnr_vs_fp']:.2f} ± {res['psnr_ci95']:.2f}" in page and "SSIM vs FP" in page
    with pytest.raises(ValueError, match="not one of the configs"):
        compare(run["fp"], run["calib"], [RTN], EvalSpec(("a handwritten digit 1",)),
                run["out"] / "x", quantized={run_name(PQ): run["pq"]})


class _Page(HTMLParser):
    """Collects ids, URLs and tag balance of a page."""

    VOID = frozenset({"meta", "img", "br", "hr", "link", "input", "source", "wbr"})

    def __init__(self):
        super().__init__()
        self.ids, self.urls, self.imgs, self.stack, self.errors = {}, [], [], [], []
        self.tags = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "id" in a:
            self.ids[a["id"]] = len(self.tags)
        for key in ("src", "href"):
            if a.get(key):
                self.urls.append(a[key])
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    assert not page.errors and not page.stack, (page.errors[:3], page.stack[-3:])
    return page


def _check_self_contained(page: _Page) -> None:
    remote = [u for u in page.urls if not (u.startswith("#") or u.startswith("data:"))]
    assert not remote, remote[:3]
    assert "script" not in page.tags and "link" not in page.tags
    for src in page.imgs:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()


def test_comparison_page_is_self_contained_with_every_section(run):
    path = run["out"] / "index.html"
    page = _parse(path)
    _check_self_contained(page)
    assert all(s in page.ids for s in SECTIONS), sorted(page.ids)
    text = path.read_text()
    rep = run["pq"].report
    assert f"<td>{rep.versions['jax']}</td>" in text and "jaxlib" in text and "python" in text
    # 3 images x (fp, quantized, diff) x 2 runs, one ratio plot, one plot per channel site.
    assert len(rep.channel_stats) >= 1
    assert len(page.imgs) == 3 * 3 * 2 + 1 + len(rep.channel_stats)
    assert '<dl class="legend">' in text and "PSNR vs FP" in text
    worst = text[text.index('id="worst"'):text.index('id="channels"')]
    assert worst.count("<tr>") == 1 + min(20, len(rep.layers))  # header + 20 worst


def test_run_page_is_written_beside_each_report(run, tmp_path):
    rep = run["pq"].report
    rep.save(tmp_path)
    page = _parse(tmp_path / "index.html")
    _check_self_contained(page)
    assert all(s in page.ids for s in SECTIONS)
    again = QuantReport.load(tmp_path / "report.json")  # versions and channel stats survive
    assert again.versions == rep.versions and again.channel_stats == rep.channel_stats
    assert (run["out"] / run_name(RTN) / "index.html").is_file()


def test_layers_are_reported_in_model_order(run):
    rep = run["pq"].report
    order = model_order(run["fp"].transformer)
    idx = [order[r["layer"]] for r in rep.layers]
    assert idx == sorted(idx)
    names = [r["layer"] for r in rep.layers]  # execution order: double blocks, then single
    assert max(i for i, n in enumerate(names) if n.startswith("transformer_blocks.")) < min(
        i for i, n in enumerate(names) if n.startswith("single_transformer_blocks."))


def test_group_ranges_before_and_after_a_permutation():
    absmax = np.array([1.0, 100.0, 2.0, 50.0])
    np.testing.assert_allclose(group_ranges(absmax, None, 2), [100.0, 25.0])
    np.testing.assert_allclose(group_ranges(absmax, np.array([0, 2, 1, 3]), 2), [2.0, 2.0])


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_page_renders_in_headless_chromium(run, tmp_path):
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", f"--screenshot={shot}",
             "--window-size=1200,900", (run["out"] / "index.html").resolve().as_uri()],
            check=True, capture_output=True, timeout=120,
        )
    img = np.asarray(Image.open(shot).convert("L"))
    assert img.shape == (900, 1200) and img.std() > 5  # drawn, not a blank page
