"""Experiments built on the training layer: the SPFEM study (spfem)."""
