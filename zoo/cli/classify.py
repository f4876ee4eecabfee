"""`zoo classify`: top-5 classes of images with any zoo or timm classifier."""
from __future__ import annotations

import argparse
from pathlib import Path

from . import CliError
from ._common import (
    HelpFormatter,
    add_common,
    add_model_source,
    check_model_name,
    device_of,
    info,
    model_name,
    no_weights_message,
    number,
    recorded_model,
)

DEFAULT_CLASSIFIER = "biformer_mnist"

EXAMPLES = """examples:
  zoo classify digit.png                              # the embedded MNIST classifier (white digit on black)
  zoo classify --model nat_tiny --top 3 cat.jpg dog.jpg
  zoo classify --checkpoint outputs/classify/nat_mnist/export/nat_mnist.safetensors digit.png   # a `zoo train` export"""


def class_names(model) -> list[str]:
    """Names from the pretrained cfg (`label_names`), ImageNet's for 1000 classes, else the indices."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    n = model.num_classes
    if cfg.get("label_names"):
        return list(cfg["label_names"])
    if n in (1000, 1001, 11821, 21841, 21843):
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if subset:
            info_ = ImageNetInfo(subset)
            return [info_.index_to_description(i) for i in range(n)]
    return [str(i) for i in range(n)]


def load_classifier(args: argparse.Namespace):
    import timm

    import zoo
    from zoo.factory import default_weights

    name = model_name(args, DEFAULT_CLASSIFIER)  # an export rebuilds its own network, as in `zoo generate`
    timm_only = timm.is_model(name) and not zoo.list_models(name.partition(".")[0])
    if not timm_only:
        check_model_name(name, kind="classifier")
    _check_images(args.images)
    if args.checkpoint:  # the zoo's tensors-only reader; an export rebuilds with its own model arguments (timm models too)
        if not Path(args.checkpoint).is_file():
            raise CliError(f"--checkpoint {args.checkpoint}: no such file")
        if recorded_model(args) and zoo.weights.read_export_config(args.checkpoint) is None:
            raise CliError(f"--checkpoint {args.checkpoint}: a training checkpoint does not record the classifier's "
                           "preprocessing; classify with the run's export (`zoo train` writes it at export=PATH, "
                           "by default <output_dir>/export/<name>.safetensors)")
        return name, zoo.create_model(name, checkpoint_path=args.checkpoint), args.checkpoint
    if timm_only:  # a timm model: timm loads its weights
        try:
            model = timm.create_model(name, pretrained=not args.random_init)
        except Exception as e:  # hub / network errors come in many types
            raise CliError(f"timm could not load {name} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                           "pass --checkpoint PATH or --random-init") from None
        return name, model, f"timm {'random init' if args.random_init else 'pretrained'}"
    if args.random_init:
        return name, zoo.create_model(name), "random init (untrained)"
    w = default_weights(name)
    if w is None:
        raise CliError(no_weights_message(name))
    try:
        return name, zoo.create_model(w.name, pretrained=True), f"{w.name} ({w.describe()})"
    except zoo.weights.WeightsError as e:
        raise CliError(f"{e}; or pass --checkpoint PATH, or --random-init for an untrained model") from None


def _check_images(paths: list[str]) -> None:
    """Every image exists and Pillow can read its header, before any model is loaded."""
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise CliError(f"{missing[0]}: no such image" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for p in paths:
        _open_image(p).close()


def _open_image(path: str):
    """`PIL.Image.open` (lazy: reads the header) with one-line errors."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except FileNotFoundError:
        raise CliError(f"{path}: no such image") from None
    except UnidentifiedImageError:
        raise CliError(f"{path}: not an image Pillow can read") from None
    except Image.DecompressionBombError as e:  # decoding it could exhaust memory before it is resized
        raise CliError(f"{path}: {str(e).splitlines()[0].rstrip('.')}; downscale it first "
                       "(PIL.Image.MAX_IMAGE_PIXELS sets the limit)") from None


def preprocess(model, paths: list[str]):
    """Images -> a batch with the model's own preprocessing (timm's data config from its pretrained_cfg)."""
    import torch
    from timm.data import create_transform, resolve_model_data_config

    cfg = resolve_model_data_config(model)
    transform = create_transform(**cfg)
    mode = "L" if cfg["input_size"][0] == 1 else "RGB"
    batch = []
    for p in paths:
        with _open_image(p) as im:
            batch.append(transform(im.convert(mode)))
    return torch.stack(batch)


def cmd_classify(args: argparse.Namespace) -> int:
    import torch

    device = device_of(args)
    name, model, source = load_classifier(args)
    info(args, f"{name}: {source}")
    model.to(device).eval()
    x = preprocess(model, args.images).to(device)
    names = class_names(model)
    with torch.no_grad():
        probs = model(x).float().softmax(-1).cpu()
    k = min(args.top, probs.shape[-1])
    for path, p in zip(args.images, probs):
        top = p.topk(k)
        print(path)
        for prob, idx in zip(top.values.tolist(), top.indices.tolist()):
            print(f"  {prob:7.2%}  {idx:>4d}  {names[idx]}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("classify", help="top-5 classes of images with a classifier",
                       description="Classify images with a zoo/timm classifier, using its own preprocessing. "
                       f"Without --model, the embedded {DEFAULT_CLASSIFIER} (MNIST digits, 32x32) is used.",
                       epilog=EXAMPLES, formatter_class=HelpFormatter)
    add_model_source(p, None, checkpoint="load these weights (safetensors or .pth; an export of `zoo train` rebuilds its "
                     "own network and preprocessing, without --model) instead of the registered ones")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--top", type=number(int, 1), default=5, help="classes to print per image")
    add_common(p, seed=False)
    p.set_defaults(func=cmd_classify)
