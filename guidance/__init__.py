"""Guidance maths: perturbed-attention guidance family, scheduled CFG, CADS, noise refinement (pure torch)."""
