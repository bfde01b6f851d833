"""Mean teacher on the v3 demo (seed SEED, 150 iterations) with the teacher's BatchNorm buffers copied from the
student at the hand-over (the trainer copies parameters only, as the official code). Tests whether the mean-teacher
collapse right after the hand-over comes from the teacher's stale BN statistics.
  python experiments/scripts/mt_bn_handover.py SEED OUT_JSON"""
import json, math, sys, torch
from brpg.cli import demo_configs
from brpg.trainer import Trainer

seed, out = int(sys.argv[1]), sys.argv[2]
cfg = demo_configs("demo", ["trainer.progress=false"], 150, seed, "mean_teacher", f"runs/mt_bn/seed{seed}")

class CopyBN:
    "At the sync point that ends the sup-only phase, copy the student's BN running stats into the teacher."
    def __init__(self): self.curve, self.copied = [], False
    def on_step_end(self, tr, logs):
        if tr.iteration == tr.teacher_start and not self.copied:
            with torch.no_grad():
                for bt, bs in zip(tr.teacher.buffers(), tr.student.buffers()): bt.copy_(bs)
            self.copied = True
    def on_validation_end(self, tr, m):
        self.curve.append((tr.iteration, float(m["miou"]), float(m["boundary_iou"])))

cb = CopyBN()
tr = Trainer(cfg, callbacks=[cb], out_dir=f"runs/mt_bn/seed{seed}", overwrite=True)
tr.fit()
assert cb.copied
best = max(cb.curve, key=lambda c: c[1])
json.dump({"method": "mean_teacher + BN buffers copied at hand-over", "seed": seed, "iterations": tr.iteration,
           "best_miou": best[1], "best_iteration": best[0], "last_miou": cb.curve[-1][1], "last_boundary_iou": cb.curve[-1][2],
           "curve": cb.curve}, open(out, "w"), indent=1)
print(json.dumps({"best": best, "last": cb.curve[-1]}))
