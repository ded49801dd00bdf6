"""Pre-emption at step boundaries (serving.engine.scheduler): a short request arriving at a full batch of long
ones runs at once, the long one it displaces resumes where it was (same images), and a long request whose
deadline cannot afford the wait is never paused."""
from serving.engine import DiffusionRequest, DiffusionStepper, EngineCore
from serving.engine.request import make_state
from serving.engine.scheduler import PREEMPT_SLACK, Scheduler
from serving.engine.state import Status
from tests.test_engine import FakeRunner, alone, close


def request(steps: int, n: int = 1, **kw) -> DiffusionRequest:
    return DiffusionRequest(class_id=3, sampler="ddim", steps=steps, seed=steps, n=n, **kw)


def full_batch(deadline: float | None = None) -> tuple[Scheduler, list]:
    """Two 50-step requests of 2 rows filling a 4-row budget, one step done."""
    sched = Scheduler(max_rows=4)
    longs = [make_state(f"long{i}", request(50, n=2, deadline=deadline), 0.0) for i in range(2)]
    for s in longs:
        sched.add(s)
    sched.update(sched.schedule(0.0, step_s=0.1))
    return sched, longs


def test_a_short_request_pauses_the_longest_running_one_which_resumes_at_the_head_of_the_queue():
    sched, (a, b) = full_batch()
    b.steps_done = 5  # b has fewer steps left: a is the one to pause
    short = make_state("short", request(10, n=2), 0.0)
    sched.add(short)
    plan = sched.schedule(1.0, step_s=0.1)
    assert plan.preempted == ["long0"] and plan.joined == ["short"]
    assert [s.request_id for s in plan.requests] == ["long1", "short"]
    assert a.status is Status.WAITING and a.steps_done == 1 and list(sched.waiting) == [a]  # it keeps its progress
    assert sched.schedule(1.1).preempted == []  # without a step time (the policy's replay of FCFS): none


def test_no_preemption_without_a_step_time_or_when_the_head_fits():
    sched, _ = full_batch()
    sched.add(make_state("short", request(10, n=2), 0.0))
    assert sched.schedule(1.0).preempted == [] and [s.request_id for s in sched.waiting] == ["short"]
    sched = Scheduler(max_rows=8)
    sched.add(make_state("long", request(50, n=2), 0.0))
    sched.update(sched.schedule(0.0, 0.1))
    sched.add(make_state("short", request(10, n=2), 0.0))
    assert sched.schedule(1.0, 0.1).preempted == []  # room for it: it simply joins


def test_a_request_whose_deadline_cannot_afford_the_wait_is_not_paused():
    # 49 steps left at 0.1 s and the short one's 10: 5.9 s of work, x PREEMPT_SLACK
    tight = 1.0 + 5.9 * PREEMPT_SLACK - 0.01
    sched, _ = full_batch(deadline=tight)
    sched.add(make_state("short", request(10, n=2), 0.0))
    assert sched.schedule(1.0, step_s=0.1).preempted == []
    sched, _ = full_batch(deadline=tight + 0.1)
    sched.add(make_state("short", request(10, n=2), 0.0))
    assert len(sched.schedule(1.0, step_s=0.1).preempted) == 1


def test_through_the_engine_a_paused_request_gives_the_image_it_gives_alone_and_the_short_one_ends_first():
    core = EngineCore(DiffusionStepper(FakeRunner()), max_rows=2)
    core.add_request(request(8), "long")
    core.add_request(request(7), "long2")
    outputs = {o.request_id: o for o in core.step()}  # both run; the engine now knows a step's time
    core.add_request(request(2), "short")
    order = []
    while core.has_work():
        ended = core.step()
        order += [o.request_id for o in ended]
        outputs |= {o.request_id: o for o in ended}
    assert core.metrics.preempted == 1 and order[0] == "short"
    for name, steps in (("long", 8), ("long2", 7), ("short", 2)):
        assert close(outputs[name].result(), alone(request(steps))), name
