"""Diffusion transformers: class-conditional image DiT and video DiT."""
