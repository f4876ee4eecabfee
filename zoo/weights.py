"""Pretrained-weight registry: where each checkpoint lives, how to check it, how to convert it.

Every pretrained `arch.tag` names one source (URL, HF hub repo + filename, or a local file
shipped in the package), its licence, its sha256 (every shipped file has one; a hub/URL file
never downloaded here has None, "unknown offline": its hash is recorded on first use and checked
after) and a converter from the official layout to ours. Loading downloads into the cache
(`ZOO_CACHE`, else `<torch hub dir>/attnzoo`), verifies, reads tensors only (never pickled code:
`load_tensors_only`), converts, and checks every key and shape *before* touching the model, so a
bad file leaves the model exactly as it was. Files are written atomically (`atomic_path`).

`load_weights(model, source)` is the one way weights enter a model: a registered `arch.tag`, a
checkpoint file of any format, or a state dict; everything else (`create_model(pretrained=,
checkpoint_path=)`, the CLI, Lightning) calls it.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pickletools
import tempfile
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

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
    sha256: str | None = None  # None: unknown offline (a hub/URL file never downloaded here); see `sha256_status`
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

    @property
    def sha256_status(self) -> str:
        """The registered sha256, or what is checked instead when it is unknown offline."""
        if self.sha256:
            return self.sha256
        return "unknown offline: recorded beside the cached file on first use and checked on every later load"

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


def available_weights(arch: str) -> str:
    """The registered `arch.tag` names of `arch` (the `zoo list --pretrained` data), for error messages."""
    known = sorted(n for n in _WEIGHTS if n.partition(".")[0] == arch)
    return (f"registered: {', '.join(known)}" if known else
            f"{arch} has no registered weights (`zoo list --pretrained` shows the models that have some)")


def get_weights(name: str) -> Weights:
    if name not in _WEIGHTS:
        raise WeightsError(f"no pretrained weights named {name!r}; {available_weights(name.partition('.')[0])}; "
                           "or load a file with checkpoint_path=PATH")
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


def offline_mode() -> bool:
    """True when HF_HUB_OFFLINE or ZOO_OFFLINE is set: nothing is downloaded, a missing file says what to fetch."""
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
    if offline_mode():
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


def fetch_verified(weights: Weights, progress: bool = True) -> Path:
    """`fetch`, then check the file: against the registered sha256, or, for a cached hub/URL file
    whose hash is unknown offline, against the one recorded beside it (`<file>.sha256`) on first use,
    so a file replaced or corrupted later is refused. Loading it stays tensors-only either way."""
    path = fetch(weights, progress=progress)
    if weights.sha256 or weights.package_file or weights.file:
        verify_sha256(path, weights.sha256)
        return path
    record = path.with_name(path.name + ".sha256")
    if record.is_file():
        verify_sha256(path, record.read_text().strip())
    else:
        with atomic_path(record) as tmp:
            tmp.write_text(sha256_of(path) + "\n")
    return path


_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "ema", "state_dict", "model", "module")


def read_checkpoint(path: str | os.PathLike) -> StateDict:
    """Read a `.safetensors`, `.pth`/`.pt`/`.bin` or Lightning `.ckpt` into a flat state dict.

    Unwraps the usual containers (`state_dict`, `model`, `model_ema`, ...) and strips
    `module.`, `_orig_mod.` and (for Lightning checkpoints) `model.` prefixes.
    """
    return _state_dict_of(load_tensors_only(path), Path(path))


def _state_dict_of(state: Any, path: Path) -> StateDict:
    """The flat state dict inside what `load_tensors_only` read from `path` (see `read_checkpoint`)."""
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


class _ConfigNode:
    """Stand-in for a pickled yacs `CfgNode` (a dict subclass): it unpickles as an OrderedDict of
    its items, a container torch's weights-only unpickler fills (it refuses dict subclasses)."""

    def __new__(cls, *args: Any) -> Any:
        return OrderedDict()


# What torch's weights-only unpickler accepts besides tensors, numbers, strings and plain containers:
# the argparse Namespace that official training scripts pickle next to the weights, and the yacs
# config of the Swin-codebase ones (Agent / FLatten / InLine), read as a plain dict.
PICKLE_ALLOW_LIST = [argparse.Namespace, (_ConfigNode, "yacs.config.CfgNode")]
_SAFETENSORS_SUFFIX = ".safetensors"
# globals torch's weights-only unpickler accepts that are neither torch's nor containers
_PLAIN_BUILTINS = frozenset({"builtins.set", "builtins.frozenset", "builtins.bytearray", "builtins.complex", "_codecs.encode"})


def load_tensors_only(path: str | os.PathLike, mmap: bool = False) -> Any:
    """Read any checkpoint file as tensors and plain containers, never running code it pickles.

    safetensors is read as such; every `torch.save` format (zip and legacy) goes through
    `torch.load(weights_only=True)`, whose unpickler builds only tensors, storages, numbers,
    strings and containers, plus `PICKLE_ALLOW_LIST`. Anything else (a plain pickle, a pickled
    class or function) is refused with one line naming the file and, when found, the global.
    `mmap` maps zip checkpoints instead of reading them (a cheap validity check).
    """
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"{path}: is a directory, not a checkpoint file")
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        raise WeightsError(f"{path}: is empty, not a checkpoint (an interrupted download or save?): delete it")
    if path.suffix == _SAFETENSORS_SUFFIX or _looks_like_safetensors(head):
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise WeightsError(f"{path}: not a readable safetensors file, truncated or corrupt ({_first_line(e)})") from None
    try:
        with torch.serialization.safe_globals(PICKLE_ALLOW_LIST), warnings.catch_warnings():
            # a plain pickle or a TorchScript archive: weights_only refuses both, and so do we below
            warnings.filterwarnings("ignore", message="Detected pickle protocol|.*looks like a TorchScript archive")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as e:
        refused = _refused_global(path)
        if refused:
            raise WeightsError(f"{path}: refused: it holds pickled objects other than tensors ({refused}); only weights "
                               "load, never pickled code: re-save the state dict as safetensors") from None
        raise WeightsError(f"{path}: not a readable torch checkpoint, truncated or corrupt ({_first_line(e)})") from None


def _looks_like_safetensors(head: bytes) -> bool:
    """safetensors files open with an 8-byte header length and the header's JSON `{`."""
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 1 << 30


def _first_line(e: BaseException) -> str:
    """The exception's first non-empty line that says something (torch's weights-only errors open with advice)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    specific = [line for line in lines if not line.startswith(("Weights only load failed", "Please file an issue", "Check the documentation"))]
    return f"{type(e).__name__}: {(specific or lines or [''])[0]}"


def _refused_global(path: Path) -> str | None:
    """The first global the file's pickle names outside torch's and our allow-list, read from its
    opcodes without running them; None if it names none (then the file is not a pickle at all)."""
    allowed = {f"{g.__module__}.{g.__qualname__}" if not isinstance(g, tuple) else g[1] for g in PICKLE_ALLOW_LIST}
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [n for data in archive.namelist() if data.endswith("data.pkl")
                         for n in _pickled_globals(io.BytesIO(archive.read(data)))]
        else:
            with open(path, "rb") as f:
                names = list(_pickled_globals(f))
    except (OSError, zipfile.BadZipFile):
        return None
    for name in names:
        if name not in allowed and name.partition(".")[0] not in ("torch", "collections") and name not in _PLAIN_BUILTINS:
            return name
    return None


def _pickled_globals(stream: BinaryIO) -> Iterator[str]:
    """The `module.name` of every GLOBAL / STACK_GLOBAL in the pickles `stream` starts with
    (legacy torch files are several pickles in a row)."""
    for _ in range(5):  # legacy torch.save: magic number, protocol, system info, the object, storage keys
        strings: list[str | None] = []
        memo: dict[int, str | None] = {}
        try:
            for op, arg, _ in pickletools.genops(stream):
                if op.name == "GLOBAL":
                    yield str(arg).replace(" ", ".")
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2 and None not in strings[-2:]:
                    yield f"{strings[-2]}.{strings[-1]}"
                elif op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                    memo[len(memo) if op.name == "MEMOIZE" else int(arg)] = strings[-1] if strings else None
                elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                    strings.append(memo.get(int(arg)))
                else:
                    strings.append(arg if isinstance(arg, str) else None)
        except Exception:  # not (or no longer) a pickle: random bytes, or the storages after a legacy file's pickles
            return


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
        parts = []
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shapes)):
            if items:
                shown = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
                parts.append(f"{title}: {shown}")
        raise WeightsError(f"{source} does not match {type(model).__name__}: {'; '.join(parts)}")


def _load_checked(model: torch.nn.Module, state: StateDict, source: str, ignore: tuple[str, ...] = ()) -> None:
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


Source = str | os.PathLike | Weights | Mapping[str, torch.Tensor]
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".tar")


@dataclass(frozen=True)
class Loaded:
    """What `load_weights` loaded: `source` names it for messages (`arch.tag (where)` or the path); `cfg` is the
    weights' own cfg (the registered entry's, or the `pretrained_cfg` an export or a Lightning checkpoint
    recorded, else empty): settings they were trained with, such as a flow model's `flow_shift`."""

    source: str
    cfg: dict[str, Any]


def load_weights(model: torch.nn.Module, source: Source, *, converter: Converter | None = None,
                 arch: str | None = None, progress: bool = True) -> Loaded:
    """Load weights into `model`: fetch, verify, read (tensors only), convert, check, then load.

    `source` is one of:
      - a registered `arch.tag` or its `Weights`: fetched into the cache (`fetch_verified`), checked
        against its sha256 and converted by its registered converter; a classifier whose class count
        differs from the weights' keeps its own head (as timm does);
      - a checkpoint file (a `Path`, or a `str` with a path separator, a checkpoint suffix or that exists):
        safetensors, `.pth`/`.pt`/`.bin`, a Lightning `.ckpt` or a `zoo.weights.export` file, read as is
        in our layout, else through `converter` or the registered converters of `arch` (default: the
        model's `pretrained_cfg['architecture']`), whichever output fits the model;
      - a state dict in memory, treated as a file's.
    The model's own `checkpoint_converter` (if it has one) always completes the state dict, e.g. a DiT
    fills the keys only its attention backend has, so dense weights load into an SLA model. Every key
    and shape is checked before the model is touched: a bad source raises a one-line `WeightsError`
    and leaves the model as it was.
    """
    entry = _registered(source)
    if entry is not None:
        path = fetch_verified(entry, progress=progress)
        label = f"{path} ({entry.name})"
        state = read_checkpoint(path)
        if entry.converter is not None:
            state = _run_converter(entry.converter, state, model, label)
        state = _complete(model, state, label)
        ignore = _head_mismatch(model, state, entry.cfg.get("num_classes", 1000 if _classifier_keys(model) else None))
        _load_checked(model, {k: v for k, v in state.items() if not k.startswith(ignore)} if ignore else state, label, ignore)
        return Loaded(f"{entry.name} ({entry.describe()})", dict(entry.cfg))
    if isinstance(source, Mapping):
        label, state, cfg = "the given state dict", dict(source), {}
    else:
        path = Path(source)
        label, raw = str(path), load_tensors_only(path)
        state = _state_dict_of(raw, path)
        recorded = read_export_config(path) or (_lightning_record(raw) if path.suffix == ".ckpt" else None) or {}
        cfg = dict(recorded.get("pretrained_cfg") or {})
    converters = [converter] if converter is not None else []
    arch = arch or (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if arch:
        converters += [w.converter for w in weights_for_arch(arch) if w.converter is not None and w.converter not in converters]
    _load_checked(model, _convert(model, state, converters, label), label)
    return Loaded(label, cfg)


def _registered(source: Source) -> Weights | None:
    """The registry entry `source` names; None for a file or a state dict. A `str` is a registered name
    unless it names a file (a path separator, a checkpoint suffix, or an existing file)."""
    if isinstance(source, Weights):
        return source
    if not isinstance(source, str):
        return None
    path = Path(source)
    if not has_weights(source) and (os.sep in source or "/" in source or path.suffix in CHECKPOINT_SUFFIXES or path.exists()):
        return None
    return get_weights(source)


def _converter_name(converter: Converter) -> str:
    return getattr(converter, "__name__", type(converter).__name__)


def _run_converter(converter: Converter, state: StateDict, model: torch.nn.Module, source: str) -> StateDict:
    """`converter(state, model)`, its failure a one-line `WeightsError` naming the source and the converter."""
    try:
        return converter(dict(state), model)
    except Exception as e:  # converters index and reshape freely: any failure means "not this layout"
        raise WeightsError(f"{source}: converter {_converter_name(converter)} failed ({_first_line(e)})") from None


def _complete(model: torch.nn.Module, state: StateDict, source: str) -> StateDict:
    """The model's own `checkpoint_converter` applied, if it has one (e.g. DiT's `fill_backend_keys`)."""
    own = getattr(model, "checkpoint_converter", None)
    return state if own is None else _run_converter(own, state, model, source)


def _convert(model: torch.nn.Module, state: StateDict, converters: list[Converter], source: str) -> StateDict:
    """The first that fits the model of: the state as is, then each converter's output (official layouts),
    each completed by the model's own converter. None fits: one line with why each attempt failed."""
    try:
        converted = _complete(model, state, source)
        check_state_dict(model, converted, source)
        return converted
    except WeightsError as e:
        as_is = e
    failures = []
    for converter in converters:
        name = _converter_name(converter)
        try:
            converted = converter(dict(state), model)
        except Exception as e:  # a converter for another layout may fail outright: try the next
            failures.append(f"{name} failed ({_first_line(e)})")
            continue
        try:
            converted = _complete(model, converted, source)
            check_state_dict(model, converted, source)
            return converted
        except WeightsError as e:
            why = str(e).removeprefix(f"{source}: ").removeprefix(f"{source} does not match {type(model).__name__}: ")
            failures.append(f"{name}: {why if len(why) <= 300 else why[:300] + '...'}")
    if not failures:
        raise as_is
    raise WeightsError(f"{as_is}; converters tried: {' | '.join(failures)}")


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
    if path.suffix != _SAFETENSORS_SUFFIX:
        path = path.with_suffix(_SAFETENSORS_SUFFIX)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    architecture = architecture or cfg.get("architecture") or getattr(model, "zoo_architecture", None)
    if not architecture:
        raise ValueError("export needs architecture=: the model does not record which zoo model it is")
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"architecture": architecture, "format": "pt"})
    meta = {"architecture": architecture, "model_args": _model_args(model), "pretrained_cfg": _jsonable(cfg)}
    with atomic_path(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(meta, indent=2))
    return path


PARTIAL_SUFFIX = ".zoo-partial"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write the file to; on success it is fsynced and renamed over
    `path` (a rename within one filesystem is atomic), on failure removed. Readers, and a run killed
    mid-save, see the old file or the new one, never a partial one; a kill can leave only a
    `.<name>.*.zoo-partial` file (`remove_partial_files`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide checkpoints from the rest of a group
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a crash
    finally:
        os.close(fd)


def remove_partial_files(folder: str | os.PathLike) -> list[Path]:
    """Delete what `atomic_path` left in `folder` when a process was killed mid-save."""
    leftovers = sorted(Path(folder).glob(f".*{PARTIAL_SUFFIX}"))
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)
    return leftovers


def read_export_config(path: str | os.PathLike) -> dict | None:
    """The JSON `export` wrote next to `path`, if any."""
    sidecar = Path(path).with_suffix(".json")
    if not sidecar.is_file():
        return None
    try:
        return json.loads(sidecar.read_text())
    except (ValueError, OSError) as e:
        raise WeightsError(f"{sidecar}: the export's JSON is unreadable ({type(e).__name__}: {e}); "
                           "delete it to load the weights with the model's default arguments") from None


def recorded_model(path: str | os.PathLike) -> dict | None:
    """What rebuilds the network saved at `path`: the export's JSON (`read_export_config`), else a Lightning
    checkpoint's hyper-parameters as the same keys (`architecture`, `model_args`, and `pretrained_cfg` with the
    `flow_shift` a flow model trained with); None if neither is there."""
    exported = read_export_config(path)
    if exported is not None or Path(path).suffix != ".ckpt":
        return exported
    return _lightning_record(load_tensors_only(path, mmap=True))


def _lightning_record(checkpoint: Any) -> dict | None:
    """`recorded_model`'s keys from what a Lightning checkpoint holds (its hyper-parameters and `flow_shift`)."""
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or not isinstance(hparams.get("model_name"), str):
        return None
    recorded = {"architecture": hparams["model_name"].partition(".")[0], "model_args": dict(hparams.get("model_kwargs") or {})}
    if isinstance(checkpoint.get("flow_shift"), float):
        recorded["pretrained_cfg"] = {"flow_shift": checkpoint["flow_shift"]}
    return recorded


def _jsonable(cfg: dict) -> dict:
    out = {}
    for k, v in cfg.items():
        try:
            json.dumps(v)
            out[k] = v
        except TypeError:
            continue
    return out
