"""Long recordings as clips: rows of a manifest cut into windows of a few seconds (`clip_windows`), since DiST
spreads its 8 sparse and 16 dense frames over a whole row, and frames of a recording of minutes are seconds apart.
`data import folders --clip-seconds` cuts while it imports, `data clips --manifest M --clip-seconds S --out M2` cuts
any manifest; the durations come from the files' headers (ranged reads in a bucket: `video.header_duration`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from workflows.data.manifest import absolute_paths_note, load_manifest, relative_to, write_manifest
from workflows.data.sampling import clip_windows
from workflows.runtime import is_remote


def _windowed(row: dict[str, object]) -> bool:
    return any(row.get(k) is not None and not (isinstance(row[k], float) and math.isnan(row[k]))
               for k in ("start", "end"))


def check_clip_seconds(seconds: float) -> None:
    """ValueError naming `--clip-seconds` unless it is a length above 0."""
    if not seconds > 0:
        raise ValueError(f"--clip-seconds {seconds}: give the length of a clip in seconds (e.g. 10)")


def durations(paths: list[str], progress: bool) -> dict[str, float | None]:
    """Each video's duration from its header (no frame is decoded or, in a bucket, fetched); None when it cannot
    be opened."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from workflows.data.video import header_duration

    found: dict[str, float | None] = {}
    start = last = time.perf_counter()
    threads = 32 if any(is_remote(path) for path in paths) else 8  # waiting on the storage more than on the CPU
    pool = ThreadPoolExecutor(threads)
    try:
        for path, seconds in zip(paths, pool.map(header_duration, paths), strict=True):
            found[path] = seconds
            if progress and time.perf_counter() - last > 5:
                last = time.perf_counter()
                print(f"  read the durations of {len(found)}/{len(paths)} videos "
                      f"({len(found) / (last - start):.0f}/s)", flush=True)
    finally:  # interrupted (Ctrl-C, SIGTERM) or failed: the reads not started are not waited for
        pool.shutdown(cancel_futures=True)
    return found


def cut_into_clips(rows: dict[str, list[dict[str, object]]], seconds: float,
                   progress: bool) -> tuple[dict[str, list[dict[str, object]]], list[str]]:
    """The rows ({name: rows with "path" and "location", where the video is read}) with each video cut into
    `clip_windows` of `seconds`, and notes on the videos listed whole. Rows with a start or end are clips already:
    kept as they are."""
    found = durations([str(row["location"]) for part in rows.values() for row in part if not _windowed(row)],
                      progress)
    short, unknown, unreadable = [], [], []
    cut: dict[str, list[dict[str, object]]] = {}
    for name, part in rows.items():
        cut[name] = []
        for row in part:
            if _windowed(row):  # a clip already: kept as it is
                cut[name].append(row)
                continue
            duration = found[str(row["location"])]
            windows = clip_windows(duration, seconds) if duration else None
            if windows is None:
                (unreadable if duration is None else unknown if not duration else short).append(str(row["path"]))
                cut[name].append(row)
            else:
                cut[name] += [{**row, "start": start, "end": end} for start, end in windows]
    notes = []
    for listed, why in ((short, f"are shorter than --clip-seconds {seconds:g}"),
                        (unknown, "declare no duration (a live recording)"),
                        (unreadable, "could not be opened (`data check` says why)")):
        if listed:
            notes.append(f"{len(listed)} videos {why} and are listed whole ({', '.join(listed[:3])}"
                         f"{', ...' if len(listed) > 3 else ''})")
    return cut, notes


@dataclass
class CutManifest:
    """What `cut_manifest` wrote."""

    manifest: str
    rows: int  # rows written
    seconds: float
    cut: int  # input rows whose video was cut into clips
    whole: int  # input rows left whole (shorter than a clip, no duration, unreadable: said in `notes`)
    kept_clips: int  # input rows that had a start or end already
    notes: list[str] = field(default_factory=list)
    path_note: str | None = None  # the manifest names local videos by absolute paths (`data clips` says so)

    def summary(self) -> list[str]:
        whole = f", {self.whole} left whole (below)" if self.whole else ""
        kept = f", {self.kept_clips} rows kept as they were (clips already: start,end)" if self.kept_clips else ""
        return [f"wrote {self.manifest}: {self.rows} rows; {self.cut} videos cut into clips of {self.seconds:g} s"
                f"{whole}{kept}"] + [f"note: {note}" for note in self.notes]


def cut_manifest(manifest: str, out: str | Path, seconds: float, progress: bool = False) -> CutManifest:
    """Write `out`, `manifest` with each whole video cut into centred windows of `seconds` (rows with start,end;
    labels as written), the paths relative to `out`'s folder when the videos lie below it, else absolute (bucket
    URIs stay URIs). ValueError for a length that is no length, an `out` in a bucket or the manifest itself."""
    check_clip_seconds(seconds)
    if is_remote(out):
        raise ValueError(f"--out {out}: write the new manifest to a local file, then copy it beside the videos "
                         f"(`data upload` copies a dataset folder)")
    out = Path(out).expanduser()
    if not is_remote(manifest) and out.resolve() == Path(manifest).expanduser().resolve():
        raise ValueError(f"--out {out} is the manifest itself; write the clips to a new file (the original stays)")
    loaded = load_manifest(manifest, None, strict=False)
    table = loaded.table
    rows = [{"path": path, "label": label, "location": path, "start": None if math.isnan(a) else a,
             "end": None if math.isnan(b) else b}
            for path, label, a, b in zip(*(table.column(c).to_pylist() for c in ("path", "label_name", "start", "end")),
                                         strict=True)]
    cut, notes = cut_into_clips({"rows": rows}, seconds, progress)
    written = [{"path": row["path"] if is_remote(str(row["path"])) else relative_to(str(row["path"]), out.parent),
                "label": row["label"], "start": row.get("start"), "end": row.get("end")} for row in cut["rows"]]
    write_manifest(written, out)
    path_note = absolute_paths_note([str(row["path"]) for row in written], f"{out.parent}/")
    kept = sum(_windowed(r) for r in rows)
    whole = sum(not _windowed(r) for r in cut["rows"])
    return CutManifest(str(out), len(written), seconds, len(rows) - kept - whole, whole, kept, notes, path_note)
