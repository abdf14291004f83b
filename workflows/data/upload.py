"""`data upload DIR URI`: copy a local dataset folder (videos, manifests, label files) into a bucket, so that clusters
without a shared filesystem read it from there.

The folder is copied as it is, below the destination prefix, through pyarrow's filesystems (s3://, gs://, ... with
the credentials and endpoint from the environment: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL,
GOOGLE_APPLICATION_CREDENTIALS). Manifests resolve relative paths against their own folder, so a manifest whose
entries are relative to it works unchanged in the bucket; before anything is copied, every manifest in the folder
is checked, and one that names a video by an absolute local path, or outside the folder, stops the upload (the
cluster could not read it there). A corpus of many thousand videos takes a while: a progress line comes every 10 s,
files go several at a time, a bucket that stops answering is waited for (`--storage-retry-s`), and the same command
run again copies only what is not there at its size yet.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")


@dataclass
class UploadReport:
    source: str
    destination: str
    files: int = 0
    bytes: int = 0
    skipped: int = 0  # files in the bucket already at their size (an upload run again): not copied again
    manifests: list[str] = field(default_factory=list)  # their URIs in the bucket
    labels: list[str] = field(default_factory=list)
    missing_videos: dict[str, int] = field(default_factory=dict)  # manifest -> videos it lists that are not there

    def summary(self) -> str:
        again = f", {self.skipped} of them there already" if self.skipped else ""
        lines = [f"uploaded {self.files} files ({self.bytes / 1e6:.1f} MB) from {self.source} to {self.destination}"
                 f"{again}"]
        lines += [f"  manifest: {m}" for m in self.manifests]
        lines += [f"  labels: {m}" for m in self.labels]
        for manifest, count in self.missing_videos.items():
            lines.append(f"  warning: {manifest} lists {count} video(s) that are not in the folder "
                         f"(`data check` will count them as missing)")
        if self.manifests:
            labels = f" --labels {self.labels[0]}" if self.labels else ""
            lines.append(f"  check it from the cluster: python -m workflows data check --manifest {self.manifests[0]}"
                         f"{labels}")
        return "\n".join(lines)


def _is_uri(value: str) -> bool:
    return "://" in value


def _manifest_paths(path: Path) -> list[tuple[str, str]] | None:
    """(where the row is, as `Manifest.where` says it: "line 5" or a Parquet table's "row 4"; its `path` cell) of
    each row of a manifest with a path, or None when the file is not a manifest (no path/label columns)."""
    from workflows.data.manifest import ManifestError, _read_table_lines, _where

    try:
        table, lines = _read_table_lines(str(path))
    except ManifestError:
        return None
    if not {"path", "label"} <= set(table.column_names):
        return None
    return [(_where(lines, i), str(p).strip()) for i, p in enumerate(table.column("path").to_pylist())
            if p is not None and str(p).strip()]


def check_manifests(root: Path) -> tuple[list[Path], dict[str, int]]:
    """The manifests under `root` (files with path/label columns) and, per manifest, how many listed videos are
    missing; raises ValueError naming the rows whose paths would not resolve in the bucket (absolute, a URI of
    another place is fine, or outside `root`)."""
    manifests, missing, problems = [], {}, []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES):
        entries = _manifest_paths(path)
        if entries is None:
            continue
        manifests.append(path)
        folder = path.parent.relative_to(root).as_posix()
        bad, gone = [], 0
        for where, entry in entries:
            if _is_uri(entry) and not entry.lower().startswith("file:"):
                continue  # already remote: the cluster reads it where it is
            inside = posixpath.normpath(posixpath.join(folder, entry))
            if entry.lower().startswith("file:") or posixpath.isabs(entry) or Path(entry).is_absolute() \
                    or inside == ".." or inside.startswith("../"):
                bad.append(f"{where}: {entry}")
            elif not (root / inside).is_file():
                gone += 1
        if bad:
            problems.append(f"{path.relative_to(root)} ({len(bad)} of {len(entries)} rows, e.g. {'; '.join(bad[:3])})")
        if gone:
            missing[path.relative_to(root).as_posix()] = gone
    if problems:
        raise ValueError(f"{root}: these manifests name videos by a local path outside the folder, which the bucket "
                         f"copy could not resolve: {', '.join(problems)}. Write manifests whose paths are relative "
                         f"to the manifest's folder and keep the videos below it (`data sample`, `data k710`, "
                         f"`data import` and `data transcode` write them so)")
    return manifests, missing


UPLOAD_THREADS = 8  # files in flight at once: a dataset is many small videos, each a round trip or two


def upload_dataset(source: str | Path, destination: str, *, progress: bool = False, retry_s: float | None = None,
                   threads: int = UPLOAD_THREADS) -> UploadReport:
    """Copy the dataset folder `source` to the URI `destination` (e.g. s3://bucket/datasets/sample); returns what
    was copied. A file already there at its size (an upload cut short, run again) is not copied again; the others
    go `threads` at a time, each retried as reads are when the bucket stops answering (`retry_s`, None:
    `video.STORAGE_RETRY_S`), with a progress line every 10 s when `progress`. ValueError for bad input (before
    anything is copied); OSError when the bucket cannot be reached or written (StorageUnreachable: it stopped
    answering)."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.fs as pafs

    from workflows.data.video import from_storage

    src = Path(source).expanduser()
    if _is_uri(str(source)):
        raise ValueError(f"data upload copies a local folder; {source} is already a URI")
    if not src.is_dir():
        raise ValueError(f"data upload: {source} is not a folder (give the dataset's folder: its videos, manifests "
                         f"and label files)")
    if not _is_uri(destination) or destination.lower().startswith("file:"):
        raise ValueError(f"data upload: the destination {destination} is not a bucket URI (s3://bucket/prefix, "
                         f"gs://bucket/prefix); to copy between local folders use cp")
    src = src.resolve()
    manifests, missing = check_manifests(src)
    fs, prefix = pafs.FileSystem.from_uri(destination)
    prefix = prefix.rstrip("/")
    files = {f"{prefix}/{p.relative_to(src).as_posix()}": p for p in sorted(src.rglob("*")) if p.is_file()}
    if not files:
        raise ValueError(f"data upload: {source} holds no files")
    report = UploadReport(source=str(src), destination=destination.rstrip("/"))
    from_storage(report.destination, fs, lambda: fs.create_dir(prefix, recursive=True), retry_s, action="write")
    sizes = {key: path.stat().st_size for key, path in files.items()}
    there = from_storage(report.destination, fs, lambda: _uploaded(fs, prefix), retry_s, action="list")
    todo = [key for key, size in sizes.items() if there.get(key) != size]
    report.skipped = len(files) - len(todo)
    total, done, sent, start, shown = sum(sizes[k] for k in todo), 0, 0, time.monotonic(), time.monotonic()
    if progress and report.skipped:
        print(f"  {report.skipped} of {len(files)} files are in {destination} already at their size: not copied "
              f"again", flush=True)
    pool = ThreadPoolExecutor(max(1, threads))
    try:
        for key in pool.map(lambda k: upload_file(files[k], fs, k, f"{report.destination}{k[len(prefix):]}", retry_s),
                            todo):
            done, sent = done + 1, sent + sizes[key]
            now = time.monotonic()
            if progress and (now - shown >= 10 or done == len(todo)):
                shown, rate = now, sent / max(now - start, 1e-9)
                print(f"  uploaded {done}/{len(todo)} files, {sent / 1e6:.1f} of {total / 1e6:.1f} MB "
                      f"({rate / 1e6:.1f} MB/s, ETA {(total - sent) / max(rate, 1e-9) / 60:.1f} min)", flush=True)
    finally:  # on a failure the files not started yet are not tried (each would wait out the retry budget again)
        pool.shutdown(cancel_futures=True)
    report.files = len(files)
    report.bytes = sum(sizes.values())
    uploaded = from_storage(report.destination, fs, lambda: _uploaded(fs, prefix), retry_s, action="list")
    absent = [key for key, size in sizes.items() if uploaded.get(key) != size]
    if absent:
        raise OSError(f"data upload: {len(absent)} file(s) are not in {destination} at their size after the copy, "
                      f"e.g. {files[absent[0]].relative_to(src)}")
    base = report.destination
    report.manifests = [f"{base}/{m.relative_to(src).as_posix()}" for m in manifests]
    report.labels = [f"{base}/{p.relative_to(src).as_posix()}" for p in files.values()
                     if p.suffix == ".json" and _is_label_file(p)]
    report.missing_videos = {f"{base}/{k}": v for k, v in missing.items()}
    return report


def _uploaded(fs: Any, prefix: str) -> dict[str, int]:
    """bucket path -> size of every object below `prefix`."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return {info.path: info.size for info in infos if info.type == pafs.FileType.File}


def upload_file(local: Path, fs: Any, key: str, uri: str, retry_s: float | None = None) -> str:
    """Copy the local file `local` to `key` in the bucket `fs` (`uri`: the same, as the user names it), retried
    as reads are while the bucket does not answer (`from_storage`); returns `key`."""
    import shutil

    from workflows.data.video import from_storage

    def put() -> None:
        with open(local, "rb") as f, fs.open_output_stream(key) as out:
            shutil.copyfileobj(f, out, 8 << 20)

    from_storage(uri, fs, put, retry_s, action="write")
    return key


def _is_label_file(path: Path) -> bool:
    from workflows.data.manifest import ManifestError, load_labels

    try:
        load_labels(str(path))
    except ManifestError:
        return False
    return True
