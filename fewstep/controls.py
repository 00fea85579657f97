"""New controls for a one-step generator (Noise Consistency Training, `fewstep.objectives.nct`):
the control signal models, the adapter, and the adapted generator.

    control = CONTROLS["downsample"]            # images (B, 1, 32, 32) in [-1, 1] -> (B, 1, 8, 8)
    adapted = AdaptedGenerator(generator, layer_name, ControlAdapter(...))
    x0 = adapted(z, t0, {"class_labels": y, "control": control(wanted_images)})

A control signal model is any callable images -> control tensor (differentiable, so its error
can train the adapter): `downsample` (the 8x8 average-pool of the image) and `edges` (Sobel
gradient magnitude) ship for the digits; a classifier's logits would do as well.

The adapter reads the control image, maps it to the width of one layer of the generator's
backbone (the family's feature tap, `Family.gan_tap`: a DiT's middle transformer block, a UNet's
mid-block; or, with `adapter_layers: blocks`, every block, one projection each over a shared
trunk) and adds it to that layer's output through a forward hook. Its last layer starts at
zero, so the adapted generator starts as the generator. Exported as the generator's stock
pipeline plus `adapter.safetensors` and `adapter.json` (`export_control_adapter`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CONTROLS",
    "downsample_control",
    "edge_control",
    "ControlAdapter",
    "AdaptedGenerator",
    "adapter_layers",
    "export_control_adapter",
    "load_control_adapter",
]


def downsample_control(images: Tensor) -> Tensor:
    """(B, C, 32, 32) -> (B, C, 8, 8): the 4x4 average pool (what an 8x8 thumbnail asks for)."""
    return F.avg_pool2d(images.float(), 4)


def edge_control(images: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C, H, W): Sobel gradient magnitude of the image (in [-1, 1] units / 8)."""
    x = images.float()
    k = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device) / 8.0
    c = x.shape[1]
    kx = k.reshape(1, 1, 3, 3).expand(c, 1, 3, 3)
    ky = k.t().reshape(1, 1, 3, 3).expand(c, 1, 3, 3)
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
    gx, gy = F.conv2d(xp, kx, groups=c), F.conv2d(xp, ky, groups=c)
    return torch.sqrt(gx * gx + gy * gy + 1e-8)


CONTROLS: dict[str, Callable[[Tensor], Tensor]] = {"downsample": downsample_control, "edges": edge_control}


def control_model(name: str) -> Callable[[Tensor], Tensor]:
    if name not in CONTROLS:
        raise ValueError(f"objective.control={name!r}: choose one of {sorted(CONTROLS)}")
    return CONTROLS[name]


class ControlAdapter(nn.Module):
    """Control image (B, Cc, h, w) -> one residual per hooked layer, of that layer's output shape.

    Args:
        control_channels: channels of the control image.
        out_channels:     the hooked layer's width (transformer width or UNet channels), or a
                          list of widths, one per hooked layer (one trunk, one projection each).
        width:            channels of the adapter's convolutions.
        size:             the control is resized to size x size first (any control resolution).
        grid:             the hooked layers' spatial grid (a DiT's token grid), or None. With a
                          grid, the trunk's features are folded onto it by a space-to-depth step
                          and a learned 1x1 mix, so each token or cell receives every position
                          of its patch; without, they are average-pooled onto the layer's grid.
    """

    def __init__(
        self,
        control_channels: int,
        out_channels: int | list[int],
        width: int = 64,
        size: int = 32,
        grid: int | None = None,
    ):
        super().__init__()
        outs = [int(out_channels)] if isinstance(out_channels, int) else [int(c) for c in out_channels]
        self.config = {
            "control_channels": int(control_channels),
            "out_channels": outs[0] if isinstance(out_channels, int) else outs,
            "width": int(width),
            "size": int(size),
        }
        if grid is not None:
            self.config["grid"] = int(grid)
        self.size = int(size)
        self.outs = outs
        self.net = nn.Sequential(
            nn.Conv2d(control_channels, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.SiLU(),
        )
        self.down, self.fold_side = None, None
        if grid is not None:  # the trunk runs at size / 2; fold k x k patches onto the grid
            k = max(1, (self.size // 2) // int(grid))
            self.fold_side = int(grid) * k
            self.down = nn.Sequential(nn.PixelUnshuffle(k), nn.Conv2d(width * k * k, width, 1), nn.SiLU())
        self.proj = nn.Conv2d(width, sum(outs), 1)  # every layer's projection, stacked on the channels
        nn.init.zeros_(self.proj.weight)  # starts as no change: the adapted generator is the generator
        nn.init.zeros_(self.proj.bias)

    def trunk(self, control: Tensor) -> Tensor:
        """The control's features, shared by every hooked layer."""
        c = F.interpolate(control.float(), size=(self.size, self.size), mode="bilinear", align_corners=False)
        h = self.net(c)
        if self.down is not None:
            side = self.fold_side
            h = self.down(F.adaptive_avg_pool2d(h, (side, side)) if h.shape[-1] != side else h)
        return h

    def residual(self, h: Tensor, like: Tensor, index: int = 0) -> Tensor:
        """Layer `index`'s residual from the trunk's features `h`, for a layer output `like`:
        (B, N, D) tokens on a square-ish grid, or (B, C, h, w)."""
        lo = sum(self.outs[:index])
        weight, bias = self.proj.weight[lo : lo + self.outs[index]], self.proj.bias[lo : lo + self.outs[index]]
        if like.ndim == 4:
            return F.conv2d(F.adaptive_avg_pool2d(h, like.shape[-2:]), weight, bias).to(like.dtype)
        if like.ndim != 3:
            raise ValueError(
                f"control adapter: the hooked layer's output must be (B, N, D) or (B, C, h, w), got {tuple(like.shape)}"
            )
        n = like.shape[1]
        gh = int(math.isqrt(n))
        gh = gh if gh * gh == n else 1
        r = F.conv2d(F.adaptive_avg_pool2d(h, (gh, n // gh)), weight, bias)
        return r.flatten(2).transpose(1, 2).to(like.dtype)

    def forward(self, control: Tensor, like: Tensor, index: int = 0) -> Tensor:
        return self.residual(self.trunk(control), like, index)


class AdaptedGenerator(nn.Module):
    """A frozen one-step generator (a `Denoiser`) with a control adapter on backbone layers.

    Called like a Denoiser; when cond holds "control", the adapter's residuals are added to the
    outputs of `layer` (a dotted module path in the generator's backbone, or a list of them, one
    per adapter output) during that call."""

    def __init__(self, generator: nn.Module, layer: str | list[str], adapter: ControlAdapter):
        super().__init__()
        self.generator = generator
        self.adapter = adapter
        self.layers = [layer] if isinstance(layer, str) else list(layer)
        if len(self.layers) != len(adapter.outs):
            raise ValueError(f"control adapter: {len(adapter.outs)} outputs for {len(self.layers)} layers")

    @property
    def path(self):
        return self.generator.path

    def forward(self, x_t: Tensor, t, cond: dict | None = None, guidance=1.0, output: str = "x0"):
        control = None if cond is None else cond.get("control")
        rest = None if cond is None else {k: v for k, v in cond.items() if k != "control"}
        if control is None:
            return self.generator(x_t, t, rest, guidance, output=output)
        h = self.adapter.trunk(control)

        def hook_for(index: int):
            def hook(mod, args, out):
                if isinstance(out, tuple):
                    return (out[0] + self.adapter.residual(h, out[0], index), *out[1:])
                return out + self.adapter.residual(h, out, index)

            return hook

        handles = [
            self.generator.backbone.get_submodule(name).register_forward_hook(hook_for(i))
            for i, name in enumerate(self.layers)
        ]
        try:
            return self.generator(x_t, t, rest, guidance, output=output)
        finally:
            for handle in handles:
                handle.remove()


def adapter_layers(backbone: nn.Module, which: str | list[str] | None) -> list[tuple[str, int]]:
    """(dotted path, width) of the layers an adapter feeds: None, the family's feature tap (one
    layer); "blocks", every transformer block (a DiT) or every down block and the mid block (a
    UNet); or a list of dotted paths."""
    from .objectives.gan import feature_layer, output_width

    if which is None:
        layer, width = feature_layer(backbone)
        return [(layer_name(backbone, layer), width)]
    if which == "blocks":
        if hasattr(backbone, "transformer_blocks"):
            names = [f"transformer_blocks.{i}" for i in range(len(backbone.transformer_blocks))]
        elif hasattr(backbone, "down_blocks") and getattr(backbone, "mid_block", None) is not None:
            names = [f"down_blocks.{i}" for i in range(len(backbone.down_blocks))] + ["mid_block"]
        else:
            raise ValueError(
                f"objective.adapter_layers='blocks': {type(backbone).__name__} has neither transformer_blocks "
                "nor down_blocks + mid_block; list the dotted layer paths instead"
            )
    elif isinstance(which, (list, tuple)) and which:
        names = [str(n) for n in which]
    else:
        raise ValueError(f"objective.adapter_layers={which!r}: null (the feature tap), 'blocks' or a list of paths")
    out = []
    for name in names:
        try:
            module = backbone.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"objective.adapter_layers: {name!r} names no module of {type(backbone).__name__}") from e
        out.append((name, output_width(module, name)))
    return out


def layer_name(backbone: nn.Module, module: nn.Module) -> str:
    for name, m in backbone.named_modules():
        if m is module:
            return name
    raise ValueError("control adapter: the feature layer is not a module of the generator's backbone")


def export_control_adapter(run_dir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """An NCT run -> `out/adapter.safetensors` + `out/adapter.json` + `out/README.md` (how to load
    the adapter onto the generator's stock pipeline). The generator's own pipeline is exported
    from its run with `fewstep export` (its folder is named in the README)."""
    from safetensors.torch import load_file, save_file

    from .export import atomic_folder

    run_dir = Path(run_dir)
    card = json.loads((run_dir / "run_card.json").read_text())
    if card.get("objective") != "nct":
        raise ValueError(f"{run_dir}: not an NCT run (objective {card.get('objective')!r})")
    params = card["objective_params"]
    wfile = run_dir / card["files"]["student"] / "model.safetensors"
    state = load_file(str(wfile))
    adapter = {k[len("adapter.") :]: v for k, v in state.items() if k.startswith("adapter.")}
    if not adapter:
        raise ValueError(f"{wfile}: holds no adapter.* weights")
    meta = {
        "control": params["control"],
        "layer": params.get("layer_name") or card.get("final_logs", {}).get("layer", ""),
        "adapter": params.get("adapter_config"),
        "generator": params["generator"],
        "sampling": card["sampling"],
    }
    with atomic_folder(Path(out), overwrite=overwrite) as tmp:
        save_file(adapter, str(Path(tmp) / "adapter.safetensors"))
        (Path(tmp) / "adapter.json").write_text(json.dumps(meta, indent=1) + "\n")
        (Path(tmp) / "README.md").write_text(_readme(meta))
    return Path(out)


def load_control_adapter(folder: str | Path) -> tuple[ControlAdapter, dict[str, Any]]:
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = json.loads((folder / "adapter.json").read_text())
    adapter = ControlAdapter(**meta["adapter"])
    adapter.load_state_dict(load_file(str(folder / "adapter.safetensors")))
    return adapter.eval(), meta


def _readme(meta: dict[str, Any]) -> str:
    t0 = meta["sampling"]["times"][0]
    return f"""# Control adapter ({meta["control"]}), Noise Consistency Training

Adds the control `{meta["control"]}` (fewstep.controls) to the one-step generator of
`{meta["generator"]}`. Export that generator as a stock pipeline first
(`fewstep export --checkpoint {meta["generator"]} --out <pipeline>`), then:

```python
import torch
from diffusers import DiTPipeline
from fewstep.controls import load_control_adapter, CONTROLS
pipe = DiTPipeline.from_pretrained("<pipeline>")
adapter, meta = load_control_adapter("<this folder>")
control = CONTROLS[meta["control"]](wanted_images)          # (B, 1, 32, 32) in [-1, 1] -> the control
layers = meta["layer"] if isinstance(meta["layer"], list) else [meta["layer"]]   # {meta["layer"]}
h = adapter.trunk(control)
hooks = [
    pipe.transformer.get_submodule(name).register_forward_hook(
        lambda m, a, out, i=i: out + adapter.residual(h, out, i)
    )
    for i, name in enumerate(layers)
]
images = pipe(class_labels=labels, num_inference_steps=1, guidance_scale=1.0).images
for hook in hooks:
    hook.remove()
```

The adapter adds its residuals to the outputs of those layers at every call (the student samples
in one step from t = {t0}); its weights are `adapter.safetensors` (safetensors only).
"""
