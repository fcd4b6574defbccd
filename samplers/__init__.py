"""Sampler functions with k-diffusion's signature, schedules and sampler wrappers (pure torch)."""
