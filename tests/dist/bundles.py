"""Teachers for the entry-point tests and the multi-process scripts: an exact Gaussian-mixture
teacher (with real data drawn from a mixture) and tiny diffusers models of each family."""

from __future__ import annotations

import torch

from fewstep.testing import gmm_denoiser
from fewstep.training.bundle import TeacherBundle

K = 4


def true_means(shape=(1, 4, 4)) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randn((K, *shape), generator=g) * 1.5


def gmm_bundle(shift: float = 0.0, real_data: bool = True, learnable: bool = True) -> TeacherBundle:
    """A class-conditional GMM teacher (K classes, null class K) whose means are the true ones
    plus `shift`; its real data are exact samples of the true mixture."""
    from tests.tiny import vp_path

    means = true_means()
    den = gmm_denoiser(vp_path(), means + shift, std=0.3, classes=torch.arange(K), null_class=K, learnable=learnable)
    real = None
    if real_data:
        truth = gmm_denoiser(vp_path(), means, std=0.3, classes=torch.arange(K), null_class=K).backbone

        def real():
            g = torch.Generator().manual_seed(7)
            labels = torch.arange(256) % K
            return truth.sample_data(256, labels, generator=g), labels

    return TeacherBundle(
        denoiser=den,
        latent_shape=tuple(means.shape[1:]),
        source="gmm",
        family=None,
        num_classes=K,
        null_class=K,
        real_data=real,
    )


def tiny_bundle(family: str = "dit", seed: int = 0, **kw) -> TeacherBundle:
    """A tiny randomly initialised teacher of `family`; text families encode a prompt as a random
    condition seeded by the prompt's text, so the same prompt always gives the same condition."""
    from tests.tiny import NUM_CLASSES, make_tiny

    tiny = make_tiny(family, seed=seed, **kw)
    text = family not in ("dit", "unet")
    enc = None
    if text:

        def enc(prompts):
            parts = [tiny.cond(1, torch.Generator().manual_seed(sum(map(ord, p)) % 100_003)) for p in prompts]
            from fewstep.conditioning import cat_cond

            return cat_cond(*parts)

    null = NUM_CLASSES if family in ("dit", "unet") else None
    return TeacherBundle(
        denoiser=tiny.denoiser,
        latent_shape=tuple(tiny.latent_shape),
        source=f"tiny-{family}",
        family=family,
        num_classes=None if text else NUM_CLASSES,
        null_class=null,
        text=text,
        encode_prompts=enc,
    )


def real_data_bundle(tiny, n: int, **kw) -> TeacherBundle:
    """A class-conditional TeacherBundle around `tiny` (a `make_tiny("dit")` teacher, 10 classes)
    with n random real latents labelled 0..9 in turn; `kw` adds fields (decode, vae, ...)."""
    lat, lab = torch.randn(n, *tiny.latent_shape), torch.arange(n) % 10
    return TeacherBundle(
        denoiser=tiny.denoiser,
        latent_shape=tiny.latent_shape,
        family="dit",
        num_classes=10,
        null_class=10,
        real_data=lambda: (lat, lab),
        **kw,
    )


def restore_bundle(seed: int = 0) -> TeacherBundle:
    """A tiny image-conditioned restoration teacher (the restore family) with its own training
    pairs, as `digits-restore` has: 20 fixed random 1x8x8 targets and, for any of them, a condition
    image degraded afresh from the batch's generator (the target plus noise)."""
    from tests.tiny import make_tiny

    tiny = make_tiny("restore", prediction="v_prediction", seed=seed)
    g = torch.Generator().manual_seed(11)
    targets = torch.randn((20, *tiny.latent_shape), generator=g).clamp(-1, 1)

    def real():
        return targets, None

    def pair_cond(index: torch.Tensor, gen: torch.Generator) -> dict:
        x = targets[index.cpu().long()]
        return {"image": x + 0.3 * torch.randn(x.shape, generator=gen)}

    return TeacherBundle(
        denoiser=tiny.denoiser,
        latent_shape=tuple(tiny.latent_shape),
        source="tiny-restore",
        family="restore",
        num_classes=None,
        null_class=None,
        real_data=real,
        pair_cond=pair_cond,
    )
