"""The views' figures of one finished run, from its run directory (the view log), with the facts they show as JSON.

Used for `experiments/brain_views/` (the brain study's BRPG run, seed 0, started from a shell as a user would):

    brpg demo --out runs/views_brain --seeds 0 --methods brpg --set trainer.progress=false
    python scripts/brain_views.py runs/views_brain/seed0/brpg experiments/brain_views

Writes `curves.png`, `features.png`, `confidence.png`, `drift.png`, `margins.png` (the dashboard's own figures, at its
2x resolution), `patch.png` (the image patch of the labeled low-confidence pixel with the smallest margin to another
class's prototype) and `facts.json` (what the prose about the figures quotes).
"""
from __future__ import annotations
import argparse, json, sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing
from brpg.views import open_run, prototype_margins  # noqa: E402


def facts(dash, mg: dict) -> dict:
    "Counts, margins (`mg`: `prototype_margins` of the sample) and prototype kinds of the last feature sample."
    fv, thr = dash.features, dash.features.threshold.value
    y, cf, lab, bank = fv.labels, fv.conf, fv.is_labeled, fv.bank
    names = list(dash.class_names or [f"class {c}" for c in range(fv.num_classes)])
    kinds = {"high": lab & (cf >= thr), "low": lab & (cf < thr), "pseudo": ~lab}

    def over(stat):
        "`stat` of the valid margins of each kind of pixel (None for a kind without any)."
        out = {}
        for k, m in kinds.items():
            v = m & mg["valid"]
            out[k] = round(float(stat(mg["margin"][v], mg["own_low"][v])), 4) if v.any() else None
        return out
    per = {names[c]: {**{k: int((m & (y == c)).sum()) for k, m in kinds.items()},
                      "prototypes_high": int((bank.valid[c] & bank.is_high[c]).sum()),
                      "prototypes_low": int((bank.valid[c] & ~bank.is_high[c]).sum()), "apo_added": int(bank.added[c].sum())}
           for c in range(len(names))}
    return {"iteration": fv.sample_meta["iteration"], "phase": fv.sample_meta["phase"], "threshold": thr,
            "rows": int(len(y)), "shown": int(len(fv._idx)), "per_class": per,
            "median_margin": over(lambda mr, low: np.median(mr)),
            "served_by_low_prototype": over(lambda mr, low: low.mean()),
            "negative_margin": over(lambda mr, low: (mr < 0).mean())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir"); p.add_argument("out")
    a = p.parse_args(argv)
    try: dash = open_run(a.run_dir)
    except (FileNotFoundError, KeyError, ValueError) as e: raise SystemExit(f"brain_views: {e}") from None
    if dash.features.feats is None or dash.features.bank is None:
        raise SystemExit(f"brain_views: {a.run_dir}: the view log holds no feature sample with prototypes (a BRPG run past its initialisation)")
    dash.redraw(all_views=True)
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    paths = dash.export(out)
    fv = dash.features
    mg = prototype_margins(fv.feats, fv.labels, fv.bank)
    cand = np.flatnonzero(fv.is_labeled & (fv.conf < fv.threshold.value) & mg["valid"] & (fv.labels > 0))
    if not len(cand): cand = np.flatnonzero(mg["valid"])
    row = int(cand[np.argmin(mg["margin"][cand])])
    fv.inspect(row); paths.append(fv.patch.export(out / "patch.png"))
    f = {**facts(dash, mg), "patch_row": row, "patch_where": [int(v) for v in fv.patches["where"][row]],
         "patch_grid": [int(v) for v in fv.patches["images"].shape[1:3]], "patch_margin": round(float(mg["margin"][row]), 4), "patch_conf": round(float(fv.conf[row]), 4),
         "patch_class": dash.class_names[int(fv.labels[row])] if dash.class_names else int(fv.labels[row])}
    (out / "facts.json").write_text(json.dumps(f, indent=1) + "\n")
    print("\n".join(str(x) for x in paths + [out / "facts.json"]))


if __name__ == "__main__":
    main()
