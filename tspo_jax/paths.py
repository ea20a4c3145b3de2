"""Run paths, local or remote (gs://, s3://): one filesystem layer for every file a run writes.

Cloud TPU pods keep checkpoints in GCS: every host writes its own shards there, VM disks are small
and not shared. `os.path.abspath("gs://b/run")` would turn such a workdir into a local path, so
every workdir path goes through `resolve`, and files are read and written through etils' epath
(the layer Orbax itself uses; gcsfs serves gs:// to it).
"""

from __future__ import annotations

import io
import os

from etils import epath


def is_remote(path) -> bool:
    return "://" in str(path)


def resolve(path) -> epath.Path:
    """An absolute local path (with ~ expanded), or the URL untouched."""
    path = str(path)
    if is_remote(path):
        return epath.Path(path)
    return epath.Path(os.path.abspath(os.path.expanduser(path)))


def local_cache_dir() -> str:
    """$TSPO_JAX_CACHE, else ~/.cache/tspo_jax: where host-local artefacts (indexes) are kept."""
    return os.path.expanduser(os.environ.get("TSPO_JAX_CACHE") or "~/.cache/tspo_jax")


def stable_hash(*parts) -> str:
    import hashlib

    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:16]


def read_json(path):
    import json

    return json.loads(epath.Path(path).read_text())


def write_text(path, text: str) -> None:
    """Whole-file write that a kill cannot leave half-written: a local file is written beside and
    renamed over; an object store replaces an object atomically. Remote stores have no append,
    so callers rewrite small files whole."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(path):
        path.write_text(text)
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_bytes(path, data: bytes) -> None:
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def save_figure(fig, path) -> str:
    """matplotlib savefig into any path (PNG bytes through the filesystem layer)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_bytes(path, buf.getvalue())
    return str(path)


def move_dir(src, dst) -> None:
    """Renames a directory; on an object store, a server-side copy then a delete (object stores
    have no directory rename, and GCS's newer moveTo call is not served everywhere)."""
    src, dst = str(src), str(dst)
    if not is_remote(src):
        os.replace(src, dst)
        return
    import fsspec

    fs, src_path = fsspec.core.url_to_fs(src)
    _, dst_path = fsspec.core.url_to_fs(dst)
    fs.copy(src_path, dst_path, recursive=True)
    fs.rm(src_path, recursive=True)
    # Every cached instance of this filesystem (epath and Orbax hold their own) would still list src.
    for instance in [fs, *type(fs)._cache.values()]:
        instance.invalidate_cache()
