"""Cost of BRPG's prototype machinery (docs/method.md §8) against one DeepLabV3+-ResNet-101 forward+backward.

Measures, at VOC scale (C=21, 86 prototypes) and COCO scale (C=81, 332 prototypes), with the official batch
(4 labeled + 4 unlabeled images per process, 513 crop -> 129x129 stride-4 map, 256-d rep):

* one prototype step: labeled 33x33 grid (`labeled_grid`) + <= B*1000 confident unlabeled pixels
  (`unlabeled_pick`) + L_pro forward and backward into the rep map + prototype EMA (`ema_update`);
* the one-off initialisation: APO + one `batched_kmeans` call over 2C queues of Q x 256 (k = 2/3);
* one student forward+backward of `brpg.models.create_segmenter` (DeepLabV3+, timm resnet101, output
  stride 8, random init) on the same batch, with upsampled CE on `pred` and a term on `rep`;

and prints the median time of each and the ratio prototype step / model step. Nothing about time is
asserted. The rep map is a leaf tensor standing in for the student's output, so the prototype step's
backward stops there (the model's share of the L_pro backward is inside the model step's backward).

Command lines (from the repository root, venv active):

    # CPU (the numbers reported for this repository: 1 thread on a shared 2-core machine);
    # the R101 step runs at a reduced crop (a 513 crop takes many minutes on one core)
    OMP_NUM_THREADS=1 python benchmarks/prototype_step.py --device cpu --scale both --repeats 5 \
        --init-repeats 1 --model-crop 129 --model-repeats 1 --model-warmup 0
    # GPU, official sizes
    python benchmarks/prototype_step.py --device cuda --scale both --repeats 20
    # quick smoke run
    python benchmarks/prototype_step.py --device cpu --scale voc --repeats 2 --skip-model --queue-len 2000

Measured 2026-11-25 16:35 UTC with the CPU command above on an otherwise idle 2-core machine (torch 2.14.1,
1 thread; no GPU was available), after the single-gather change to the sampling ops:

    VOC  (86 prototypes):  prototype step 347 ms (sampling fwd 52, L_pro fwd 14, EMA 19, backward 261);
                           init (42 queues x 30000x256) 7.3 s; R101 step at crop 129: 12.5 s -> ratio 2.78%
                           (0.18% with the model time scaled to 513 by pixel count)
    COCO (332 prototypes): prototype step 386 ms (sampling fwd 54, L_pro fwd 57, EMA 59, backward 216);
                           init (162 queues x 30000x256) 24.7 s; R101 step at crop 129: 11.4 s -> ratio 3.38%
                           (0.21% scaled to 513)
    (An earlier run on the loaded machine, before the single-gather change: VOC step 1.36 s, COCO 1.58 s.)

On CPU the backward is dominated by the zero-filled full-size gradient buffers that the sampling ops'
index/slice backward allocates for the [8, 256, 129, 129] rep map (memory bound; cheap on a GPU).

`--crop` sets the crop of the prototype step (513 = official); `--model-crop` the crop of the R101 step
(default: same as --crop). When they differ the ratio is also reported with the model time extrapolated to
--crop by pixel count (`ratio_extrapolated`), and the script says so.
"""
from __future__ import annotations
import argparse, statistics, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing
import torch
import torch.nn.functional as F

from brpg.config import MethodConfig, ModelConfig
from brpg.prototypes import PrototypeBank
from brpg.losses import prototype_loss
from brpg.sampling import labeled_grid, unlabeled_pick

SCALES = {"voc": 21, "coco": 81}


def _sync(dev):
    if dev.type == "cuda": torch.cuda.synchronize(dev)


def _median_time(fn, repeats, dev, warmup=1):
    for _ in range(warmup): fn()
    _sync(dev)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); _sync(dev); ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


def _bank(C, D, cfg, dev, g):
    "A bank with the official layout: 2+2 per class, +1 high and +1 low for round(0.05C) classes."
    bank = PrototypeBank.from_config(C, D, cfg).to(dev)
    n_add = max(1, round(cfg.add_proportion * C))
    valid = torch.zeros(C, bank.num_slots, dtype=torch.bool)
    valid[:, :cfg.high_prototype_num] = True
    valid[:, bank.max_high:bank.max_high + cfg.low_prototype_num] = True
    valid[torch.randperm(C, generator=g)[:n_add], cfg.high_prototype_num] = True
    valid[torch.randperm(C, generator=g)[:n_add], bank.max_high + cfg.low_prototype_num] = True
    protos = torch.randn(C, bank.num_slots, D, generator=g)
    bank.set_prototypes(protos.to(dev), valid.to(dev))
    return bank


def bench_proto_step(C, args, dev):
    cfg = MethodConfig()
    g = torch.Generator().manual_seed(0)
    B, D, H = args.batch, args.dim, args.crop
    h = (H - 1) // 4 + 1
    bank = _bank(C, D, cfg, dev, g)
    rep = torch.randn(2 * B, D, h, h, generator=g).to(dev).requires_grad_()
    gt = torch.randint(0, C, (B, H, H), generator=g); gt[:, :20] = 255
    conf = torch.rand(B, H, H, generator=g) * 0.4 + 0.6                     # ~60% of pixels >= 0.8
    pseudo = torch.randint(0, C, (B, H, H), generator=g)
    gt, conf, pseudo = gt.to(dev), conf.to(dev), pseudo.to(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    out = {}

    def step():
        rep.grad = None
        fl, yl = labeled_grid(rep[:B], gt, cfg.grid_num)
        fu, yu = unlabeled_pick(rep[B:], conf, pseudo, cfg.pseudo_threshold, B * cfg.unsup_sample_num, generator=gen)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.amp):
            loss, stats = prototype_loss(bank, fl, yl, fu, yu, cfg.temperature)
        bank.ema_update(torch.cat([fl, fu]), torch.cat([yl, yu]), decay=cfg.prototype_ema_decay, sync=False,
                        fault_weight=cfg.fault_weight)
        loss.backward()
        out.update(n_l=fl.shape[0], n_u=fu.shape[0], loss=loss)

    med, ts = _median_time(step, args.repeats, dev)
    # breakdown (forward pieces timed alone; backward = full step - the pieces)
    parts = {}
    with torch.no_grad():
        parts["sampling fwd (grid + pick)"] = _median_time(lambda: (labeled_grid(rep[:B], gt, cfg.grid_num), unlabeled_pick(
            rep[B:], conf, pseudo, cfg.pseudo_threshold, B * cfg.unsup_sample_num, generator=gen)), args.repeats, dev)[0]
        fl, yl = labeled_grid(rep[:B], gt, cfg.grid_num)
        fu, yu = unlabeled_pick(rep[B:], conf, pseudo, cfg.pseudo_threshold, B * cfg.unsup_sample_num, generator=gen)
        parts["L_pro fwd"] = _median_time(lambda: prototype_loss(bank, fl, yl, fu, yu, cfg.temperature), args.repeats, dev)[0]
        f, y = torch.cat([fl, fu]), torch.cat([yl, yu])
        parts["EMA"] = _median_time(lambda: bank.ema_update(f, y, sync=False), args.repeats, dev)[0]
    parts["backward (rest)"] = med - sum(parts.values())
    out["parts"] = parts
    return med, ts, out, int(bank.num_prototypes)


def bench_init(C, args, dev):
    cfg = MethodConfig(kmeans_iters=args.kmeans_iters)
    g = torch.Generator().manual_seed(1)
    Q, D = args.queue_len, args.dim
    def queues():
        cent = torch.randn(C, 3, D, generator=g) * 3
        lab = torch.randint(0, 3, (C, Q), generator=g)
        x = torch.gather(cent, 1, lab[..., None].expand(C, Q, D))
        return x.add_(torch.randn(C, Q, D, generator=g)).to(dev)
    hf, lf = queues(), queues()
    m = torch.ones(C, Q, dtype=torch.bool, device=dev)
    bank = PrototypeBank.from_config(C, D, cfg).to(dev)
    info = {}
    def init(): info.update(bank.init_from_tensors(hf, m, lf, m, cfg))
    med, ts = _median_time(init, args.init_repeats, dev, warmup=0)
    return med, ts, int(bank.num_prototypes)


def bench_model(C, args, dev):
    try:
        from brpg.models import create_segmenter
    except ImportError:                                                      # pragma: no cover
        raise SystemExit("brpg.models.create_segmenter is missing; this benchmark needs it")
    mcfg = ModelConfig(backbone=args.backbone, pretrained=False, output_stride=args.output_stride)
    model = create_segmenter(mcfg, C).to(dev).train()
    B, H = args.batch, args.model_crop
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2 * B, 3, H, H, generator=g).to(dev)
    y = torch.randint(0, C, (2 * B, H, H), generator=g).to(dev)
    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.amp):
            out = model(x)
            pred = F.interpolate(out["pred"], size=(H, H), mode="bilinear", align_corners=True)
            loss = F.cross_entropy(pred.float(), y) + out["rep"].float().pow(2).mean()
        loss.backward()
    med, ts = _median_time(step, args.model_repeats, dev, warmup=args.model_warmup)
    return med, ts, f"brpg.models.create_segmenter(DeepLabV3+, timm {args.backbone}, OS {args.output_stride}, random init)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--scale", default="both", choices=("voc", "coco", "both"))
    p.add_argument("--repeats", type=int, default=10, help="timed repeats of the prototype step (median reported)")
    p.add_argument("--init-repeats", type=int, default=3, help="timed repeats of the initial clustering")
    p.add_argument("--model-repeats", type=int, default=None, help="timed repeats of the model step (default --repeats)")
    p.add_argument("--model-warmup", type=int, default=1, help="untimed model steps before timing")
    p.add_argument("--batch", type=int, default=4, help="labeled = unlabeled images per process (official 4)")
    p.add_argument("--crop", type=int, default=513, help="crop of the prototype step (official 513)")
    p.add_argument("--model-crop", type=int, default=None, help="crop of the R101 step (default --crop)")
    p.add_argument("--dim", type=int, default=256, help="rep dimension")
    p.add_argument("--queue-len", type=int, default=30000, help="rows per queue for the clustering (official 30000)")
    p.add_argument("--kmeans-iters", type=int, default=100)
    p.add_argument("--backbone", default="resnet101")
    p.add_argument("--output-stride", type=int, default=8)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on for cuda)")
    p.add_argument("--skip-model", action="store_true", help="skip the R101 step")
    p.add_argument("--skip-init", action="store_true", help="skip the clustering")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available(): raise SystemExit("--device cuda: no CUDA device")
    args.model_crop = args.model_crop or args.crop
    args.model_repeats = args.model_repeats or args.repeats
    if args.amp is None: args.amp = args.device == "cuda"
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; amp(bf16)={args.amp}; batch {args.batch}+{args.batch}; "
          f"crop {args.crop} (map {(args.crop - 1) // 4 + 1}); dim {args.dim}")
    for scale in (("voc", "coco") if args.scale == "both" else (args.scale,)):
        C = SCALES[scale]
        print(f"\n== {scale.upper()} scale: C={C}")
        med, ts, out, P = bench_proto_step(C, args, dev)
        print(f"prototype step: median {med * 1e3:.1f} ms over {len(ts)} (min {min(ts) * 1e3:.1f}, max {max(ts) * 1e3:.1f}); "
              f"{P} prototypes, N_l={out['n_l']}, N_u={out['n_u']}")
        print("  breakdown: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in out["parts"].items()))
        if not args.skip_init:
            mi, ti, Pi = bench_init(C, args, dev)
            print(f"initial clustering (APO + batched_kmeans of {2 * C} queues of {args.queue_len}x{args.dim}, k=2/3): "
                  f"median {mi:.2f} s over {len(ti)} -> {Pi} prototypes")
        if not args.skip_model:
            mm, tm, what = bench_model(C, args, dev)
            print(f"model step ({what}, {2 * args.batch} images at {args.model_crop}): median {mm * 1e3:.0f} ms over {len(tm)}")
            print(f"ratio prototype step / model step: {med / mm:.4f} ({100 * med / mm:.2f}%)")
            if args.model_crop != args.crop:
                mx = mm * (args.crop / args.model_crop) ** 2
                print(f"ratio_extrapolated (model time scaled by pixels to crop {args.crop}: {mx * 1e3:.0f} ms): "
                      f"{med / mx:.4f} ({100 * med / mx:.2f}%)")


if __name__ == "__main__":
    main()
