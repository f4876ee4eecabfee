"""Pretrained-weight registry: where each checkpoint lives, how to check it, how to convert it.

Every pretrained `arch.tag` names one source (URL, HF hub repo + filename, or a local file
shipped in the package), its licence, an optional sha256 and a converter from the official
layout to ours. Loading downloads into the cache (`ZOO_CACHE`, else `<torch hub dir>/attnzoo`),
verifies, converts, and checks every key and shape *before* touching the model, so a bad file
leaves the model exactly as it was.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

StateDict = dict[str, torch.Tensor]
Converter = Callable[[StateDict, torch.nn.Module], StateDict]

# fields that are ours, not timm's PretrainedCfg
_ZOO_FIELDS = ("sha256", "converter", "hf_filename", "package_file")


def _timm_cfg_fields() -> frozenset[str]:
    import dataclasses

    from timm.models import PretrainedCfg

    return frozenset(f.name for f in dataclasses.fields(PretrainedCfg))


class WeightsError(RuntimeError):
    """A checkpoint could not be found, verified, read or matched to the model."""


@dataclass(frozen=True)
class Weights:
    name: str  # arch.tag
    url: str | None = None
    hf_hub_id: str | None = None
    hf_filename: str | None = None
    package_file: str | None = None  # a file shipped inside the zoo package (zoo/pretrained/...)
    file: str | None = None  # an absolute local path
    sha256: str | None = None
    license: str | None = None
    converter: Converter | None = None
    cfg: dict[str, Any] = field(default_factory=dict)

    @property
    def filename(self) -> str:
        """The cached file's name; a cfg `file_name` overrides URLs without one (e.g. OneDrive `.../content`)."""
        for source in (self.cfg.get("file_name"), self.hf_filename, self.package_file, self.file, self.url):
            if source:
                name = os.path.basename(source.split("?")[0].rstrip("/"))
                # share links (https://cloud.tsinghua.edu.cn/f/<id>/?dl=1) name no file: use the entry's
                return name if "." in name else f"{self.name}.pth"
        raise WeightsError(f"{self.name} has no source")

    def describe(self) -> str:
        if self.package_file:
            return f"embedded: zoo/{self.package_file}"
        if self.hf_hub_id:
            return f"hf-hub: {self.hf_hub_id}/{self.hf_filename}"
        return self.url or self.file or "-"


_WEIGHTS: dict[str, Weights] = {}
# cfg fields timm does not know (top1, paper_params, paper_flops, model_args, ...), by `arch.tag`
_EXTRAS: dict[str, dict[str, Any]] = {}


def generate_default_cfgs(cfgs: dict[str, dict[str, Any]]):
    """Register the pretrained entries of a model module and return timm's `default_cfgs`.

    Each key is `arch` or `arch.tag`; each value holds timm `PretrainedCfg` fields plus ours:
    `sha256`, `converter(state_dict, model) -> state_dict`, `hf_filename`, `package_file`.
    Any other field (e.g. `top1`, `paper_params`, `paper_flops`, or `model_args`: architecture
    arguments the tag implies, such as other dilations at 384) is kept by the zoo
    (`cfg_extras`) and added to the model's `pretrained_cfg` by `build_classifier`.
    """
    from timm.models import generate_default_cfgs as timm_default_cfgs

    timm_fields = _timm_cfg_fields()
    timm_cfgs = {}
    for name, cfg in cfgs.items():
        ours = {k: cfg[k] for k in _ZOO_FIELDS if k in cfg}
        extras = {k: v for k, v in cfg.items() if k not in _ZOO_FIELDS and k not in timm_fields}
        plain = {k: v for k, v in cfg.items() if k not in _ZOO_FIELDS and k not in extras}
        _EXTRAS[name.rstrip("*")] = extras
        if ours.get("hf_filename"):
            plain["hf_hub_filename"] = ours["hf_filename"]
        if ours.get("package_file"):
            plain["file"] = str(_package_path(ours["package_file"]))
        if any(plain.get(k) for k in ("url", "hf_hub_id", "file")):
            if "." not in name:
                raise ValueError(f"pretrained entry {name!r} needs a tag (arch.tag)")
            if name in _WEIGHTS:
                raise ValueError(f"pretrained entry {name!r} is registered twice")
            _WEIGHTS[name] = Weights(
                name=name,
                url=plain.get("url"),
                hf_hub_id=plain.get("hf_hub_id"),
                hf_filename=ours.get("hf_filename"),
                package_file=ours.get("package_file"),
                file=None if ours.get("package_file") else plain.get("file"),
                sha256=ours.get("sha256"),
                license=plain.get("license"),
                converter=ours.get("converter"),
                cfg={**plain, **extras},
            )
        timm_cfgs[name] = plain
    return timm_default_cfgs(timm_cfgs)


def cfg_extras(name: str) -> dict[str, Any]:
    """The zoo-only cfg fields of `arch.tag` (or untagged `arch`); empty if none were given."""
    return dict(_EXTRAS.get(name, {}))


def has_weights(name: str) -> bool:
    return name in _WEIGHTS


def get_weights(name: str) -> Weights:
    if name not in _WEIGHTS:
        arch = name.partition(".")[0]
        known = sorted(n for n in _WEIGHTS if n.partition(".")[0] == arch)
        hint = f"; registered: {', '.join(known)}" if known else f"; {arch} has no registered weights"
        raise WeightsError(f"no pretrained weights named {name!r}{hint}")
    return _WEIGHTS[name]


def weights_for_arch(arch: str) -> list[Weights]:
    return [w for n, w in _WEIGHTS.items() if n.partition(".")[0] == arch]


def _package_path(relative: str) -> Path:
    return Path(str(resources.files("zoo").joinpath(relative)))


def cache_dir() -> Path:
    """`ZOO_CACHE`, else `<torch hub dir>/attnzoo`."""
    root = os.environ.get("ZOO_CACHE") or os.path.join(torch.hub.get_dir(), "attnzoo")
    return Path(root)


def cache_path(name: str) -> Path:
    """Where the file of the registered weights `name` (arch.tag) is cached: one folder per entry,
    since hub files often share a name (e.g. `pytorch_model.bin`)."""
    weights = get_weights(name)
    return cache_dir() / weights.name / weights.filename


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "ZOO_OFFLINE"))


def fetch(weights: Weights, progress: bool = True) -> Path:
    """The local path of `weights`' file, downloading it into the cache if needed."""
    if weights.package_file:
        path = _package_path(weights.package_file)
        if not path.is_file():
            raise WeightsError(f"{weights.name}: the embedded file {path} is missing from the installed package")
        return path
    if weights.file:
        path = Path(weights.file)
        if not path.is_file():
            raise WeightsError(f"{weights.name}: local file {path} does not exist")
        return path
    target = cache_path(weights.name)
    if target.is_file():
        return target
    where = weights.url or f"https://huggingface.co/{weights.hf_hub_id}/resolve/main/{weights.hf_filename}"
    place = f"download {where} and place it at {target} (ZOO_CACHE moves the cache root)"
    if _offline():
        raise WeightsError(f"{weights.name}: offline mode and {target} is not cached; {place}")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        if weights.hf_hub_id:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(weights.hf_hub_id, weights.hf_filename, local_dir=target.parent))
        partial = target.with_suffix(target.suffix + ".partial")
        torch.hub.download_url_to_file(weights.url, str(partial), progress=progress)
        partial.replace(target)
        return target
    except Exception as e:  # network failures come in many types; all mean the same to the user
        raise WeightsError(f"{weights.name}: could not download ({type(e).__name__}: {e}); {place}") from e


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str | None) -> None:
    if expected is None:
        return
    actual = sha256_of(path)
    if actual != expected.lower():
        raise WeightsError(
            f"{path}: sha256 mismatch (expected {expected}, got {actual}); the file is corrupt or not the "
            "registered checkpoint: delete it and download it again"
        )


_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "ema", "state_dict", "model", "module")


def read_checkpoint(path: str | os.PathLike) -> StateDict:
    """Read a `.safetensors`, `.pth`/`.pt`/`.bin` or Lightning `.ckpt` into a flat state dict.

    Unwraps the usual containers (`state_dict`, `model`, `model_ema`, ...) and strips
    `module.`, `_orig_mod.` and (for Lightning checkpoints) `model.` prefixes.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such checkpoint file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = _torch_load(path)
    except WeightsError:
        raise
    except Exception as e:
        raise WeightsError(f"{path}: not a readable checkpoint, truncated or corrupt ({type(e).__name__}: {e})") from e
    lightning = isinstance(state, dict) and "pytorch-lightning_version" in state
    for _ in range(2):  # e.g. {"model": {"state_dict": ...}} is not seen, but {"state_dict": {...}} is
        if isinstance(state, dict):
            for key in _WRAPPER_KEYS:
                if isinstance(state.get(key), dict) and state[key] and not isinstance(state.get(key), torch.Tensor):
                    if all(isinstance(v, torch.Tensor) for v in state[key].values()):
                        state = state[key]
                        break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: holds no state dict of tensors (found {type(state).__name__})")
    prefixes = ("module.", "_orig_mod.") + (("model.",) if lightning else ())
    for prefix in prefixes:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # official checkpoints often pickle their argparse Namespace next to the weights
        if "weights_only" not in str(e) and "Unsupported global" not in str(e):
            raise
        import argparse

        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception:
                pass
        try:
            # the Swin-codebase checkpoints (Agent / FLatten / InLine ...) pickle their yacs config
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_config_pickle)
        except Exception:
            raise WeightsError(
                    f"{path}: contains pickled objects other than tensors; it was not loaded "
                    "(convert it to safetensors, or load a trusted file with torch.load and pass the state dict)"
                ) from e


class _ConfigNode(dict):
    """Stand-in for a pickled yacs `CfgNode` (a dict subclass); only its items are kept."""

    def __setstate__(self, state) -> None:
        pass


class _ConfigUnpickler(pickle.Unpickler):
    """An allow-list unpickler: tensors and storages, plain containers, argparse / yacs configs."""

    _ALLOWED = {("collections", "OrderedDict"), ("argparse", "Namespace"), ("torch", "Size"), ("torch", "device")}

    def find_class(self, module: str, name: str):
        if (module, name) == ("yacs.config", "CfgNode"):
            return _ConfigNode
        torch_ok = module == "torch" and (name.endswith("Storage") or isinstance(getattr(torch, name, None), torch.dtype))
        rebuild_ok = module in ("torch._utils", "torch._tensor") and name.startswith("_rebuild")
        if (module, name) in self._ALLOWED or torch_ok or rebuild_ok:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


_config_pickle = types.SimpleNamespace(Unpickler=_ConfigUnpickler, load=pickle.load, __name__="zoo_config_pickle")


def check_state_dict(model: torch.nn.Module, state: StateDict, source: str, ignore: tuple[str, ...] = ()) -> None:
    """Raise `WeightsError` listing every missing, unexpected or mis-shaped key."""
    own = model.state_dict()
    expected = {k for k in own if not k.startswith(ignore)} if ignore else set(own)
    given = {k for k in state if not k.startswith(ignore)} if ignore else set(state)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(expected & given)
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        lines = [f"{source} does not match {type(model).__name__}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shapes)):
            if items:
                shown = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
                lines.append(f"  {title}: {shown}")
        raise WeightsError("\n".join(lines))


def _convert(model, state, converters: list[Converter], source: str) -> StateDict:
    """Our layout as is; otherwise the first registered converter whose output matches."""
    own = model.state_dict()
    if set(state) == set(own):
        return state
    first_error = None
    for converter in converters:
        try:
            converted = converter(dict(state), model)
            check_state_dict(model, converted, source)
            return converted
        except Exception as e:  # a converter for another layout may fail outright: try the next
            first_error = first_error or e
    return state


def load_state_dict(model: torch.nn.Module, state: StateDict, source: str, ignore: tuple[str, ...] = ()) -> None:
    """Check then load strictly (keys under `ignore` keep the model's own values)."""
    check_state_dict(model, state, source, ignore)
    if ignore:
        own = model.state_dict()
        state = {**{k: v for k, v in own.items() if k.startswith(ignore)}, **{k: v for k, v in state.items() if not k.startswith(ignore)}}
    with torch.no_grad():
        model.load_state_dict(state, strict=True)


def _classifier_keys(model) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier")
    if not classifier:
        return ()
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return tuple(f"{n}." for n in names)


def _head_mismatch(model, state: StateDict, num_classes: int | None) -> tuple[str, ...]:
    """Keys to keep from the model when its class count differs from the checkpoint's (as timm does)."""
    heads = _classifier_keys(model)
    if not heads or num_classes is None or getattr(model, "num_classes", num_classes) == num_classes:
        return ()
    return heads


def load_pretrained(model: torch.nn.Module, name: str, progress: bool = True) -> None:
    """Fetch, verify, convert and load the registered weights `name` (arch.tag) into `model`."""
    weights = get_weights(name)
    path = fetch(weights, progress=progress)
    verify_sha256(path, weights.sha256)
    state = read_checkpoint(path)
    if weights.converter is not None:
        state = weights.converter(state, model)
    ignore = _head_mismatch(model, state, weights.cfg.get("num_classes", 1000 if _classifier_keys(model) else None))
    load_state_dict(model, {k: v for k, v in state.items() if not k.startswith(ignore)} if ignore else state, f"{path} ({name})", ignore)


def load_checkpoint(model: torch.nn.Module, path: str | os.PathLike, converter: Converter | None = None, arch: str | None = None) -> None:
    """Load a local checkpoint in our layout or an official one (through the arch's converters)."""
    state = read_checkpoint(path)
    converters = [converter] if converter else []
    if getattr(model, "checkpoint_converter", None) is not None:  # the model's own (e.g. dense -> sparse attention)
        converters.append(model.checkpoint_converter)
    arch = arch or (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if arch:
        converters += [w.converter for w in weights_for_arch(arch) if w.converter is not None and w.converter not in converters]
    state = _convert(model, state, converters, str(path))
    load_state_dict(model, state, str(path))


def _model_args(model) -> dict:
    """The factory arguments that JSON can hold (numbers, strings, lists and dicts of them)."""
    args = {**(getattr(model, "_model_args", None) or {}), **(getattr(model, "zoo_model_args", None) or {})}
    return _jsonable(args)


def export(model: torch.nn.Module, path: str | os.PathLike, architecture: str | None = None) -> Path:
    """Write the model's weights as safetensors plus `<path>.json` with its architecture and args.

    `zoo.create_model(architecture, checkpoint_path=path)` rebuilds it bit-exactly.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    architecture = architecture or cfg.get("architecture") or getattr(model, "zoo_architecture", None)
    if not architecture:
        raise ValueError("export needs architecture=: the model does not record which zoo model it is")
    save_file(state, str(path), metadata={"architecture": architecture, "format": "pt"})
    meta = {"architecture": architecture, "model_args": _model_args(model), "pretrained_cfg": _jsonable(cfg)}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return path


def read_export_config(path: str | os.PathLike) -> dict | None:
    """The JSON `export` wrote next to `path`, if any."""
    sidecar = Path(path).with_suffix(".json")
    return json.loads(sidecar.read_text()) if sidecar.is_file() else None


def _jsonable(cfg: dict) -> dict:
    out = {}
    for k, v in cfg.items():
        try:
            json.dumps(v)
            out[k] = v
        except TypeError:
            continue
    return out
