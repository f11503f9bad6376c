"""Atomic file writes and content hashes, shared by every stage (prefdata and train alike)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from schemas.errors import UserError, first_line

# A write that ran out of room: the disk, or the user's quota on it.
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class NoSpaceError(UserError):
    """A stage's write ran out of disk space: one line naming the file, instead of the writer's
    OSError traceback (pyarrow's carries the errno but no file name)."""

    def __init__(self, path: Path, kept: Path) -> None:
        self.path = path
        super().__init__(f"{path}: not written, no space left on device; free space on its disk and run again "
                         f"(the previous {kept} is unchanged)")


@contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` only if the block succeeds.

    The temp file lives in the same directory so the rename is atomic on POSIX: a reader (or a
    resumed run) sees either the old file, no file, or the complete new one — never half of it.
    Temp names start with `.tmp-` so globs like `*.arrow` never pick them up.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{final.name}.", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        _chmod(tmp, _mode_of(final, 0o666))
        os.replace(tmp, final)
    except OSError as exc:
        if exc.errno in NO_SPACE_ERRNOS:
            raise NoSpaceError(final, final) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _mode_of(final: Path, default: int) -> int:
    """The permissions the file or directory `final` gets: those it had, else what creating it
    would give (`default` less the umask). mkstemp and mkdtemp make their temporaries private
    (0600, 0700), and the rename would otherwise carry that onto every stage output: on a shared
    filesystem nobody else could read a team's curated records or shards."""
    try:
        return os.stat(final).st_mode & 0o7777
    except FileNotFoundError:
        return default & ~_umask()


def _chmod(path: Path, mode: int) -> None:
    """chmod where the filesystem has modes; one without (vfat, some SMB and FUSE mounts) refuses,
    and its files keep whatever it gives them, as a plain write would."""
    try:
        os.chmod(path, mode)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would change it for every thread
    for a moment); from /proc on Linux, else by setting it back at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            return next(int(line.split()[1], 8) for line in fh if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        current = os.umask(0o077)  # a file another thread creates meanwhile is private, never looser
        os.umask(current)
        return current


def write_text_atomic(final: str | os.PathLike[str], text: str) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def parquet_read(path: str | os.PathLike[str], fix: str) -> Iterator[None]:
    """pyarrow's error on a damaged parquet file (cut short, overwritten) as one line naming it."""
    try:
        yield
    except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError
        if isinstance(exc, OSError) and exc.errno is not None:  # the file system's refusal (permissions, a vanished file)
            raise UserError(f"{path}: cannot read ({exc.strerror or exc}); check the path and its permissions") from None
        raise UserError(f"{path}: not a readable parquet file ({first_line(exc)}); {fix}") from None


DAMAGED_RECORDS = "its record set is damaged: re-run the stage that wrote it"


def parquet_batches(path: str | os.PathLike[str], fix: str = DAMAGED_RECORDS, **options: Any) -> Iterator[Any]:
    """`pq.ParquetFile(path).iter_batches(**options)`, a damaged file's error one line naming it."""
    import pyarrow.parquet as pq

    with parquet_read(path, fix):
        batches = pq.ParquetFile(path).iter_batches(**options)
    while True:
        with parquet_read(path, fix):
            batch = next(batches, None)
        if batch is None:
            return
        yield batch


def read_utf8(path: str | os.PathLike[str], fix: str) -> str:
    """A whole text file that must be UTF-8; otherwise one line naming the first bad byte and `fix`."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); {fix}") from None


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# sha256 of large files, cached: a 70B model's weights take ~100 s to hash, every run.

CACHE_DIR_ENV = "PREFDATA_CACHE_DIR"
_CACHE_VERSION = 1
# A file changed within this window of being hashed is not cached: file timestamps are coarse
# (a kernel tick), so a second write in the same tick leaves size, mtime and ctime as they were
# (git's "racy clean" problem). Such a file is simply hashed again next time.
RACY_WINDOW_NS = 2_000_000_000


def cache_dir() -> Path:
    """$PREFDATA_CACHE_DIR, else $XDG_CACHE_HOME/prefdata, else ~/.cache/prefdata."""
    if override := os.environ.get(CACHE_DIR_ENV):
        return Path(override)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "prefdata"


def _stat_key(st: os.stat_result) -> dict[str, int]:
    # ctime too: unlike mtime it cannot be set back by a tool (`cp -p`, `touch -d`, rsync -t).
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def _read_cache(path: Path) -> dict[str, dict]:
    """The cached entries; an unreadable, corrupt or foreign cache file counts as empty."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict) or raw.get("version") != _CACHE_VERSION or not isinstance(raw.get("files"), dict):
        return {}
    return {k: v for k, v in raw["files"].items() if isinstance(v, dict) and isinstance(v.get("sha256"), str)}


def _write_cache(path: Path, new: dict[str, dict]) -> None:
    # Re-read just before writing so entries another process added meanwhile survive, and drop
    # files that no longer exist so the cache does not grow without bound.
    entries = {k: v for k, v in {**_read_cache(path), **new}.items() if os.path.exists(k)}
    try:
        write_text_atomic(path, json.dumps({"version": _CACHE_VERSION, "files": entries}, indent=1) + "\n")
    except OSError:
        pass  # a read-only cache only costs the time to hash again


def sha256_files_cached(paths: list[str | os.PathLike[str]]) -> list[str]:
    """sha256 of each file, from the user's cache when the file's (resolved path, size, mtime,
    ctime) is what it was when hashed; otherwise hashed in full and remembered."""
    cache_path = cache_dir() / "sha256-cache.json"
    cache = _read_cache(cache_path)
    digests, new = [], {}
    for path in paths:
        resolved = str(Path(path).resolve())  # Hub caches symlink weights into blobs: key the blob
        key = _stat_key(os.stat(resolved))
        entry = cache.get(resolved)
        if entry is not None and {k: entry.get(k) for k in key} == key:
            digests.append(entry["sha256"])
            continue
        digest = sha256_file(resolved)
        after = os.stat(resolved)
        changed_since = time.time_ns() - max(after.st_mtime_ns, after.st_ctime_ns)
        if _stat_key(after) == key and changed_since >= RACY_WINDOW_NS:  # not written while we read it
            new[resolved] = {**key, "sha256": digest}
        digests.append(digest)
    if new:
        _write_cache(cache_path, new)
    return digests


@contextmanager
def atomic_dir(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `final`; on success it replaces `final` whole.

    For stages that write several files: a crash leaves `final` as it was (or absent) plus a
    `.tmp-*` directory that the next run ignores, never a mix of old and new files.
    """
    import shutil

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}.", dir=final.parent))
    try:
        yield tmp
        # A setgid parent (a team's shared directory) gave the temporary its bit, as mkdir would.
        _chmod(tmp, _mode_of(final, 0o777) | (os.stat(tmp).st_mode & stat.S_ISGID))
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".old-{final.name}.", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except NoSpaceError as exc:  # a file written with atomic_path inside: name it where it would have landed
        raise NoSpaceError(_landing(exc.path, tmp, final), final) from None
    except OSError as exc:
        if exc.errno not in NO_SPACE_ERRNOS:
            raise
        # The file when the error names it (Python's own writes); pyarrow's writers name none, so
        # then the stage output the run was writing.
        raise NoSpaceError(_landing(exc.filename, tmp, final) if exc.filename else final, final) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _landing(path: str | os.PathLike[str], tmp: Path, final: Path) -> Path:
    """Where a file written under atomic_dir's temporary directory would have landed; any other path as it is."""
    path = Path(path)
    return final / path.relative_to(tmp) if path.is_relative_to(tmp) else path
