"""Summarise the prototype bank and L_pro of finished BRPG demo runs: python experiments/scripts/bank_stats.py RUN_DIR... > out.json"""
import json, sys
import torch

out = []
for d in sys.argv[1:]:
    ck = torch.load(f"{d}/last.pt", map_location="cpu", weights_only=True)
    b = ck["bank"]
    recs = [json.loads(l) for l in open(f"{d}/metrics.jsonl")]
    tr = [r for r in recs if r["type"] == "train" and r["phase"] == "prototypes"]
    cos = torch.nn.functional.cosine_similarity(b["protos"], b["init_protos"], dim=-1)[b["valid"]]
    out.append({"run": d, "method": ck["method"], "seed": ck["config"]["trainer"]["seed"],
                "overrides": {k: ck["config"]["method"][k] for k in ("proto_loss_weight", "high_threshold", "pseudo_threshold", "threshold_ramp_end")},
                "prototypes_per_class": b["valid"].sum(1).tolist(), "apo_added": int(b["added"].sum()),
                "usage_last_step_per_class": b["usage"].sum(1).tolist(),
                "cos_to_init_min": float(cos.min()), "cos_to_init_mean": float(cos.mean()),
                "loss_proto_first": tr[0]["loss_proto"], "loss_proto_last": tr[-1]["loss_proto"],
                "threshold_first": tr[0]["threshold"], "threshold_last": tr[-1]["threshold"],
                "val_miou": [(r["iteration"], r["miou"]) for r in recs if r["type"] == "val"]})
print(json.dumps(out, indent=1))
