"""Process-spawn helpers for the tests that run real gloo process groups on localhost.

A test starts ``nprocs`` ranks of a module-level ``worker(rank, nprocs, port, out_dir, *args)``
(``spawn`` start method, so the worker must be importable), and every rank writes what it saw
into ``out_dir``; the parent asserts on those files. Two ways to wait:

- :func:`run_ranks`: every rank must succeed. The first rank to fail stops the others and its
  traceback is raised in the parent; each rank's :func:`save_result` is returned.
- :func:`start_ranks`: ranks may fail or die (gloo aborts a process on some mismatches). It
  waits for all of them and returns their exit codes; the parent then reads what each rank
  wrote with :func:`write_json` (often a :func:`capture` of a call) and :func:`read_json`.

Both kill every rank still alive at the wall timeout, so a regression that hangs fails instead.
Workers call :func:`init_gloo`, whose short timeout turns a collective that never pairs into an
error on that rank.
"""

import datetime
import json
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = [
    "GROUP_TIMEOUT_S",
    "WALL_TIMEOUT_S",
    "capture",
    "exception_chain",
    "free_port",
    "init_gloo",
    "read_json",
    "run_ranks",
    "save_result",
    "start_ranks",
    "write_json",
]

GROUP_TIMEOUT_S = 30  # a collective that never pairs fails after this long
WALL_TIMEOUT_S = 300  # only a regression that hangs gets here; the ranks are then killed


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_gloo(rank, world_size, port, *, timeout_s=GROUP_TIMEOUT_S):
    """Join the default gloo group of ``world_size`` ranks at ``port``, with a short timeout."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def _spawn(worker, nprocs, out_dir, args):
    return mp.start_processes(
        worker,
        args=(nprocs, free_port(), str(out_dir), *args),
        nprocs=nprocs,
        start_method="spawn",
        join=False,
    )


def _kill(context):
    for process in context.processes:
        if process.is_alive():
            process.kill()


def start_ranks(worker, nprocs, out_dir, *args, wall_timeout_s=WALL_TIMEOUT_S):
    """Start ``nprocs`` ranks and wait until every one has exited; return their exit codes.

    A rank that fails does not stop the others. Ranks still alive at the wall timeout are
    killed (their exit code is then negative).
    """
    context = _spawn(worker, nprocs, out_dir, args)
    deadline = time.monotonic() + wall_timeout_s
    while any(process.is_alive() for process in context.processes):
        if time.monotonic() > deadline:
            _kill(context)
        time.sleep(0.1)
    return [process.exitcode for process in context.processes]


def run_ranks(worker, nprocs, out_dir, *args, wall_timeout_s=WALL_TIMEOUT_S):
    """Run ``nprocs`` ranks that must all succeed; return each rank's :func:`save_result`.

    Raises:
        torch.multiprocessing.ProcessRaisedException: a rank raised (its traceback is in it).
        TimeoutError: the ranks were still running at the wall timeout.
    """
    context = _spawn(worker, nprocs, out_dir, args)
    deadline = time.monotonic() + wall_timeout_s
    while not context.join(timeout=0.5):
        if time.monotonic() > deadline:
            _kill(context)
            raise TimeoutError(f"{nprocs} ranks still running after {wall_timeout_s} s")
    out_dir = Path(out_dir)
    return [torch.load(out_dir / f"{rank}.pt", weights_only=True) for rank in range(nprocs)]


def save_result(out_dir, rank, result):
    """Write one rank's result (tensors, numbers, strings) for :func:`run_ranks` to return."""
    torch.save(result, f"{out_dir}/{rank}.pt")


def write_json(path, value):
    """Write ``value`` as JSON to ``path`` atomically: a reader sees all of it or nothing."""
    path = Path(path)
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(value))
    os.replace(partial, path)


def read_json(path):
    """What :func:`write_json` wrote at ``path``, or None where nothing was (the rank died)."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def exception_chain(error):
    """``Type: message`` of an exception and of its ``__cause__`` chain, one per line."""
    parts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        parts.append(f"{type(error).__name__}: {error}")
        error = error.__cause__
    return "\n".join(parts)


def capture(call, describe=lambda value: value):
    """``{"kind": "returned", "value": describe(call())}``, or what ``call`` raised:
    ``{"kind": type name, "message": exception_chain}``. JSON-ready when ``describe`` is."""
    try:
        return {"kind": "returned", "value": describe(call())}
    except Exception as error:  # the parent asserts on what was raised
        return {"kind": type(error).__name__, "message": exception_chain(error)}
