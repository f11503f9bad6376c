"""`--engine ray`: a stage's units of work as Ray tasks (prefdata.engine; docs/cluster.md).

`RayPool` has `OrderedPool`'s interface: `map(jobs)` submits `fn(job)` for each job as a Ray task,
at most two per CPU of the cluster in flight, and yields the results in input order, so the stage
writes them as the local engine does. A worker process runs the pool's initializer once before
its first job of that pool (`prefdata.pool.start_worker`, as the local workers do).

Fault tolerance is Ray's: a task whose worker process dies (killed, out of memory, its node lost)
is run again, up to MAX_RETRIES times, and its result is the same since a job is a pure function
of its input; the results are still consumed in order, so the output is byte-identical. Past that,
the stage fails with one line and, since every stage writes through `schemas.io.atomic_dir`,
`--out` is left as it was.

Imported only by prefdata.engine.session, when `--engine ray` runs.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import ray
from ray.exceptions import RayError, RayTaskError

from prefdata.pool import start_worker
from schemas.errors import UserError, first_line

MAX_RETRIES = 3  # runs of a task after its worker died, before the stage fails
CONNECT_TIMEOUT_S = 5.0
_ready: set[str] = set()  # in a worker process: the pools whose initializer ran here


def _run(pool_id: str, setup: tuple[Callable[..., None] | None, tuple], fn: Callable[[Any], Any], job: Any) -> Any:
    if pool_id not in _ready:
        start_worker(*setup)
        _ready.add(pool_id)
    return fn(job)


def remote(fn: Callable[..., Any], **options: Any) -> Any:
    """`fn` as a Ray task that is retried when its worker dies (never on an exception it raises)."""
    return ray.remote(max_retries=MAX_RETRIES, retry_exceptions=False, **options)(fn)


def get(refs: Any, what: str) -> Any:
    """`ray.get`, with a task's UserError raised as itself and a lost worker or node as one line."""
    try:
        return ray.get(refs)
    except RayTaskError as exc:
        if isinstance(exc.cause, UserError):
            raise exc.cause from None
        raise
    except RayError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserError(f"ray: {what} failed after {MAX_RETRIES} retries ({type(exc).__name__}: {first}); "
                        "the output was not written, run it again") from None


def cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


class RayPool:
    def __init__(self, fn: Callable[[Any], Any], in_flight: int, initializer: Callable[..., None] | None = None,
                 initargs: tuple = ()) -> None:
        self.fn, self.in_flight, self.initializer, self.initargs = fn, in_flight, initializer, initargs
        self._in_flight: deque[Any] = deque()

    def __enter__(self) -> RayPool:
        return self

    def __exit__(self, *_: Any) -> None:
        for ref in self._in_flight:  # a failed stage leaves no task running
            ray.cancel(ref, force=True)

    def map(self, jobs: Iterable[Any]) -> Iterator[Any]:
        task, what = remote(_run), f"{self.fn.__module__}.{self.fn.__name__}"
        setup = ray.put((self.initializer, self.initargs))  # one copy in the object store, not one per job
        # Two per CPU keeps every CPU busy while results wait their turn; never more than
        # `in_flight`, which bounds the chunks held for them whatever the cluster's size.
        pool_id, limit = uuid.uuid4().hex, min(2 * cluster_cpus(), self.in_flight)
        for job in jobs:
            self._in_flight.append(task.remote(pool_id, setup, self.fn, job))
            if len(self._in_flight) >= limit:
                yield get(self._in_flight.popleft(), what)
        while self._in_flight:
            yield get(self._in_flight.popleft(), what)


class RayEngine:
    name = "ray"

    def __init__(self, in_flight: int) -> None:
        self.in_flight = in_flight

    def pool(self, fn: Callable[[Any], Any], workers: int, initializer: Callable[..., None] | None = None,
             initargs: tuple = ()) -> RayPool:
        """`workers` is the local engine's; the cluster's CPUs (and `in_flight`) decide here."""
        return RayPool(fn, self.in_flight, initializer, initargs)


def _check_reachable(address: str) -> None:
    """ray.init retries an address nobody listens on for minutes; a host:port is tried first."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", "local": Ray's own lookups
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise UserError(f"--ray-address (or RAY_ADDRESS) {address}: no Ray cluster answers there ({exc.strerror or exc}); start one with "
                        "`ray start --head` and pass the address it prints, or leave --ray-address out") from None


@contextmanager
def connected(address: str | None, in_flight: int) -> Iterator[RayEngine]:
    """A connection to the cluster for one stage. A connection this process already holds is
    used and kept; one opened here is closed after the stage (and a local cluster started for it
    stopped)."""
    if ray.is_initialized():
        held = ray.get_runtime_context().gcs_address
        if address and address != "auto" and address.removeprefix("ray://") != held:
            raise UserError(f"--ray-address {address}: this process is already connected to the Ray cluster at {held}; "
                            "pass that address, or leave --ray-address out")
        yield RayEngine(in_flight)
        return
    # RAY_ADDRESS is where ray.init goes without an address: a dead one would hang as long.
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        _check_reachable(target)
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False,
                 **({} if address else {"include_dashboard": False}))
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UserError(f"--ray-address {address or '(RAY_ADDRESS or local)'}: could not join the Ray cluster "
                        f"({first_line(exc)}); check the address `ray start --head` printed") from None
    try:
        yield RayEngine(in_flight)
    finally:
        ray.shutdown()
