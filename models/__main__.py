"""`python -m models [--json]`: every variant's parameters and GMACs beside the paper's figures."""
from __future__ import annotations

import argparse
import json

from . import count_gmacs, count_params, create_model, list_models, model_info


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    args = parser.parse_args()
    rows = []
    for name in list_models():
        info = model_info(name)
        model = create_model(name)
        rows.append(dict(name=name, params=count_params(model), gmacs=round(count_gmacs(model, info.img_size), 4),
                         img_size=info.img_size, paper_params_m=info.paper.get("params_m"),
                         paper_gmacs=info.paper.get("gmacs"), paper_top1=info.paper.get("top1")))
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    dash = "–"
    print(f"{'model':<16}{'input':>6}{'params':>14}{'GMACs':>9}   {'paper: params':>13}{'GMACs':>7}{'top-1':>8}")
    for r in rows:
        paper = [f"{r['paper_params_m']} M" if r["paper_params_m"] else dash,
                 f"{r['paper_gmacs']}" if r["paper_gmacs"] else dash,
                 f"{r['paper_top1']} %" if r["paper_top1"] else dash]
        print(f"{r['name']:<16}{r['img_size']:>6}{r['params']:>14,}{r['gmacs']:>9.3f}   "
              f"{paper[0]:>13}{paper[1]:>7}{paper[2]:>8}")


if __name__ == "__main__":
    main()
