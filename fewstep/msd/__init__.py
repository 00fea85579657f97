"""Multi-student distillation (MSD; Song et al. 2024): K one-step students, each distilled with
DMD2 on its own subset of the conditions, and the routing that sends each condition to its
student at inference.

    partition.py   which conditions each student owns (class labels split evenly; for text, a hash
                   of the prompt, k-means on its embedding, or an explicit mapping file)
    small.py       a narrower / shallower copy of the teacher's architecture, built from its config
    train.py       the entry point's driver: one run dir, one sub-run (subfolder) per student
    routing.py     the routing file, and a denoiser that routes a batch to its students
    export.py      one stock pipeline folder per student + routing.json + a model card

The per-student objective (DMD2 plus the small students' score-matching pre-training) is
`fewstep.objectives.msd`; the plain-Python routed pipeline is `fewstep.pipelines.MultiStudentPipeline`.
"""
