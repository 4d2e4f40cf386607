"""Run a function on W spawned CPU processes joined in a gloo group, and collect what each rank returns.

    results = run_group(world, fn, payload, tmp_dir)   # [fn(rank, world, payload) for each rank]

Each rank initialises torch.distributed (gloo, file rendezvous in tmp_dir, so no port is guessed), calls
fn and saves its return value with torch.save; an exception in any rank fails the call with that rank's
traceback. A group that does not finish within `timeout` seconds is killed and fails, so a hang in a
collective shows as a test failure instead of a stuck test run.
"""
import datetime
import multiprocessing
import os
import time
import traceback

import torch


def _entry(rank, world, fn, payload, tmp_dir, timeout):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before hrmloss imports triton in this process
    import torch.distributed as dist
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{tmp_dir}/rendezvous", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=timeout))
        result = fn(rank, world, payload)
        torch.save(result, os.path.join(tmp_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears the group down while another still talks (gloo aborts then)
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(tmp_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def run_group(world, fn, payload, tmp_dir, timeout=150):
    """[fn(rank, world, payload) for rank in range(world)], each in its own process of one gloo group.

    fn must be importable (a module-level function); payload and results travel by pickle / torch.save.
    """
    tmp_dir = os.fspath(tmp_dir)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_entry, args=(r, world, fn, payload, tmp_dir, timeout // 2))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = []
    for r in range(world):
        err = os.path.join(tmp_dir, f"rank{r}.err")
        if os.path.exists(err):
            with open(err) as f:
                errors.append(f"rank {r}:\n{f.read()}")
    if errors or hung:
        raise RuntimeError(f"group of {world} failed (ranks still running after {timeout} s: {hung})\n"
                           + "\n".join(errors))
    return [torch.load(os.path.join(tmp_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
