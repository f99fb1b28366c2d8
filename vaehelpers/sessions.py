"""A training run across Kaggle sessions: how many sessions and weeks of GPU quota it needs, and where it stands."""

from __future__ import annotations

import csv
import math
import statistics
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vaehelpers.images import list_images, select_split
from vaehelpers.notebook import in_parameters
from vaehelpers.rundir import RunDir

SESSION_HOURS = 12.0  # Kaggle's limit on one GPU session (a committed version is stopped there)
WEEKLY_GPU_HOURS = 30.0  # Kaggle's weekly GPU quota (resets every Saturday, UTC)
SETUP_HOURS = 0.25  # per session, outside training: install, image cache, doctor, figures (an estimate)


@dataclass
class SessionPlan:
    """What a run of `epochs` over `train_images` images at `images_per_s` costs on Kaggle."""

    images_per_s: float  # measured training throughput, every GPU together
    training_hours: float  # training time of the whole run
    session_hours: float  # training time one session allows (max_minutes)
    sessions: int  # committed versions ("Save & Run All") the run needs
    quota_hours: float  # GPU hours charged: training plus each session's setup
    weeks: int  # weeks of the weekly GPU quota

    def __str__(self) -> str:
        return (
            f"at {self.images_per_s:.1f} images/s the run trains for {self.training_hours:.1f} h: {self.sessions} "
            f"session(s) of up to {self.session_hours:.1f} h, about {self.quota_hours:.0f} GPU hours, i.e. "
            f"{self.weeks} week(s) of Kaggle's {WEEKLY_GPU_HOURS:g} h weekly GPU quota"
        )


def plan(train_images: int, epochs: float, images_per_s: float, max_minutes: float) -> SessionPlan:
    """The sessions and quota weeks of `epochs` over `train_images` images at images_per_s (> 0), each session
    training for max_minutes (0: no limit of its own, so Kaggle's 12 hours)."""
    if images_per_s <= 0:
        raise ValueError(f"images_per_s must be positive, not {images_per_s}")
    training_hours = epochs * train_images / images_per_s / 3600
    session_hours = min(max_minutes / 60, SESSION_HOURS) if max_minutes > 0 else SESSION_HOURS
    sessions = max(1, math.ceil(training_hours / session_hours))
    quota_hours = training_hours + sessions * SETUP_HOURS
    return SessionPlan(
        images_per_s, training_hours, session_hours, sessions, quota_hours, math.ceil(quota_hours / WEEKLY_GPU_HOURS)
    )


def standing(log_csv: str | Path, epochs: float, train_images: int, max_minutes: float, window: int = 200) -> str:
    """Where a run stands, in one line, from its log.csv: step, epoch of `epochs`, and the hours and sessions left at
    the median images/s of its last `window` logged steps; a run without a log has not started."""
    path = Path(log_csv)
    rows: list[dict[str, str]] = []
    if path.is_file():
        with path.open() as handle:
            rows = list(csv.DictReader(handle))
    if not rows:
        return f"the run has not started: {epochs:g} epochs ahead"
    step, epoch = int(rows[-1]["step"]), float(rows[-1]["epoch"])
    if epoch >= epochs:
        return f"step {step}, epoch {epoch:.2f} of {epochs:g}: the run has finished"
    speed = statistics.median(float(row["images_per_s"]) for row in rows[-window:])
    left = plan(train_images, max(epochs - epoch, 0.0), speed, max_minutes) if speed > 0 else None
    ahead = f"{left.training_hours:.1f} h of training left, {left.sessions} session(s)" if left else "speed unknown"
    return (
        f"step {step}, epoch {epoch:.2f} of {epochs:g} ({100 * epoch / epochs:.0f}%); {ahead} at {speed:.1f} images/s"
    )


def train_images(images: str | Path) -> int:
    """How many images of the folder the training split holds (images.select_split)."""
    return len(select_split(list_images(images), images, "train"))


def doctor_images_per_s(report: Any, processes: int) -> float:
    """The training throughput of every process together from doctor.run's report (its train_step images/s, measured
    on one process's share of the batch), assuming data-parallel processes scale it linearly."""
    return float(report.facts["speed"]["train_step"]["images_per_s"]) * max(1, processes)


@dataclass
class SessionFailure:
    """Training failed in this session; what is left is the last good checkpoint (printed as the session's end)."""

    run_dir: Path
    error: BaseException

    def __str__(self) -> str:
        checkpoint = RunDir(self.run_dir).checkpoint
        kept = f"the last good checkpoint {checkpoint} stays" if checkpoint.is_file() else "no checkpoint was written"
        return (
            f"training failed in this session: {type(self.error).__name__}: {in_parameters(str(self.error))}. The "
            "version ends cleanly, "
            f"so its output keeps the run: {kept}. Fix the cause (e.g. a smaller batch_size after running out of "
            "memory), then run the next session with this output attached (`vaehelpers kaggle push` attaches it)."
        )

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # the notebook shows the message, not the dataclass
        printer.text(str(self))


def guarded_launch(cfg: Any, gpus: int | None, **launch_kwargs: Any) -> Any:
    """launch.launch(cfg, gpus, **launch_kwargs), but a failure (out of memory, non-finite steps, a process dying)
    returns a SessionFailure instead of raising: an errored Kaggle version keeps no output, so the session must end
    cleanly for its /kaggle/working (the run directory with its last good checkpoint) to be kept. The traceback is
    printed; KeyboardInterrupt (the stop button) still stops."""
    from vaehelpers.launch import launch

    try:
        return launch(cfg, gpus, **launch_kwargs)
    except Exception as error:
        traceback.print_exc()
        return SessionFailure(Path(cfg.run_dir), error)
