"""How each pipeline class drives its scheduler (`Drive`, one per pipeline class, kept in its
backbone family's record: `fewstep.families`), and the method names the card gives each objective."""

from __future__ import annotations

from ..families import DRIVES, Drive

__all__ = ["Drive", "DRIVES", "METHODS"]

METHODS = {
    "dmd": "DMD (distribution matching distillation with a regression loss)",
    "dmd2": "DMD2 (distribution matching distillation, two time-scale update)",
    "decoupled_dmd": "Decoupled DMD (CFG augmentation + distribution matching)",
    "lcm": "LCM (latent consistency distillation)",
    "scm": "sCM (continuous-time consistency distillation, TrigFlow)",
    "tbcm": "TBCM (trajectory-backward consistency distillation, data-free sCM)",
    "tdm": "TDM (trajectory distribution matching)",
    "boot": "BOOT (data-free bootstrapping along the teacher's trajectory)",
    "twinflow": "TwinFlow (self-adversarial any-step flow, no frozen teacher)",
    "dsm": "DSM fine-tuning (denoising score matching on the teacher's own sampler)",
    "msd": "MSD (multi-student distillation: one DMD2 student per subset of the conditions)",
}
