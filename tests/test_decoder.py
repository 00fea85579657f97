"""`fewstep distill-decoder`: the small AutoencoderTiny learns the full decoder, saves and loads as
a stock diffusers model, and an exported pipeline loads it as its `vae` with the full VAE beside."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from fewstep.decoder import DecoderError, DecoderParams, build_tiny_vae, distill_decoder, install_decoder
from tests.tiny import make_tiny_pipeline


def _heldout_mse(tiny, vae, z):
    with torch.no_grad():
        return float(F.mse_loss(tiny.decoder(z).clamp(-1, 1), vae.decode(z).sample.clamp(-1, 1)))


def test_distilled_decoder_approaches_the_full_decoder_and_loads_stock(tmp_path):
    from diffusers import AutoencoderTiny

    vae = make_tiny_pipeline("dit").vae
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(96, vae.config.latent_channels, 4, 4, generator=g)
    p = DecoderParams(width=8, encoder_width=4, steps=150, batch_size=32, lr=5e-3, pool=1, noise=0.0)
    z_val = torch.randn(16, vae.config.latent_channels, 4, 4, generator=g)
    torch.manual_seed(p.seed)
    untrained = _heldout_mse(build_tiny_vae(vae, p), vae, z_val)
    tiny, record = distill_decoder(vae, latents, p, say=lambda m: None)
    trained = _heldout_mse(tiny, vae, z_val)
    assert trained < 0.5 * untrained, (trained, untrained)  # it learned the full decoder's map
    assert record["decoder_parameters"] < record["full_decoder_parameters"] or record["decoder_parameters"] > 0
    assert tiny.config.scaling_factor == vae.config.scaling_factor  # pipelines feed both the same input
    tiny.save_pretrained(str(tmp_path / "dec"), safe_serialization=True)
    back = AutoencoderTiny.from_pretrained(str(tmp_path / "dec"))
    torch.testing.assert_close(back.decode(z_val).sample, tiny.decode(z_val).sample)


def test_export_swap_loads_the_small_vae_in_the_stock_pipeline(tmp_path):
    from diffusers import AutoencoderKL, AutoencoderTiny, DiTPipeline

    pipe = make_tiny_pipeline("dit")
    folder = tmp_path / "pipe"
    pipe.save_pretrained(str(folder), safe_serialization=True)
    tiny = build_tiny_vae(pipe.vae, DecoderParams(width=8, encoder_width=4))
    tiny.save_pretrained(str(tmp_path / "dec"), safe_serialization=True)
    (tmp_path / "dec" / "decoder_card.json").write_text(json.dumps({"heldout_decoder_psnr_db": 30.0}))
    info = install_decoder(folder, tmp_path / "dec")
    assert info["vae"] == "AutoencoderTiny" and info["heldout_decoder_psnr_db"] == 30.0
    assert json.loads((folder / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderTiny"]
    loaded = DiTPipeline.from_pretrained(str(folder))
    assert isinstance(loaded.vae, AutoencoderTiny)
    full = AutoencoderKL.from_pretrained(str(folder), subfolder="vae_full")
    z = torch.randn(2, pipe.vae.config.latent_channels, 4, 4)
    torch.testing.assert_close(full.decode(z).sample, pipe.vae.decode(z).sample)
    torch.testing.assert_close(loaded.vae.decode(z).sample, tiny.decode(z).sample)
    # fewstep's own loader (sampling, eval) decodes through the small VAE too
    from fewstep.pipeline_teacher import load_teacher

    t = load_teacher(str(folder))
    assert isinstance(t.vae, AutoencoderTiny)
    img = t.decode(torch.randn(1, *t.latent_shape))
    assert img.shape[-1] == t.latent_shape[-1] * t.vae_scale_factor


def test_install_decoder_refuses_a_folder_that_is_not_a_decoder(tmp_path):
    (tmp_path / "dec").mkdir()
    with pytest.raises(DecoderError, match="no config.json"):
        install_decoder(tmp_path / "pipe", tmp_path / "dec")


def test_load_decoder_decodes_as_the_saved_vae_and_refuses_other_folders(tmp_path):
    from fewstep.decoder import load_decoder

    vae = make_tiny_pipeline("dit").vae
    tiny = build_tiny_vae(vae, DecoderParams(width=8, encoder_width=4))
    tiny.save_pretrained(str(tmp_path / "dec"), safe_serialization=True)
    decode = load_decoder(tmp_path / "dec")
    z = torch.randn(2, vae.config.latent_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = tiny.decode(z / tiny.config.scaling_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(decode(z), want)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DecoderError, match="no config.json"):
        load_decoder(tmp_path / "empty")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(DecoderError, match="AutoencoderTiny or AutoencoderKL"):
        load_decoder(tmp_path / "unet")


def test_per_level_blocks_shape_the_decoder_and_a_wrong_count_is_refused():
    from fewstep.decoder_cmd import _block_counts

    vae = make_tiny_pipeline("dit").vae
    levels = len(vae.config.block_out_channels)
    counts = (2,) + (0,) * (levels - 1)
    tiny = build_tiny_vae(vae, DecoderParams(width=4, blocks=counts))
    assert tuple(tiny.config.num_decoder_blocks) == counts
    blocks = [type(m).__name__ for m in tiny.decoder.layers]
    assert blocks.count("AutoencoderTinyBlock") == 2
    z = torch.randn(2, vae.config.latent_channels, 4, 4)
    assert tiny.decode(z).sample.shape == vae.decode(z).sample.shape
    assert _block_counts("2,0,0") == (2, 0, 0) and _block_counts("3") == 3
    with pytest.raises(DecoderError, match=f"--blocks: {levels + 1} counts for a decoder of {levels} levels"):
        build_tiny_vae(vae, DecoderParams(blocks=(1,) * (levels + 1)))
    with pytest.raises(DecoderError, match="--blocks: counts must be >= 0"):
        build_tiny_vae(vae, DecoderParams(blocks=(-1,) * levels))
