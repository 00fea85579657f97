"""Conditioners against the diffusers pipelines they stand for: the same backbone call, the same
guidance batch, the same null inputs; and clear errors for conditions that do not fit."""

from __future__ import annotations

import diffusers
import pytest
import torch

from fewstep.conditioning import (
    ClassConditioner,
    FluxConditioner,
    PixArtConditioner,
    SD3Conditioner,
    UNetTextConditioner,
    cat_cond,
    conditioner_for,
    index_cond,
)
from fewstep.families.restore import ImageConcatConditioner
from fewstep.samplers import sample
from tests.tiny import FAMILIES, TEXT_LEN, ddim_scheduler, make_tiny

diffusers.utils.logging.set_verbosity_error()


def test_conditioner_for_picks_by_backbone_class():
    want = {
        "dit": ClassConditioner,
        "unet": ClassConditioner,
        "restore": ImageConcatConditioner,
        "sd15": UNetTextConditioner,
        "sdxl": UNetTextConditioner,
        "pixart": PixArtConditioner,
        "sd3": SD3Conditioner,
        "flux": FluxConditioner,
    }
    for fam in FAMILIES:
        assert type(make_tiny(fam).denoiser.conditioner) is want[fam], fam
    assert make_tiny("dit").denoiser.conditioner.null_class == 10  # num_embeds_ada_norm
    assert make_tiny("flux").denoiser.conditioner.guidance_embedded
    with pytest.raises(ValueError, match="no conditioner for backbone class Linear"):
        conditioner_for(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown arguments \\['null_embed'\\]"):
        conditioner_for(make_tiny("sd15").backbone, null_embed=torch.zeros(1))


def _pipeline_latents(fam, tiny, noise, cond, w, n):
    """Run the family's own diffusers pipeline on precomputed embeddings (no text encoders)."""
    d = tiny.denoiser
    null = d.conditioner
    b = noise.shape[0]
    common = dict(num_inference_steps=n, guidance_scale=w, output_type="latent", height=64, width=64)
    if fam == "sd15":
        p = diffusers.StableDiffusionPipeline(
            vae=None,
            text_encoder=None,
            tokenizer=None,
            unet=d.backbone,
            scheduler=ddim_scheduler(tiny.prediction),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        return p(
            prompt_embeds=cond["encoder_hidden_states"],
            negative_prompt_embeds=null.null_embeds.expand(b, -1, -1),
            latents=noise,
            **common,
        ).images
    if fam == "sdxl":
        p = diffusers.StableDiffusionXLPipeline(
            vae=None,
            text_encoder=None,
            text_encoder_2=None,
            tokenizer=None,
            tokenizer_2=None,
            unet=d.backbone,
            scheduler=ddim_scheduler(tiny.prediction),
        )
        return p(
            prompt_embeds=cond["encoder_hidden_states"],
            pooled_prompt_embeds=cond["text_embeds"],
            negative_prompt_embeds=torch.zeros_like(cond["encoder_hidden_states"]),
            negative_pooled_prompt_embeds=torch.zeros_like(cond["text_embeds"]),
            latents=noise,
            **common,
        ).images
    if fam == "pixart":
        p = diffusers.PixArtAlphaPipeline(
            tokenizer=None,
            text_encoder=None,
            vae=None,
            transformer=d.backbone,
            scheduler=ddim_scheduler(tiny.prediction),
        )
        return p(
            prompt_embeds=cond["encoder_hidden_states"],
            prompt_attention_mask=cond["encoder_attention_mask"],
            negative_prompt=None,
            negative_prompt_embeds=null.null_embeds.expand(b, -1, -1),
            negative_prompt_attention_mask=null.null_mask.expand(b, -1),
            latents=noise,
            use_resolution_binning=False,
            **common,
        ).images
    if fam == "sd3":
        p = diffusers.StableDiffusion3Pipeline(
            transformer=d.backbone,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=None,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            text_encoder_3=None,
            tokenizer_3=None,
        )
        return p(
            prompt_embeds=cond["encoder_hidden_states"],
            pooled_prompt_embeds=cond["pooled_projections"],
            negative_prompt_embeds=null.null_embeds.expand(b, -1, -1),
            negative_pooled_prompt_embeds=null.null_pooled.expand(b, -1),
            latents=noise,
            **common,
        ).images
    raise AssertionError(fam)


@pytest.mark.parametrize(
    "fam,prediction",
    [("sd15", "epsilon"), ("sd15", "v_prediction"), ("sdxl", "epsilon"), ("pixart", "v_prediction"), ("sd3", "flow")],
)
def test_guided_sampling_matches_the_pipeline(fam, prediction):
    tiny = make_tiny(fam, prediction=prediction)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(2, *tiny.latent_shape, generator=g)
    cond = tiny.cond(2, g)
    n, w = 4, 3.0
    ref = _pipeline_latents(fam, tiny, noise, cond, w, n)
    ours = sample(tiny.denoiser, noise, cond, tiny.path.sampling_times(n), guidance=w)
    assert torch.allclose(ours, ref, atol=2e-5 * max(1.0, ours.abs().max().item())), (ours - ref).abs().max()


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_flux_matches_the_pipeline(guidance_embeds):
    """Guidance-distilled Flux takes the scale as an input; without it, true CFG with a negative
    prompt (FluxPipeline's true_cfg_scale) runs both branches."""
    tiny = make_tiny("flux", guidance_embeds=guidance_embeds)
    d = tiny.denoiser
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(2, *tiny.latent_shape, generator=g)
    cond = tiny.cond(2, g)
    p = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=d.backbone,
    )
    kw = dict(
        prompt_embeds=cond["encoder_hidden_states"],
        pooled_prompt_embeds=cond["pooled_projections"],
        latents=FluxConditioner.pack(noise),
        num_inference_steps=4,
        output_type="latent",
        height=64,
        width=64,
    )
    if guidance_embeds:
        ref = p(guidance_scale=2.5, **kw).images
        w = 2.5
    else:
        c = d.conditioner
        ref = p(
            true_cfg_scale=3.0,
            negative_prompt_embeds=c.null_embeds.expand(2, -1, -1),
            negative_pooled_prompt_embeds=c.null_pooled.expand(2, -1),
            **kw,
        ).images
        w = 3.0
    ref = FluxConditioner.unpack(ref, 8, 8)
    ours = sample(d, noise, cond, torch.linspace(1, 0, 5), guidance=w)  # shift 1: sigmas linspace(1, 1/4, 4)
    assert torch.allclose(ours, ref, atol=1e-5 * max(1.0, ours.abs().max().item())), (ours - ref).abs().max()


def test_flux_pack_roundtrip_and_ids():
    x = torch.randn(2, 4, 6, 8)
    packed = FluxConditioner.pack(x)
    assert packed.shape == (2, 12, 16)
    assert torch.equal(FluxConditioner.unpack(packed, 6, 8), x)
    # token (row 1, col 2) holds the 2x2 patch at rows 2-3, cols 4-5, channel-major
    assert torch.equal(packed[0, 1 * 4 + 2].view(4, 2, 2), x[0, :, 2:4, 4:6])
    ids = FluxConditioner.image_ids(6, 8, "cpu", torch.float32)
    assert ids[1 * 4 + 2].tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="even height and width"):
        FluxConditioner.pack(torch.randn(1, 4, 5, 8))


def test_pixart_size_conditions_default_to_the_latent_size():
    """A PixArt-alpha-1024-style backbone (use_additional_conditions) gets resolution and aspect
    ratio from the latent size and the VAE factor when the condition does not give them."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    # the size embeddings take a third of the width each: width 12
    bb = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=6,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        cross_attention_dim=12,
        sample_size=8,
        patch_size=2,
        caption_channels=16,
        use_additional_conditions=True,
        norm_num_groups=4,
    )
    for p in bb.parameters():
        if (p == 0).all():
            torch.nn.init.normal_(p, std=0.02)
    c = PixArtConditioner(in_channels=4)
    x = torch.randn(2, 4, 8, 6)
    t = torch.full((2,), 500.0)
    cond = {"encoder_hidden_states": torch.randn(2, 5, 16), "encoder_attention_mask": torch.ones(2, 5)}
    explicit = {**cond, "resolution": torch.tensor([[64.0, 48.0]] * 2), "aspect_ratio": torch.tensor([[64 / 48]] * 2)}
    with torch.no_grad():
        auto = c.call(bb, x, t, cond)
        ref = c.call(bb, x, t, explicit)
        other = c.call(bb, x, t, {**explicit, "resolution": torch.tensor([[128.0, 96.0]] * 2)})
    assert torch.allclose(auto, ref) and not torch.allclose(auto, other)


def test_pixart_null_of_another_length_is_padded_and_masked():
    tiny = make_tiny("pixart")
    c = tiny.denoiser.conditioner
    cond = tiny.cond(2)
    long_cond = {
        "encoder_hidden_states": torch.cat([cond["encoder_hidden_states"], torch.randn(2, 3, 16)], 1),
        "encoder_attention_mask": torch.cat([cond["encoder_attention_mask"], torch.zeros(2, 3, dtype=torch.long)], 1),
    }
    null = c.null(long_cond, 2)
    assert null["encoder_hidden_states"].shape == (2, TEXT_LEN + 3, 16)
    assert null["encoder_attention_mask"][:, TEXT_LEN:].sum() == 0
    assert torch.count_nonzero(null["encoder_hidden_states"][:, TEXT_LEN:]) == 0
    # masked-out padding does not change the output
    x = torch.randn(2, 4, 8, 8)
    short = tiny.denoiser.output(x, 0.5, c.null(cond, 2))
    padded = tiny.denoiser.output(x, 0.5, null)
    assert torch.allclose(short, padded, atol=1e-5)


def test_missing_or_misshapen_conditions_name_the_key():
    x = torch.randn(2, 4, 8, 8)
    sdxl = make_tiny("sdxl")
    cond = sdxl.cond(2)
    with pytest.raises(ValueError, match="missing \\['text_embeds'\\]"):
        sdxl.denoiser(x, 0.5, {k: v for k, v in cond.items() if k != "text_embeds"})
    with pytest.raises(ValueError, match="encoder_hidden_states.*last dimension 16.*\\(2, 6, 7\\)"):
        sdxl.denoiser(x, 0.5, {**cond, "encoder_hidden_states": torch.randn(2, 6, 7)})
    sd3 = make_tiny("sd3")
    with pytest.raises(ValueError, match="pooled_projections"):
        sd3.denoiser(x, 0.5, {"encoder_hidden_states": torch.randn(2, 6, 16)})
    with pytest.raises(ValueError, match="condition batch size 3 does not match x batch size 2"):
        sd3.denoiser(x, 0.5, sd3.cond(3))
    dit = make_tiny("dit")
    with pytest.raises(ValueError, match="class_labels"):
        dit.denoiser(x, 0.5, {"class_labels": torch.rand(2)})


def test_guidance_without_a_null_is_a_clear_error():
    tiny = make_tiny("sd15")
    bare = UNetTextConditioner()  # no null embeddings given
    from fewstep.denoiser import Denoiser

    d = Denoiser(tiny.backbone, tiny.path, bare)
    cond = tiny.cond(2)
    x = torch.randn(2, 4, 8, 8)
    assert d(x, 0.5, cond).shape == x.shape  # guidance 1 needs no null
    with pytest.raises(ValueError, match="empty prompt"):
        d(x, 0.5, cond, guidance=2.0)
    with pytest.raises(ValueError, match="guidance-distilled"):
        make_tiny("flux").denoiser(x, 0.5, make_tiny("flux").cond(2), output="cond_uncond")
    with pytest.raises(ValueError, match="null class"):
        Denoiser(make_tiny("unet").backbone, tiny.path)(
            torch.randn(2, 1, 8, 8), 0.5, {"class_labels": torch.tensor([1, 2])}, guidance=2.0
        )


def test_cat_and_index_cond():
    a = {"encoder_hidden_states": torch.zeros(2, 3, 4), "flag": "x", "guidance": torch.tensor(2.0)}
    b = {"encoder_hidden_states": torch.ones(1, 3, 4), "flag": "x", "guidance": torch.tensor(2.0)}
    c = cat_cond(a, b)
    assert c["encoder_hidden_states"].shape == (3, 3, 4) and c["flag"] == "x" and c["guidance"].ndim == 0
    assert torch.equal(index_cond(c, torch.tensor([2]))["encoder_hidden_states"], torch.ones(1, 3, 4))
    assert index_cond(None, 0) is None
