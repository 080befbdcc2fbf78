"""The family records: one per model, found by one mechanism, true to the models they describe."""

from __future__ import annotations

import fnmatch
import importlib
import sys

import jax.numpy as jnp
import pytest
from flax import nnx

import convert
from convert import registry
from pqjax import checkpoint, permute
from pqjax.calibrate import linears
from pqjax.models import family as fam_mod
from pqjax.models.family import families, family, family_of, family_of_pipeline, family_of_preset
from pqjax.models.flux import FluxConfig, FluxTransformer2DModel
from pqjax.models.layers import Linear
from pqjax.models.sana import SanaTransformer2DModel
from pqjax.models.zimage import ZImageConfig, ZImageTransformer2DModel
from pqjax.quantize import DEFAULT_SKIP
from tests.models.test_zimage import CONFIGS as ZCONFIGS
from tests.parity import TINY_FLUX
from tests.permute.test_sana_sites import CONFIGS as SCONFIGS


@pytest.fixture(scope="module")
def tiny_models() -> dict[str, nnx.Module]:
    rngs = nnx.Rngs(0)
    return {
        "flux": FluxTransformer2DModel(FluxConfig(**TINY_FLUX), rngs=rngs),
        "sana": SanaTransformer2DModel(SCONFIGS["all_options"], rngs=rngs),
        "zimage": ZImageTransformer2DModel(ZImageConfig(**ZCONFIGS["small_qknorm"]), rngs=rngs),
    }


def test_one_record_per_family_found_by_name():
    assert [f.name for f in families()] == ["flux", "sana", "zimage"]
    assert family("sana").model_class is SanaTransformer2DModel
    with pytest.raises(KeyError, match=r"no model family 'nope'; known: \['flux', 'sana'"):
        family("nope")


def test_the_embedded_model_is_a_flux_instance():
    model = convert.load_transformer("tiny-flux-digits", dtype=jnp.float32)
    assert family_of(model) is family("flux")
    assert family_of(Linear(2, 2, rngs=nnx.Rngs(0))) is None
    assert family_of_pipeline("TinyFluxDigitsPipeline") is family("flux")
    assert family_of_pipeline("FluxPipeline") is family("flux")
    assert family_of_pipeline("SanaPipeline") is family("sana")
    assert family_of_pipeline("StableDiffusionPipeline") is None


@pytest.mark.parametrize("name", ["flux", "sana", "zimage"])
def test_record_matches_its_model(name, tiny_models):
    record, model = family(name), tiny_models[name]
    assert family_of(model) is record and isinstance(model.config, record.config_class)
    # the record's sites are what permute.sites finds
    assert [s.name for s in permute.sites(model)] == [s.name for s in record.sites(model)]
    # the block lists cover every block, in order, and each block holds sites
    blocks = record.blocks(model)
    assert len(blocks) == sum(len(getattr(model, lst)) for lst in record.block_lists)
    site_names = [s.name for s in record.sites(model)]
    for path, _ in blocks:
        assert any(n.startswith(path + ".") for n in site_names), path
    # every 16-bit pattern is explained and names Linears this family has; every Linear
    # outside the blocks (embedders, final layers) stays 16-bit
    paths = [p for p, _ in linears(model)]
    for pattern, why in record.keep_16bit:
        assert len(why) > 20, pattern
        assert fnmatch.filter(paths, pattern), pattern
    outside = [p for p in paths if not p.startswith(tuple(f"{b}." for b in record.block_lists))]
    kept = {p for pat, _ in record.keep_16bit for p in fnmatch.filter(paths, pat)}
    assert set(outside) - kept == set(), name
    for preset, parts in record.presets().items():
        assert isinstance(parts["transformer"], record.config_class)
        assert family_of_preset(preset) is record
    for class_name, _ in record.pipelines:
        assert callable(record.pipeline_loader(class_name))


@pytest.mark.parametrize(("preset", "tokens"), [
    # FLUX.1: VAE 8x down, 2x2 patches -> (1024 / 16)^2
    ("flux-dev", 4096),
    # SANA-1.5: DC-AE f32c32 (32x down), patch 1 -> (1024 / 32)^2
    ("sana-1.5-1.6b", 1024),
    # Z-Image: the FLUX VAE (8x), patch 2 -> (1024 / 16)^2
    ("z-image-turbo", 4096),
])
def test_image_tokens_at_1024(preset, tokens):
    record = family_of_preset(preset)
    config = record.presets()[preset]["transformer"]
    assert record.image_tokens(config, 1024, 1024) == tokens


def test_default_skip_is_the_records_union():
    assert set(DEFAULT_SKIP) == {p for f in families() for p, _ in f.keep_16bit}


TOY = '''
from flax import nnx
from pqjax.models.family import Family, FamilyMemory
from pqjax.models.layers import Linear
from pqjax.models.sites import Site, linear_out
from pqjax.models.spec import ModelSpec


class ToyConfig:
    dim = 4


class ToyDiT(nnx.Module):
    def __init__(self):
        self.config = ToyConfig()
        self.blocks = nnx.List([nnx.Dict(up=Linear(4, 4, rngs=nnx.Rngs(0)),
                                         down=Linear(4, 4, rngs=nnx.Rngs(1)))])


def toy_sites(model):
    return [Site("blocks.0.hidden", 4, consumers=("blocks.0.down",),
                 edits=linear_out(model, "blocks.0.up"))]


FAMILY = Family(
    name="toy", model_class=ToyDiT, config_class=ToyConfig,
    checkpoints=(ModelSpec("ToyDiT", ToyDiT, ToyConfig),),
    pipelines=(), components=(("transformer", "ToyDiT"),), sites=toy_sites, keep_16bit=(),
    block_lists=("blocks",),
    memory=lambda c, preset: FamilyMemory(4, 1, 8, 8, 4, True, True, "toy"),
    presets=dict, saved_parts=(("ToyDecoder", "toy_family:ToyDecoder"),),
)
'''


def test_adding_a_model_is_one_record(tmp_path, monkeypatch):
    """A new `<name>_family.py` on the models package's path is found: permute.sites serves
    its model, convert reads its checkpoints by its class name; nothing else is edited."""
    (tmp_path / "toy_family.py").write_text(TOY)
    import pqjax.models

    monkeypatch.setattr(pqjax.models, "__path__", [*pqjax.models.__path__, str(tmp_path)])
    fam_mod.families.cache_clear()
    try:
        record = family("toy")
        model = record.model_class()
        assert family_of(model) is record
        assert [s.name for s in permute.sites(model)] == ["blocks.0.hidden"]
        assert [p for p, _ in record.blocks(model)] == ["blocks.0"]
        assert checkpoint.components()["ToyDecoder"] == "toy_family:ToyDecoder"
        assert registry.spec_for_class_name("ToyDiT", "config.json").module is record.model_class
    finally:
        fam_mod.families.cache_clear()
        sys.modules.pop("pqjax.models.toy_family", None)


def test_checkpoint_parts_are_the_records_saved_parts():
    """What a checkpoint can hold besides the transformer is read from the records: each part
    is importable, named after its class, and can be written and read back."""
    table = checkpoint.components()
    assert table == {n: w for f in families() for n, w in f.saved_parts}
    assert {"PromptTable", "FluxTextEncoders", "SanaTextToImage", "ZImageTextToImage"} <= set(table)
    for name, where in table.items():
        module, attr = where.split(":")
        cls = getattr(importlib.import_module(module), attr)
        assert cls.__name__ == name
        assert {"save", "load"} <= set(dir(cls)) or {"save_parts", "load_parts"} <= set(dir(cls))


def test_a_family_module_without_a_record_is_refused(tmp_path, monkeypatch):
    (tmp_path / "broken_family.py").write_text("FAMILY = None\n")
    import pqjax.models

    monkeypatch.setattr(pqjax.models, "__path__", [*pqjax.models.__path__, str(tmp_path)])
    fam_mod.families.cache_clear()
    try:
        with pytest.raises(TypeError, match="broken_family.py must define FAMILY"):
            families()
    finally:
        fam_mod.families.cache_clear()
        sys.modules.pop("pqjax.models.broken_family", None)
