"""Distillation objectives: one short file each, one shape (see `base.Objective`)."""
