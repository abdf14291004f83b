"""Where a command's results go (`evaluate --out`, `predict --ray --out`): a local folder, or a bucket prefix
(s3://, gs://, ...) for clusters without a shared disk, where a job's driver runs on a node the user never logs into.

A bucket cannot be appended to, so results for one are written in a local staging folder and each file is uploaded
whole (`OutputFolder.push`): at the end, and for a long job as it goes (`predict --ray`: a CSV every few minutes, each
Parquet part once when written), so that a killed driver leaves its results up to the last push in the bucket. A job
that continues (`predict --ray`) first fetches what is there, folders of parts included."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from workflows.config_loader import ConfigError
from workflows.runtime import in_bucket, redact_secrets


class OutputFolder:
    """`uri` as a place to write: `local` is the folder to write into (the folder itself, or a staging folder for a
    bucket prefix); `push` copies its files to the bucket. ConfigError when it cannot be a folder (an existing file,
    a read-only place)."""

    def __init__(self, uri: str | Path, option: str = "--out") -> None:
        from workflows.data.manifest import check_output_folder

        self.uri = str(uri)
        self.shown = redact_secrets(self.uri)
        self.remote = in_bucket(self.uri)
        self.option = option
        self.created: list[Path] = []  # the folders `create` made, deepest first (`discard` removes them when empty)
        self.replaced: list[str] = []  # an earlier result's files, removed once the new ones are written (`set_aside`)
        self.aside: Path | None = None  # where a local folder keeps them meanwhile
        try:
            if self.remote:
                self.fs, self.prefix = self._bucket()
                self.local = Path(tempfile.mkdtemp(prefix="dist-out-"))
            else:
                self.local = check_output_folder(self.uri.removeprefix("file://"), option)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def _bucket(self) -> tuple[Any, str]:
        from workflows.data.manifest import resolve_filesystem

        try:
            fs, prefix = resolve_filesystem(self.uri)
        except Exception as exc:  # noqa: BLE001 - an unknown scheme, missing credentials: said with the URI
            raise ValueError(f"--out {self.shown}: {exc}") from None
        return fs, prefix.rstrip("/")

    def __str__(self) -> str:
        return self.shown if self.remote else str(self.local)

    def create(self) -> None:
        """A local folder made (with the folders above it) and proven writable by writing and deleting a probe file
        in it, so that a place that cannot be written fails now, not once the results are there (os.access says yes
        to root everywhere, /proc included). ConfigError naming the folder and the OS error, the folders it made
        removed again. A bucket prefix: its staging folder is there already."""
        if self.remote:
            return
        absolute = self.local.absolute()
        missing = [p for p in (absolute, *absolute.parents) if not p.exists()]
        probe = self.local / f".dist-write-probe-{os.getpid()}"
        self.created = missing
        try:
            self.local.mkdir(parents=True, exist_ok=True)
            write_probe(probe)
            probe.unlink()
        except OSError as exc:
            self.discard()
            raise ConfigError(f"{self.option} {self.local} cannot be written here ({exc}); give a folder you can "
                              f"write") from None

    def discard(self) -> None:
        """Remove the folders `create` made while they are still empty (a plan or a scoring that failed leaves no
        empty folder behind); anything written in them keeps them."""
        for folder in self.created:
            if not folder.is_dir():  # a mkdir that failed part-way: the ones above it may be there
                continue
            try:
                folder.rmdir()
            except OSError:
                break
        self.created = []

    def listed(self) -> set[str]:
        """The names directly in the folder, files and folders (none when it does not exist); of a bucket prefix,
        asked of the bucket (one listing)."""
        if not self.remote:
            return set(os.listdir(self.local)) if self.local.is_dir() else set()
        import pyarrow.fs as pafs

        from workflows.data.video import from_storage

        found = from_storage(self.uri, self.fs, lambda: self.fs.get_file_info(
            pafs.FileSelector(self.prefix, recursive=False, allow_not_found=True)), action="list")
        return {info.base_name for info in found}

    def remove(self, names: list[str]) -> None:
        """Delete the files `names` from the folder (and, for a bucket prefix, from the bucket too); nothing else in
        it is touched, a missing one is no error."""
        for name in names:
            (self.local / name).unlink(missing_ok=True)
        if not self.remote:
            return
        import pyarrow.fs as pafs

        from workflows.data.video import from_storage

        for name in names:
            key = f"{self.prefix}/{name}"
            if from_storage(self.uri, self.fs, lambda key=key: self.fs.get_file_info(key)).type == pafs.FileType.File:
                from_storage(self.uri, self.fs, lambda key=key: self.fs.delete_file(key), action="delete")

    def set_aside(self, names: list[str]) -> None:
        """The files `names` of an earlier result, to be replaced by the new one: kept until it is written, so a
        failure on the way loses neither (`restore`); `finish` removes them. In a local folder they are moved into
        the hidden folder `.replaced-<pid>` in it (after a kill, the earlier result is there); in a bucket prefix
        they stay in place, and those the new result does not write over are deleted after its last push."""
        self.replaced = list(names)
        if self.remote or not names:
            return
        self.aside = self.local / f".replaced-{os.getpid()}"
        self.aside.mkdir(exist_ok=True)
        for name in names:
            os.replace(self.local / name, self.aside / name)

    def restore(self, written: tuple[str, ...] | list[str]) -> None:
        """Undo `set_aside` after the new result failed: its files among `written` (the names it may write) removed,
        the earlier ones back in place."""
        if self.aside is not None:
            for name in written:
                (self.local / name).unlink(missing_ok=True)
            for path in self.aside.iterdir():
                os.replace(path, self.local / path.name)
            self.aside.rmdir()
            self.aside = None
        self.replaced = []

    def _drop_replaced(self) -> None:
        """The earlier result's files `set_aside` kept, removed now that the new one is written (after its push: a
        name it wrote is replaced in the bucket, the others deleted there)."""
        if self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None
        stale = [name for name in self.replaced if not (self.local / name).exists()]
        self.replaced = []
        if self.remote and stale:
            self.remove(stale)

    def fetch(self, names: list[str]) -> list[str]:
        """Copy the files `names` that exist in the bucket prefix into `local` (an earlier run's results); a name
        ending in / is a folder, fetched with every file in it. Returns the files found. A local folder holds them
        already."""
        if not self.remote:
            return [name for name in names if (self.local / name).exists()]
        import pyarrow.fs as pafs

        from workflows.checkpoints import child_uri
        from workflows.data.video import fetch_to_file, from_storage

        def ask(what: Any) -> Any:
            return from_storage(self.uri, self.fs, lambda: self.fs.get_file_info(what))

        found = []
        for name in names:
            if name.endswith("/"):  # every file in it (a missing folder lists nothing)
                listed = ask(pafs.FileSelector(f"{self.prefix}/{name}", recursive=True, allow_not_found=True))
                keys = sorted(info.path for info in listed if info.type == pafs.FileType.File)
            else:  # asked first: a missing object is an OSError to a read, which the storage retries would wait out
                keys = [f"{self.prefix}/{name}"] if ask(f"{self.prefix}/{name}").type == pafs.FileType.File else []
            for key in keys:
                relative = key.removeprefix(f"{self.prefix}/")
                (self.local / relative).parent.mkdir(parents=True, exist_ok=True)
                fetch_to_file(child_uri(self.uri, self.prefix, key), str(self.local / relative))
                found.append(relative)
        return found

    def push(self, names: list[str] | None = None, retry_s: float | None = None) -> None:
        """Upload the files `names` of `local` (default: every file in it) to the bucket prefix, each whole,
        retried while the bucket does not answer for `retry_s` (None: data.storage_retry_s's default), then raising
        StorageUnreachable. Nothing to do for a local folder."""
        if not self.remote:
            return
        from workflows.data.upload import upload_file

        files = sorted(p.name for p in self.local.iterdir() if p.is_file()) if names is None else names
        for name in files:
            if (self.local / name).exists():
                upload_file(self.local / name, self.fs, f"{self.prefix}/{name}", self.uri, retry_s)

    def push_or_say(self, names: list[str] | None = None, retry_s: float = 10.0) -> bool:
        """`push` for a periodic upload while a job runs: a bucket that does not answer is said on stderr and
        the job goes on (the next push, or the last one, uploads it); returns whether it was pushed."""
        from workflows.data.video import StorageUnreachable

        try:
            self.push(names, retry_s)
        except StorageUnreachable as exc:
            print(f"note: could not upload the results so far to {self.shown} ({exc}); trying again later",
                  file=sys.stderr, flush=True)
            return False
        return True

    def finish(self, names: list[str] | None = None, retry_s: float | None = None) -> None:
        """The last push (`names`, default every file), then the earlier result `set_aside` kept removed and the
        staging folder too. When the bucket does not answer: StorageUnreachable naming the local folder, which is
        kept. A local folder: only the earlier result removed."""
        if not self.remote:
            self._drop_replaced()
            return
        from workflows.data.video import StorageUnreachable

        try:
            self.push(names, retry_s)
        except StorageUnreachable as exc:
            raise StorageUnreachable(f"{exc}. The results are in {self.local} on this machine; copy them to "
                                     f"{self.shown}") from None
        self._drop_replaced()
        shutil.rmtree(self.local, ignore_errors=True)


def write_probe(path: Path) -> None:
    """Write an empty file at `path` (`OutputFolder.create`'s proof that its folder can be written)."""
    path.write_bytes(b"")
