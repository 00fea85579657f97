"""The family registry: every record is complete and agrees with its tiny model, and nothing
under fewstep/objectives/ or fewstep/samplers.py names a backbone class (they ask the record)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import diffusers
import pytest
import torch

from fewstep import families
from fewstep.conditioning import Conditioner, conditioner_for
from fewstep.families import Drive, Family, all_families, family_by_name, family_of, family_of_pipeline
from fewstep.objectives.gan import DiscriminatorHead, FeatureTap, feature_layer
from tests.tiny import FAMILIES, TINY, make_tiny, make_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]


def test_every_family_has_a_tiny_model_and_the_registry_finds_them():
    assert set(families.FAMILIES) == set(FAMILIES) == set(TINY)
    assert [f.name for f in all_families()] == list(families.FAMILIES)
    for fam in all_families():
        assert family_by_name(fam.name) is fam
        assert (ROOT / "fewstep" / "families" / f"{fam.name}.py").is_file(), "one file per family, named as it"
    with pytest.raises(ValueError, match="family must be one of"):
        family_by_name("sd9")
    assert family_of(torch.nn.Linear(2, 2)) is None


@pytest.mark.parametrize("name", families.FAMILIES)
def test_family_record_is_complete(name):
    fam = family_by_name(name)
    required = [
        f.name
        for f in dataclasses.fields(Family)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    for key in required:
        if key == "conditioner_kwargs" and fam.image_conditioned:
            continue  # no null condition to configure: the image is the whole condition
        value = getattr(fam, key)
        assert value is not None and value != () and value != "", f"{name}: {key} is empty"
    for key in ("conditioner", "null_kwargs", "gan_tap", "matches"):
        assert callable(getattr(fam, key)), f"{name}: {key}"
    # text families encode prompts; class-conditional ones count their classes
    assert callable(fam.encode_prompts if fam.text else fam.num_classes), name
    assert set(fam.drives) <= set(fam.pipeline_classes), f"{name}: a drive for a pipeline of another family"
    for drive in fam.drives.values():
        assert isinstance(drive, Drive) and drive.conditioning == ("text" if fam.text else "labels")
    assert families.DRIVES.keys() >= fam.drives.keys()

    tiny = make_tiny(name)
    bb = tiny.backbone
    assert family_of(bb) is fam
    assert isinstance(conditioner_for(bb), Conditioner)
    # the default LoRA targets name modules of the model
    names = [n for n, _ in bb.named_modules()]
    assert any(n.endswith("." + t) or n == t for t in fam.lora_targets for n in names), name
    # the GAN tap sees the fake score's forward pass, with the width the head is built for
    layer, channels = fam.gan_tap(bb, None)
    assert feature_layer(bb) == (layer, channels)
    tap = FeatureTap(layer)
    x = torch.randn(2, *tiny.latent_shape)
    with torch.no_grad(), tap.capture():
        tiny.denoiser(x, 0.5, tiny.cond(2))
    logits = DiscriminatorHead(channels, tiny.latent_shape[1:], width=8)(tap.take())
    assert logits.shape == (2,)
    tap.remove()


@pytest.mark.parametrize("name", ["dit", "sd15", "sd3"])
def test_pipeline_family_round_trip(name):
    pipe = make_tiny_pipeline(name)
    assert family_of_pipeline(pipe).name == name
    assert type(pipe).__name__ in family_by_name(name).pipeline_classes


def _backbone_class_names() -> set[str]:
    """diffusers' model classes that are backbones (transformers, UNets) and every family's classes."""
    listed = getattr(diffusers, "_import_structure", {}).get("models", [])
    names = {n for n in listed if re.search(r"(Transformer|UNet).*Model$", n)}
    return names | {c for f in all_families() for c in f.backbone_classes}


def test_objectives_and_samplers_never_name_a_backbone_class():
    names = _backbone_class_names()
    assert {"UNet2DConditionModel", "DiTTransformer2DModel", "FluxTransformer2DModel"} <= names
    pattern = re.compile(r"\b(" + "|".join(sorted(map(re.escape, names))) + r")\b")
    files = sorted((ROOT / "fewstep" / "objectives").rglob("*.py")) + [ROOT / "fewstep" / "samplers.py"]
    hits = [
        f"{f.relative_to(ROOT)}:{i}: {m.group(1)}"
        for f in files
        for i, line in enumerate(f.read_text().splitlines(), 1)
        for m in [pattern.search(line)]
        if m
    ]
    assert not hits, "objectives and samplers ask the family record instead:\n" + "\n".join(hits)
