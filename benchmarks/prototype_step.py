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

`old` (today's chain: labeled_grid + unlabeled_pick + prototype_loss + ema_update(sims=...)) and `new`
(`brpg.losses.prototype_step` + ema_update on its rows, what the trainer calls) run interleaved in one process;
forward, EMA and backward are each timed directly. Peak extra memory: a fresh subprocess per variant, the
kernel's RSS high-water mark (VmHWM, reset through /proc/self/clear_refs) over one step minus RSS before it
(includes the kept rep.grad, 130 MiB). The last line compares both on the same picks (sync-free rule).

    OMP_NUM_THREADS=2 python benchmarks/prototype_step.py --device cpu --scale both --repeats 15 --skip-init --skip-model

Measured with that command (shared 2-core machine, torch 2.14.1; the first of three runs, README has all three),
after the gradient buffer became reusable (`brpg.sampling.zeroed_buffer`) and the empty-slot mask an added bias:

    VOC  old: fwd 42.1, EMA 4.5, bwd 166.4, step 213.6 ms, peak extra 392 MiB
         new: fwd 33.1, EMA 3.7, bwd  35.1, step  72.1 ms, peak extra 191 MiB  -> new/old 0.338
    COCO old: fwd 54.9, EMA 9.1, bwd 180.9, step 245.1 ms, peak extra 377 MiB
         new: fwd 44.0, EMA 7.9, bwd  43.4, step  95.3 ms, peak extra 214 MiB  -> new/old 0.389
    same picks: |d loss| 0, |d grad| <= 3.6e-12 (grad scale 6.6e-05), |d EMA'd protos| 0

Before those two changes (same command, a loaded machine): VOC new/old 0.47, COCO 0.54.

Earlier numbers (before `prototype_step`; the old breakdown derived backward by subtraction):

Measured 2026-11-25 16:35 UTC with the CPU command above on an otherwise idle 2-core machine (torch 2.14.1,
1 thread; no GPU was available), after the single-gather change to the sampling ops:

    VOC  (86 prototypes):  prototype step 347 ms (sampling fwd 52, L_pro fwd 14, EMA 19, backward 261);
                           init (42 queues x 30000x256) 7.3 s; R101 step at crop 129: 12.5 s -> ratio 2.78%
                           (0.18% with the model time scaled to 513 by pixel count)
    COCO (332 prototypes): prototype step 386 ms (sampling fwd 54, L_pro fwd 57, EMA 59, backward 216);
                           init (162 queues x 30000x256) 24.7 s; R101 step at crop 129: 11.4 s -> ratio 3.38%
                           (0.21% scaled to 513)
    (An earlier run on the loaded machine, before the single-gather change: VOC step 1.36 s, COCO 1.58 s.)

On CPU the old chain's backward is dominated by the zero-filled full-size gradient buffers that the sampling ops'
index/slice backward allocates for the [8, 256, 129, 129] rep map (memory bound, first-touch page faults
included; cheap on a GPU). The new step writes one such buffer, kept and re-zeroed from step to step.

`--crop` sets the crop of the prototype step (513 = official); `--model-crop` the crop of the R101 step
(default: same as --crop). When they differ the ratio is also reported with the model time extrapolated to
--crop by pixel count (`ratio_extrapolated`), and the script says so.
"""
from __future__ import annotations
import argparse, copy, gc, json, os, resource, statistics, subprocess, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing
import torch
import torch.nn.functional as F

from brpg.config import MethodConfig, ModelConfig
from brpg.prototypes import PrototypeBank
from brpg.losses import prototype_loss, prototype_step
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


def _inputs(C, args, dev, crop=None):
    cfg = MethodConfig()
    g = torch.Generator().manual_seed(0)
    B, D, H = args.batch, args.dim, crop or args.crop
    h = (H - 1) // 4 + 1
    bank = _bank(C, D, cfg, dev, g)
    rep = torch.randn(2 * B, D, h, h, generator=g).to(dev).requires_grad_()
    gt = torch.randint(0, C, (B, H, H), generator=g); gt[:, :20] = 255
    conf = torch.rand(B, H, H, generator=g) * 0.4 + 0.6                     # ~50% of pixels >= 0.8
    pseudo = torch.randint(0, C, (B, H, H), generator=g)
    grid_num = cfg.grid_num if crop is None else (H - 1) // 4
    return cfg, bank, rep, gt.to(dev), conf.to(dev), pseudo.to(dev), grid_num


def old(rep, B, gt, conf, pseudo, bank, cfg, grid_num, gen=None):
    "Today's chain (`BRPG.prototype_terms` before `prototype_step`): forward; returns (loss, ema thunk)."
    fl, yl = labeled_grid(rep[:B], gt, grid_num)
    fu, yu = unlabeled_pick(rep[B:], conf, pseudo, cfg.pseudo_threshold, B * cfg.unsup_sample_num, generator=gen)
    loss, st = prototype_loss(bank, fl.float(), yl, fu.float(), yu, cfg.temperature)
    ema = lambda: bank.ema_update(torch.cat([fl, fu]).float(), torch.cat([yl, yu]), decay=cfg.prototype_ema_decay,
                                  sync=False, fault_weight=cfg.fault_weight, sims=st["sims"])
    return loss, ema


def new(rep, B, gt, conf, pseudo, bank, cfg, grid_num, gen=None, sync_free=None):
    "`prototype_step` (what the trainer calls) + the EMA on its rows and similarities."
    loss, st = prototype_step(rep, B, gt, conf, pseudo, bank, cfg.pseudo_threshold, grid_num,
                              B * cfg.unsup_sample_num, cfg.temperature, 255, generator=gen, sync_free=sync_free)
    ema = lambda: bank.ema_update(st["feats"], st["labels"], decay=cfg.prototype_ema_decay, sync=False,
                                  fault_weight=cfg.fault_weight, sims=st["sims"])
    return loss, ema


VARIANTS = {"old": old, "new": new}


def _step(fn, rep, B, gt, conf, pseudo, bank, cfg, grid_num, gen, dev, amp):
    "One full step, each phase timed on its own: forward (sampling + L_pro), EMA, backward."
    rep.grad = None
    _sync(dev); t0 = time.perf_counter()
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
        loss, ema = fn(rep, B, gt, conf, pseudo, bank, cfg, grid_num, gen)
    _sync(dev); t1 = time.perf_counter()
    ema()
    _sync(dev); t2 = time.perf_counter()
    loss.backward()
    _sync(dev); t3 = time.perf_counter()
    return {"forward": t1 - t0, "EMA": t2 - t1, "backward": t3 - t2, "step": t3 - t0}


def bench_proto_step(C, args, dev):
    "Median phase times of `old` and `new`, interleaved in one run, and the largest differences at this scale."
    cfg, bank, rep, gt, conf, pseudo, grid_num = _inputs(C, args, dev)
    B = args.batch
    gen = torch.Generator(device=dev).manual_seed(0)
    times = {k: [] for k in VARIANTS}
    for i in range(args.repeats + 1):                                      # first round = warm-up
        for name, fn in VARIANTS.items():
            t = _step(fn, rep, B, gt, conf, pseudo, bank, cfg, grid_num, gen, dev, args.amp)
            if i: times[name].append(t)
    med = {k: {p: statistics.median(t[p] for t in ts) for p in ts[0]} for k, ts in times.items()}
    med["rounds"] = [n["step"] / o["step"] for o, n in zip(times["old"], times["new"])]   # same round, same machine state
    # equivalence at this scale: the same picks (keys + topk from the same seed) on two copies of the bank
    res = {}
    for name, kw in (("old", {}), ("new", {"sync_free": True})):
        b = copy.deepcopy(bank); rep.grad = None
        loss, ema = VARIANTS[name](rep, B, gt, conf, pseudo, b, cfg, grid_num, torch.Generator(device=dev).manual_seed(7), **kw)
        ema(); loss.backward()
        res[name] = (loss.detach(), rep.grad.clone(), b.protos.clone())
    diff = {k: float((res["new"][i] - res["old"][i]).abs().max()) for i, k in enumerate(("loss", "grad", "protos"))}
    diff["grad_scale"] = float(res["old"][1].abs().max())
    return med, diff, int(bank.num_prototypes)


def _status_kib(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key + ":"))


def mem_probe(name, scale, args):
    """In a fresh process: peak RSS growth (MiB) of one step of `name` (after a warm-up step on a tiny crop):
    the kernel's high-water mark VmHWM, reset just before the step (`5 > /proc/self/clear_refs`), minus VmRSS then.
    Counts every touched page of the step (torch's CPU allocations are invisible to tracemalloc), rep.grad included."""
    dev = torch.device(args.device)
    C = SCALES[scale]
    small = _inputs(C, args, dev, crop=33)
    _step(VARIANTS[name], small[2], args.batch, *small[3:6], small[1], small[0], small[6], None, dev, args.amp)
    cfg, bank, rep, gt, conf, pseudo, grid_num = _inputs(C, args, dev)
    del small; gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f: f.write("5")
        reset = True
    except OSError:
        reset = False
    base = _status_kib("VmRSS")
    _step(VARIANTS[name], rep, args.batch, gt, conf, pseudo, bank, cfg, grid_num, None, dev, args.amp)
    peak = _status_kib("VmHWM")
    print(json.dumps({"extra_mib": (peak - base) / 1024, "censored": not reset,
                      "grad_mib": rep.grad.numel() * rep.grad.element_size() / 2**20}))


def peak_extra(name, scale, args):
    cmd = [sys.executable, __file__, "--mem-probe", name, "--scale", scale, "--device", args.device,
           "--batch", str(args.batch), "--crop", str(args.crop), "--dim", str(args.dim)]
    if args.amp: cmd.append("--amp")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


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
    p.add_argument("--skip-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--mem-probe", choices=tuple(VARIANTS), help=argparse.SUPPRESS)   # internal: one memory probe
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available(): raise SystemExit("--device cuda: no CUDA device")
    args.model_crop = args.model_crop or args.crop
    args.model_repeats = args.model_repeats or args.repeats
    if args.amp is None: args.amp = args.device == "cuda"
    dev = torch.device(args.device)
    if args.mem_probe: return mem_probe(args.mem_probe, args.scale, args)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; amp(bf16)={args.amp}; batch {args.batch}+{args.batch}; "
          f"crop {args.crop} (map {(args.crop - 1) // 4 + 1}); dim {args.dim}")
    for scale in (("voc", "coco") if args.scale == "both" else (args.scale,)):
        C = SCALES[scale]
        print(f"\n== {scale.upper()} scale: C={C}")
        med, diff, P = bench_proto_step(C, args, dev)
        mem = {k: peak_extra(k, scale, args) for k in VARIANTS} if dev.type == "cpu" and not args.skip_memory else {}
        print(f"{P} prototypes; medians over {args.repeats} interleaved steps (ms)")
        print(f"  {'':4s} {'forward':>8s} {'EMA':>7s} {'backward':>9s} {'step':>7s} {'peak extra MiB':>15s}")
        for k in VARIANTS:
            m = med[k]
            mm = f"{mem[k]['extra_mib']:.0f}{' (censored)' if mem[k]['censored'] else ''}" if k in mem else "-"
            print(f"  {k:4s} {m['forward'] * 1e3:8.1f} {m['EMA'] * 1e3:7.1f} {m['backward'] * 1e3:9.1f} "
                  f"{m['step'] * 1e3:7.1f} {mm:>15s}")
        r = {p: med["new"][p] / med["old"][p] for p in med["new"]}
        print(f"  new/old: step {r['step']:.3f} (forward {r['forward']:.2f}, EMA {r['EMA']:.2f}, backward {r['backward']:.2f})")
        q = statistics.quantiles(med["rounds"], n=4) if len(med["rounds"]) > 1 else med["rounds"] * 3
        print(f"  new/old step, round by round: median {statistics.median(med['rounds']):.3f} "
              f"(quartiles {q[0]:.3f}-{q[2]:.3f}, {len(med['rounds'])} rounds)")
        if mem: print(f"  (peak extra includes rep.grad itself, {mem['new']['grad_mib']:.0f} MiB)")
        print(f"  same picks, max |new - old|: loss {diff['loss']:.2e}, d loss/d rep {diff['grad']:.2e} "
              f"(max |grad| {diff['grad_scale']:.2e}), EMA'd prototypes {diff['protos']:.2e}")
        if not args.skip_init:
            mi, ti, Pi = bench_init(C, args, dev)
            print(f"initial clustering (APO + batched_kmeans of {2 * C} queues of {args.queue_len}x{args.dim}, k=2/3): "
                  f"median {mi:.2f} s over {len(ti)} -> {Pi} prototypes")
        if not args.skip_model:
            mm, tm, what = bench_model(C, args, dev)
            print(f"model step ({what}, {2 * args.batch} images at {args.model_crop}): median {mm * 1e3:.0f} ms over {len(tm)}")
            ms = med["new"]["step"]
            print(f"ratio prototype step (new) / model step: {ms / mm:.4f} ({100 * ms / mm:.2f}%)")
            if args.model_crop != args.crop:
                mx = mm * (args.crop / args.model_crop) ** 2
                print(f"ratio_extrapolated (model time scaled by pixels to crop {args.crop}: {mx * 1e3:.0f} ms): "
                      f"{ms / mx:.4f} ({100 * ms / mx:.2f}%)")


if __name__ == "__main__":
    main()
