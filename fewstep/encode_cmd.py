"""`fewstep encode`: images -> a sharded latent cache, with the teacher's VAE.

    fewstep encode my_images/ --teacher digits-vp --out caches/my_images --labels subfolders
    fewstep encode "shards/train-{000..099}.tar" --source webdataset --teacher <pipeline> --out caches/train
    fewstep encode saved_ds/ --source datasets --captions text --teacher <pipeline> --out caches/ds

Writes shard-NNNNN.safetensors files and cache.json (fewstep/data/cache.py); a run that stops
(Ctrl-C, a lost machine) is finished by the same command, and the result is the same as that of a
run that never stopped. Train on the cache with `data.source=cache data.path=<out>`.
"""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace

from .errors import positive_int

__all__ = ["add_arguments", "run", "main"]

_ARGS = {  # the data keys the arguments stand for
    "data.path": "PATH",
    "data.labels": "--labels",
    "data.captions": "--captions",
    "data.image_key": "--image-key",
    "data.split": "--split",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="an image folder, a webdataset shard list (braces / glob), or a saved dataset folder")
    p.add_argument("--teacher", required=True, help="digits-vp, digits-flow, or a diffusers pipeline folder")
    p.add_argument("--out", required=True, help="the cache folder (created; an unfinished cache there is resumed)")
    p.add_argument(
        "--source", choices=("folder", "webdataset", "datasets"), default="folder", help="what PATH is (default folder)"
    )
    p.add_argument("--labels", default=None, help="folder: 'subfolders' or a labels file; others: member / column")
    p.add_argument("--captions", default=None, help="folder / webdataset: caption extension (txt); datasets: column")
    p.add_argument("--image-key", default=None, help="webdataset: image member extension; datasets: image column")
    p.add_argument("--split", default=None, help="datasets: the split of a saved DatasetDict (default train)")
    p.add_argument(
        "--resolution", type=positive_int, default=None, help="image size in pixels (default: the teacher's)"
    )
    p.add_argument("--shard-size", type=positive_int, default=1024, help="samples per shard file (default 1024)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per VAE call (default 64)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="the VAE's dtype")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="encode afresh over a cache of other images or settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import torch

    from .config import ConfigError, TeacherConfig
    from .data.cache import encode_to_cache
    from .data.images import open_images
    from .data.spec import check_data
    from .errors import user_errors
    from .training.bundle import load_bundle

    given = ("source", "path", "labels", "captions", "image_key", "split", "resolution")  # as data.* names them
    spec = SimpleNamespace(**{k: getattr(args, k) for k in given}, encode_batch=args.batch_size)
    spec.real_latents = spec.prompt_column = spec.prompts = None
    try:  # the images exist, before the teacher loads
        check_data(spec)
        table = open_images(spec)
    except ConfigError as e:  # name the command's arguments, not the config keys they stand for
        msg = str(e)
        for key, arg in _ARGS.items():
            msg = msg.replace(key, arg)
        raise ConfigError(msg) from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with user_errors(f"--teacher={args.teacher!r}", ValueError, OSError, named=args.teacher):
        bundle = load_bundle(TeacherConfig(source=args.teacher, dtype=args.dtype), device)
    if bundle.encode is None or bundle.image_shape is None:
        print(f"fewstep encode: error: --teacher={args.teacher!r} has no VAE encoder", file=sys.stderr)
        return 2
    shape = tuple(bundle.image_shape)
    if args.resolution is not None:
        shape = (shape[0], args.resolution, args.resolution)
    print(f"fewstep encode: {len(table)} images from {args.path} -> {args.out} ({shape[1]}px, {device})", flush=True)
    m = encode_to_cache(
        table,
        bundle.encode,
        args.out,
        image_shape=shape,
        latent_shape=tuple(bundle.latent_shape),
        teacher=args.teacher,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        device=device,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    extra = ", labels" if m["has_labels"] else ""
    extra += ", captions" if m["has_captions"] else ""
    print(
        f"fewstep encode: done: {m['count']} latents {tuple(m['latent_shape'])} in {len(m['shards'])} shards{extra}; "
        f"train with data.source=cache data.path={args.out}",
        flush=True,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    from .cli import OneLineParser
    from .errors import main_guard

    parser = OneLineParser(
        prog="fewstep encode", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    return main_guard("fewstep encode", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
