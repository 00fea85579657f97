"""Real data from the user's images: an image folder (labels from subfolders or a file, sidecar
captions), webdataset tar shards, a saved `datasets` dataset and the latent cache of `fewstep
encode` (resumable: an interrupted encode gives the same bytes), training on each, prompts from a
`datasets` column or the captions, and the config errors that name the key."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from fewstep.config import ConfigError, load_config
from fewstep.data.cache import LatentCache, encode_to_cache
from fewstep.data.images import FolderImages, SavedDatasetImages, TarShardImages, open_images, to_model_input
from fewstep.data.real import CachedLatents, EncodedImages, prompts_for
from fewstep.errors import UserError
from fewstep.training.data import BatchSource
from fewstep.training.preflight import preflight

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["log.trackers=[]", "log.progress=false"]


def _digit_pngs(folder: Path, n: int, captions: bool = False, subfolders: bool = True) -> list[int]:
    """The first n digits as 8-bit grey PNGs (class subfolders), optionally with captions."""
    from PIL import Image

    from fewstep.digits.data import load_digits_tensors

    x, y = load_digits_tensors()
    for i in range(n):
        d = folder / str(int(y[i])) if subfolders else folder
        d.mkdir(parents=True, exist_ok=True)
        a = ((x[i, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
        Image.fromarray(a).save(d / f"{i:04d}.png")
        if captions:
            (d / f"{i:04d}.txt").write_text(f"a handwritten {int(y[i])}\n")
    return [int(v) for v in y[:n]]


def _toy_encode(x: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for a VAE: (B, 1, 32, 32) -> (B, 4, 8, 8)."""
    z = F.avg_pool2d(x.float(), 4)
    return torch.cat([z, z.square(), -z, z * 0.5 + 0.1], dim=1)


def _data(**kw):
    base = dict(
        source="folder",
        path=None,
        labels=None,
        captions=None,
        image_key=None,
        split=None,
        resolution=None,
        encode_batch=8,
        real_latents=None,
        real_data=False,
        prompts=None,
        prompt_column=None,
        batch_size=8,
        num_classes=None,
        conditions=None,
    )
    base.update(kw)
    return SimpleNamespace(**base)


def _digits_bundle():
    from fewstep.training.bundle import load_bundle

    return load_bundle(SimpleNamespace(source="digits-vp", dtype="float32", family=None, resolution=None))


# ---------------------------------------------------------------------------------------------
def test_folder_reads_subfolder_labels_captions_and_a_labels_file(tmp_path):
    labels = _digit_pngs(tmp_path / "imgs", 30, captions=True)
    t = FolderImages(tmp_path / "imgs", labels="subfolders")
    assert len(t) == 30 and t.keys == sorted(t.keys)
    by_name = {f"{y}/{i:04d}.png": y for i, y in enumerate(labels)}
    assert [by_name[k] for k in t.keys] == t.labels  # class k = k-th subfolder ("0".."9")
    assert t.captions[0] == f"a handwritten {t.labels[0]}"
    x = to_model_input(t.image(0), 32, 1)
    assert x.shape == (1, 32, 32) and x.min() >= -1 and x.max() <= 1
    # a labels file gives other labels to the same images
    (tmp_path / "labels.txt").write_text("".join(f"{k},{(j * 7) % 3}\n" for j, k in enumerate(t.keys)))
    t2 = FolderImages(tmp_path / "imgs", labels=str(tmp_path / "labels.txt"))
    assert t2.labels == [(j * 7) % 3 for j in range(30)] and t2.num_classes == 3
    (tmp_path / "short.txt").write_text(f"{t.keys[0]} 1\n")
    with pytest.raises(ConfigError, match=r"data\.labels: .* gives no label for 29 images"):
        FolderImages(tmp_path / "imgs", labels=str(tmp_path / "short.txt"))
    (tmp_path / "imgs" / "loose.png").write_bytes((tmp_path / "imgs" / t.keys[0]).read_bytes())
    with pytest.raises(ConfigError, match=r"data\.labels=subfolders: 'loose.png' is not inside a class subfolder"):
        FolderImages(tmp_path / "imgs", labels="subfolders")
    with pytest.raises(ConfigError, match=r"data\.captions: some images have a \.txt caption"):
        FolderImages(tmp_path / "imgs")  # loose.png has no caption


def test_webdataset_shards_and_saved_dataset_give_the_folders_samples(tmp_path):
    wds = pytest.importorskip("webdataset")
    datasets = pytest.importorskip("datasets")
    _digit_pngs(tmp_path / "imgs", 12, captions=True)
    folder = FolderImages(tmp_path / "imgs", labels="subfolders")
    # the same samples, written by webdataset's own writer into 3 shards of 4
    for s in range(3):
        with wds.TarWriter(str(tmp_path / f"train-{s:03d}.tar")) as w:
            for i in range(4 * s, 4 * s + 4):
                key = folder.keys[i]
                w.write(
                    {
                        "__key__": f"s{i:04d}",
                        "png": (tmp_path / "imgs" / key).read_bytes(),
                        "cls": str(folder.labels[i]),
                        "txt": folder.captions[i],
                    }
                )
    tars = TarShardImages(str(tmp_path / "train-{000..002}.tar"))
    assert len(tars) == 12 and tars.labels == folder.labels and tars.captions == folder.captions
    assert torch.equal(to_model_input(tars.image(7), 32, 1), to_model_input(folder.image(7), 32, 1))
    with pytest.raises(ConfigError, match=r"data\.labels='lbl': no sample has a \.lbl member"):
        TarShardImages(str(tmp_path / "train-*.tar"), labels="lbl")
    with pytest.raises(ConfigError, match=r"data\.path: no such tar shard .*train-003.tar"):
        TarShardImages(str(tmp_path / "train-{000..003}.tar"))
    # a datasets dataset saved on disk: an Image column, a ClassLabel column and a text column
    feats = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=[str(c) for c in range(10)]),
            "text": datasets.Value("string"),
        }
    )
    rows = {
        "image": [str(p) for p in folder.files],
        "label": folder.labels,
        "text": folder.captions,
    }
    ds = datasets.Dataset.from_dict(rows, features=feats)
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(tmp_path / "ds"))
    saved = SavedDatasetImages(tmp_path / "ds", labels="label", captions="text")
    assert len(saved) == 12 and saved.labels == folder.labels and saved.num_classes == 10
    assert torch.equal(to_model_input(saved.image(5), 32, 1), to_model_input(folder.image(5), 32, 1))
    assert len(SavedDatasetImages(tmp_path / "ds", split="test")) == 2
    with pytest.raises(ConfigError, match=r"data\.split='val': no such split \(splits: train, test\)"):
        SavedDatasetImages(tmp_path / "ds", split="val")
    with pytest.raises(ConfigError, match=r"data\.captions='caption': the dataset has no such column"):
        SavedDatasetImages(tmp_path / "ds", captions="caption")
    # prompts from a datasets column
    spec = _data(prompts=str(tmp_path / "ds"), prompt_column="text")
    assert prompts_for(spec, None) == folder.captions


def _sha(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("shard-*"))}


def test_encode_interrupted_and_restarted_writes_the_same_cache(tmp_path):
    _digit_pngs(tmp_path / "imgs", 22, captions=True)
    table = FolderImages(tmp_path / "imgs", labels="subfolders")
    kw = dict(
        image_shape=(1, 32, 32), latent_shape=(4, 8, 8), teacher="toy", shard_size=5, batch_size=3, progress=False
    )
    whole = encode_to_cache(table, _toy_encode, tmp_path / "whole", **kw)
    assert whole["complete"] and len(whole["shards"]) == 5

    class Stop(Exception):
        pass

    def stop_after_two(k):
        if k == 1:
            raise Stop

    with pytest.raises(Stop):
        encode_to_cache(table, _toy_encode, tmp_path / "cut", on_shard=stop_after_two, **kw)
    assert sorted(_sha(tmp_path / "cut")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    with pytest.raises(UserError, match=r"the cache is incomplete"):
        LatentCache(tmp_path / "cut")
    (tmp_path / "cut" / "shard-00002.safetensors.tmp").write_bytes(b"half a shard")  # killed mid-write
    (tmp_path / "cut" / "shard-00003.safetensors").write_bytes(b"damaged")
    seen = []
    encode_to_cache(table, _toy_encode, tmp_path / "cut", on_shard=seen.append, **kw)
    assert seen == [2, 3, 4]  # the finished shards were kept, the damaged one encoded again
    assert _sha(tmp_path / "cut") == _sha(tmp_path / "whole")
    assert json.loads((tmp_path / "cut" / "cache.json").read_text()) == whole
    # the cache holds exactly the encoder's latents, labels and captions, in the table's order
    cache = LatentCache(tmp_path / "cut")
    idx = torch.tensor([21, 0, 7, 7])
    want = _toy_encode(torch.stack([to_model_input(table.image(i), 32, 1) for i in idx.tolist()]))
    torch.testing.assert_close(cache.latents(idx), want)
    assert cache.labels.tolist() == table.labels and cache.captions == table.captions
    # the same folder under other settings is refused, not mixed in
    with pytest.raises(UserError, match=r"holds a cache of other images or settings \(shard_size differ"):
        encode_to_cache(table, _toy_encode, tmp_path / "cut", **{**kw, "shard_size": 4})


def test_batches_from_images_equal_batches_from_their_cache_and_pair_labels(tmp_path):
    """On-the-fly encoding and the cache give the same x0; each x0 carries its own image's label."""
    _digit_pngs(tmp_path / "imgs", 40)
    bundle = _digits_bundle()
    spec = _data(path=str(tmp_path / "imgs"), labels="subfolders")
    table = open_images(spec)
    encode_to_cache(
        table,
        bundle.encode,
        tmp_path / "cache",
        image_shape=bundle.image_shape,
        latent_shape=bundle.latent_shape,
        teacher="digits-vp",
        shard_size=16,
        progress=False,
    )
    on_fly = BatchSource.from_config(bundle, spec, seed=1)
    cached = BatchSource.from_config(bundle, _data(source="cache", path=str(tmp_path / "cache")), seed=1)
    assert isinstance(on_fly.real, EncodedImages) and isinstance(cached.real, CachedLatents)
    assert bundle.image_shape == (1, 32, 32)
    all_z = cached.real.latents(torch.arange(40))
    for step in (0, 3):
        a, b = on_fly(step), cached(step)
        assert torch.equal(a["cond"]["class_labels"], b["cond"]["class_labels"])
        torch.testing.assert_close(a["x0"], b["x0"], rtol=1e-4, atol=1e-5)
        # every row is the latent of an image of the class it is labelled with
        d = (b["x0"][:, None] - all_z[None]).flatten(2).abs().amax(-1)
        assert d.min(1).values.max() == 0
        rows = d.argmin(1)
        assert torch.equal(torch.tensor(table.labels)[rows], b["cond"]["class_labels"])
    # two processes' slices make up the one-process batch (each reads only its own rows)
    spec2 = _data(source="cache", path=str(tmp_path / "cache"))
    halves = [BatchSource.from_config(bundle, spec2, seed=1, process_index=r, num_processes=2)(3) for r in range(2)]
    assert torch.equal(torch.cat([h["x0"] for h in halves]), cached(3)["x0"])
    # the cache refuses another teacher's VAE
    with pytest.raises(
        ConfigError, match=r"encoded with the VAE of teacher 'digits-vp', not teacher.source='digits-flow'"
    ):
        CachedLatents(tmp_path / "cache", "digits-flow", (4, 8, 8))


def test_text_teacher_takes_the_images_captions_as_prompts(tmp_path):
    from tests.dist.bundles import tiny_bundle

    _digit_pngs(tmp_path / "imgs", 9, captions=True, subfolders=False)
    bundle = tiny_bundle("sd15")
    bundle.encode, bundle.image_shape = _toy_encode, (1, 32, 32)
    assert tuple(bundle.latent_shape) == (4, 8, 8)
    src = BatchSource.from_config(bundle, _data(path=str(tmp_path / "imgs"), batch_size=6), seed=0)
    table = FolderImages(tmp_path / "imgs")
    z = _toy_encode(torch.stack([to_model_input(table.image(i), 32, 1) for i in range(9)]))
    b = src(2)
    for prompt, x0 in zip(b["prompts"], b["x0"]):
        i = table.captions.index(prompt)  # captions are distinct here: "a handwritten <digit>" of 9 digits
        torch.testing.assert_close(x0, z[i])
    assert src.num_prompts == 9


def test_config_errors_name_the_data_key(tmp_path):
    _digit_pngs(tmp_path / "imgs", 3)

    def check(*ov):
        return preflight(load_config(ROOT / "configs/digits/dmd2_1step_vp.yaml", [f"output_dir={tmp_path}/r", *ov]))

    with pytest.raises(ConfigError, match=r"data\.source: expected 'folder' \| 'webdataset' \| 'datasets' \| 'cache'"):
        check("data.source=images", "data.path=x")
    with pytest.raises(ConfigError, match=r"data\.path='/nonexistent/imgs': no such image folder"):
        check("data.source=folder", "data.path=/nonexistent/imgs")
    with pytest.raises(ConfigError, match=r"data\.path: required with data.source='folder'"):
        check("data.source=folder")
    with pytest.raises(ConfigError, match=r"data\.path='.*imgs': not a latent cache"):
        check("data.source=cache", f"data.path={tmp_path / 'imgs'}")
    with pytest.raises(ConfigError, match=r"data\.split: not read with data.source='folder'"):
        check("data.source=folder", f"data.path={tmp_path / 'imgs'}", "data.split=train")
    with pytest.raises(ConfigError, match=r"data\.labels='nofile.txt': not 'subfolders' and no such labels file"):
        check("data.source=folder", f"data.path={tmp_path / 'imgs'}", "data.labels=nofile.txt")
    with pytest.raises(
        ConfigError, match=r"data\.prompt_column='text': data.prompts must name a saved `datasets` folder"
    ):
        check("data.prompt_column=text")
    check("data.source=folder", f"data.path={tmp_path / 'imgs'}", "data.labels=subfolders")  # fine


def test_dmd2_gan_preset_trains_from_an_image_folder(tmp_path, monkeypatch):
    """The digits DMD2 GAN preset, two steps on PNGs read from a folder (no latents file): the GAN's
    real latents are the folder's images, encoded on the fly."""
    from fewstep.training import run

    _digit_pngs(tmp_path / "imgs", 20)
    reads = []
    real_image = FolderImages.image
    monkeypatch.setattr(FolderImages, "image", lambda self, i: reads.append(i) or real_image(self, i))
    cfg = load_config(
        ROOT / "configs/digits/dmd2_1step_vp.yaml",
        [
            f"output_dir={tmp_path / 'run'}",
            *QUIET,
            "steps=2",
            "data.batch_size=4",
            "objective.fake_updates_per_generator=1",
            "data.source=folder",
            f"data.path={tmp_path / 'imgs'}",
            "data.labels=subfolders",
            "checkpoint.every=0",
            "log.sample_count=2",
            "log.every=1",
        ],
    )
    res = run(cfg)
    assert res.steps == 2 and res.skipped == 0
    assert len(reads) == 2 * 4 and set(reads) <= set(range(20))  # one batch of 4 images per step
    logs = [json.loads(ln) for ln in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("fake_score/gan_d" in r for r in logs)


# ---- the command line: --print-config, objective keys checked before the teacher loads ------------
def test_print_config_prints_the_resolved_config_and_exits(tmp_path, capsys, monkeypatch):
    import yaml

    from fewstep.train_cmd import main

    monkeypatch.chdir(tmp_path)
    args = ["--print-config", "--config", str(ROOT / "configs/digits/dmd2_1step_vp.yaml"), "data.batch_size=64"]
    assert main([*args, "data.source=folder", "data.path=imgs"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["data"]["batch_size"] == 64 and out["data"]["source"] == "folder"
    assert out["objective"]["name"] == "dmd2" and out["objective"]["gan"] is True  # the preset's
    assert out["data"]["encode_batch"] == 32 and out["optim"]["generator"]["lr"] == 5e-5  # defaults, resolved
    assert list(tmp_path.iterdir()) == []  # nothing run, nothing written
    assert main([*args, "data.batch_size=0"]) == 2  # still a checked config
    assert "data.batch_size: must be >= 1" in capsys.readouterr().err


def test_objective_keys_are_checked_before_the_teacher_loads(tmp_path, capsys, monkeypatch):
    from fewstep import pipeline_teacher
    from fewstep.train_cmd import main

    def no_load(*a, **k):
        raise AssertionError("the teacher was loaded before the objective's keys were checked")

    monkeypatch.setattr(pipeline_teacher, "load_teacher", no_load)
    base = ["--config", str(ROOT / "configs/digits/dmd2_1step_vp.yaml"), f"output_dir={tmp_path / 'r'}"]
    assert main([*base, "objective.gan_generator_weigth=0.1"]) == 2
    err = capsys.readouterr().err
    assert "objective.gan_generator_weigth" in err and "unknown" in err
    assert main([*base, "objective.num_steps=0"]) == 2
    assert "objective.num_steps" in capsys.readouterr().err
    # a hub teacher that is not even downloaded: the objective's key is still the error reported
    assert main([*base, "teacher.source=someone/not-downloaded", "objective.fake_updates_per_generatr=2"]) == 2
    assert "objective.fake_updates_per_generatr" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("preset", ["lcm_4step_vp.yaml", "scm_2step_vp.yaml", "twinflow_vp.yaml"])
def test_real_data_objectives_train_from_a_latent_cache(tmp_path, monkeypatch, preset):
    """LCM, sCM and TwinFlow take their real latents from a `fewstep encode` cache."""
    from fewstep.data.cache import LatentCache
    from fewstep.encode_cmd import main as encode_main
    from fewstep.training import run

    _digit_pngs(tmp_path / "imgs", 12)
    args = [str(tmp_path / "imgs"), "--teacher", "digits-vp", "--labels", "subfolders", "--out", str(tmp_path / "c")]
    assert encode_main([*args, "--shard-size", "5", "--device", "cpu", "--no-progress"]) == 0
    rows = []
    real_latents = LatentCache.latents
    monkeypatch.setattr(LatentCache, "latents", lambda self, idx: rows.append(len(idx)) or real_latents(self, idx))
    cfg = load_config(
        ROOT / "configs/digits" / preset,
        [
            f"output_dir={tmp_path / 'run'}",
            *QUIET,
            "steps=2",
            "data.batch_size=4",
            "data.source=cache",
            f"data.path={tmp_path / 'c'}",
            "checkpoint.every=0",
            "log.sample_count=2",
        ],
    )
    res = run(cfg)
    assert res.steps == 2 and res.skipped == 0 and rows == [4, 4]


def test_encode_command_errors_name_the_argument(tmp_path, capsys):
    from fewstep.encode_cmd import main as encode_main

    base = ["--teacher", "digits-vp", "--out", str(tmp_path / "c"), "--no-progress"]
    assert encode_main([str(tmp_path / "none"), *base]) == 2
    assert f"PATH={str(tmp_path / 'none')!r}: no such image folder" in capsys.readouterr().err
    _digit_pngs(tmp_path / "imgs", 3)
    assert encode_main([str(tmp_path / "imgs"), "--labels", "nofile.txt", *base]) == 2
    assert "--labels='nofile.txt': not 'subfolders' and no such labels file" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
