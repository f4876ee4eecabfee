"""Diffusion transformers: class-conditional image DiT and video DiT.

`zoo.dit.sample` draws images from a DiT through diffusers' schedulers; `zoo.dit.sample_video`
draws latent videos from a video DiT by flow matching. diffusers is imported only there.

Image DiT in pixel space (e.g. MNIST), trained with DiT's objective::

    model = zoo.create_model("dit_s_2", input_size=32, in_channels=1, num_classes=10,
                             depth=6, hidden_size=256)          # num_heads follows (head dim 64)
    diffusion = zoo.dit.GaussianDiffusion(learn_sigma=model.learn_sigma)
    loss = diffusion.training_losses(model, images_in_minus1_1, labels)["loss"].mean()
    images = zoo.dit.sample(model, labels, num_steps=50, guidance_scale=2.0, scheduler="ddim")

(`class_dropout_prob=0.1` by default gives the null class that guidance needs; without a VAE
`sample` returns the model's pixel range, [-1, 1] for data normalised that way.)

Video DiT, flow matching with any attention backend::

    model = zoo.create_model("video_dit_s_2", input_size=(16, 32, 32), attention="radial",
                             attention_kwargs=dict(decay_factor=1.0, dense_layers=1, dense_timesteps=12))
    loss = zoo.dit.FlowMatching(shift=5.0).training_losses(model, latents, y=labels)["loss"].mean()
    latents = zoo.dit.sample_video(model, labels, num_steps=50, guidance_scale=5.0, scheduler="unipc")

A checkpoint trained with one attention loads into another: `zoo.weights.load_weights(model, state_or_path)`.
The backends (dense, radial, sla, na) are one registry, `zoo.dit.attention_backends()`; a backend of
your own joins it with `zoo.dit.register_backend` (see `zoo.dit.attention`).
"""
from . import dit, video_dit  # noqa: F401  (registers the generators)
from .attention import AttentionBackend, attention_backends, fill_backend_keys, get_backend, register_backend
from .diffusion import GaussianDiffusion, sample
from .dit import DiT, diffusers_to_dit, dit_to_diffusers, to_diffusers
from .flow import FlowMatching, sample_video
from .video_dit import VideoDiT

__all__ = ["DiT", "VideoDiT", "GaussianDiffusion", "FlowMatching", "sample", "sample_video", "dit_to_diffusers",
           "diffusers_to_dit", "to_diffusers", "fill_backend_keys", "AttentionBackend", "attention_backends", "get_backend",
           "register_backend"]
