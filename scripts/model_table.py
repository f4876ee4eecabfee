"""Params / FLOPs of every registered model, ours vs the paper, as a markdown table.

One row per pretrained `arch.tag` whose cfg carries paper numbers (`paper_params` /
`paper_flops`, in the model's file), else one row per architecture (its default input). Ours
come from building the model (params on the meta device, FLOPs with `zoo.flops` at the cfg's
input size; generators use their own example inputs). Nothing in the table is typed by hand.
Rows whose params differ from the paper by more than 0.5% or FLOPs by more than 2% are flagged.

    python scripts/model_table.py --output docs/model_table.md --cache /tmp/model_table.json
    python scripts/model_table.py 'nat_*' 'dinat_*' --kind classifier
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import time
from pathlib import Path

import torch

import zoo
from zoo import weights
from zoo._registry import get_entry

PARAMS_TOL, FLOPS_TOL = 0.005, 0.02


def rows_for(patterns: list[str], kind: str | None = None) -> list[str]:
    """Names to measure (registry order): tags with paper numbers, else the architecture itself."""
    names = []
    for arch in zoo.list_models(patterns, kind=kind):
        tagged = [f"{arch}.{t}" if t else arch for t in get_entry(arch).tags]
        with_paper = [n for n in tagged if _has_paper(weights.cfg_extras(n))]
        names += with_paper or [arch]
    return names


def _has_paper(extras: dict) -> bool:
    return extras.get("paper_params") is not None or extras.get("paper_flops") is not None


def _as_count(value: float | None, unit: float) -> tuple[float | None, bool]:
    """A paper number as a count; values given in millions / GFLOPs (< 1e4) are scaled and reported."""
    if value is None:
        return None, False
    return (value * unit, True) if value < 1e4 else (value, False)


def _delta(ours: float | None, paper: float | None) -> str:
    return f"{round(100 * (ours / paper - 1), 1) + 0.0:+.1f}%" if ours is not None and paper else "-"  # + 0.0: no "-0.0"


def measure(name: str) -> dict:
    """Params (meta device) and the cfg's paper numbers; FLOPs are added by the caller."""
    extras = weights.cfg_extras(name)
    with torch.device("meta"):
        meta = zoo.create_model(name)
    entry = get_entry(name)
    cfg = getattr(meta, "pretrained_cfg", None) or {}
    input_size = cfg.get("input_size")
    if input_size is None and hasattr(meta, "input_size"):  # generators: their latent / video size
        input_size = (getattr(meta, "in_channels", "?"), *meta.input_size)
    paper_params, p_units = _as_count(extras.get("paper_params"), 1e6)
    paper_flops, f_units = _as_count(extras.get("paper_flops"), 1e9)
    row = dict(name=name, kind=entry.kind, params=zoo.count_params(meta), input_size=list(input_size or ()),
               paper_params=paper_params, paper_flops=paper_flops, units_scaled=p_units or f_units,
               top1=extras.get("top1"), paper=entry.paper,
               official_params=extras.get("official_params"), official_flops=extras.get("official_flops"))
    return row


def flags(r: dict) -> list[str]:
    out = []
    if r["paper_params"] and abs(r["params"] / r["paper_params"] - 1) > PARAMS_TOL:
        out.append(f"params Δ>{100 * PARAMS_TOL:g}%")
    if r.get("flops") is not None and r["paper_flops"] and abs(r["flops"] / r["paper_flops"] - 1) > FLOPS_TOL:
        out.append(f"FLOPs Δ>{100 * FLOPS_TOL:g}%")
    if r["paper_params"] is None and r["paper_flops"] is None:
        out.append("no paper numbers")
    # `official_params` / `official_flops`: the official code's own count, where it differs from the paper's table
    for key, ours in (("params", r["params"]), ("flops", r.get("flops"))):
        official = r.get(f"official_{key}")
        if official is not None and ours is not None:
            out.append(f"{'params' if key == 'params' else 'FLOPs'} {'=' if ours == official else '≠'} official code's")
    if r["units_scaled"]:
        out.append("cfg gives M/G units")
    return out


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | input | params (M) | paper | Δ | GFLOPs | paper | Δ | top-1 (official ckpt) | flags |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pp, pf, flops = r["paper_params"], r["paper_flops"], r.get("flops")
        size = "x".join(str(s) for s in r["input_size"][1:]) if len(r["input_size"]) > 3 else (r["input_size"] or ["-"])[-1]
        lines.append(
            f"| `{r['name']}` | {size} | {r['params'] / 1e6:.2f} | "
            + (f"{pp / 1e6:g} | " if pp else "- | ") + f"{_delta(r['params'], pp)} | "
            + (f"{flops / 1e9:.2f} | " if flops is not None else "- | ")
            + (f"{pf / 1e9:g} | " if pf else "- | ") + f"{_delta(flops, pf)} | "
            + (f"{r['top1']} | " if r["top1"] is not None else "- | ")
            + ("**" + ", ".join(flags(r)) + "**" if flags(r) else "") + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("patterns", nargs="*", default=["*"], help="model name patterns (fnmatch)")
    parser.add_argument("--kind", choices=("classifier", "generator"), help="only this kind (default: both)")
    parser.add_argument("--output", type=Path, help="write the markdown here (default: print)")
    parser.add_argument("--no-flops", action="store_true", help="params only (fast)")
    parser.add_argument("--skip-flops", nargs="*", default=[], metavar="PATTERN",
                        help="no FLOPs for models matching these patterns (e.g. large video models on CPU)")
    parser.add_argument("--cache", type=Path, help="JSON of measured rows, reused when the param count is unchanged")
    args = parser.parse_args(argv)

    cache = json.loads(args.cache.read_text()) if args.cache and args.cache.exists() else {}
    rows = []
    for name in rows_for(args.patterns, args.kind):
        start = time.time()
        with_flops = not args.no_flops and not any(fnmatch.fnmatch(name.partition(".")[0], p) for p in args.skip_flops)
        row = measure(name)
        hit = cache.get(name)
        if with_flops and hit and hit.get("params") == row["params"] and hit.get("input_size") == row["input_size"] \
                and hit.get("flops") is not None:
            row["flops"] = hit["flops"]
        elif with_flops:
            row["flops"] = zoo.flops(zoo.create_model(name))
        rows.append(row)
        if args.cache:
            cache[name] = row
            args.cache.write_text(json.dumps(cache, indent=1))
        print(f"{name}: {time.time() - start:.0f}s {' '.join(flags(row))}", file=sys.stderr)
    papers: dict[str, list[dict]] = {}
    for r in rows:
        papers.setdefault(r["paper"] or "-", []).append(r)
    flagged = [r for r in rows if any(f.startswith(("params Δ", "FLOPs Δ")) for f in flags(r))]
    text = [
        "# Params and FLOPs: ours vs the papers",
        "",
        "Generated by `python scripts/model_table.py" + "".join(f" '{p}'" for p in args.patterns)
        + (f" --kind {args.kind}" if args.kind else "") + "".join(f" --skip-flops '{p}'" for p in args.skip_flops)
        + "`; do not edit by hand. FLOPs are fvcore's (1 multiply-add = 1 FLOP, attention included) "
        "at the pretrained cfg's input size, batch 1 (generators: their example inputs); paper numbers are the "
        f"`paper_params` / `paper_flops` fields of each cfg. Flagged: params off by more than {100 * PARAMS_TOL:g}%, "
        f"FLOPs by more than {100 * FLOPS_TOL:g}% (papers round, often to 0.1M or 1M: check against the paper's precision).",
        "",
        f"{len(rows)} rows; {len(flagged)} flagged: " + (", ".join(f"`{r['name']}`" for r in flagged) or "none") + ".",
    ]
    for paper, group in papers.items():
        text += ["", f"## {paper}", "", markdown(group)]
    out = "\n".join(text) + "\n"
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(out)
    else:
        print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
