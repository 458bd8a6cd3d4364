"""Stage outputs on disk: content digests, atomic writes, manifests.

A stage writes into a temporary sibling folder and renames it into place only when complete,
so a killed write never leaves a half-written output that a rerun would trust. A manifest
(written last) records the digest of every file, hashed once as it is written, and each file's
size and modification time; ``read_manifest`` checks those and hashes only a file whose stat
changed, so a cache hit reads none of an unaltered output.
``exclusive`` lets one worker of many compute a stage that several reach at once (a shared
stage store): the others wait, then find the finished output.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path


def digest_json(obj) -> str:
    """sha256 of a JSON-serialisable object (sorted keys): the identity of a config section."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of one file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return [p for p in sorted(Path(folder).rglob("*")) if p.is_file() and p.name != "manifest.json"]


def digest_files(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 for every file below ``folder`` except the manifest."""
    return {str(p.relative_to(folder)): file_digest(p) for p in _files(folder)}


def _fingerprint(path: Path) -> list[int]:
    """What tells a file was changed without reading it: its size and modification time."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def digest_files_remembered(folder: Path, memo: Path) -> dict[str, str]:
    """``digest_files(folder)`` for a folder no stage wrote (a checkpoint given by path), hashing
    only the files whose size or modification time differ from what ``memo`` (a JSON file kept
    beside the stage store) recorded when they were last hashed; ``memo`` is then rewritten."""
    folder, memo = Path(folder), Path(memo)
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    out, seen = {}, {}
    for p in _files(folder):
        rel, fp = str(p.relative_to(folder)), _fingerprint(p)
        old = known.get(rel)
        out[rel] = old[1] if isinstance(old, list) and old[0] == fp else file_digest(p)
        seen[rel] = [fp, out[rel]]
    if seen != known:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(seen))
        tmp.replace(memo)
    return out


def folder_digest(files: dict[str, str]) -> str:
    return digest_json(files)


@contextlib.contextmanager
def atomic_dir(final: Path):
    """Yield a temporary folder; on success it replaces ``final`` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(final), dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise OSError(err.errno, f"cannot write {final} ({os.strerror(err.errno)}); nothing "
                                     f"was left half-written: free space or choose another "
                                     f"output folder, then rerun the same command") from err
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _tmp_prefix(final: Path) -> str:
    """How ``atomic_dir`` names its temporary folder for ``final`` (a random tail follows)."""
    return f".{final.name}.tmp-"


def clear_dead_writes(final: Path) -> list[Path]:
    """Delete the temporary folders that ``atomic_dir`` writers of ``final`` killed mid-write
    left beside it; returns them. Call it only while holding ``exclusive(final)``: every
    writer holds it, so no live one is writing then."""
    final = Path(final)
    dead = [p for p in final.parent.glob(_tmp_prefix(final) + "*") if p.is_dir()]
    for p in dead:
        shutil.rmtree(p, ignore_errors=True)
    return dead


@contextlib.contextmanager
def exclusive(final: Path, quiet: bool = False):
    """Hold an exclusive lock on the output folder ``final`` while a stage computes it.

    The lock is ``flock`` on a ``.NAME.lock`` file beside the folder: other processes, from any
    working directory (and on a shared filesystem that supports it, from other machines), wait
    here until the holder leaves; the kernel releases it when the holder dies, SIGKILL included,
    so a crashed worker never blocks the next one. The lock file itself is left in place (a
    waiter may already hold it open)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not quiet:
                print(f"{final.name}: another worker is writing it; waiting for that worker",
                      file=sys.stderr, flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_manifest(folder: Path, extra: dict) -> dict:
    """Record every file's digest plus ``extra`` in ``folder/manifest.json``; return it. Each file
    is hashed here, once; its size and modification time (``stat``) let ``read_manifest`` check
    it later without reading it again."""
    folder = Path(folder)
    files = digest_files(folder)
    stat = {rel: _fingerprint(folder / rel) for rel in files}
    manifest = {"digest": folder_digest(files), "files": files, "stat": stat, **extra}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def load_manifest(folder: Path) -> dict | None:
    """The manifest as written, unchecked against the files; None if missing or unreadable."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def read_manifest(folder: Path) -> dict | None:
    """The manifest of a complete, unaltered stage output; None if missing or corrupted. Files
    removed by ``prune`` are not expected (nor checked, if a killed prune left them).

    Hashes nothing an unaltered output holds: a file whose size and modification time are the
    ones recorded is taken as written; one whose stat changed (touched, copied, rewritten) is
    hashed and must still match its digest; a missing or extra file fails at once. A manifest
    written before stats were recorded is checked by hashing every file."""
    manifest = load_manifest(folder)
    if manifest is None:
        return None
    folder = Path(folder)
    pruned = manifest.get("pruned", {})
    want = manifest.get("files")
    if not isinstance(want, dict):
        return None
    present = {str(p.relative_to(folder)): p for p in _files(folder)}
    present = {k: p for k, p in present.items() if k not in pruned}
    if present.keys() != want.keys():
        return None
    stat = manifest.get("stat", {})
    for rel, path in present.items():
        if stat.get(rel) == _fingerprint(path):
            continue
        if file_digest(path) != want[rel]:
            return None
    return manifest


def _under(rel: str, names: tuple[str, ...]) -> bool:
    return any(rel == n or rel.startswith(n + "/") for n in names)


def prune(folder: Path, names: tuple[str, ...]) -> int:
    """Delete the files ``names`` (files or folders, relative to ``folder``) from a published
    stage output, keeping its digest: the output still *is* what was published (downstream
    stages keyed by the digest stay valid), and its manifest lists what was removed under
    ``pruned``. The manifest is rewritten first, so a prune killed midway leaves a valid folder.
    Returns the bytes freed; 0 if there was nothing (left) to remove. Hashes nothing: called
    on every older checkpoint at every iteration, it costs a few stat calls once done."""
    folder = Path(folder)
    if not any((folder / n).exists() for n in names):
        return 0
    manifest = load_manifest(folder)
    if manifest is None:
        return 0
    gone = {k: v for k, v in manifest["files"].items() if _under(k, names)}
    if gone:
        manifest = {
            **manifest,
            "files": {k: v for k, v in manifest["files"].items() if k not in gone},
            "pruned": {**manifest.get("pruned", {}), **gone},
        }
        tmp = folder.parent / f".{folder.name}.manifest.tmp"  # outside: not a file of the output
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        tmp.replace(folder / "manifest.json")
    freed = 0
    for rel in manifest.get("pruned", {}):
        p = folder / rel
        if p.is_file():
            freed += p.stat().st_size
            p.unlink()
    for name in names:  # folders left empty
        if (folder / name).is_dir():
            shutil.rmtree(folder / name, ignore_errors=True)
    return freed


def pruned_files(folder: Path, names: tuple[str, ...] | None = None) -> list[str]:
    """What ``prune`` removed from a stage output (relative paths), all or under ``names``."""
    manifest = load_manifest(folder) or {}
    return sorted(k for k in manifest.get("pruned", {}) if names is None or _under(k, names))
