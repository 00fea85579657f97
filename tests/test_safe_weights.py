"""Feature-extractor weights handed to torch-fidelity (which unpickles .pth files without
weights_only) are converted into a private cache folder and verified there: a planted pickle at
the old predictable temporary path or at the new path never runs."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fewstep.evaluation.inputs import InputError
from fewstep.evaluation.safe_weights import (
    converted_path,
    private_cache_dir,
    verified_torch_weights,
)
from fewstep.evaluation.scores import Extractor


class _Plant:
    """Unpickling this creates the marker file (what a planted pickle could do instead)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def setting(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))  # the "shared" system temporary folder
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3)}
    src = tmp_path / "weights.safetensors"
    save_file(state, str(src))
    from fewstep.evaluation.protocols import file_sha256

    return src, state, file_sha256(src), tmp_path / "marker"


def _plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"w": _Plant(marker)}, path)
    # the plant works: an unpickler without weights_only would run it (checked on a copy)
    probe = path.with_name("probe.bin")
    probe_marker = Path(str(marker) + ".probe")
    torch.save({"w": _Plant(probe_marker)}, probe)
    torch.load(probe, weights_only=False)
    assert probe_marker.exists()
    probe.unlink()


def test_planted_pickles_never_run(setting):
    src, state, sha, marker = setting
    old = Path(tempfile.gettempdir()) / f"fewstep-{sha[:16]}.pth"  # where the weights used to go
    new = converted_path(sha)  # where they go now
    _plant(old, marker)
    _plant(new, marker)
    out = verified_torch_weights(src)
    assert out == new and out.parent == private_cache_dir()
    # what torch-fidelity then does with it: a full unpickle; the plant was replaced before it
    got = torch.load(out, map_location="cpu", weights_only=False)
    assert set(got) == set(state) and all(torch.equal(got[k], v) for k, v in state.items())
    assert not marker.exists()
    # the same through the extractor that torch-fidelity would be given
    ext = Extractor("inception-v3-compat", weights=str(src)).check()
    assert Path(ext.tf_kwargs()["feature_extractor_weights_path"]) == new
    assert not marker.exists()


def test_existing_conversion_is_checked_against_the_source(setting):
    src, state, _, _ = setting
    out = verified_torch_weights(src)
    stamp = out.stat().st_mtime_ns
    assert verified_torch_weights(src) == out and out.stat().st_mtime_ns == stamp  # a good one is reused
    torch.save({"w": torch.zeros(2, 3), "b": torch.ones(3)}, out)  # plain tensors, wrong values
    assert verified_torch_weights(src) == out
    got = torch.load(out, weights_only=True)
    assert torch.equal(got["w"], state["w"])
    out.write_bytes(out.read_bytes()[:50])  # truncated
    got = torch.load(verified_torch_weights(src), weights_only=True)
    assert torch.equal(got["w"], state["w"])


def test_private_folder_is_closed(setting, tmp_path, monkeypatch):
    d = tmp_path / "cache" / "torch-weights"
    d.mkdir(parents=True)
    os.chmod(d, 0o777)
    assert private_cache_dir() == d
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    link_root = tmp_path / "other"
    (link_root).mkdir()
    os.symlink(tmp_path / "elsewhere", link_root / "torch-weights")
    monkeypatch.setenv("FEWSTEP_CACHE", str(link_root))
    with pytest.raises(InputError, match="not a folder"):
        private_cache_dir()


def test_a_pickle_given_as_weights_is_refused_unrun(setting, tmp_path):
    _, _, _, marker = setting
    bad = tmp_path / "weights.pth"
    torch.save({"w": _Plant(marker)}, bad)
    with pytest.raises(InputError, match="plain tensors"):
        verified_torch_weights(bad)
    assert not marker.exists()
