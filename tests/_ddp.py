"""Helpers shared by the multi-process tests: a free TCP port, and gloo process groups on CPU.

A plain module (not conftest) so that the test modules, and the child processes `torch.multiprocessing`
spawns, can import it: pytest puts tests/ on sys.path and spawned children inherit that sys.path."""
import os, socket

MASTER_ADDR = "127.0.0.1"


def free_port():
    "A TCP port on 127.0.0.1 that is free right now."
    with socket.socket() as s:
        s.bind((MASTER_ADDR, 0)); return s.getsockname()[1]


def dist_env(rank, world, port):
    "The environment variables `torchrun` would give process `rank` of `world` (for subprocess-launched ranks)."
    return dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR=MASTER_ADDR,
                MASTER_PORT=str(port))


def _gloo_entry(rank, fn, world, port, args):
    "Child side of `spawn_gloo`: join the gloo group, run `fn(rank, world, *args)`, always leave the group."
    import torch
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR=MASTER_ADDR, MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn_gloo(fn, *args, world=2):
    """Run `fn(rank, world, *args)` in `world` spawned processes joined in a gloo process group (on a free port);
    returns when all have finished and raises if one failed. `fn` must be a top-level (picklable) function."""
    import torch.multiprocessing as mp
    mp.spawn(_gloo_entry, args=(fn, world, free_port(), args), nprocs=world, join=True)
