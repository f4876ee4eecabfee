"""`zoo list`, `zoo info`, `zoo flops`."""
from __future__ import annotations

import argparse

from . import CliError


def _fmt_count(n: int | float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def cmd_list(args: argparse.Namespace) -> int:
    import zoo

    names = zoo.list_models(args.filter or "", pretrained=args.pretrained)
    if not names:  # say so (and fail), rather than print nothing
        raise CliError(f"no model matches {args.filter or '*'!r}{' with pretrained weights' if args.pretrained else ''}: "
                       "see `zoo list` for every name")
    for name in names:
        print(name)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import zoo

    info = zoo.model_info(args.name, with_flops=not args.no_flops)
    print(f"{info['name']}  ({info['kind']}, {info['class']})")
    if info.get("paper"):
        print(f"  paper:   {info['paper']}")
    print(f"  params:  {_fmt_count(info['params'])} ({info['params']:,})")
    if "flops" in info:
        where = f" at {info['input_size']}" if "input_size" in info else ""
        print(f"  FLOPs:   {_fmt_count(info['flops'])}{where} (fvcore: 1 multiply-add = 1 FLOP, attention included)")
    if info["pretrained"]:
        print("  pretrained:")
        for name, meta in info["pretrained"].items():
            extra = f"  top-1 {meta['top1']}" if meta.get("top1") else ""
            print(f"    {name}: {meta['source']}  [{meta.get('license') or '?'}]{extra}")
            print(f"      sha256: {meta['sha256']}")
    else:
        print("  pretrained: none registered")
    return 0


def cmd_flops(args: argparse.Namespace) -> int:
    import zoo

    model = zoo.create_model(args.name)
    size = tuple(args.input_size) if args.input_size else None
    limit = {} if args.max_input_elements is None else {"max_input_elements": args.max_input_elements}
    total = zoo.flops(model, input_size=size, **limit)
    print(f"{args.name}: {_fmt_count(total)} FLOPs ({total:,}), {_fmt_count(zoo.count_params(model))} params")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ._common import number

    p = sub.add_parser("list", help="list models", description="List models; FILTER is a wildcard, e.g. 'nat_*'.")
    p.add_argument("filter", nargs="?", default="")
    p.add_argument("--pretrained", action="store_true", help="list arch.tag names that have weights")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("info", help="params, FLOPs and pretrained sources of a model",
                       description="Example: zoo info nat_tiny")
    p.add_argument("name")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (faster)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("flops", help="count FLOPs at an input size",
                       description="Example: zoo flops nat_tiny --input-size 3 384 384")
    p.add_argument("name")
    p.add_argument("--input-size", type=number(int, 1), nargs="+", help="C H W (or H W)")
    p.add_argument("--max-input-elements", type=number(int, 1),
                   help="refuse inputs with more values (the count runs a forward pass; default 3*2048*2048)")
    p.set_defaults(func=cmd_flops)
