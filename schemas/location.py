"""Where a data stage reads its input set and writes its output: a local path, or an object-store
URI (`s3://bucket/runs/curate`, `gs://…`, `abfs://…`, `hdfs://…`: any filesystem pyarrow.fs
opens, with that filesystem's own credentials and settings, e.g. AWS_ENDPOINT_URL for S3-compatible
stores such as MinIO). docs/cluster.md says when to use which.

A stage always works on a local directory. A URI `--out` is built in a local temporary directory
(under TMPDIR) and then published. An object store has no rename, so the manifest is the commit:
publishing deletes the old manifest.json first, uploads every other file, deletes the files of an
older output that this one does not have, and uploads manifest.json last. A prefix without a
manifest (a run that died while uploading) is refused in one line by every stage that reads it,
never read as a whole output. A URI input set is downloaded to a local temporary directory first,
once its manifest is there.

A local path keeps `schemas.io.atomic_dir` (a rename: the old output stays whole until the new one
replaces it); `file://` URIs are local paths.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from urllib.parse import unquote, urlparse

from schemas.errors import UserError, first_line
from schemas.io import atomic_dir
from schemas.manifest import MANIFEST_NAME

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(location: str) -> bool:
    """An object-store (or other remote) URI: a scheme other than file://."""
    return bool(_SCHEME.match(location)) and not location.startswith("file://")


def local_path(location: str) -> Path:
    """A local location as a path (file:// URIs included)."""
    return Path(unquote(urlparse(location).path)) if location.startswith("file://") else Path(location)


def _filesystem(uri: str):  # -> (pyarrow.fs.FileSystem, path inside it)
    from pyarrow import fs

    try:
        filesystem, path = fs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as exc:  # an unknown scheme, a bad URI, no credentials
        raise UserError(f"{uri}: pyarrow cannot open this location ({first_line(exc)})") from None
    return filesystem, path.rstrip("/")


def _files(filesystem, root: str) -> list[str]:
    """The files under `root`, as paths relative to it."""
    from pyarrow import fs

    infos = filesystem.get_file_info(fs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(info.path[len(root) + 1:] for info in infos if info.type == fs.FileType.File)


@contextmanager
def output_dir(out: str) -> Iterator[Path]:
    """A fresh local directory for a stage's output; on success it becomes `out`: by a rename for a
    local path, by publishing it (the manifest last) for a URI. After a failure inside, `out` is
    as it was."""
    if not is_uri(out):
        with atomic_dir(local_path(out)) as tmp:
            yield tmp
        return
    filesystem, root = _filesystem(out)
    staging = Path(tempfile.mkdtemp(prefix="prefdata-out-"))
    try:
        yield staging
        _publish(staging, filesystem, root, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, filesystem, root: str, uri: str) -> None:
    names = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
    if MANIFEST_NAME not in names:
        raise RuntimeError(f"{staging}: a stage output without {MANIFEST_NAME}")  # a bug: every stage writes one
    try:
        old = _files(filesystem, root)
        if MANIFEST_NAME in old:  # from here on, the old output is no longer whole: no stage reads it
            filesystem.delete_file(f"{root}/{MANIFEST_NAME}")
        for name in names:
            if name != MANIFEST_NAME:
                _upload(staging / name, filesystem, f"{root}/{name}")
        for stale in sorted(set(old) - set(names)):
            filesystem.delete_file(f"{root}/{stale}")
        _upload(staging / MANIFEST_NAME, filesystem, f"{root}/{MANIFEST_NAME}")  # the commit
    except OSError as exc:
        raise UserError(f"{uri}: publishing the output failed ({first_line(exc)}); what was uploaded has no "
                        f"{MANIFEST_NAME}, so no stage reads it; run the stage again") from None


def _upload(source: Path, filesystem, target: str) -> None:
    with open(source, "rb") as local, filesystem.open_output_stream(target) as remote:
        shutil.copyfileobj(local, remote, 8 << 20)


@contextmanager
def input_dirs(locations: list[str]) -> Iterator[list[Path]]:
    """Each input set as a local directory: a local path as it is, a URI's files downloaded into a
    temporary directory (removed afterwards) once its manifest is there."""
    with ExitStack() as stack:
        yield [stack.enter_context(_input_dir(location)) for location in locations]


@contextmanager
def _input_dir(location: str) -> Iterator[Path]:
    if not is_uri(location):
        yield local_path(location)
        return
    filesystem, root = _filesystem(location)
    names = _files(filesystem, root)
    if MANIFEST_NAME not in names:
        raise UserError(f"{location}: no {MANIFEST_NAME}; not the output of a prefdata stage, or the run that wrote it "
                        "stopped before it finished publishing (run that stage again)")
    local = Path(tempfile.mkdtemp(prefix="prefdata-in-"))
    try:
        try:
            for name in names:
                (local / name).parent.mkdir(parents=True, exist_ok=True)
                with filesystem.open_input_stream(f"{root}/{name}") as remote, open(local / name, "wb") as copy:
                    shutil.copyfileobj(remote, copy, 8 << 20)
        except OSError as exc:
            raise UserError(f"{location}: downloading the input set failed ({first_line(exc)})") from None
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)


def shown(path: Path, dirs: list[Path], locations: list[str]) -> str:
    """A file of the local input copies `dirs` named where the user's input set has it (for a
    manifest: a temporary directory's name means nothing to a later run)."""
    for local, location in zip(dirs, locations):
        if is_uri(location) and path.is_relative_to(local):
            return f"{location.rstrip('/')}/{path.relative_to(local).as_posix()}"
    return str(path)
