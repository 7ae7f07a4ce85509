"""A progress bar update (tqdm): one bar per stage, with the loss and the latest metrics."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

from .update import SessionLike


class Progress:
    """Show the current stage's progress; add it to a session's updates.

    The bar is refreshed by tqdm at most every ``mininterval`` seconds, so the
    per-step cost is one counter increment.
    """

    def __init__(self, *, mininterval: float = 0.5, disable: bool | None = None, **tqdm_kwargs: Any):
        self.kwargs = {"mininterval": mininterval, "disable": disable, "dynamic_ncols": True, **tqdm_kwargs}
        self._bar: Any = None
        self._stage: str | None = None

    def __call__(self, session: SessionLike) -> SessionLike:
        if self._stage != session.stage or self._bar is None:
            self.close()
            self._stage = session.stage
            total = session.stage_total(session.current_stage)
            done = session.stage_step - (1 if session.event == "step" else 0)
            self._bar = tqdm(total=total, initial=max(done, 0), desc=session.stage, unit="step", **self.kwargs)
        if session.event == "step":
            self._bar.update(1)
        else:
            shown = {k: f"{v:.4g}" for k, v in session.metrics.items() if isinstance(v, float)}
            if session.loss is not None:
                shown["loss"] = f"{float(session.loss):.4g}"
            self._bar.set_postfix(shown, refresh=False)
            if not session.is_running or session.stage_total(session.current_stage) == session.stage_step:
                self.close()
        return session

    def close(self) -> None:
        """Close the bar (done automatically at a stage change)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
