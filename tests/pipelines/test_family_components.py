"""Each family record names its pipeline's component folders and their checkpoint classes
truly: a diffusers pipeline saved by `save_pretrained` has exactly those folders, each config
naming that class, and convert has a key map for every class."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from convert import registry
from convert.loader import class_name_of, read_config
from pqjax.models.family import family, family_of_pipeline
from tests.pipelines.test_flux_pipeline import tiny_flux_pipeline
from tests.pipelines.test_lm_pipelines import tiny_sana, tiny_zimage

BUILDERS = {
    "flux": (lambda root: tiny_flux_pipeline(root, guidance_embeds=True), "pipe"),
    "sana": (tiny_sana, "sana"),
    "zimage": (tiny_zimage, "zimage"),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_record_components_are_the_pipeline_folders(tmp_path, name):
    build, sub = BUILDERS[name]
    build(tmp_path)
    root = tmp_path / sub
    record = family(name)
    index = json.loads((root / "model_index.json").read_text())
    assert family_of_pipeline(index["_class_name"]) is record
    weighted = {k for k, v in index.items()
                if isinstance(v, list) and (root / k / "config.json").is_file()}
    assert weighted == {folder for folder, _ in record.components}
    known = registry.registry()
    for folder, class_name in record.components:
        source = str(root / folder / "config.json")
        assert class_name_of(read_config(root / folder), source) == class_name, folder
        assert class_name in known, f"no key map for {class_name}"
    assert dict(record.components)["transformer"] in record.checkpoint_classes
