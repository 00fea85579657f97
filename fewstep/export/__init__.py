"""`fewstep export`: a trained student as a stock diffusers pipeline folder that loads and samples
with no fewstep code.

    fewstep export --checkpoint runs/digits-dmd2 --out exports/digits-dmd2
    export_student("runs/digits-dmd2", "exports/digits-dmd2")          # the same from Python

    pipe = DiTPipeline.from_pretrained("exports/digits-dmd2")         # later, anywhere
    torch.manual_seed(0)                                              # fresh noise between steps
    images = pipe([3, 7], num_inference_steps=4, guidance_scale=1.0).images

The folder is the teacher's pipeline class with the teacher's other components (VAE, text
encoders, tokenizers) copied from its folder, the student's backbone weights, and a stock
scheduler configured so that the pipeline runs the student's own sampler: the times the student
was trained for and its re-noising rule (the run card's `sampling` entry).

How the scheduler is chosen. Every route is checked, not assumed: for each candidate
configuration the pipeline's own sequence of scheduler calls (`set_timesteps`, the initial noise
scale, `scale_model_input`, `step` with or without a generator, PixArt's one-step
`pred_original_sample`) is replayed against `fewstep.samplers.sample` on a smooth synthetic
network and the same noise; a step count is "supported" when the two agree to 1e-5 relative.
The candidates are
    VP path, fresh noise      LCMScheduler: default spacing (`original_inference_steps`) that
                              gives exactly the trained DDPM indices; `timestep_scaling` 1e4 makes
                              its boundary scalings exact (c_skip <= 2.5e-9 at index >= 1), except
                              for LCM students, which keep their own (the deviation is recorded)
    VP path, deterministic    DDIMScheduler, "trailing" spacing, final alpha 1
    flow path, fresh noise    FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), shift 1
                              and `shift_terminal` = the last time: linspace(1, t_last, n)
    flow path, deterministic  the same without stochastic sampling, the teacher's own scheduler
                              (same-schedule students), FlowMapEulerDiscreteScheduler
and, for pipelines whose __call__ takes them, the same schedulers with `timesteps=` / `sigmas=`
passed at call time (recorded in the card). Grids whose first time is not the last DDPM index
are reached by setting the scheduler's `num_train_timesteps` to that index + 1 and giving the
teacher's noise table as `trained_betas` (so e.g. TDM's [899, 674, 449, 224] is DDIM "trailing"
spacing over 900 steps). A schedule no route reproduces is refused with the reason. Known limits:
VP times between integer DDPM indices (e.g. sCM / TBCM angles mapped to a VP teacher) have no
stock scheduler; DiTPipeline cannot pass custom timesteps or sigmas, and calls
`scale_model_input`, which FlowMatchEulerDiscreteScheduler lacks (the card gives the one-line
fix); SCMScheduler expects a TrigFlow F output and TrigFlow inputs, which VP / flow students do
not produce.

Writing is atomic: everything goes to a temporary folder beside `out`, renamed into place at the
end; a non-empty `out` is replaced only with `overwrite=True`, and never when it holds the run or
the teacher.

Modules: drives (how each pipeline class drives its scheduler, from fewstep.families),
candidates / replay / plan (the scheduler plan), run_dir (reading the run, the teacher folder and
eval results), weights (state, fit checks, LoRA), folder (writing the pipeline folder), card and
model_card (fewstep_card.json and README.md), cli (the command line).
"""

from __future__ import annotations

from ._common import CARD_NAME, ExportError
from .cli import add_arguments, run
from .drives import DRIVES
from .folder import ExportResult, atomic_folder, export_student
from .plan import SchedulerPlan, plan_scheduler
from .replay import replay_pipeline

__all__ = [
    "ExportError",
    "ExportResult",
    "SchedulerPlan",
    "export_student",
    "plan_scheduler",
    "DRIVES",
    "CARD_NAME",
    "add_arguments",
    "run",
    "atomic_folder",
    "replay_pipeline",
]
