"""attnzoo: one import namespace `zoo`, assembled from the top-level folders.

`ops` and `dit` are taken on PyPI and `backbones/`/`ops/` clash with users' own folders,
so every folder is installed under `zoo` through `package_dir`.
"""
from setuptools import find_packages, setup

FOLDERS = {"zoo": "zoo", "zoo.backbones": "backbones", "zoo.dit": "dit", "zoo.ops": "ops", "zoo.configs": "configs"}


def _packages() -> list[str]:
    packages = []
    for package, folder in FOLDERS.items():
        packages.append(package)
        packages += [f"{package}.{sub}" for sub in find_packages(folder)]
    return packages


def _package_dir() -> dict[str, str]:
    mapping = dict(FOLDERS)
    for package, folder in FOLDERS.items():
        for sub in find_packages(folder):
            mapping[f"{package}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"
    return mapping


TRAIN = ["lightning>=2.4", "tensorboard"]
DIFFUSION = ["diffusers>=0.32", "transformers", "accelerate"]
VIDEO = ["imageio[ffmpeg]", "av"]
# flash-attn-4 (CuTe-DSL FlashAttention, Hopper/Blackwell): the tested range; not in `dev` (CPU CI has no GPU)
HOPPER = ["flash-attn-4>=4.0.0b36,<4.1", "nvidia-cutlass-dsl>=4.8.1,<4.9"]

setup(
    name="attnzoo",
    version="0.1.0",
    description="Vision backbones and diffusion generators built on efficient attention, with their kernels.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=_packages(),
    package_dir=_package_dir(),
    package_data={"zoo.configs": ["**/*.yaml", "*.yaml"], "zoo": ["pretrained/*.safetensors", "pretrained/*.json"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "timm>=1.0.15",
        "safetensors",
        "huggingface_hub",
        "numpy",
        "omegaconf>=2.4",
        "fvcore",
        "tqdm",
    ],
    extras_require={
        "train": TRAIN,
        "diffusion": DIFFUSION,
        "video": VIDEO,
        "hopper": HOPPER,
        "dev": TRAIN + DIFFUSION + VIDEO + ["peft", "pytest", "pytest-xdist", "hypothesis", "ruff"],
    },
    entry_points={"console_scripts": ["zoo=zoo.cli:main"]},
)
