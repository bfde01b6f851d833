"""Dashboard overhead: train the demo config for N iterations with and without a live TrainingDashboard attached
(same seed, same config), and print the slowdown.

    python benchmarks/dashboard_overhead.py [--iters 40] [--repeats 2] [--interval 2.0] [--set key=value ...]

Runs alternate (plain, dashboard, dashboard, plain, ...) so that drifting machine load hits both sides alike; the
slowdown is taken between the medians. On a shared machine wall time is noisy (other processes), so CPU time is
reported as well: of the whole process (training plus the dashboard's drawing thread; an upper bound of the
slowdown when training is CPU-bound on the same cores) and of the training thread alone (the event handlers and
the extra feature sampling the trainer does for a listener). The dashboard renders its PNGs in its timer thread exactly as it does in a
notebook (no frontend is needed for that). Besides wall time it prints the dashboard's own accounting: seconds
spent inside event handlers on the training thread (a direct cost) and seconds of drawing in the timer thread
(which costs training time only when CPU cores are scarce).

Default schedule: the demo config shortened to `trainer.iters_per_epoch=10`, so the run covers the supervised
warm-up (it 0-9), the sampling epoch (10-19), prototype initialisation and the prototype phase (20-), with
validation at every epoch end and a feature sample every 10 iterations (`trainer.view_every=10`), so the
dashboard sees every event type."""
import argparse, os, statistics, sys, tempfile, time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1"); os.environ.setdefault("MPLBACKEND", "Agg"); os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from brpg.config import load_config, apply_overrides
from brpg.trainer import Trainer
from brpg.views import TrainingDashboard


def one_run(cfg, dashboard: bool, interval: float, feature_interval: float):
    out = tempfile.mkdtemp(prefix="brpg_overhead_")
    tr = Trainer(cfg, out_dir=out, overwrite=True)
    dash = TrainingDashboard(tr, interval=interval, feature_interval=feature_interval) if dashboard else None
    if dash is not None: dash.start_timer()
    t0, c0, th0 = time.perf_counter(), time.process_time(), time.thread_time()
    tr.fit()
    el, cpu, th = time.perf_counter() - t0, time.process_time() - c0, time.thread_time() - th0
    stats = None
    if dash is not None:
        dash.stop_timer()
        stats = dict(events=dash.event_seconds, draws=dash.draws, draw_s=dash.draw_seconds,
                     recorded=len(dash.recorder.history()["iterations"]), samples=dash.features.renders)
    stats = stats or {}
    stats.update(final_miou=tr.final_miou, cpu=cpu, thread=th)
    return el, stats


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="demo")
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2, help="runs per side")
    ap.add_argument("--interval", type=float, default=2.0, help="dashboard redraw interval (s)")
    ap.add_argument("--feature-interval", type=float, default=10.0, help="feature projection interval (s)")
    ap.add_argument("--set", nargs="*", default=[], help="extra config overrides key=value")
    a = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ov = ["trainer.iters_per_epoch=10", f"trainer.max_iters={a.iters}", "trainer.tensorboard=false",
          "trainer.progress=false", "trainer.val_every=0", "trainer.view_every=10", "trainer.device=cpu" if not torch.cuda.is_available() else "trainer.device=auto",
          *a.set]
    cfg = apply_overrides(load_config(a.config), ov)
    print(f"config {a.config} + {ov}")
    print(f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, device {'cuda' if torch.cuda.is_available() else 'cpu'}")
    one_run(apply_overrides(cfg, ["trainer.max_iters=2"]), False, a.interval, a.feature_interval)   # warm-up: imports, demo data cache
    times = {False: [], True: []}; stats = []
    order = [x for i in range(a.repeats) for x in ((False, True) if i % 2 == 0 else (True, False))]
    for dash in order:
        el, st = one_run(cfg, dash, a.interval, a.feature_interval)
        times[dash].append(el)
        stats.append((dash, st))
        print(f"  {'dashboard' if dash else 'plain    '}: {el:7.2f} s wall ({a.iters / el:.2f} it/s), CPU {st['cpu']:.2f} s process / "
              f"{st['thread']:.2f} s training thread, final mIoU {st['final_miou']:.7f}" + (
              f"  events {st['events']:.3f} s, {st['draws']} redraws / {st['draw_s']:.2f} s drawing, "
              f"{st['recorded']} drift records, {st['samples']} feature renders" if dash else ""), flush=True)
    p, d = statistics.median(times[False]), statistics.median(times[True])
    ds = [s for d, s in stats if d]
    ev = statistics.mean(s["events"] for s in ds); dr = statistics.mean(s["draw_s"] for s in ds)
    same = len({s["final_miou"] for _, s in stats}) == 1
    med = lambda d, k: statistics.median(s[k] for x, s in stats if x == d)
    cp, cd, tp, td = med(False, "cpu"), med(True, "cpu"), med(False, "thread"), med(True, "thread")
    print(f"median plain {p:.2f} s, median with dashboard {d:.2f} s over {a.iters} iterations")
    print(f"slowdown (wall, medians): {100 * (d - p) / p:+.2f} %  (run-to-run spread of plain runs: "
          f"{100 * (max(times[False]) - min(times[False])) / p:.1f} %)")
    print(f"CPU time, whole process (training + drawing thread), medians: {cp:.2f} -> {cd:.2f} s = {100 * (cd - cp) / cp:+.2f} %")
    print(f"CPU time of the training thread, medians: {tp:.2f} -> {td:.2f} s = {100 * (td - tp) / tp:+.2f} %")
    print(f"identical final mIoU in all runs (same seed): {same}")
    print(f"event-handler time on the training thread: {ev:.3f} s = {100 * ev / p:.3f} % of a plain run")
    print(f"drawing in the timer thread: {dr:.2f} s = {100 * dr / p:.2f} % of a plain run (competes only for spare CPU)")
    return {"plain": times[False], "dashboard": times[True], "slowdown_pct": 100 * (d - p) / p,
            "cpu_overhead_pct": 100 * (cd - cp) / cp, "thread_cpu_overhead_pct": 100 * (td - tp) / tp}


if __name__ == "__main__":
    main()
