"""A small VAE distilled from a teacher's: a stock diffusers `AutoencoderTiny` whose decoder
reproduces the teacher VAE's decoder (and whose encoder reproduces its encoder's mean), so a
1- or 2-step student's per-image time is close to its network's instead of the decoder's.

    fewstep distill-decoder --teacher digits-vp --out decoders/digits_tiny
    fewstep export --checkpoint runs/dmd2_1step_vp --out exports/x --decoder decoders/digits_tiny

Training data are the teacher VAE's own latents: the embedded digits through its encoder for the
digits teachers, or a safetensors file of latents (`--latents`, scaled as the teacher's VAE scales
them, the format of `data.real_latents`). Each latent is perturbed with Gaussian noise of
up to `noise * std(latents)` (`pool` perturbed copies of each, decoded once; the held-out set: exactly that) so the small decoder also sees what a student produces off the data
manifold; the target is the full decoder's output on the same latent (pure distillation: the small
decoder copies the full one, artefacts included). The encoder learns the full encoder's posterior
mean on the full decoder's images. The result keeps the teacher VAE's `scaling_factor` and
`shift_factor`, so a pipeline feeds both decoders the same input.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UserError

__all__ = [
    "DecoderParams",
    "DecoderError",
    "build_tiny_vae",
    "decoder_blocks",
    "distill_decoder",
    "teacher_latents",
    "install_decoder",
    "load_decoder",
]


class DecoderError(UserError):
    """A problem with the decoder distillation's inputs (a one-line message)."""


@dataclass
class DecoderParams:
    width: int = 16  # channels of every decoder level (the full digits decoder: 64, 32, 16)
    blocks: int | tuple[int, ...] = 1  # residual blocks per decoder level: one count for every level, or one
    # per level from the latent's resolution up to the image's (AutoencoderTiny's order), e.g. (2, 0, 0):
    # blocks at the full resolution cost the most per image
    encoder_width: int = 16  # channels of every encoder level
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3  # AdamW, cosine decay to 0 after 100 warm-up steps
    noise: float = 0.2  # latent perturbation std, relative to the latents' std
    pool: int = 8  # perturbed copies of each training latent, decoded once by the full VAE
    val_fraction: float = 0.1
    seed: int = 0


def _levels(vae: nn.Module) -> int:
    """Resolution levels of a diffusers VAE (its image / latent size ratio is 2 ** (levels - 1))."""
    cfg = vae.config
    chans = cfg.get("block_out_channels") or cfg.get("decoder_block_out_channels")
    if not chans:
        raise DecoderError(f"{type(vae).__name__}: config has no block_out_channels to read its resolution levels from")
    return len(chans)


def build_tiny_vae(vae: nn.Module, p: DecoderParams) -> nn.Module:
    """An `AutoencoderTiny` with the teacher VAE's channels, latent size and scaling."""
    from diffusers import AutoencoderTiny

    cfg = vae.config
    n = _levels(vae)
    blocks = decoder_blocks(p.blocks, n)
    return AutoencoderTiny(
        in_channels=int(cfg.get("in_channels", 3)),
        out_channels=int(cfg.get("out_channels", 3)),
        encoder_block_out_channels=(int(p.encoder_width),) * n,
        decoder_block_out_channels=(int(p.width),) * n,
        num_encoder_blocks=(1,) * n,
        num_decoder_blocks=blocks,
        latent_channels=int(cfg.get("latent_channels", 4)),
        scaling_factor=float(cfg.get("scaling_factor", 1.0) or 1.0),
        shift_factor=float(cfg.get("shift_factor", 0.0) or 0.0),
        force_upcast=False,
    )


def decoder_blocks(blocks: int | tuple[int, ...] | list[int], levels: int) -> tuple[int, ...]:
    """Residual blocks per decoder level for a VAE of `levels` levels: one count repeated, or one
    per level (latent resolution first)."""
    counts = (int(blocks),) * levels if isinstance(blocks, int) else tuple(int(b) for b in blocks)
    if len(counts) != levels:
        raise DecoderError(f"--blocks: {len(counts)} counts for a decoder of {levels} levels (give one, or {levels})")
    if any(b < 0 for b in counts):
        raise DecoderError(f"--blocks: counts must be >= 0, got {list(counts)}")
    return counts


def teacher_latents(vae: nn.Module, source: str, latents_file: str | None, seed: int) -> Tensor:
    """Unscaled latents (what `vae.decode` takes): the digits through the encoder (posterior
    samples) for the embedded teachers, else the latents of `latents_file`."""
    cfg = vae.config
    scale = float(cfg.get("scaling_factor", 1.0) or 1.0)
    shift = float(cfg.get("shift_factor", 0.0) or 0.0)
    if latents_file is not None:
        from safetensors.torch import load_file

        path = Path(latents_file)
        if not path.is_file():
            raise DecoderError(f"--latents: no such file {path}")
        data = load_file(str(path))
        if "latents" not in data or data["latents"].dim() != 4:
            raise DecoderError(f"--latents {path}: needs a 'latents' tensor of shape (N, C, H, W)")
        lat = data["latents"].float()
        if lat.shape[1] != int(cfg.get("latent_channels", 4)):
            raise DecoderError(
                f"--latents {path}: {lat.shape[1]} channels, the VAE's latents have {cfg.get('latent_channels')}"
            )
        return lat / scale + shift
    if not str(source).startswith("digits"):
        raise DecoderError(f"--teacher {source}: give --latents (a safetensors file of the teacher's latents)")
    from .digits.data import load_digits_tensors

    images, _ = load_digits_tensors(int(cfg.get("sample_size", 32)))
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for i in range(0, len(images), 256):
            dist = vae.encode(images[i : i + 256]).latent_dist
            out.append(dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g))
    return torch.cat(out)


def _psnr(mse: float) -> float:
    return 10 * math.log10(4.0 / max(mse, 1e-12))  # images in [-1, 1]: peak-to-peak 2


def distill_decoder(
    vae: nn.Module, latents: Tensor, p: DecoderParams, say: Callable[[str], None] = print
) -> tuple[nn.Module, dict]:
    """Train an `AutoencoderTiny` on `latents` (unscaled, (N, C, h, w)) to match `vae`.

    Returns the model (eval mode, frozen) and a record: held-out decoder MSE and PSNR against the
    full decoder, encoder MSE against the full encoder's mean, parameter counts, seconds."""
    torch.manual_seed(p.seed)
    vae = vae.eval().requires_grad_(False).float()
    tiny = build_tiny_vae(vae, p)
    n = len(latents)
    g = torch.Generator().manual_seed(p.seed)
    perm = torch.randperm(n, generator=g)
    n_val = max(1, int(round(n * p.val_fraction)))
    val, train = latents[perm[:n_val]], latents[perm[n_val:]]
    std = float(train.std())
    t0 = time.time()
    with torch.no_grad():  # a fixed held-out set: perturbed latents, full decodes, full encodes
        zv = val + p.noise * std * torch.randn(val.shape, generator=g)
        xv = vae.decode(zv).sample.clamp(-1, 1)
        ev = vae.encode(xv).latent_dist.mean
    # the training pool, decoded and encoded once by the full VAE (its decoder dominates a step)
    zs, xs, es = [], [], []
    with torch.no_grad():
        for _ in range(int(p.pool)):
            for i in range(0, len(train), 256):
                z0 = train[i : i + 256]
                z = z0 + p.noise * std * torch.rand(len(z0), 1, 1, 1, generator=g) * torch.randn(z0.shape, generator=g)
                x = vae.decode(z).sample.clamp(-1, 1)
                zs.append(z)
                xs.append(x)
                es.append(vae.encode(x).latent_dist.mean)
    zs, xs, es = torch.cat(zs), torch.cat(xs), torch.cat(es)
    say(f"{len(zs)} training latents decoded by the full VAE in {time.time() - t0:.0f}s")
    opt = torch.optim.AdamW(tiny.parameters(), lr=p.lr, weight_decay=0.0)
    warm = 100

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, p.steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    tiny.train()
    for step in range(p.steps):
        idx = torch.randint(0, len(zs), (p.batch_size,), generator=g)
        loss_dec = F.mse_loss(tiny.decoder(zs[idx]), xs[idx])
        loss_enc = F.mse_loss(tiny.encoder(xs[idx]), es[idx])
        opt.zero_grad(set_to_none=True)
        (loss_dec + loss_enc).backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, p.steps // 10) == 0 or step == 0:
            say(f"step {step + 1}/{p.steps}: decoder mse {loss_dec.item():.5f}, encoder mse {loss_enc.item():.5f}")
    tiny.eval().requires_grad_(False)
    with torch.no_grad():
        mse_dec = float(F.mse_loss(tiny.decoder(zv).clamp(-1, 1), xv))
        mse_enc = float(F.mse_loss(tiny.encoder(xv), ev))
    count = lambda m: sum(q.numel() for q in m.parameters())  # noqa: E731
    record = {
        "class": "AutoencoderTiny",
        "params": asdict(p),
        "train_latents": len(train),
        "heldout_latents": n_val,
        "heldout_decoder_mse": mse_dec,
        "heldout_decoder_psnr_db": _psnr(mse_dec),
        "heldout_encoder_mse": mse_enc,
        "decoder_parameters": count(tiny.decoder),
        "full_decoder_parameters": count(vae.decoder) + count(getattr(vae, "post_quant_conv", None) or nn.Identity()),
        "seconds": round(time.time() - t0, 1),
    }
    return tiny, record


def install_decoder(folder: Path, decoder: str | Path) -> dict:
    """In a pipeline folder being written: the teacher's VAE moves to `vae_full/` (not in
    model_index.json, so stock loading ignores it) and `decoder` (a `fewstep distill-decoder`
    folder) becomes `vae`. Returns the card's record of the swap."""
    import shutil

    src = Path(decoder)
    cls = _checked_decoder_class(src, f"--decoder {src}")
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    if "vae" not in index or not (folder / "vae").is_dir():
        raise DecoderError("--decoder: the teacher pipeline has no 'vae' component to replace")
    (folder / "vae").rename(folder / "vae_full")
    (folder / "vae").mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copy2(src / name, folder / "vae" / name)
    index["vae"] = ["diffusers", cls]
    index_file.write_text(json.dumps(index, indent=2) + "\n")
    card_file = src / "decoder_card.json"
    card = json.loads(card_file.read_text()) if card_file.is_file() else {}
    return {
        "vae": cls,
        "full_vae": "vae_full/ (AutoencoderKL.from_pretrained(folder, subfolder='vae_full'))",
        "source": str(src),
        "heldout_decoder_psnr_db": card.get("heldout_decoder_psnr_db"),
    }


def load_decoder(decoder: str | Path, device: str | torch.device = "cpu") -> Callable[[Tensor], Tensor]:
    """The decode function (scaled latents -> images in [-1, 1]) of a `fewstep distill-decoder`
    folder, loaded through safetensors, the way a pipeline that holds it as its `vae` decodes."""
    import diffusers

    from .training.bundle import vae_decoder

    src = Path(decoder)
    cls = getattr(diffusers, _checked_decoder_class(src, str(src)))
    vae = cls.from_pretrained(str(src), use_safetensors=True).to(device).eval().requires_grad_(False)
    return vae_decoder(vae)


def _checked_decoder_class(src: Path, what: str) -> str:
    """The diffusers class of a `fewstep distill-decoder` folder (AutoencoderTiny or AutoencoderKL)
    once its config and safetensors weights are checked; a DecoderError starting with `what`."""
    from .weights_check import check_weights_folder

    cfg_file = src / "config.json"
    if not cfg_file.is_file():
        raise DecoderError(f"{what}: no config.json (expected a `fewstep distill-decoder` output folder)")
    cls = json.loads(cfg_file.read_text()).get("_class_name")
    if cls not in ("AutoencoderTiny", "AutoencoderKL"):
        raise DecoderError(f"{what}: a {cls!r}; expected AutoencoderTiny or AutoencoderKL")
    check_weights_folder(src, what)
    return cls
