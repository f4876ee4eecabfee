"""Diffusion transformers: class-conditional image DiT and video DiT.

`zoo.dit.sample` draws images from a DiT through diffusers' schedulers; `zoo.dit.sample_video`
draws latent videos from a video DiT by flow matching. diffusers is imported only there.
"""
from . import dit, video_dit
from .attention import ATTENTION_BACKENDS, fill_backend_keys
from .diffusion import GaussianDiffusion, sample
from .dit import DiT, diffusers_to_dit, dit_to_diffusers
from .flow import FlowMatching, sample_video
from .video_dit import VideoDiT

__all__ = ["DiT", "VideoDiT", "GaussianDiffusion", "FlowMatching", "sample", "sample_video", "dit_to_diffusers",
           "diffusers_to_dit", "fill_backend_keys", "ATTENTION_BACKENDS"]
