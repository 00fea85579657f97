"""How each pipeline class drives its scheduler (read from diffusers' __call__ of each class), and
the method names the card gives each objective."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Drive", "DRIVES", "METHODS"]


@dataclass(frozen=True)
class Drive:
    backbone: str                  # the component that holds the network ("transformer" / "unet")
    init_sigma: bool               # latents *= scheduler.init_noise_sigma
    scale_input: bool              # calls scheduler.scale_model_input
    step_generator: bool           # passes its `generator` (and eta=0) to scheduler.step when accepted
    call_kwargs: tuple[str, ...]   # schedule arguments its __call__ forwards to set_timesteps
    flux_sigmas: bool = False      # FluxPipeline: sigmas default to linspace(1, 1/n, n), mu always passed
    one_step_output: int = 0       # PixArt-alpha takes step(...)[1] (pred_original_sample) at one step
    begin_index: bool = False      # calls scheduler.set_begin_index(0) before the loop
    step_on_scaled: bool = False   # DiTPipeline passes the scale_model_input output to step as the sample
    conditioning: str = "text"     # "labels" or "text"
    lora: str | None = None        # the keyword of `save_lora_weights` for its backbone, if it loads LoRA


DRIVES: dict[str, Drive] = {
    "DiTPipeline": Drive("transformer", False, True, False, (), conditioning="labels", step_on_scaled=True),
    "StableDiffusionPipeline": Drive("unet", True, True, True, ("timesteps", "sigmas"), lora="unet_lora_layers"),
    "StableDiffusionXLPipeline": Drive("unet", True, True, True, ("timesteps", "sigmas"), begin_index=True,
                                       lora="unet_lora_layers"),
    "PixArtAlphaPipeline": Drive("transformer", True, True, True, ("timesteps", "sigmas"), one_step_output=1,
                                 begin_index=True),
    "PixArtSigmaPipeline": Drive("transformer", True, True, True, ("timesteps", "sigmas")),
    "StableDiffusion3Pipeline": Drive("transformer", False, False, False, ("sigmas",),
                                      lora="transformer_lora_layers"),
    "FluxPipeline": Drive("transformer", False, False, False, ("sigmas",), flux_sigmas=True, begin_index=True,
                          lora="transformer_lora_layers"),
}

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
}

