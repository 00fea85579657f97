"""The benchmark table of BENCHMARKS.md: the embedded teachers at 1, 2, 4, 8, 25 and 50 steps and
every student at 1, 2 and 4 steps, on the embedded default protocol (`fewstep eval --protocol
digits`: 2,000 samples with balanced labels, seed 0, digits-judge features, all 1,797 real digits).

    python eval/benchmark_table.py --teacher-guidance 2 --write BENCHMARKS.md   # teachers + students under runs/
    python eval/benchmark_table.py --students runs/digits-dmd2 exports/dmd2-digits

Writes under --out (default eval/benchmark): results.json (every row with its provenance),
fid_vs_steps.png (FID against steps, log scale) and grids.png (ten samples, one per class, for
every source and step count); one `fewstep eval` output folder per source goes under --work
(default runs/benchmark). With --write, the
"Benchmark table" section of that file is replaced (between its markers) by the table with the
exact command above it; the rest of the file is left alone.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from fewstep.evaluation import EvalSpec, evaluate
from fewstep.evaluation.inputs import atomic_write_json, atomic_write_text
from fewstep.evaluation.sources import EXPORT_CARD_NAMES, RUN_CARD_NAMES

SECTION = "## Benchmark table"
START, END = "<!-- benchmark-table:start -->", "<!-- benchmark-table:end -->"
TEACHERS = ("digits-vp", "digits-flow")


def find_students(root: Path) -> list[str]:
    """Run dirs (a run card, no pipeline) and exported student folders (model_index.json and an
    export card) up to two levels under `root`, sorted."""
    if not root.is_dir():
        return []
    found = []
    for d in sorted([root, *root.glob("*"), *root.glob("*/*")]):
        if not d.is_dir():
            continue
        is_pipe = (d / "model_index.json").is_file()
        if is_pipe and any((d / n).is_file() for n in EXPORT_CARD_NAMES):
            found.append(str(d))
        elif not is_pipe and any((d / n).is_file() for n in RUN_CARD_NAMES):
            found.append(str(d))
    return found


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in s.strip("/").replace("/", "__"))[-80:]


# ---- table --------------------------------------------------------------------------------------
def table_rows(results: list[dict]) -> list[str]:
    head = ["model", "kind", "steps", "NFE", "guidance", "FID", "KID", "class acc", "diversity", "Vendi", "samples/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        src = res["source"]
        for r in res["rows"]:
            m = r["metrics"]

            def v(k, fmt, m=m):
                return fmt.format(m[k]["value"]) if k in m else "-"

            lines.append(
                "| "
                + " | ".join(
                    [
                        f"`{src['name']}`",
                        src["kind"],
                        str(r["steps"]),
                        str(r["nfe"]),
                        f"{r['guidance']:g}",
                        v("fid", "{:.2f}"),
                        v("kid", "{:.4g}"),
                        v("class_acc", "{:.3f}"),
                        v("diversity", "{:.2f}"),
                        v("vendi", "{:.2f}"),
                        f"{r['samples_per_second']:.0f}",
                    ]
                )
                + " |"
            )
    return lines


def section_text(results: list[dict], command: str, out: Path, prepare: list[str] = ()) -> str:
    first = results[0]
    p, ext, ref, be = first["protocol"], first["extractor"], first["reference"], first["backend"]
    lines = [SECTION, "", START, "", "Reproduce with:", "", "```", *prepare, command, "```", ""]
    lines += table_rows(results)
    lines += [
        "",
        f"Protocol `{p['name']}`: {p['num_samples']} samples per row, labels i % 10 (balanced), sample i "
        f"starts from noise seeded with {p['seed']} + i; FID, KID (subset size "
        f"{min(p['kid_subset_size'], p['num_samples'])}, {p['kid_subsets']} subsets) through torch-fidelity "
        f"{be['torch_fidelity']} on `{ext['name']}` features (weights sha256 {ext['weights_sha256'][:16]}) "
        f"against {ref['count']} real digits; class acc is the judge's accuracy on the requested labels; "
        "diversity is the mean pairwise judge-feature distance within a class and Vendi the Vendi score "
        f"within a class ({min(p['diversity_per_group'], p['num_samples'] // 10)} samples per class). "
        "Teachers run DDIM (VP) / Euler (flow) on their own schedule with the CFG scale shown; students "
        "run the times they were trained with (evenly spaced times from 1 at other step counts; each "
        "row's times are in results.json) with guidance 1. NFE counts CFG's two passes. samples/s: "
        f"generation and decoding, batch {first['spec']['batch_size']}, {be['device']}, "
        f"{be['threads']} thread(s), on a shared machine (indicative only).",
        "",
        f"![FID against steps]({out.as_posix()}/fid_vs_steps.png)",
        "",
        f"Samples (one per class, every source and step count): `{out.as_posix()}/grids.png`; every number "
        f"with its provenance: `{out.as_posix()}/results.json`.",
        "",
        END,
    ]
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    """Replace the benchmark-table section of `path` (between its markers), or append it."""
    old = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
    if START in old and END in old:
        a = old.index(START)
        b = old.index(END) + len(END)
        head = old[:a]
        if head.rstrip().endswith(SECTION):  # the section heading sits just above the start marker
            head = head.rstrip()[: -len(SECTION)]
        new = head + text.rstrip("\n") + old[b:]
    else:
        new = old.rstrip("\n") + "\n\n" + text
    atomic_write_text(path, new)


# ---- pictures (PIL: matplotlib is not a dependency) -------------------------------------------------
_COLOURS = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]


def plot_fid(results: list[dict], path: Path, width: int = 900, height: int = 560) -> None:
    """FID against steps (log2 x axis, linear y), one line per source, legend on the right."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    series = []
    for res in results:
        pts = [(r["steps"], r["metrics"]["fid"]["value"]) for r in res["rows"] if "fid" in r["metrics"]]
        if pts:
            series.append((res["source"]["name"], sorted(pts)))
    if not series:
        return
    im = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(im)
    left, right, top, bottom = 70, 250, 30, 50
    x0, x1, y0, y1 = left, width - right, height - bottom, top
    steps = sorted({s for _, pts in series for s, _ in pts})
    fids = [f for _, pts in series for _, f in pts]
    lo_x, hi_x = math.log2(min(steps)), math.log2(max(steps)) if max(steps) > min(steps) else math.log2(min(steps)) + 1
    hi_y = max(fids) * 1.05 if max(fids) > 0 else 1.0
    lo_y = 0.0

    def px(s, f):
        return (x0 + (math.log2(s) - lo_x) / (hi_x - lo_x) * (x1 - x0), y0 - (f - lo_y) / (hi_y - lo_y) * (y0 - y1))

    for s in steps:
        x, _ = px(s, 0)
        d.line([x, y0, x, y0 + 5], fill="black")
        d.text((x - 6, y0 + 8), str(s), fill="black", font=font)
    for i in range(6):
        f = lo_y + (hi_y - lo_y) * i / 5
        _, y = px(steps[0], f)
        d.line([x0 - 5, y, x0, y], fill="black")
        d.line([x0, y, x1, y], fill=(230, 230, 230))
        d.text((x0 - 60, y - 6), f"{f:.1f}", fill="black", font=font)
    d.rectangle([x0, y1, x1, y0], outline="black")
    d.text(((x0 + x1) // 2 - 40, height - 20), "steps (log scale)", fill="black", font=font)
    d.text((10, 8), "FID (digits judge features, lower is better)", fill="black", font=font)
    for k, (name, pts) in enumerate(series):
        c = _COLOURS[k % len(_COLOURS)]
        xy = [px(s, f) for s, f in pts]
        if len(xy) > 1:
            d.line(xy, fill=c, width=2)
        for x, y in xy:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=c)
        ly = y1 + 14 * k
        d.line([x1 + 12, ly + 6, x1 + 32, ly + 6], fill=c, width=3)
        d.text((x1 + 38, ly), name[-34:], fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def grids(results: list[dict], path: Path, per_row: int = 10) -> None:
    """One row per (source, steps): the first `per_row` samples (labels 0..9), from each row's grid."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    rows = []
    for res in results:
        out = Path(res["spec"]["out"])
        for r in res["rows"]:
            g = out / f"grid_steps{r['steps']}.png"
            if g.is_file():
                rows.append(
                    (
                        f"{res['source']['name'][-28:]} {r['steps']} step(s)",
                        r["num_samples"],
                        Image.open(g).convert("RGB"),
                    )
                )
    if not rows:
        return
    # each grid (fewstep.evaluation.run.save_grid) is up to 100 cells, 10 a row, 2-pixel pads: keep its first row
    first = []
    for label, n, g in rows:
        cell = (g.height - 2) // math.ceil(min(n, 100) / 10)
        row = g.crop((0, 0, g.width, cell + 2))
        first.append((label, row.resize((row.width * 2, row.height * 2), Image.NEAREST)))
    label_w = 230
    h = max(g.height for _, g in first)
    w = max(g.width for _, g in first) + label_w
    im = Image.new("RGB", (w, h * len(first)), "white")
    d = ImageDraw.Draw(im)
    for i, (label, g) in enumerate(first):
        im.paste(g, (label_w, i * h))
        d.text((6, i * h + h // 2 - 6), label, fill="black", font=font)
    im.save(path)


# ---- reuse -------------------------------------------------------------------------------------------
_SAME_SPEC = (
    "pipeline",
    "steps",
    "protocol",
    "num_samples",
    "seed",
    "metrics",
    "reference",
    "guidance",
    "device",
    "dtype",
    "sampler",
    "student_weights",
    "hybrid",
    "teacher_guidance",
    "times",
)


def reusable(spec: EvalSpec) -> dict | None:
    """The earlier complete results in spec.out if they were made with the same settings, the same
    network weights (backbone sha256), the same judge weights, the same guidance and the same
    sampling times; else None. The batch size must match too, except for a teacher: its sampler
    draws no noise after the per-sample initial noise, so its images do not depend on the batch
    (a student's fresh noise between steps is drawn per batch)."""
    from fewstep.evaluation.scores import Extractor
    from fewstep.evaluation.sources import load_source

    f = Path(spec.out) / "results.json"
    if not f.is_file():
        return None
    old = json.loads(f.read_text())
    if not old.get("complete") or any(old["spec"].get(k) != _jsonish(getattr(spec, k)) for k in _SAME_SPEC):
        return None
    src = load_source(spec.pipeline)
    if src.kind != "teacher" and old["spec"].get("batch_size") != spec.batch_size:
        return None
    if any(r.get("times") != src.schedule(int(r["steps"]))[0] for r in old.get("rows", [])):
        return None
    if (
        old["source"].get("backbone_sha256") != src.backbone_sha256()
        or old["source"].get("default_guidance") != src.default_guidance
        or (old.get("extractor") or {}).get("weights_sha256") != Extractor().check().weights_sha256
    ):
        return None
    return old


def _jsonish(v):
    return list(v) if isinstance(v, tuple) else v


def teacher_jobs(teachers: list[str], guidance: list[str] | None, ap: argparse.ArgumentParser):
    """(teacher, CFG scale or None for the teacher's recommended one) pairs from --teacher-guidance:
    a bare W applies to every teacher; NAME=W entries give a teacher its own scales."""
    if not guidance:
        return [(t, None) for t in teachers]
    common, own = None, {}
    for item in guidance:
        name, sep, val = item.rpartition("=")
        try:
            w = float(val)
        except ValueError:
            ap.error(f"--teacher-guidance: {item!r} is not W or NAME=W with a number W")
        if not sep:
            common = w
        elif name not in teachers:
            ap.error(f"--teacher-guidance: {name!r} is not one of the teachers ({', '.join(teachers) or 'none'})")
        else:
            own.setdefault(name, []).append(w)
    return [(t, w) for t in teachers for w in own.get(t, [common])]


# ---- main -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teachers", default=",".join(TEACHERS), help="comma-separated teacher names (or '')")
    ap.add_argument("--teacher-steps", default="1,2,4,8,25,50")
    ap.add_argument(
        "--students", nargs="*", default=None, help="run dirs or exported folders (default: those found under --runs)"
    )
    ap.add_argument("--runs", default="runs", help="where to look for students when --students is not given")
    ap.add_argument("--student-steps", default="1,2,4")
    ap.add_argument("--num-samples", type=int, default=None, help="default: the protocol's 2,000")
    ap.add_argument(
        "--batch-size",
        type=int,
        default=250,
        help="generation batch size (default 250, as `fewstep eval` and the bench scripts: a multi-step "
        "student's fresh noise between steps is drawn per batch, so its 2- and 4-step scores "
        "match theirs only at the same batch size)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--teacher-guidance",
        nargs="+",
        default=None,
        metavar="[NAME=]W",
        help="teachers' CFG scales: W for every teacher, NAME=W for one (repeat NAME=W to score a "
        "teacher at several scales); default: each teacher's recommended value",
    )
    ap.add_argument("--out", default="eval/benchmark", help="results.json, fid_vs_steps.png, grids.png")
    ap.add_argument("--work", default="runs/benchmark", help="one `fewstep eval` output folder per source")
    ap.add_argument("--write", default=None, help="markdown file whose benchmark-table section is replaced")
    ap.add_argument(
        "--prepare",
        action="append",
        default=[],
        help="a command that made the students (printed above this one; not run); repeatable",
    )
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="keep a source's results from an earlier run of this script when everything that "
        "determines them (network weights, protocol, steps, guidance, batch, judge) is unchanged",
    )
    args = ap.parse_args(argv)
    command = "python eval/benchmark_table.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )

    out = Path(args.out)
    teachers = [t for t in args.teachers.split(",") if t]
    students = args.students if args.students is not None else find_students(Path(args.runs))
    tsteps = [int(s) for s in args.teacher_steps.split(",")]
    ssteps = [int(s) for s in args.student_steps.split(",")]
    tjobs = teacher_jobs(teachers, args.teacher_guidance, ap)
    jobs = [(t, tsteps, w) for t, w in tjobs] + [(s, ssteps, None) for s in students]
    if not jobs:
        print("nothing to evaluate: no teachers and no students", file=sys.stderr)
        return 2
    print(f"evaluating {len(jobs)} source(s): {', '.join(j for j, _, _ in jobs)}", file=sys.stderr)
    results = []
    t0 = time.perf_counter()
    for src, steps, w in jobs:
        work = Path(args.work) / (_slug(src) + (f"_w{w:g}" if w is not None else ""))
        spec = EvalSpec(
            pipeline=src,
            steps=steps,
            protocol="digits",
            num_samples=args.num_samples,
            guidance=w,
            batch_size=args.batch_size,
            device=args.device,
            out=str(work),
            command=command,
        )
        res = reusable(spec) if args.reuse else None
        if res is None:
            res = evaluate(spec)
        else:
            print(f"{src}: reusing {spec.out}/results.json (same weights and settings)", file=sys.stderr)
        results.append(res)
        print("\n".join(table_rows([res])[2:]), file=sys.stderr)
    atomic_write_json(
        out / "results.json",
        {
            "command": command,
            "wall_seconds": time.perf_counter() - t0,
            "threads": torch.get_num_threads(),
            "results": results,
        },
    )
    plot_fid(results, out / "fid_vs_steps.png")
    grids(results, out / "grids.png")
    text = section_text(results, command, out, args.prepare)
    print(text)
    if args.write:
        write_section(Path(args.write), text)
        print(f"updated the benchmark table in {args.write}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
