"""load_teacher on pipeline folders of every family (tiny models saved with save_pretrained, tiny
text encoders with offline tokenizers): the loaded teacher must sample what the diffusers
pipeline itself samples from the same prompts and noise, with the pipeline's own null prompt."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import diffusers
import pytest
import torch

from fewstep.conditioning import FluxConditioner
from fewstep.paths import FlowPath, VPPath
from fewstep.pipeline_teacher import Teacher, load_teacher, teacher_from_pipeline
from fewstep.samplers import sample
from tests.tiny import make_tiny_pipeline

diffusers.utils.logging.set_verbosity_error()

PROMPTS = ["a photo of a cat", "two red dogs"]
TEXT = ("sd15", "sdxl", "pixart", "sd3", "flux")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One saved pipeline folder per family (built once for the module)."""
    out = {}
    for fam in ("dit", "unet") + TEXT:
        d = tmp_path_factory.mktemp(fam)
        make_tiny_pipeline(fam).save_pretrained(d)
        out[fam] = str(d)
    return out


def _times(teacher: Teacher, n: int) -> torch.Tensor:
    """The schedule each tiny pipeline's scheduler runs for n steps."""
    if teacher.family == "flux":  # FluxPipeline: sigmas linspace(1, 1/n, n), shifted by exp(mu)
        return teacher.path.apply_shift(torch.linspace(1, 0, n + 1, dtype=torch.float64))
    return teacher.path.sampling_times(n)


@pytest.mark.parametrize("family", TEXT)
def test_teacher_reproduces_pipeline_from_prompts(folders, family):
    # 64 px images (8x8 latents); Flux needs the resolution named (its default is 1024 px)
    teacher = load_teacher(folders[family], resolution=64)
    pipe = teacher.pipeline
    assert teacher.family == family and teacher.pipeline_dir == folders[family]
    assert teacher.latent_shape == (4, 8, 8)
    n, w = 4, 3.0
    noise = torch.randn(2, *teacher.latent_shape, generator=torch.Generator().manual_seed(3))
    kw = dict(prompt=PROMPTS, num_inference_steps=n, guidance_scale=w, output_type="latent", height=64, width=64)
    if family == "flux":
        ref = pipe(latents=FluxConditioner.pack(noise), **kw).images
        ref = FluxConditioner.unpack(ref, 8, 8)
    elif family == "pixart":
        ref = pipe(latents=noise, use_resolution_binning=False, **kw).images
    else:
        ref = pipe(latents=noise, **kw).images
    ours = sample(teacher.denoiser, noise, teacher.encode_prompts(PROMPTS), _times(teacher, n), guidance=w)
    scale = ours.abs().max().item()
    assert torch.allclose(ours, ref.float(), atol=2e-5 * max(1.0, scale)), (ours - ref).abs().max()


@pytest.mark.parametrize("family", TEXT)
def test_null_conditioning_follows_the_pipeline(folders, family):
    teacher = load_teacher(folders[family], resolution=64)
    null = teacher.null_cond(2)
    empty = teacher.encode_prompts(["", ""])
    ehs = null["encoder_hidden_states"]
    if family == "sdxl":  # force_zeros_for_empty_prompt
        assert torch.count_nonzero(ehs) == 0 and torch.count_nonzero(null["text_embeds"]) == 0
        assert torch.equal(null["time_ids"], empty["time_ids"])
    else:  # the encoding of ""
        assert torch.allclose(ehs, empty["encoder_hidden_states"], atol=1e-5) and ehs.abs().sum() > 0
    prompt = teacher.encode_prompts(PROMPTS)
    assert not torch.allclose(prompt["encoder_hidden_states"], empty["encoder_hidden_states"])


def test_flux_dynamic_shift_is_resolved_for_the_resolution(folders):
    # tiny scheduler: base/max image_seq_len 4/64, base/max shift 0.5/1.15; mu linear in tokens
    for res, tokens in ((64, 16), (128, 64)):
        t = load_teacher(folders["flux"], resolution=res)
        mu = 0.5 + (tokens - 4) * (1.15 - 0.5) / (64 - 4)
        assert isinstance(t.path, FlowPath)
        assert t.path.shift == pytest.approx(math.exp(mu), rel=1e-9)
    # the default resolution is FluxPipeline's: 128 * vae_scale_factor pixels
    assert load_teacher(folders["flux"]).latent_shape == (4, 128, 128)


def test_sd3_path_and_decode_match_the_pipeline(folders):
    teacher = load_teacher(folders["sd3"])
    assert isinstance(teacher.path, FlowPath) and teacher.path.shift == 3.0
    lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    img = teacher.decode(lat)
    assert img.shape == (1, 3, 64, 64) and img.dtype == torch.float32
    # what the pipeline does on output: latents / scaling + shift, decode, postprocess to [0, 1]
    vae = teacher.vae
    ref = vae.decode(lat / vae.config.scaling_factor + vae.config.shift_factor).sample
    assert torch.allclose(img, ref.clamp(-1, 1), atol=1e-6)
    # encode undoes decode's scaling: a latent of the decoded image is in the latent scale
    z = teacher.encode(img)
    assert z.shape == lat.shape


def test_class_teachers(folders):
    dit = load_teacher(folders["dit"])
    assert (dit.family, dit.pipeline_class, dit.latent_shape) == ("dit", "DiTPipeline", (4, 8, 8))
    assert isinstance(dit.path, VPPath) and dit.path.prediction_type == "epsilon"
    assert torch.equal(dit.encode_prompts([1, "3"])["class_labels"], torch.tensor([1, 3]))
    assert dit.null_cond(2)["class_labels"].tolist() == [10, 10]  # num_embeds_ada_norm
    with pytest.raises(ValueError, match="unknown class 'zebra'"):
        dit.encode_prompts(["zebra"])
    x = torch.randn(2, 4, 8, 8)
    out = dit.denoiser(x, 0.5, dit.encode_prompts([1, 2]), guidance=4.0)
    assert out.shape == x.shape and torch.isfinite(out).all()

    unet = load_teacher(folders["unet"])  # pixel space: no VAE, the last class is the null class
    assert unet.vae is None and unet.latent_shape == (1, 8, 8) and unet.image_size == (8, 8)
    assert unet.null_cond(1)["class_labels"].item() == 10


def test_class_names_from_an_in_memory_pipeline():
    pipe = make_tiny_pipeline("dit")  # id2label: 0 -> "zero", ..., 9 -> "nine"
    t = teacher_from_pipeline(pipe)
    assert t.pipeline_dir is None
    assert t.encode_prompts(["three", "nine", 0])["class_labels"].tolist() == [3, 9, 0]


def test_low_precision_teacher_returns_float32(folders):
    t = load_teacher(folders["sd15"], dtype=torch.bfloat16)
    assert t.denoiser.dtype == torch.bfloat16
    cond = t.encode_prompts(PROMPTS)
    assert cond["encoder_hidden_states"].dtype == torch.float32
    out = t.denoiser(torch.randn(2, 4, 8, 8), 0.7, cond, guidance=2.0)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_bad_sources_give_clear_errors(tmp_path, folders):
    with pytest.raises(ValueError, match="nobody-xyz/no-such-model.*download"):
        load_teacher("nobody-xyz/no-such-model")
    with pytest.raises(ValueError, match="no model_index.json"):
        load_teacher(str(tmp_path))
    bin_dir = tmp_path / "bin"
    make_tiny_pipeline("sd15").save_pretrained(bin_dir, safe_serialization=False)
    with pytest.raises(ValueError, match="safetensors"):
        load_teacher(str(bin_dir))
    with pytest.raises(ValueError, match="family must be one of"):
        load_teacher(folders["sd15"], family="sd9")
    with pytest.raises(ValueError, match="unknown arguments"):
        load_teacher(folders["sd15"], resolutoin=64)


@pytest.mark.skipif(
    importlib.util.find_spec("fewstep.digits.embedded_teachers") is None,
    reason="the embedded digits teacher (fewstep/digits/embedded_teachers.py) is not in this version yet",
)
@pytest.mark.parametrize("name,path_type", [("digits-vp", VPPath), ("digits-flow", FlowPath)])
def test_digits_teachers(name, path_type):
    t = load_teacher(name)
    assert t.family == "dit" and isinstance(t.path, path_type)
    labels = t.encode_prompts(list(range(10)))["class_labels"]
    x = torch.randn(10, *t.latent_shape)
    out = t.denoiser(x, 1.0, {"class_labels": labels}, guidance=2.0)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert t.decode(out).shape[0] == 10


def test_sample_command_writes_a_prompt_grid(folders, tmp_path, capsys):
    from PIL import Image

    from fewstep.cli import main
    from fewstep.sample_cmd import image_grid, sample_grid

    out = tmp_path / "grid.png"
    argv = [
        "sample",
        "--teacher",
        folders["sd15"],
        "--prompt",
        "a cat",
        "--prompt",
        "a blue dog",
        "--per-row",
        "3",
        "--steps",
        "2",
        "--guidance",
        "2",
        "--seed",
        "4",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    png = torch.from_numpy(__import__("numpy").array(Image.open(out))).permute(2, 0, 1)
    assert png.shape == (3, 2 * 66 + 2, 3 * 66 + 2)  # 2 rows x 3 columns of 64 px with 2 px gaps
    t = load_teacher(folders["sd15"])
    images = sample_grid(t, ["a cat", "a blue dog"], 3, t.path.sampling_times(2).tolist(), 2.0, seed=4)
    assert torch.equal(png, image_grid(images, 2))  # the file holds exactly the seeded samples
    assert not torch.equal(images[0], images[3]) and not torch.equal(images[0], images[1])
    capsys.readouterr()
    assert main(["sample", "--teacher", folders["sd15"], "--out", str(out)]) == 2  # a user error: one line, status 2
    assert "give --prompt" in capsys.readouterr().err


@pytest.mark.skipif(
    importlib.util.find_spec("fewstep.digits.embedded_teachers") is None,
    reason="the embedded digits teacher (fewstep/digits/embedded_teachers.py) is not in this version yet",
)
def test_sample_command_digits_grid(tmp_path):
    from PIL import Image

    from fewstep.cli import main

    out = tmp_path / "digits.png"
    assert main(["sample", "--teacher", "digits-vp", "--steps", "10", "--guidance", "3", "--out", str(out)]) == 0
    img = Image.open(out)
    assert img.size == (10 * 34 + 2, 10 * 34 + 2)  # 10 classes x 10 samples of 32 px


def test_digits_names_load_the_shipped_folder(tmp_path, monkeypatch):
    """load_teacher("digits-flow") loads fewstep/digits/weights/teacher_flow like any pipeline
    folder; without it, the error names the missing file."""
    import fewstep.digits.data as data

    t = load_teacher("digits-flow", dtype=torch.bfloat16)
    assert t.family == "dit" and t.denoiser.dtype == torch.bfloat16
    assert Path(t.pipeline_dir).name == "teacher_flow"
    out = t.denoiser(torch.randn(2, *t.latent_shape), 0.5, t.encode_prompts([1, 2]), guidance=3.0)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    monkeypatch.setattr(data, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(ValueError, match="teacher_flow/model_index.json is missing"):
        load_teacher("digits-flow")
