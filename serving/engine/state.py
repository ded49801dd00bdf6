"""What the step scheduler tracks for a request, whatever its family: its rows, its progress, how it ended.
No tensors and no torch here, so that the scheduler (and the policy, which replays the engine's admission
at the ingress) imports without torch; the families' tensors extend it in request.py."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Status(Enum):
    WAITING = "waiting"      # queued, not yet in the batch
    RUNNING = "running"      # in the batch: stepped at every engine step
    FINISHED = "finished"    # all steps done, images ready
    CANCELLED = "cancelled"  # aborted by its client; left the batch at the next step
    EXPIRED = "expired"      # its deadline passed first; left the batch at the next step
    FAILED = "failed"        # the forward pass or update raised while it was in the batch


@dataclass(eq=False)
class RequestState:
    """What the scheduler tracks for one request: family-agnostic bookkeeping. Mutated only by the
    engine's step, except `cancel_requested`, which any thread may set."""

    request_id: str
    n: int                           # images
    rows: int                        # rows it takes in every forward (n, or 2n when guided): the budget's unit
    steps_total: int                 # forwards until its images are done
    arrival: float                   # engine clock when added, for latency metrics
    deadline: float | None = None    # engine clock; from then on it is dropped before the next step
    steps_done: int = 0
    status: Status = Status.WAITING
    cancel_requested: bool = False   # set by abort(); it leaves at the next schedule()
    preview_at: tuple[int, ...] = ()  # steps_done values after which a preview of its images is streamed
    previews_taken: int = 0

    @property
    def done(self) -> bool:
        return self.steps_done >= self.steps_total

    @property
    def remaining(self) -> int:
        return self.steps_total - self.steps_done

    @property
    def preview_due(self) -> bool:
        """The step now running ends at one of its preview points (read by the stepper's update, before the
        step is counted)."""
        return self.steps_done + 1 in self.preview_at


def preview_steps(steps: int, previews: int) -> tuple[int, ...]:
    """Where `previews` previews of a `steps`-step request fall: evenly spaced, never at 0 or at the end
    (the final image is no preview). 3 over 20 steps: after steps 5, 10 and 15."""
    return tuple(sorted({round(steps * i / (previews + 1)) for i in range(1, previews + 1)} - {0, steps}))
