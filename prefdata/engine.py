"""Which executor runs a data stage's units of work: this machine's process pool, or a Ray cluster
(docs/cluster.md).

The engine replaces the executor only. A stage names its inputs as the same units either way
(an input file or dataset), reads them with the same function into the same jobs, runs the
same per-row functions on those, and consumes the results in input order with the same writer,
so its outputs are byte-identical on either engine. The local engine reads in this process; the
Ray engine reads with Ray Data, in tasks on the cluster's nodes. `EngineOptions` is a
part of each data stage's config (ingest, curate, tokenize), so `--engine` and `--ray-address`
are options of their commands and in their manifests' config; nothing else in a manifest
depends on the engine.

Ray is an extra (`pip install 'prefdata[ray]'`), imported only when `--engine ray` runs:
`prefdata --help` and the local engine never import it. Its code is in prefdata/engine_ray.py
(the Ray Data pipeline) and prefdata/neardup_ray.py (near-duplicate clusters on the cluster).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field

from prefdata.pool import OrderedPool
from schemas.errors import UserError

RAY_EXTRA = "pip install 'prefdata[ray]'"


class EngineOptions(BaseModel):
    """The executor fields of a data stage's config."""

    engine: Literal["local", "ray"] = Field("local", description="local: processes on this machine; ray: tasks on a Ray "
                                            "cluster (same outputs, byte for byte; docs/cluster.md).")
    ray_address: str | None = Field(None, description="With --engine ray: the cluster's address (host:port, or auto). "
                                    "Default: the RAY_ADDRESS of a running cluster, else a local one started for the run.")
    ray_in_flight: int = Field(16, gt=0, description="With --engine ray: chunks processed at once, at most (a CPU each), "
                               "and input files read at once; Ray Data holds back the reads while results wait, so "
                               "memory does not grow with the input.")


class Pool(Protocol):
    """What a stage asks of its executor: `fn(job)` for every job that `read(unit)` yields, unit
    after unit, the results in input order. A unit is small (an input's name and where to start): the
    local engine reads them in this process, the Ray engine where its tasks run (`here`: on this
    process's node, for inputs only it holds)."""

    def __enter__(self) -> Pool: ...

    def __exit__(self, *exc: Any) -> None: ...

    def map_units(self, units: Any, read: Callable[[Any], Iterable[Any]], here: bool = False) -> Iterator[Any]: ...


class Engine(Protocol):
    name: str

    def pool(self, fn: Callable[[Any], Any], workers: int, initializer: Callable[..., None] | None = None,
             initargs: tuple = ()) -> Pool: ...


class LocalEngine:
    name = "local"

    def pool(self, fn: Callable[[Any], Any], workers: int, initializer: Callable[..., None] | None = None,
             initargs: tuple = ()) -> OrderedPool:
        return OrderedPool(fn, workers, initializer, initargs)


@contextmanager
def session(options: EngineOptions) -> Iterator[Engine]:
    """The engine a stage runs on, for the length of the stage: the local pool, or a connection to
    a Ray cluster (given by --ray-address, else RAY_ADDRESS, else a local cluster started here and
    stopped after the stage; a connection already open in this process is used as it is)."""
    if options.engine == "local":
        yield LocalEngine()
        return
    try:
        engine_ray = importlib.import_module("prefdata.engine_ray")
    except ImportError as exc:
        raise UserError(f"--engine ray needs Ray ({exc.name} is not installed); {RAY_EXTRA}, or use --engine local") from None
    with engine_ray.connected(options.ray_address, options.ray_in_flight) as engine:
        yield engine
