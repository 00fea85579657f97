"""Run exported pipeline folders with diffusers alone and save what they produce.

    python tests/export_check/run_pipeline.py jobs.json

This script never imports fewstep (it checks that at the end): it is what a user of an exported
folder runs. jobs.json is a list of jobs, each a dict with
    folder           the pipeline folder to load (DiffusionPipeline.from_pretrained)
    out              a .safetensors file to write {"latents": ...} (and "images" for class pipelines)
    steps            num_inference_steps
    guidance_scale   passed to the pipeline
    call_kwargs      extra schedule arguments from the export card (timesteps / sigmas), or {}
    labels | prompts class labels (DiTPipeline) or prompts (text pipelines)
    latents          a .safetensors file whose "latents" are the initial noise (text pipelines), or null
    generator_seed   seed of the pipeline's `generator`
    global_seed      torch.manual_seed(global_seed) right before the call (fresh noise drawn by
                     schedulers that get no generator)
    height, width    image size (text pipelines)
    patch            set scheduler.scale_model_input to the identity (DiTPipeline + flow schedulers)
    lora             null, or {"base": teacher folder, "adapter": folder}: load the base pipeline,
                     load_lora_weights(adapter), take the scheduler from `folder`
    extra            other __call__ keyword arguments
    hybrid           null, or {"teacher": folder, "teacher_steps": k, "guidance": w, "timesteps": [...]}:
                     the model card's diffusers-only hybrid recipe: the teacher pipeline (DDIM,
                     trailing spacing, CFG w) stopped after k steps by a step callback, then this
                     folder's pipeline from those latents at the remaining student timesteps
Prints one JSON line: {"jobs": n, "fewstep_imported": false}.
"""

from __future__ import annotations

import json
import sys

import torch


def load(job):
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    if job.get("lora"):
        pipe = diffusers.DiffusionPipeline.from_pretrained(job["lora"]["base"])
        pipe.load_lora_weights(job["lora"]["adapter"])
        with open(f"{job['folder']}/scheduler/scheduler_config.json") as f:
            cls = getattr(diffusers, json.load(f)["_class_name"])
        pipe.scheduler = cls.from_pretrained(job["folder"], subfolder="scheduler")
    else:
        pipe = diffusers.DiffusionPipeline.from_pretrained(job["folder"])
    pipe.set_progress_bar_config(disable=True)
    if job.get("patch"):
        pipe.scheduler.scale_model_input = lambda sample, timestep: sample
    return pipe


def run_job(job):
    from safetensors.torch import load_file, save_file

    pipe = load(job)
    kw = dict(
        num_inference_steps=job["steps"],
        guidance_scale=job["guidance_scale"],
        **job.get("call_kwargs", {}),
        **job.get("extra", {}),
    )
    gen = torch.Generator().manual_seed(job["generator_seed"])
    out = {}
    if "labels" in job:
        seen = []
        vae = pipe.vae
        hook = vae.post_quant_conv.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
        torch.manual_seed(job["global_seed"])
        images = pipe(class_labels=job["labels"], generator=gen, output_type="pt", **kw).images
        hook.remove()
        out["latents"] = seen[0] * vae.config.scaling_factor
        out["images"] = torch.as_tensor(images).float()
    elif job.get("hybrid"):
        import diffusers

        hy = job["hybrid"]
        teacher = diffusers.DiffusionPipeline.from_pretrained(hy["teacher"])
        teacher.set_progress_bar_config(disable=True)
        teacher.scheduler = diffusers.DDIMScheduler.from_config(
            teacher.scheduler.config,
            timestep_spacing="trailing",
            set_alpha_to_one=True,
            clip_sample=False,
            steps_offset=0,
        )

        def stop(p, i, t, kw):
            if i == hy["teacher_steps"] - 1:
                p._interrupt = True
            return kw

        x = teacher(
            prompt=job["prompts"],
            num_inference_steps=job["steps"],
            guidance_scale=hy["guidance"],
            latents=load_file(job["latents"])["latents"],
            output_type="latent",
            height=job["height"],
            width=job["width"],
            callback_on_step_end=stop,
        ).images
        res = pipe(
            prompt=job["prompts"],
            timesteps=hy["timesteps"],
            guidance_scale=job["guidance_scale"],
            latents=x,
            generator=gen,
            output_type="latent",
            height=job["height"],
            width=job["width"],
        )
        out["latents"] = res.images.float()
    else:
        latents = load_file(job["latents"])["latents"]
        torch.manual_seed(job["global_seed"])
        res = pipe(
            prompt=job["prompts"],
            latents=latents,
            generator=gen,
            output_type="latent",
            height=job["height"],
            width=job["width"],
            **kw,
        )
        out["latents"] = res.images.float()
    save_file({k: v.contiguous() for k, v in out.items()}, job["out"])


def main(argv):
    with open(argv[1]) as f:
        jobs = json.load(f)
    for job in jobs:
        run_job(job)
    print(
        json.dumps(
            {
                "jobs": len(jobs),
                "fewstep_imported": any(m == "fewstep" or m.startswith("fewstep.") for m in sys.modules),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
