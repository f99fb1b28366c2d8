"""Training on several processes of this machine from a notebook: spawn them, run train() in each, report failures.

    from vaehelpers.launch import launch
    launch(cfg, nproc=2, resume=True)   # Kaggle T4x2: one process per GPU
    launch("runs/sd", resume=True)      # resume a run with its own settings (its config.json)

Each process joins the process group through distributed.init_distributed (as under torchrun).
"""

from __future__ import annotations

import os
import pickle
import queue
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.multiprocessing.spawn import ProcessException

from vaehelpers.config import TrainConfig, validate
from vaehelpers.dataset import check_data_dir
from vaehelpers.rundir import resume_config
from vaehelpers.runlock import LOCKED_BY_PARENT_ENV, RunLock
from vaehelpers.train import TrainResult, check_pretrained, train


class TrainingProcessError(RuntimeError):
    """A process of a launch() run failed; the others were stopped. The message names the rank and its error."""


def launch(
    cfg: TrainConfig | str | Path, nproc: int | None = None, *, resume: bool = False, **train_kwargs: Any
) -> TrainResult | None:
    """Train on `nproc` processes of this machine (default: one per visible GPU) and return rank 0's result.

    cfg: the settings, or a run directory to resume (resume=True) with the settings of its config.json, as
    `vaehelpers train --run R --resume` does.

    For notebooks (Kaggle T4x2), where torchrun is awkward: it spawns fresh interpreters with
    torch.multiprocessing (the "spawn" method works even after the notebook has touched CUDA, unlike fork),
    sets MASTER_ADDR/MASTER_PORT, RANK, LOCAL_RANK and WORLD_SIZE in each, and runs train(cfg) there.
    train_kwargs go to train() and must be picklable (no lambdas), except on_log: it is called here, in the
    calling process, with each of rank 0's log.csv rows in order (a queue carries them over while this process
    waits), so a notebook's live loss plot works as with one process. This process holds the run directory's
    lock (runlock.py) until every process has ended.
    If a process fails, the others are stopped and TrainingProcessError says which rank and why.
    Interrupting the notebook asks every process to checkpoint and stop, as Ctrl-C does for one process.
    With nproc == 1 it simply calls train() here.
    """
    if not isinstance(cfg, TrainConfig):
        if not resume:
            raise ValueError(f"launch({str(cfg)!r}): a run directory is resumed; pass resume=True (or a TrainConfig)")
        cfg = resume_config(cfg)
    validate(cfg)  # bad settings, an unusable data folder or a missing file stop here, before the run dir is locked
    check_data_dir(cfg.data)
    check_pretrained(cfg, train_kwargs.get("perceptual_backbone"))  # a missing file stops here, not in N processes
    nproc = nproc or max(1, torch.cuda.device_count())
    if nproc == 1:
        return train(cfg, resume=resume, **train_kwargs)
    if cfg.device != "cpu" and torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise ValueError(f"nproc={nproc} but only {torch.cuda.device_count()} GPU(s) are visible (one process per GPU)")
    on_log = train_kwargs.pop("on_log", None)
    port = int(os.environ.get("MASTER_PORT") or _free_port())
    spawn = torch.multiprocessing.get_context("spawn")
    results = spawn.SimpleQueue()
    rows = spawn.Queue() if on_log is not None else None  # rank 0's log rows, on their way to on_log here

    def forward_rows() -> None:
        """Call on_log with every row that has arrived (rank 0 is the only writer, so they come in step order)."""
        while rows is not None:
            try:
                row = rows.get_nowait()
            except queue.Empty:
                return
            on_log(row)

    with RunLock(cfg.run_dir):
        context = torch.multiprocessing.start_processes(
            _worker,
            args=(nproc, port, cfg, resume, train_kwargs, results, rows, os.getpid()),
            nprocs=nproc,
            join=False,
            start_method="spawn",
        )
        try:
            try:
                _join(context, forward_rows)
            except KeyboardInterrupt:  # the notebook's stop button: every rank checkpoints at the same step, then stops
                _signal(context, signal.SIGTERM)
                try:
                    _join(context, forward_rows)
                except KeyboardInterrupt:  # pressed again: stop now, without a checkpoint
                    _signal(context, signal.SIGKILL)
                    raise
        except ProcessException as error:
            raise TrainingProcessError(_failure_message(context, error, nproc)) from None
        except Exception:  # on_log failed here: stop the run (with a checkpoint) before its lock is let go
            on_log = _discard  # forward_rows keeps draining, so that rank 0 can flush its queue and exit
            _signal(context, signal.SIGTERM)
            _join(context, forward_rows)
            raise
    return results.get() if not results.empty() else None


def _worker(
    rank: int,
    world_size: int,
    port: int,
    cfg: TrainConfig,
    resume: bool,
    train_kwargs: dict[str, Any],
    results: Any,
    rows: Any,
    parent_pid: int,
) -> None:
    """One spawned process of launch(): torchrun's environment variables, then train(); rank 0 sends its log rows."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    os.environ[LOCKED_BY_PARENT_ENV] = str(parent_pid)  # launch() holds the run directory's lock for us
    if "OMP_NUM_THREADS" not in os.environ:  # share the CPU cores instead of each rank taking all (torchrun does too)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    on_log = rows.put if rows is not None and rank == 0 else None
    result = train(cfg, resume=resume, on_log=on_log, **train_kwargs)
    if rank == 0:
        results.put(result)


def _join(context: Any, while_waiting: Callable[[], None]) -> None:
    """Wait for every process, calling while_waiting() about 4 times a second and once at the end; when one
    fails, give the others 10 s to exit, then SIGTERM, 10 s, SIGKILL."""
    try:
        while not context.join(timeout=0.25, grace_period=10):
            while_waiting()
    finally:
        while_waiting()  # what the processes sent before they ended


def _discard(row: Any) -> None:
    pass


def _signal(context: Any, signum: int) -> None:
    for process in context.processes:
        if process.is_alive():
            os.kill(process.pid, signum)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _failure_message(context: Any, error: ProcessException, nproc: int) -> str:
    """Which rank failed first, how every rank ended (with each error's last line), and the first one's traceback.

    Every rank is listed because the first rank to exit is not always the cause: when one rank raises, the
    others soon fail too ("connection closed by peer") and may be seen first.
    """
    lines, tracebacks = [], {}
    for rank, process in enumerate(context.processes):
        tracebacks[rank] = _read_traceback(context.error_files[rank])
        if tracebacks[rank]:
            detail = ", " + tracebacks[rank].strip().splitlines()[-1]  # "SomeError: what went wrong"
        elif rank == error.error_index:
            detail = ", without a Python error: killed (e.g. out of memory) or exited hard"
        else:
            detail = ""
        lines.append(f"  rank {rank}: {_exit_status(process.exitcode)}{detail}")
    first_traceback = tracebacks[error.error_index]
    return (
        f"training on {nproc} processes failed, rank {error.error_index} first; the rest were stopped. "
        f"How each ended:\n" + "\n".join(lines) + "\nFix the cause and run again; resume=True continues from the "
        "last checkpoint." + (f"\nTraceback of rank {error.error_index}:\n{first_traceback}" if first_traceback else "")
    )


def _read_traceback(path: str) -> str:
    """The traceback a spawned process left in its error file (torch's _wrap writes one), or ""; removes the file."""
    try:
        with open(path, "rb") as handle:
            traceback = pickle.load(handle)
        os.unlink(path)
        return traceback
    except (OSError, EOFError, pickle.UnpicklingError):
        return ""


def _exit_status(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        return f"signal {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"
