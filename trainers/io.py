"""Atomic writers: every artifact appears complete or not at all.

A run can be killed at any moment (a scheduler stopping a trial, a pre-empted node, Ctrl-C). Writing to a
temporary file in the destination folder and then `os.replace`-ing it means readers (resume, the ensemble,
MLflow) never see a half-written checkpoint, CSV or plot. The temporary file lives in the same folder so the
rename stays on one filesystem and is atomic.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from trainers.errors import FoldtuneError


class DiskFullError(FoldtuneError, OSError):
    """The disk filled up while writing a file; the old version of the file is intact."""


def _default_file_mode() -> int:
    """Permissions a plain `open()` would give (0o666 minus umask); mkstemp alone would give 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()  # read once: changing the umask is process-wide and not thread-safe


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary sibling of `path` for writing; on a clean exit it replaces `path`, else it vanishes.

    The parent folder is created when missing. Data is flushed and fsync-ed before the rename so a crash
    right after cannot leave an empty file under the final name.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open supports mode 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=encoding if mode == "w" else None) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, _FILE_MODE)
        os.replace(tmp_name, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            kept = "the previous version is kept" if path.exists() else "nothing was written"
            raise DiskFullError(
                f"no space left on the disk of {path.parent} while writing {path.name} ({kept}); free space "
                "there (or move the folder) and run the same command again to continue"
            ) from None
        raise


def existing_parent(path: Path) -> Path:
    """``path`` itself or its nearest folder that exists: where a disk's free space can be asked for a
    file or folder not yet written."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Write `data` to `path` atomically; returns the path."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_text_atomic(text: str, path: str | os.PathLike, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically; returns the path."""
    return atomic_write_bytes(text.encode(encoding), path)


def write_csv_atomic(df, path: str | os.PathLike, index: bool = False) -> Path:
    """Write a pandas DataFrame as CSV atomically (no index column unless asked); returns the path."""
    return write_text_atomic(df.to_csv(index=index), path)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save` atomically, so a checkpoint is either the old one or the new one, never truncated.

    A failure while pickling removes the temporary file and leaves the previous checkpoint intact.
    """
    import torch  # imported here so CSV/plot writers do not pay for loading torch

    with atomic_open(path, "wb") as handle:
        torch.save(obj, handle)
    return Path(path)


def atomic_savez(path: str | os.PathLike, **arrays: Any) -> Path:
    """``numpy.savez_compressed`` atomically (``path`` keeps the name given, ``.npz`` or not)."""
    import numpy as np

    with atomic_open(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    return Path(path)


def save_figure_atomic(figure: Any, path: str | os.PathLike, dpi: int = 100) -> Path:
    """A matplotlib figure as a PNG, atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return atomic_write_bytes(buffer.getvalue(), path)
