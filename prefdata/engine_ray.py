"""`--engine ray`: a stage's units of work on a Ray cluster, through Ray Data (prefdata.engine;
docs/cluster.md).

`RayPool.map_units(units, read)` is `OrderedPool.map_units`'s counterpart: the stage names its inputs as
small units (an ingest source, a record file), and a Ray Data pipeline reads
them where they are (`read(unit)` in a task on the cluster, yielding the unit's jobs as it goes),
applies the stage's per-row code to each job (`fn(job)` in another task), and streams the results
back to the stage in input order, so the stage writes them as the local engine does. A worker
process runs the pool's initializer once before its first job of that pool
(`prefdata.pool.start_worker`, as the local workers do).

Fault tolerance is Ray's: a task whose worker process dies (killed, out of memory, its node lost)
is run again, up to MAX_RETRIES times, and its result is the same since a job is a pure function
of its input; the results are still consumed in order, so the output is byte-identical. Past that,
the stage fails with one line and, since every stage writes through `schemas.io.atomic_dir`,
`--out` is left as it was.

Imported only by prefdata.engine.session, when `--engine ray` runs.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import socket
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow as pa
import ray
from ray.data import DataContext, TaskPoolStrategy
from ray.exceptions import (
    LocalRayletDiedError,
    NodeDiedError,
    ObjectLostError,
    ObjectStoreFullError,
    OutOfDiskError,
    OutOfMemoryError,
    RayActorError,
    RaySystemError,
    RayTaskError,
    WorkerCrashedError,
)
from ray.util.client import ray as client_ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from prefdata.pool import start_worker
from schemas.errors import UserError, first_line

MAX_RETRIES = 3  # runs of a task after its worker died, before the stage fails (Ray Data's own default: forever)
CONNECT_TIMEOUT_S = 5.0
_ready: set[str] = set()  # in a worker process: the pools whose initializer ran here

# Passing `max_retries` to a Ray Data operator is deprecated from Ray 2.60 with nothing that replaces
# it until its removal in 2.64 (the extra pins below that); a unit with fewer jobs than the
# operator's task limit is the common case here, not a mistake.
warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks for 'MapBatches")


def remote(fn: Callable[..., Any], **options: Any) -> Any:
    """`fn` as a Ray task that is retried when its worker dies (not on an exception it raises)."""
    return ray.remote(max_retries=MAX_RETRIES, retry_exceptions=False, **options)(fn)


def get(refs: Any, what: str) -> Any:
    """`ray.get`, with a task's failure raised as `_one_line` says."""
    try:
        return ray.get(refs)
    except Exception as exc:  # noqa: BLE001 - sorted by _one_line
        raise _one_line(exc, what) from None


def cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


class RayPool:
    """The Ray engine's executor: `map_units(units, read)` runs as a Ray Data pipeline of two operators,
    a read (`read(unit)` in a task on the cluster, yielding the unit's jobs as it goes) and an
    apply (`fn(job)` in a task), with the results streamed back in input order."""

    def __init__(self, fn: Callable[[Any], Any], in_flight: int, initializer: Callable[..., None] | None = None,
                 initargs: tuple = ()) -> None:
        self.fn, self.in_flight, self.initializer, self.initargs = fn, in_flight, initializer, initargs
        self._pipelines: list[Any] = []

    def __enter__(self) -> RayPool:
        return self

    def __exit__(self, *_: Any) -> None:
        for rows in self._pipelines:  # a failed stage leaves no pipeline running: closing one stops its executor
            rows.close()

    def map_units(self, units: Iterable[Any], read: Callable[[Any], Iterable[Any]], here: bool = False) -> Iterator[Any]:
        """`fn(job)` for every job `read(unit)` yields, unit after unit, in that order. `here`: the
        reads run on this process's node (inputs only it holds: a copy fetched from an object store;
        a Hub dataset, streamed where it was found); otherwise on any node, which then reads the
        shared filesystem."""
        units = [pickle.dumps(unit, PICKLE) for unit in units]
        if not units:
            return
        what = f"{self.fn.__module__}.{self.fn.__name__}"
        setup = (uuid.uuid4().hex, self.initializer, self.initargs, self.fn)
        items = ray.data.from_items([{"unit": unit} for unit in units], override_num_blocks=len(units))
        _configure(items.context)
        # A read asks for no CPU, as the local engine's reads in the driver take no worker's: it
        # waits on its consumers most of the time (Ray Data holds it back by its object-store
        # budget), and a CPU held by it would leave a small cluster's applies without one. A
        # cluster's head, where pinned reads go, often has no CPU to offer at all.
        jobs = items.map_batches(_read_jobs, fn_args=(read,), batch_size=1, batch_format="pyarrow", num_cpus=0,
                                 compute=TaskPoolStrategy(size=min(len(units), self.in_flight)), **_retried(),
                                 **(_on_this_node() if here else {}))
        # Not more than `in_flight` tasks at once, whatever the cluster's size; Ray Data's
        # streaming executor holds back the reads while the results wait to be consumed.
        results = jobs.map_batches(_apply, fn_args=(setup,), batch_size=1, batch_format="pyarrow", num_cpus=1,
                                   compute=TaskPoolStrategy(size=self.in_flight), **_retried())
        blocks = iter(results.iter_batches(batch_size=None, batch_format="pyarrow"))
        self._pipelines.append(blocks)
        while True:
            try:
                block = next(blocks)
            except StopIteration:
                return
            except Exception as exc:  # noqa: BLE001 - Ray Data's wrappers of a task's failure
                raise _one_line(exc, what) from None
            for result in block.column("result").to_pylist():
                yield pickle.loads(result)


PICKLE = pickle.HIGHEST_PROTOCOL


def _retried() -> dict[str, Any]:
    """A task whose worker process dies is run again; one that raises is not (it would raise again),
    save Ray's own RaySystemError, which Ray Data adds to the exceptions retried."""
    return {"max_retries": MAX_RETRIES, "retry_exceptions": False}


def _on_this_node() -> dict[str, Any]:
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)}


def _configure(context: DataContext) -> None:
    """The settings of one pipeline, on its own copy of Ray Data's context (the global one is
    another stage's, or the user's): results in input order; every job its own block, so the
    applies share one unit's jobs rather than one task taking them all; a task's UserError as
    itself, not inside Ray Data's UserCodeException; no progress bars (the stage has its own)."""
    context.execution_options.preserve_order = True
    context.target_max_block_size = 1
    context.raise_original_map_exception = True
    context.enable_progress_bars = False


def _objects(column: str, items: Iterable[Any]) -> pa.Table:
    return pa.table({column: pa.array([pickle.dumps(item, PICKLE) for item in items], pa.large_binary())})


def _read_jobs(batch: pa.Table, read: Callable[[Any], Iterable[Any]]) -> Iterator[pa.Table]:
    for unit in batch.column("unit").to_pylist():
        for job in read(pickle.loads(unit)):
            yield _objects("job", [job])


_Setup = tuple[str, Callable[..., None] | None, tuple, Callable[[Any], Any]]  # pool id, initializer, its args, fn


def _apply(batch: pa.Table, setup: _Setup) -> pa.Table:
    pool_id, initializer, initargs, fn = setup
    if pool_id not in _ready:
        start_worker(initializer, initargs)
        _ready.add(pool_id)
    return _objects("result", [fn(pickle.loads(job)) for job in batch.column("job").to_pylist()])


def _causes(exc: BaseException | None) -> Iterator[BaseException]:
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


# What a lost worker, node or object raises once Ray's retries are spent: the machine's fault, not
# the input's or the code's.
_LOST = (WorkerCrashedError, NodeDiedError, LocalRayletDiedError, ObjectLostError, OutOfMemoryError, ObjectStoreFullError,
         OutOfDiskError, RaySystemError, RayActorError)


def _one_line(exc: BaseException, what: str) -> BaseException:
    """What a failed task raises here: the UserError it raised (wrapped by Ray as a RayTaskError
    that is also a UserError, whose text is the remote traceback) as itself; a worker, node or
    object lost past the retries as one line; anything else (a bug) as it came, traceback and all."""
    for cause in _causes(exc):
        if isinstance(cause, RayTaskError):
            if isinstance(cause.cause, UserError):
                return _without_retry_note(cause.cause)
        elif isinstance(cause, UserError):
            return _without_retry_note(cause)
        if isinstance(cause, _LOST):
            first = _ANSI.sub("", str(cause)).strip().splitlines()
            return UserError(f"ray: {what} failed after {MAX_RETRIES} retries ({type(cause).__name__}: {first[0] if first else ''}); "
                             "the output was not written, run it again")
    return exc


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RETRY_NOTE = "Failed to apply UDF transform after "


def _without_retry_note(error: UserError) -> UserError:
    """Ray Data appends its retry advice to a task's exception's message, as more lines ("Failed to
    apply UDF transform after 1/1 attempts …"); a UserError is one line."""
    message, *rest = error.args or ("",)
    if isinstance(message, str):
        message = message.split(f"\n{_RETRY_NOTE}")[0]
    error.args = (message, *(arg for arg in rest if not (isinstance(arg, str) and arg.startswith(_RETRY_NOTE))))
    return error


class RayEngine:
    name = "ray"

    def __init__(self, in_flight: int) -> None:
        self.in_flight = in_flight

    def pool(self, fn: Callable[[Any], Any], workers: int, initializer: Callable[..., None] | None = None,
             initargs: tuple = ()) -> RayPool:
        """`workers` is the local engine's; the cluster's CPUs (and `in_flight`) decide here."""
        return RayPool(fn, self.in_flight, initializer, initargs)


# A Ray Client driver is on no node: the tasks could not read the files it names, nor its copies
# of an object store's sets.
CLIENT_REFUSED = ("{address}: Ray Client (ray://) addresses are not supported; run prefdata on a node of the cluster "
                  "(`ray start --address HEAD:6379` there) with the head's host:port")


def _check_reachable(address: str) -> None:
    """ray.init retries an address nobody listens on for minutes; a host:port is tried first."""
    if address.startswith("ray://"):
        raise UserError(CLIENT_REFUSED.format(address=f"--ray-address (or RAY_ADDRESS) {address}"))
    host, sep, port = address.rpartition(":")
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
    with _ray_data_quiet(), _connection(address):
        yield RayEngine(in_flight)


@contextmanager
def _ray_data_quiet() -> Iterator[None]:
    """Ray Data logs each pipeline's start, plan and end to the terminal, and a failed task's
    traceback beside the error the stage reports in one line; the stage has its own bar. Only for
    the stage: a script's own pipelines keep their logging."""
    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextmanager
def _connection(address: str | None) -> Iterator[None]:
    if ray.is_initialized():
        if client_ray.is_connected():
            raise UserError(CLIENT_REFUSED.format(address="this process's Ray Client connection"))
        held = ray.get_runtime_context().gcs_address
        if address and address != "auto" and address != held:
            raise UserError(f"--ray-address {address}: this process is already connected to the Ray cluster at {held}; "
                            "pass that address, or leave --ray-address out")
        yield
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
        yield
    finally:
        ray.shutdown()
