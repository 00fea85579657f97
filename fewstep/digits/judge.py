"""The digits judge: a small CNN classifier for the 32x32 digits whose penultimate features
stand in for Inception features (FID, KID, precision/recall) and whose predictions give class
accuracy of class-conditional samples.

Two entry points for images:
- `DigitsJudge.forward(images_uint8)`: what torch-fidelity feeds an extractor, uint8
  (B, 3, H, W) in 0..255; converted to grayscale [-1, 1] and resized to 32x32.
- `DigitsJudge.features_and_logits(images)`: float images in [-1, 1], (B, 1 or 3, H, W).

`JudgeFeatureExtractor` wraps the judge for torch-fidelity; `register_judge_extractor()` makes
it available as `feature_extractor="fewstep-digits-judge"`. Weights come from
`fewstep/digits/weights/judge.safetensors`, made by `train/judge.py`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from .data import IMAGE_SIZE, NUM_CLASSES, WEIGHTS_DIR

JUDGE_NAME = "fewstep-digits-judge"
JUDGE_WEIGHTS = WEIGHTS_DIR / "judge.safetensors"
JUDGE_CARD = WEIGHTS_DIR / "judge.json"


ARCHITECTURES = {"cnn3": (1, 1, 1), "vgg": (2, 2, 1)}  # convolutions per stage (each stage ends in a 2x pool)


class DigitsJudge(nn.Module):
    """Three stages of convolutions (w, 2w, 2w channels, each stage 3x3 convs with SiLU, then a
    2x max-pool) -> linear to `feature_dim` (the FID features, taken before the activation so
    they are not clipped at zero) -> SiLU -> linear to the class logits.

    `arch` names the convolutions per stage: "cnn3" (1, 1, 1; the project's judge, about 120k
    parameters at width 32) or "vgg" (2, 2, 1: two convolutions in each of the first two stages).
    """

    def __init__(self, width: int = 32, feature_dim: int = 64, num_classes: int = NUM_CLASSES, arch: str = "cnn3"):
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"digits judge: unknown arch {arch!r}; choose one of {sorted(ARCHITECTURES)}")
        self.width = int(width)  # channels of the first stage; later stages use 2x
        self.feature_dim = int(feature_dim)  # size of the penultimate (FID) feature vector
        self.num_classes = int(num_classes)
        self.arch = arch
        w = self.width
        layers: list[nn.Module] = []
        c_in = 1
        for c_out, depth in zip((w, 2 * w, 2 * w), ARCHITECTURES[arch]):  # 32 -> 16 -> 8 -> 4
            for _ in range(depth):
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.SiLU()]
                c_in = c_out
            layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.to_features = nn.Linear(2 * w * (IMAGE_SIZE // 8) ** 2, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, self.num_classes)

    def config(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("width", "feature_dim", "num_classes", "arch")}

    @staticmethod
    def prepare(images: Tensor) -> Tensor:
        """Images -> float32 (B, 1, 32, 32) grayscale in [-1, 1].

        uint8 input is read as 0..255 (torch-fidelity's convention); floating input as [-1, 1].
        Three channels are averaged to grayscale; other sizes are resized (bilinear, antialiased).
        """
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] not in (1, 3):
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"digits judge expects images of shape (B, 1 or 3, H, W), got {shape}")
        if images.dtype == torch.uint8:
            x = images.float() / 127.5 - 1.0
        elif images.is_floating_point():
            x = images.float()
        else:
            raise ValueError(f"digits judge expects uint8 (0..255) or float ([-1, 1]) images, got {images.dtype}")
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False, antialias=True)
        return x

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Float images in [-1, 1], (B, 1 or 3, H, W) -> features (B, feature_dim), logits (B, 10),
        both float32."""
        x = self.prepare(images).to(self.head.weight.device)
        f = self.to_features(self.body(x))
        return f, self.head(F.silu(f))

    def all_features(self, images: Tensor) -> dict[str, Tensor]:
        """{"features", "logits", "conv_pooled"} for float or uint8 images. "conv_pooled" is the
        spatial mean of every conv stage's activations (w + 4w dims): less class-driven than
        "features", so FID on it reacts more to noise and blur and less to class proportions."""
        h = self.prepare(images).to(self.head.weight.device)
        pooled = []
        for layer in self.body:
            h = layer(h)
            if isinstance(layer, nn.SiLU):
                pooled.append(h.mean(dim=(2, 3)))
        f = self.to_features(h)
        return {"features": f, "logits": self.head(F.silu(f)), "conv_pooled": torch.cat(pooled, dim=1)}

    def features(self, images: Tensor) -> Tensor:
        return self.features_and_logits(images)[0]

    def logits(self, images: Tensor) -> Tensor:
        return self.features_and_logits(images)[1]

    @torch.no_grad()
    def predict(self, images: Tensor, batch_size: int = 512) -> Tensor:
        """Predicted class (B,) int64 on the CPU, in batches, for float or uint8 images."""
        out = [self.logits(images[i : i + batch_size]).argmax(1).cpu() for i in range(0, images.shape[0], batch_size)]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)

    def forward(self, images_uint8: Tensor) -> Tensor:
        """torch-fidelity's input convention: uint8 (B, 3, H, W) in 0..255 -> logits (B, 10)."""
        if images_uint8.dtype != torch.uint8:
            raise ValueError(
                f"DigitsJudge.forward takes uint8 images (0..255), got {images_uint8.dtype}; "
                "use .logits() / .features() for float images in [-1, 1]"
            )
        return self.logits(images_uint8)


def weights_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_judge(judge: DigitsJudge, path: str | Path) -> str:
    """Write the weights (safetensors); returns their sha256. The architecture is read back from
    the tensor shapes (safetensors writes multi-key metadata in a random order, which would make
    the file's hash differ between identical runs)."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in judge.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt"})
    return weights_sha256(path)


def _arch_of(state: dict[str, Tensor]) -> str:
    """The architecture name from the positions of the convolutions in `body` (a conv + SiLU pair
    takes two positions, a pool one more), so that no metadata is needed."""
    convs = sorted(int(k.split(".")[1]) for k, v in state.items() if k.startswith("body.") and v.dim() == 4)
    depths, run = [], 1
    for a, b in itertools.pairwise(convs):
        if b - a == 2:
            run += 1
        else:
            depths.append(run)
            run = 1
    depths.append(run)
    for name, d in ARCHITECTURES.items():
        if tuple(depths) == d:
            return name
    raise ValueError(
        f"digits judge weights: convolutions per stage {tuple(depths)} match no architecture ({ARCHITECTURES})"
    )


def load_judge(path: str | Path | None = None) -> DigitsJudge:
    """The trained judge, in eval mode on the CPU, gradients off.

    Args:
        path: a judge safetensors file; default the packaged `fewstep/digits/weights/judge.safetensors`.
    """
    from safetensors.torch import load_file

    path = Path(path) if path is not None else JUDGE_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"digits judge weights not found: {path} (create them with `python train/judge.py`)")
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error type on a damaged file
        raise ValueError(f"{path}: cannot read the judge weights: {e}") from e
    try:
        cfg = {
            "width": state["body.0.weight"].shape[0],
            "feature_dim": state["to_features.weight"].shape[0],
            "num_classes": state["head.weight"].shape[0],
            "arch": _arch_of(state),
        }
    except KeyError as e:
        raise ValueError(f"{path}: not a digits judge file (missing tensor {e})") from e
    judge = DigitsJudge(**cfg)
    try:
        judge.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not match the judge architecture {cfg}: {e}") from e
    judge.eval().requires_grad_(False)
    return judge


def load_judge_card(path: str | Path | None = None) -> dict:
    path = Path(path) if path is not None else JUDGE_CARD
    if not path.is_file():
        raise FileNotFoundError(f"digits judge card not found: {path} (create it with `python train/judge.py`)")
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------------
# torch-fidelity feature extractor


class JudgeFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity extractor over the digits judge.

    Features: "features" (penultimate, the default for FID / KID / PRC), "logits" (ISC) and
    "conv_pooled" (pooled conv activations, a texture-sensitive alternative; see
    `DigitsJudge.all_features`).
    `feature_extractor_weights_path` (a calculate_metrics keyword) picks another judge file; the
    default is the class's `default_weights` (the project's judge here; each panel member is a
    subclass with its own file, see fewstep/digits/panel.py).
    """

    default_weights: Path = JUDGE_WEIGHTS

    def __init__(
        self, name, features_list, feature_extractor_weights_path=None, feature_extractor_internal_dtype=None, **kwargs
    ):
        super().__init__(name, features_list)
        if feature_extractor_internal_dtype not in (None, "float32"):
            raise ValueError(
                f"{name}: feature_extractor_internal_dtype must be float32 (or None), "
                f"got {feature_extractor_internal_dtype!r}"
            )
        self.weights_path = Path(feature_extractor_weights_path or self.default_weights)
        self.judge = load_judge(self.weights_path)

    def forward(self, x):
        check_uint8_images(self.name, x)
        if "conv_pooled" in self.features_list:
            out = self.judge.all_features(x)
        else:
            out = dict(zip(("features", "logits"), self.judge.features_and_logits(x)))
        return tuple(out[k] for k in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "features", "logits", "conv_pooled"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return True

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)


def check_uint8_images(name: str, x) -> None:
    """The digits extractors take what torch-fidelity feeds them, uint8 (B, 3, H, W) images; anything
    else is a ValueError naming the extractor `name`."""
    if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
        desc = f"{x.dtype} {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{name} expects uint8 images of shape (B, 3, H, W), got {desc}")


def register_judge_extractor(name: str = JUDGE_NAME) -> None:
    """Register `JudgeFeatureExtractor` with torch-fidelity under `name`. Safe to call again;
    raises if `name` is taken by some other extractor."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    have = FEATURE_EXTRACTORS_REGISTRY.get(name)
    if have is None:
        register_feature_extractor(name, JudgeFeatureExtractor)
    elif have is not JudgeFeatureExtractor:
        # a reloaded copy of this module is the same extractor; anything else is a name clash
        if (have.__module__, have.__qualname__) != (__name__, JudgeFeatureExtractor.__qualname__):
            raise ValueError(f"torch-fidelity feature extractor {name!r} is already registered as {have!r}")
        FEATURE_EXTRACTORS_REGISTRY[name] = JudgeFeatureExtractor
