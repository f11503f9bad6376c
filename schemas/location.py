"""Where a data stage reads its input set and writes its output: a local path, or an object-store
URI (`s3://bucket/runs/curate`, `gs://…`, `abfs://…`, `hdfs://…`: any filesystem pyarrow.fs
opens, with that filesystem's own credentials and settings, e.g. AWS_ENDPOINT_URL for S3-compatible
stores such as MinIO). docs/cluster.md says when to use which.

A stage always works on a local directory. A URI `--out` is built in a local temporary directory
(under TMPDIR) and then published. An object store has no rename, so the manifest is the commit:
publishing deletes the old manifest.json first, uploads every other file, deletes the files the
old manifest listed that the new output lacks, and uploads manifest.json last. A prefix without a
manifest (a run that died while uploading) is refused in one line by every stage that reads it,
never read as a whole output. A URI input set is read by its manifest: the manifest first, then
the files it lists, into a local temporary directory; a manifest that changed meanwhile (another
run publishing there) is refused.

A local path keeps `schemas.io.atomic_dir` (a rename: the old output stays whole until the new one
replaces it); `file://` URIs are local paths.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

from schemas.errors import UserError, first_line
from schemas.io import NO_SPACE_ERRNOS, atomic_dir
from schemas.manifest import MANIFEST_NAME

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_COPY_BYTES = 8 << 20


def is_uri(location: str) -> bool:
    """An object-store (or other remote) URI: a scheme other than file://."""
    return bool(_SCHEME.match(location)) and not location.startswith("file://")


def local_path(location: str) -> Path:
    """A local location as a path: itself, or a file:// URI's path (on this host only)."""
    if not location.startswith("file://"):
        return Path(location)
    parsed = urlparse(location)
    if parsed.netloc not in ("", "localhost"):
        raise UserError(f"{location}: a file:// URI names a path on this machine (file:///abs/path); "
                        f"'{parsed.netloc}' is read as a host")
    return Path(unquote(parsed.path))


def local_only(stage: str, options: dict[str, str]) -> None:
    """One line refusing a URI (file:// included) given to a stage that reads and writes local
    paths only; `options`: its location arguments, by the name the message gives them."""
    for name, location in options.items():
        if location.startswith("file://"):
            raise UserError(f"{location}: {stage} {name} takes a plain local path; give the path itself "
                            f"({unquote(urlparse(location).path)})")
        if _SCHEME.match(location):
            raise UserError(f"{location}: {stage} {name} takes a local path; object-store URIs are for ingest's --out, "
                            "curate, tokenize and inspect (docs/cluster.md): copy the set down first")


def _filesystem(uri: str) -> tuple[Any, str]:
    """(the pyarrow filesystem of `uri`, the path inside it)."""
    from pyarrow import fs

    try:
        filesystem, path = fs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as exc:  # an unknown scheme, a bad URI, no credentials
        raise UserError(f"{uri}: pyarrow cannot open this location ({first_line(exc)})") from None
    return filesystem, path.rstrip("/")


def _copy(source: Any, target: Any) -> None:
    shutil.copyfileobj(source, target, _COPY_BYTES)


def _upload(source: Path, filesystem: Any, target: str) -> None:
    # compression=None: the bytes as they are, whatever the name's suffix (pyarrow would gzip a .gz)
    with open(source, "rb") as local, filesystem.open_output_stream(target, compression=None) as remote:
        _copy(local, remote)


def _download(filesystem: Any, source: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with filesystem.open_input_stream(source, compression=None) as remote, open(target, "wb") as local:
        _copy(remote, local)


@contextmanager
def output_dir(out: str, inputs: Sequence[str] = ()) -> Iterator[Path]:
    """A fresh local directory for a stage's output; on success it becomes `out`: by a rename for a
    local path, by publishing it (the manifest last) for a URI. After a failure inside, `out` is
    as it was. A local `out` that replacing would destroy what is not a stage output (see
    `check_output`; `inputs` are the stage's) and a URI's missing bucket or refused credentials
    stop the run at once, not after it."""
    if not is_uri(out):
        check_output(out, inputs)
        with atomic_dir(local_path(out)) as tmp:
            yield tmp
        return
    filesystem, root = _filesystem(out)
    _check_bucket(filesystem, root, out)
    staging = Path(tempfile.mkdtemp(prefix="prefdata-out-"))
    try:
        try:
            yield staging
        except OSError as exc:
            if exc.errno in NO_SPACE_ERRNOS:
                raise _no_space(out) from None
            raise
        _publish(staging, filesystem, root, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _out_path(out: str) -> Path:
    given = local_path(out)
    return given.parent.resolve() / given.name  # a link named as --out is what a rename replaces, not its target


def check_apart(out: str, inputs: Sequence[str | None]) -> None:
    """Refuse an --out that is one of the stage's `inputs` (those that exist here) or holds one:
    the stage's writes would overwrite it (train --out SHARDS, generate --out PROMPTS, …)."""
    if is_uri(out):
        return
    where = _out_path(out)
    for location in inputs:
        if location is None or is_uri(location) or not local_path(location).exists():  # a Hub name, a glob
            continue
        source = local_path(location).resolve()
        if source == where or source.is_relative_to(where):
            raise UserError(f"--out {out}: holds the input {location}, which writing the output would overwrite; give another --out")


def check_output(out: str, inputs: Sequence[str] = ()) -> None:
    """Refuse, in one line, a local --out whose replacement would destroy what is not a stage's
    output: it is replaced whole, so it must be new, empty or a stage's output (a manifest), and
    neither hold an input nor the working directory (which cannot be renamed), nor sit inside an
    input folder (reading or re-writing that folder would take it). Stages call it before any
    work; `output_dir` again just before it writes. A URI --out is never replaced whole."""
    if is_uri(out):
        return
    check_apart(out, inputs)
    where = _out_path(out)
    for location in inputs:
        if is_uri(location):
            continue
        source = local_path(location).resolve()
        if source.is_dir() and where.is_relative_to(source):
            raise UserError(f"--out {out}: is inside the input folder {location}, where reading or re-writing that folder "
                            "would take it; give another --out")
    if Path.cwd().resolve().is_relative_to(where):
        raise UserError(f"--out {out}: holds the working directory; give a folder of its own")
    if where.is_symlink() or not where.exists():
        return
    if not where.is_dir():
        raise UserError(f"--out {out}: is a file; give a folder")
    try:
        holds_files = any(where.iterdir())
    except OSError as exc:
        raise UserError(f"--out {out}: cannot list it ({exc.strerror or exc}); check its permissions") from None
    if holds_files and not (where / MANIFEST_NAME).is_file():
        raise UserError(f"--out {out}: a folder with files but no {MANIFEST_NAME}, so not a stage's output; writing the output "
                        "replaces the folder whole: give a new or empty folder")


def _check_bucket(filesystem: Any, root: str, out: str) -> None:
    """A bucket that does not exist, known before the stage runs. Credentials scoped to a prefix
    may not look up the bucket itself: then a listing of `root` must work instead."""
    from pyarrow import fs

    first, *rest = root.split("/")
    bucket = first or f"/{rest[0] if rest else ''}"  # a bucket, or an absolute path's top directory (hdfs://host/top/…)
    try:
        missing = filesystem.get_file_info(bucket).type == fs.FileType.NotFound
    except OSError:
        try:
            filesystem.get_file_info(fs.FileSelector(root, allow_not_found=True))
        except OSError as exc:
            raise UserError(f"{out}: cannot reach this location ({first_line(exc)}); check its credentials") from None
        return
    if missing:
        raise UserError(f"{out}: there is no bucket (or top-level directory) {bucket!r}; create it first")


def _no_space(location: str) -> UserError:
    return UserError(f"{tempfile.gettempdir()}: no space left on device while building {location} there (TMPDIR holds the "
                     "output, any object-store input set and curate's spill files before the upload); point TMPDIR at a "
                     "larger disk and run again")


def _publish(staging: Path, filesystem: Any, root: str, uri: str) -> None:
    names = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
    if MANIFEST_NAME not in names:
        raise RuntimeError(f"{staging}: a stage output without {MANIFEST_NAME}")  # a bug: every stage writes one
    from pyarrow import fs

    manifest = f"{root}/{MANIFEST_NAME}"
    try:
        old = _listed(filesystem, root, uri) if filesystem.get_file_info(manifest).type == fs.FileType.File else []
        if old:  # from here on, the old output is no longer whole: no stage reads it
            filesystem.delete_file(manifest)
        for name in names:
            if name != MANIFEST_NAME:
                _upload(staging / name, filesystem, f"{root}/{name}")
        for stale in sorted(set(old) - set(names)):  # files of the old output only, never other files under the prefix
            filesystem.delete_file(f"{root}/{stale}")
        _upload(staging / MANIFEST_NAME, filesystem, manifest)  # the commit
    except OSError as exc:
        raise UserError(f"{uri}: publishing the output failed ({first_line(exc)}); what was uploaded has no "
                        f"{MANIFEST_NAME}, so no stage reads it; run the stage again") from None


def _listed(filesystem: Any, root: str, uri: str) -> list[str]:
    """The files the manifest under `root` (at `uri`) names: itself and its outputs, relative to `root`."""
    with filesystem.open_input_stream(f"{root}/{MANIFEST_NAME}", compression=None) as stream:
        return _named(stream.read(), _base(uri))


def _named(manifest: bytes, where: str) -> list[str]:
    """manifest.json and the outputs it lists; an unreadable manifest lists none (the stage that
    reads it says why), and a name that would leave the directory (absolute, `..`) is not one."""
    try:
        raw = json.loads(manifest)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raw = {}
    outputs = raw.get("outputs") if isinstance(raw, dict) else None
    names = [name for name in outputs or [] if isinstance(name, str)]
    unsafe = [name for name in names if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts]
    if unsafe:
        raise UserError(f"{where}/{MANIFEST_NAME} lists {unsafe[0]!r} among its outputs, outside its directory: not a "
                        "prefdata manifest; clear that prefix or choose another location")
    return [MANIFEST_NAME, *names]


@contextmanager
def input_dirs(locations: list[str]) -> Iterator[list[Path]]:
    """Each input set as a local directory: a local path as it is, a URI as a temporary local copy
    of its manifest and the files it lists (removed afterwards). One-line errors about the copy
    name the URI, not the temporary directory."""
    with ExitStack() as stack:
        yield [stack.enter_context(_input_dir(location)) for location in locations]


@contextmanager
def _input_dir(location: str) -> Iterator[Path]:
    if not is_uri(location):
        yield local_path(location)
        return
    filesystem, root = _filesystem(location)
    local = Path(tempfile.mkdtemp(prefix="prefdata-in-"))
    try:
        _fetch(filesystem, root, location, local)
        yield local
    except UserError as exc:
        if type(exc) is UserError and str(local) in str(exc):
            raise UserError(str(exc).replace(str(local), _base(location))) from None
        raise
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _fetch(filesystem: Any, root: str, location: str, local: Path) -> None:
    from pyarrow import fs

    manifest = f"{root}/{MANIFEST_NAME}"
    try:
        before = filesystem.get_file_info(manifest)
        if before.type != fs.FileType.File:
            raise UserError(f"{location}: no {MANIFEST_NAME}; not the output of a prefdata stage, or the run that wrote it "
                            "stopped before it finished publishing (run that stage again)")
        _download(filesystem, manifest, local / MANIFEST_NAME)
        missing = []
        for name in _named((local / MANIFEST_NAME).read_bytes(), _base(location))[1:]:
            try:  # a publish running meanwhile deletes files: that is reported as the change it is
                _download(filesystem, f"{root}/{name}", local / name)
            except FileNotFoundError:
                missing.append(name)
        after = filesystem.get_file_info(manifest)
    except OSError as exc:
        if exc.errno in NO_SPACE_ERRNOS:
            raise _no_space(location) from None
        raise UserError(f"{location}: downloading the input set failed ({first_line(exc)})") from None
    if (after.type, after.mtime, after.size) != (before.type, before.mtime, before.size):
        raise UserError(f"{location}: its {MANIFEST_NAME} changed while it was read (another run is publishing there); "
                        "run this stage again once that one has finished")
    if missing:
        raise UserError(f"{_base(location)}/{missing[0]}: listed in its {MANIFEST_NAME} but missing; re-run the stage that wrote it")


def _base(location: str) -> str:
    """A URI without its query (pyarrow's options, e.g. ?region=…) and trailing slash."""
    return location.partition("?")[0].rstrip("/")


def shown(path: Path, dirs: list[Path], locations: list[str]) -> str:
    """A file of the local input copies `dirs` named where the user's input set has it (for a
    manifest: a temporary directory's name means nothing to a later run)."""
    for local, location in zip(dirs, locations):
        if is_uri(location) and path.is_relative_to(local):
            base, query = _base(location), location.partition("?")[2]
            return f"{base}/{path.relative_to(local).as_posix()}" + (f"?{query}" if query else "")
    return str(path)
