"""Multi-resolution operators: RAU-Net ops, window attention, frequency modulation, tiling (pure torch)."""
