"""Time and memory of one training iteration: supervised-only vs mean teacher vs BRPG (prototype phase).

Each method runs in a fresh subprocess on the same config, model and batch:
  * a `brpg.trainer.Trainer` is built from the config (`--config`, default the shipped demo config);
  * for BRPG the trainer is put into its prototype phase directly: the class queues are filled with
    Gaussian features around class means and `Trainer._phase_changes` initialises the prototype bank
    (APO + k-means) exactly as at epoch D+T of a real run;
  * one real batch is drawn from the trainer's loaders and reused for every iteration;
  * `Trainer._train_iteration` (forward, losses, backward, optimiser, teacher EMA, prototype EMA) is timed
    `--repeats` times after `--warmup` untimed iterations; we report the median.

Memory: on CUDA the peak of `torch.cuda.max_memory_allocated` over the timed iterations (reset before).
On CPU, `tracemalloc` does not see torch's allocator, so we report resident memory from
`resource.getrusage(RUSAGE_SELF).ru_maxrss`: the peak RSS of the process and its increase during the
warm-up + timed iterations (the growth caused by training, model and data already resident).

Time: wall-clock median (`time.perf_counter`) and the median process CPU time (`time.process_time`, all
threads); on a machine shared with other jobs the CPU time is the steadier number.

`--unsup-threshold` (default 0) sets the unlabeled confidence threshold of L_pro, so the full
B * unsup_sample_num unlabeled pixels enter the prototype loss and EMA: an untrained model is rarely 0.8
confident, and the measured cost would otherwise understate a trained run's. Pass -1 to keep the config's.

  python benchmarks/train_step.py --device cpu --crop 81 --batch 4 --backbone resnet18 --repeats 10
"""
import argparse, json, os, resource, statistics, subprocess, sys, tempfile, time
from pathlib import Path

METHODS = ("supervised", "mean_teacher", "brpg", "unimatch", "unimatch_brpg")


def _overrides(a, method):
    ov = [f"method.name={method}", f"trainer.device={a.device}", f"data.crop_size={a.crop}",
          f"data.batch_size_labeled={a.batch}", f"data.batch_size_unlabeled={a.batch}", f"model.backbone={a.backbone}",
          "model.pretrained=false", "data.num_workers=0", "trainer.tensorboard=false", "trainer.progress=false",
          f"trainer.amp={a.amp}", "method.grid_num=0"]   # grid_num=0: the labeled grid derived from the crop
    if a.crop > 81:  # the demo images are 96 px: grow them so a large crop holds real pixels, not padding
        ov.append(f"data.demo_image_size={a.crop + 15}")
    if method in ("brpg", "unimatch_brpg") and a.unsup_threshold >= 0:
        ov += [f"method.pseudo_threshold={a.unsup_threshold}", f"method.threshold_ramp_end={a.unsup_threshold}"]
    return ov + list(a.set)


def _maxrss_mb():
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 / 1024 if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


def run_one(a, method) -> dict:
    "Measure one method in this process."
    import torch
    from brpg.config import load_config
    from brpg.trainer import Trainer
    cfg = load_config(a.config, _overrides(a, method))
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(cfg, out_dir=Path(d) / "run")
        dev = tr.device
        # the iteration at which each method does its full work: semi phase (MT), prototype phase (BRPG)
        m = tr.method
        protos = getattr(m, "uses_prototypes", False)
        it = m.proto_init_iter if protos else getattr(m, "teacher_start", getattr(m, "semi_start", 0))
        epoch = it // tr.iters_per_epoch
        batch = next(tr._epoch_stream(epoch, 0))
        if protos:  # fill the queues as the sampling epoch would, then initialise the bank
            C, D = cfg.data.num_classes, cfg.model.rep_dim
            g = torch.Generator(device="cpu").manual_seed(0)
            m.queues = m.new_queues()
            n = min(cfg.method.queue_len, 200)
            centers = torch.randn(C, D, generator=g)
            for q in m.queues.values():
                lab = torch.arange(C).repeat_interleave(n)
                feats = centers[lab] + 0.5 * torch.randn(C * n, D, generator=g)
                q.push(feats.to(dev), lab.to(dev), torch.ones(C * n, device=dev))
            m.begin_iteration(it)
            assert m.bank_ready and tr.phase(it) == "prototypes"
        elif method == "mean_teacher":
            m.begin_iteration(it)   # teacher hand-over
        stream = iter(lambda: batch, None)  # the same batch every iteration

        def step(k):
            tr._train_iteration(it + k, epoch, stream)
            if dev.type == "cuda": torch.cuda.synchronize(dev)

        rss0 = _maxrss_mb()
        if dev.type == "cuda": torch.cuda.synchronize(dev); torch.cuda.reset_peak_memory_stats(dev)
        for k in range(a.warmup): step(k)
        times, cpu = [], []
        for k in range(a.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            step(a.warmup + k)
            times.append(time.perf_counter() - t0); cpu.append(time.process_time() - c0)
        res = {"method": method, "device": str(dev), "crop": a.crop, "batch": a.batch, "backbone": a.backbone,
               "repeats": a.repeats, "median_s": statistics.median(times), "min_s": min(times),
               "median_cpu_s": statistics.median(cpu),
               "threads": torch.get_num_threads(), "phase": tr.phase(it)}
        if dev.type == "cuda":
            res["peak_mem_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
            res["mem_kind"] = "torch.cuda.max_memory_allocated over warm-up + timed iterations"
        else:
            res["peak_rss_mb"] = _maxrss_mb()
            res["rss_growth_mb"] = _maxrss_mb() - rss0
            res["mem_kind"] = "ru_maxrss: process peak RSS, and its growth during warm-up + timed iterations"
        if getattr(m, "uses_prototypes", False): res["num_prototypes"] = int(m.bank.num_prototypes)
        return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps, auto")
    p.add_argument("--crop", type=int, default=81, help="training crop (demo config: 81)")
    p.add_argument("--batch", type=int, default=4, help="labeled and unlabeled batch size each")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "none"))
    p.add_argument("--config", default="demo")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="extra config overrides")
    p.add_argument("--unsup-threshold", type=float, default=0.0)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--_one", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._one:  # child process: one method
        print(json.dumps(run_one(a, a._one))); return 0
    results = []
    base = [sys.executable, os.path.abspath(__file__)] + [x for x in (argv if argv is not None else sys.argv[1:])]
    for m in a.methods:
        r = subprocess.run(base + ["--_one", m], capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr); return r.returncode
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
    mem_key = "peak_mem_mb" if "peak_mem_mb" in results[0] else "rss_growth_mb"
    print(f"device {results[0]['device']}, crop {a.crop}, batch {a.batch}+{a.batch}, {a.backbone}, "
          f"{results[0]['threads']} threads, median of {a.repeats} iterations")
    print(f"memory: {results[0]['mem_kind']}")
    print(f"{'method':<14} {'phase':<11} {'median s/it':>11} {'min s/it':>9} {'CPU s/it':>9} {mem_key:>14}" + ("  peak_rss_mb" if mem_key == "rss_growth_mb" else ""))
    for r in results:
        print(f"{r['method']:<14} {r['phase']:<11} {r['median_s']:11.4f} {r['min_s']:9.4f} {r['median_cpu_s']:9.4f} {r[mem_key]:14.1f}"
              + (f"  {r['peak_rss_mb']:11.1f}" if mem_key == "rss_growth_mb" else ""))
    by = {r["method"]: r for r in results}
    for a_, b_ in (("brpg", "mean_teacher"), ("unimatch_brpg", "unimatch"), ("unimatch", "mean_teacher")):
        if a_ in by and b_ in by:
            ratio = by[a_]["median_s"] / by[b_]["median_s"]
            cr = by[a_]["median_cpu_s"] / by[b_]["median_cpu_s"]
            print(f"{a_} / {b_} time per iteration: {ratio:.3f} wall, {cr:.3f} CPU time  (memory {by[a_][mem_key]:.1f} vs {by[b_][mem_key]:.1f} MB)")
    if a.json: Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
