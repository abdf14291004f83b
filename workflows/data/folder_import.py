"""`data import folders`: a user's own videos, laid out as one folder per class, become train.csv, val.csv and
labels.json.

    videos/                              --videos videos  (--val-fraction 0.1: a seeded tenth of each class to val)
      playing_guitar/a.mp4, b.mp4, ...   or --videos train --val-videos val, two folders of the same layout
      ApplyEyeMakeup/clips/c.avi         (videos at any depth below their class folder)

The folder may be a bucket prefix (s3://bucket/clips, one listing, nothing downloaded), and so may `--out` then: the
manifests name the videos below `--out` relative to themselves, so the dataset reads the same from the bucket on a
cluster without a shared disk.

Class names are the folder names as words, what the model's text encoder reads: underscores become spaces
("passing_American_football_(in_game)" -> "passing American football (in game)", Kinetics' own spelling) and a
name written as one CamelCase word is split ("ApplyEyeMakeup" -> "apply eye makeup"). `--labels` maps the folders
onto an existing label file instead (its indices kept). What is not taken is counted and shown, never silently
dropped: files whose extension is not a video's, hidden files (macOS `._name.mp4` metadata files look like
videos), videos lying outside any class folder, class folders without a video. `--clip-seconds` cuts long
recordings into windows (rows with start,end) after the split, so a video's clips never straddle train and val.
"""

from __future__ import annotations

import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from workflows.data.clips import check_clip_seconds, cut_into_clips
from workflows.data.importers import ucf101_class_text
from workflows.data.manifest import (
    VIDEO_EXTENSIONS,
    absolute_paths_note,
    class_key,
    earlier_labels_differ,
    load_labels,
    relative_to,
    resolve_filesystem,
    save_labels,
    storage_hint,
    text_key,
    write_manifest,
)
from workflows.runtime import is_remote, redact_secrets

SPLIT_FOLDER_NAMES = {"train", "training", "val", "valid", "validation", "test", "testing", "eval"}


def folder_class_text(name: str) -> str:
    """A class folder's name as the words of its class: underscores become spaces, case and punctuation are kept
    ("passing_American_football_(in_game)" -> "passing American football (in game)"), and a single CamelCase word
    is split and lower-cased as UCF101's are ("ApplyEyeMakeup" -> "apply eye makeup", "YoYo" -> "yo yo")."""
    words = " ".join(name.replace("_", " ").split())
    return ucf101_class_text(words) if " " not in words and re.search(r"[a-z][A-Z]", words) else words


@dataclass
class FolderScan:
    """The videos of one folder of class folders, local or in a bucket, and what was not taken from it."""

    shown: str  # the folder as the user gave it, credentials redacted
    videos: dict[str, list[str]] = field(default_factory=dict)  # class folder -> its videos' paths below the root
    other_files: Counter = field(default_factory=Counter)  # extension -> files in class folders that are not videos
    other_examples: list[str] = field(default_factory=list)
    hidden: list[str] = field(default_factory=list)  # the hidden files and folders below the class folders
    loose_videos: list[str] = field(default_factory=list)  # videos directly in the root, in no class folder
    empty_classes: list[str] = field(default_factory=list)  # class folders holding no video

    def notes(self, option: str) -> list[str]:
        """One line per kind of thing not taken, naming examples."""
        def examples(items: list[str]) -> str:
            return ", ".join(items[:3]) + (", ..." if len(items) > 3 else "")

        where = f"{option} {self.shown}"
        lines = []
        if self.loose_videos:
            lines.append(f"{where}: skipped {len(self.loose_videos)} videos lying in no class folder "
                         f"({examples(self.loose_videos)}): a video's class is the folder it is in")
        if self.empty_classes:
            lines.append(f"{where}: skipped {len(self.empty_classes)} folders holding no video "
                         f"({examples(self.empty_classes)})")
        if self.other_files:
            counts = ", ".join(f"{ext or '(no extension)'}: {n}" for ext, n in self.other_files.most_common(5))
            lines.append(f"{where}: skipped {sum(self.other_files.values())} files that are not videos by their "
                         f"extension ({counts}; e.g. {examples(self.other_examples)}); videos are "
                         f"{', '.join(VIDEO_EXTENSIONS)}")
        if self.hidden:
            lines.append(f"{where}: skipped {len(self.hidden)} hidden files or folders ({examples(self.hidden)}; a "
                         f"._name file is macOS metadata, not a video)")
        return lines


def _local_entries(root: Path) -> list[tuple[str, bool]]:
    """(path below `root`, is a folder) of everything below a local folder, symlinked folders followed (a link
    back up the tree once); a hidden folder is listed but not entered."""
    entries, visited = [], {os.path.realpath(root)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if here == "." else here + "/"
        for name in list(dirnames):
            real = os.path.realpath(os.path.join(dirpath, name))
            if name.startswith(".") or real in visited:
                dirnames.remove(name)
            visited.add(real)
            entries.append((prefix + name, True))
        entries += [(prefix + name, False) for name in filenames]
    return entries


def _bucket_entries(uri: str, option: str, progress: bool = False) -> list[tuple[str, bool]]:
    """(path below the prefix, is a folder) of every object below a bucket prefix (one listing: one request per
    1,000 objects, which pyarrow returns only as a whole, so `progress` says when it starts and what it found)."""
    import time

    import pyarrow.fs as pafs

    shown = redact_secrets(uri)
    if progress:
        print(f"listing {shown} (one request per 1,000 objects) ...", flush=True)
    started = time.perf_counter()
    try:
        fs, inner = resolve_filesystem(uri)
        inner = inner.rstrip("/")
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
    except FileNotFoundError:
        infos = []
    except (OSError, ValueError) as exc:
        raise ValueError(f"{option} {shown} cannot be listed: {exc}{storage_hint(uri)}") from None
    if progress:
        print(f"listed {len(infos)} objects and folders in {time.perf_counter() - started:.1f} s", flush=True)
    return [(info.path[len(inner) + 1:], info.type == pafs.FileType.Directory) for info in infos
            if info.path.startswith(inner + "/")]


def scan_class_folders(root: str, option: str, progress: bool = False) -> FolderScan:
    """Every video below each class folder of `root` (a local folder or a bucket prefix; `progress`: say when a
    bucket's listing starts and ends); ValueError / FileNotFoundError naming `option` when `root` is not laid out
    as one folder per class."""
    remote = is_remote(root)
    if not remote and not Path(root).expanduser().is_dir():
        raise FileNotFoundError(f"{option} {root} is not a folder; give the folder holding one folder per class")
    entries = sorted(_bucket_entries(root, option, progress) if remote else _local_entries(Path(root).expanduser()))
    scan = FolderScan(redact_secrets(root))
    if remote and not entries:
        raise FileNotFoundError(f"{option} {scan.shown} holds nothing (no object below that prefix); give the prefix "
                                f"holding one folder per class{storage_hint(root)}")
    folders: dict[str, bool] = {}  # class folder -> holds a sub-folder
    found: dict[str, list[str]] = {}
    for rel, is_dir in entries:
        parts = rel.split("/")
        hidden = next((i for i, part in enumerate(parts) if part.startswith(".")), None)
        if hidden == 0:
            continue  # .DS_Store, .ipynb_checkpoints at the top: not classes, and not worth a note
        if len(parts) == 1:
            if is_dir:
                folders.setdefault(rel, False)
            elif Path(rel).suffix.lower() in VIDEO_EXTENSIONS:
                scan.loose_videos.append(rel)
            continue  # other top-level files (this tool's own train.csv and labels.json, a README) are not the data
        folders[parts[0]] = folders.get(parts[0], False) or is_dir or len(parts) > 2  # a bucket has no empty folders
        if hidden is not None:
            top = "/".join(parts[:hidden + 1])
            if top not in scan.hidden:
                scan.hidden.append(top)
        elif not is_dir:
            suffix = Path(rel).suffix.lower()
            if suffix in VIDEO_EXTENSIONS:
                found.setdefault(parts[0], []).append(rel)
            else:
                scan.other_files[suffix] += 1
                if len(scan.other_examples) < 3:
                    scan.other_examples.append(rel)
    if not folders:
        what = (f"holds {len(scan.loose_videos)} videos but no class folder" if scan.loose_videos else
                "holds no folder")
        raise ValueError(f"{option} {scan.shown} {what}: this tool takes one folder per class (<class>/<video>); for "
                         f"a list of paths and labels use `data import list`")
    split_named = [name for name in folders if name.lower() in SPLIT_FOLDER_NAMES]
    if split_named and len(split_named) == len(folders) and folders[split_named[0]]:
        train = next((n for n in split_named if n.lower().startswith("train")), split_named[0])
        val = next((n for n in split_named if n != train), "val")
        base = scan.shown.rstrip("/")
        raise ValueError(f"{option} {scan.shown} holds split folders ({', '.join(split_named)}), not class folders: "
                         f"give --videos {base}/{train} --val-videos {base}/{val}")
    scan.videos = {name: found[name] for name in folders if name in found}
    scan.empty_classes = [name + "/" for name in folders if name not in found]
    if not scan.videos:
        raise ValueError(f"{option} {scan.shown}: none of its {len(folders)} folders holds a video "
                         f"({', '.join(VIDEO_EXTENSIONS)}); give the folder holding one folder per class")
    return scan


@dataclass
class FolderImport:
    """What `import_folders` wrote."""

    out: str  # the output folder as shown
    counts: dict[str, int]  # manifest name -> rows (videos, or clips with clip_seconds)
    classes: int
    val_rule: str  # how val.csv was chosen
    class_words: list[tuple[str, str]]  # (folder, class) of the folders whose class reads otherwise, a few
    notes: list[str]
    labels_from: str  # "" when labels.json was written from the folders
    videos: dict[str, int] = field(default_factory=dict)  # manifest name -> videos
    clip_seconds: float | None = None

    def _rows(self, part: str) -> str:
        if self.clip_seconds is None:
            return f"{self.counts[part]} videos"
        return f"{self.counts[part]} clips of {self.clip_seconds:g} s from {self.videos[part]} videos"

    def summary(self) -> list[str]:
        """The lines the CLI prints."""
        out = self.out.rstrip("/")
        lines = [f"wrote {out}/train.csv: {self._rows('train')} of {self.classes} classes",
                 f"wrote {out}/val.csv: {self._rows('val')} ({self.val_rule})"]
        if self.labels_from:
            lines.append(f"wrote {out}/labels.json: the classes and indices of {self.labels_from}")
        else:
            shown = "; ".join(f"{folder!r} -> {text!r}" for folder, text in self.class_words[:3])
            renamed = f" (e.g. {shown})" if shown else ""
            lines.append(f"wrote {out}/labels.json: {self.classes} classes, the folder names as words{renamed}")
        return lines + [f"note: {note}" for note in self.notes]


# A largest class this many times the smallest is said: top-1 then mostly measures the large classes.
IMBALANCE = 10


@dataclass
class _Place:
    """A folder named on the command line: local, or a bucket prefix whose URI may carry an endpoint and credentials
    in its query (kept to reach it, never written into a manifest)."""

    given: str
    remote: bool
    inner: str  # the local path, or the bucket path (bucket/key) without the query

    @classmethod
    def of(cls, given: str | Path) -> _Place:
        given = str(given)
        if is_remote(given):
            return cls(given, True, resolve_filesystem(given)[1].rstrip("/"))
        return cls(given, False, str(Path(given).expanduser()))

    @property
    def shown(self) -> str:
        return redact_secrets(self.given)

    def child(self, name: str) -> str:
        """What reads or writes `name` inside this folder (a URI keeps its query)."""
        if not self.remote:
            return str(Path(self.inner) / name)
        base, _, query = self.given.partition("?")
        return f"{base.rstrip('/')}/{name}" + (f"?{query}" if query else "")

    def location(self, rel: str) -> str:
        """Where `rel` below this folder is: a local path (from the folder as given), or the bucket URI without its
        query (as a manifest row names it from anywhere)."""
        if not self.remote:
            return str(Path(self.inner) / rel)
        return f"{self.given.split('://', 1)[0]}://{self.inner}/{rel}"

    def exists(self, name: str) -> bool:
        if not self.remote:
            return Path(self.child(name)).is_file()
        import pyarrow.fs as pafs

        fs, path = resolve_filesystem(self.given)
        return fs.get_file_info(f"{path.rstrip('/')}/{name}").type == pafs.FileType.File


def _row_path(source: _Place, rel: str, out: _Place) -> str:
    """A video's manifest path: relative to the manifests when it lies below their folder (relocatable, uploadable),
    else absolute (a local path, or a bucket URI)."""
    where = source.location(rel)
    if not source.remote:
        return relative_to(where, out.inner)
    below = out.location("")
    return where[len(below):] if out.remote and where.startswith(below) else where


def _write(place: _Place, rows_by_file: dict[str, list[dict[str, object]]], label_map: dict[str, int]) -> None:
    """The manifests and labels.json into a local folder or a bucket prefix."""
    if not place.remote:
        Path(place.inner).mkdir(parents=True, exist_ok=True)
    for name, rows in rows_by_file.items():
        write_manifest(rows, place.child(name))
    save_labels(label_map, place.child("labels.json"))


def _class_map(folders: list[str], labels: str | Path | None) -> tuple[dict[str, str], dict[str, int]]:
    """({folder: class}, label map): the label map from `labels` when given (every folder's class must be in it),
    else from the folders' words in sorted order (two folders the text encoder reads alike are an error)."""
    classes = {folder: class_key(folder_class_text(folder)) for folder in folders}
    if labels is not None:
        label_map = load_labels(str(labels))
        unknown = [f for f in folders if classes[f] not in label_map and class_key(f) not in label_map]
        if unknown:
            shown = ", ".join(f"{f!r} (read as {classes[f]!r})" for f in unknown[:5])
            raise ValueError(f"{len(unknown)} class folders are not classes of --labels {labels}: {shown}"
                             f"{', ...' if len(unknown) > 5 else ''}; rename the folders to its class names, or "
                             f"leave --labels out to make a label file from the folders")
        return {f: classes[f] if classes[f] in label_map else class_key(f) for f in folders}, label_map
    by_text: dict[str, str] = {}  # the text encoder lower-cases: "Big" and "big" would be one class to it
    for folder in folders:
        if not classes[folder]:
            raise ValueError(f"class folder {folder!r} has no words to name its class by; rename it")
        other = by_text.setdefault(text_key(classes[folder]), folder)
        if other != folder:
            raise ValueError(f"class folders {other!r} and {folder!r} both read {text_key(classes[folder])!r} to the "
                             f"model's text encoder (it ignores case and repeated spaces), so the model could not "
                             f"tell them apart: merge the two folders, or rename one")
    return classes, {name: i for i, name in enumerate(sorted(classes.values()))}


def _seeded_split(videos: list[str], fraction: float, seed: int, folder: str) -> tuple[list[str], list[str]]:
    """(train, val) of one class: a seeded `fraction` of its videos (at least one when it has two or more; none
    from a class of one video), the same for the same files, seed and class however the folder is listed."""
    if len(videos) < 2:
        return list(videos), []
    shuffled = list(videos)
    random.Random(f"{seed}/{folder}").shuffle(shuffled)
    n_val = min(max(1, round(len(videos) * fraction)), len(videos) - 1)
    return sorted(shuffled[n_val:]), sorted(shuffled[:n_val])


def import_folders(videos: str | Path, out_dir: str | Path, *, val_videos: str | Path | None = None,
                   val_fraction: float = 0.1, seed: int = 0, labels: str | Path | None = None,
                   clip_seconds: float | None = None, progress: bool = False) -> FolderImport:
    """Write `out_dir`/train.csv, val.csv and labels.json from `videos`, a folder of one folder per class (local,
    or a bucket prefix: s3://, gs://): val.csv is `val_videos` (the same layout) when given, else a seeded
    `val_fraction` of each class's videos. `out_dir` may be a bucket prefix when the videos are in a bucket. With
    `clip_seconds`, each video becomes rows of that many seconds (`clip_windows`), after the split: a
    video's clips are all in train.csv or all in val.csv. Nothing is written when a check fails."""
    source, out = _Place.of(videos), _Place.of(out_dir)
    val_source = _Place.of(val_videos) if val_videos is not None else None
    if out.remote and not (source.remote and (val_source is None or val_source.remote)):
        raise ValueError(f"--out {out.shown} is in a bucket but the videos are on this machine, where the cluster "
                         f"cannot read them: import into a local --out, then copy the folder with `data upload`")
    if clip_seconds is not None:
        check_clip_seconds(clip_seconds)
    if val_videos is None and not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction {val_fraction}: give a fraction between 0 and 1 (e.g. 0.1), or a folder of "
                         f"validation videos with --val-videos (training needs a val.csv)")
    train_scan = scan_class_folders(source.given, "--videos", progress)
    val_scan = scan_class_folders(val_source.given, "--val-videos", progress) if val_source is not None else None
    if val_scan is not None:
        alien = sorted(set(val_scan.videos) - set(train_scan.videos))
        if alien:
            raise ValueError(f"--val-videos {val_scan.shown}: {len(alien)} class folders have no folder of the same "
                             f"name in --videos {train_scan.shown} ({', '.join(alien[:5])}); a class the model is "
                             f"validated on must be one it trains on")
    folder_names = sorted(train_scan.videos)
    classes, label_map = _class_map(folder_names, labels)
    if out.exists("labels.json") and load_labels(out.child("labels.json")) != label_map:
        raise earlier_labels_differ(f"{out.shown.rstrip('/')}/labels.json", len(label_map), "these folders")

    parts: dict[str, list[dict[str, object]]] = {"train.csv": [], "val.csv": []}
    for folder in folder_names:
        if val_scan is None:
            train, val = _seeded_split(train_scan.videos[folder], val_fraction, seed, folder)
            sources = ((source, "train.csv", train), (source, "val.csv", val))
        else:
            sources = ((source, "train.csv", train_scan.videos[folder]),
                       (val_source, "val.csv", val_scan.videos.get(folder, [])))
        for place, name, rels in sources:
            parts[name] += [{"path": _row_path(place, rel, out), "label": classes[folder],
                             "location": place.child(rel)} for rel in rels]  # what reads it: a URI keeps its query
    videos_per_part = {name.removesuffix(".csv"): len(rows) for name, rows in parts.items()}
    notes = train_scan.notes("--videos") + (val_scan.notes("--val-videos") if val_scan else [])
    if clip_seconds is not None:
        parts, clip_notes = cut_into_clips(parts, clip_seconds, progress)
        notes += clip_notes
        if source.remote or (val_source is not None and val_source.remote):
            notes.append("each clip row fetches its whole video from the bucket (decoders read whole files), so an "
                         "epoch fetches a video once per clip of it: `data transcode --manifest M --out "
                         "s3://BUCKET/PREFIX --cut` writes each clip as a file of its own, into the bucket, on every "
                         "node of the cluster")
    per_class = sorted((len(train_scan.videos[f]), f) for f in folder_names)
    if per_class[-1][0] >= IMBALANCE * max(1, per_class[0][0]):
        fewest = ", ".join(f"{f} ({n})" for n, f in per_class[:3])
        notes.append(f"the classes are imbalanced: {per_class[0][0]} to {per_class[-1][0]} videos per class in "
                     f"--videos (fewest: {fewest}); mean class accuracy (val_mean_class_acc, evaluate's) weighs every "
                     f"class alike, top-1 follows the large ones: rank checkpoints by it with --set "
                     f"eval.best_metric=val_mean_class_acc")
    if val_scan is None:
        single = [f for f in folder_names if len(train_scan.videos[f]) < 2]
        if single:
            notes.append(f"{len(single)} classes have a single video, kept for training and absent from val.csv "
                         f"({', '.join(single[:3])}{', ...' if len(single) > 3 else ''})")
        val_rule = f"{val_fraction:g} of each class's videos, chosen with --seed {seed}"
    else:
        missing = [f for f in folder_names if f not in val_scan.videos]
        if missing:
            notes.append(f"{len(missing)} training classes have no validation videos in --val-videos "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        val_rule = f"--val-videos {val_scan.shown}"
    rows = [str(row["path"]) for name_rows in parts.values() for row in name_rows]
    if not out.remote and any(is_remote(path) for path in rows):
        notes.append("the manifests are on this machine and name the videos by their bucket URIs: a cluster without "
                     "a shared disk needs them in the bucket too (give --out a prefix in the bucket)")
    elif note := absolute_paths_note(rows, f"--out {out.shown}"):
        notes.append(note)
    if not parts["val.csv"]:
        raise ValueError(f"val.csv would be empty: every class of --videos {train_scan.shown} has a single video; "
                         f"give --val-videos, or more videos per class")
    _write(out, {name: [{k: v for k, v in row.items() if k != "location"} for row in part]
                 for name, part in parts.items()}, label_map)
    renamed = [(f, classes[f]) for f in folder_names if classes[f] != f]
    return FolderImport(out.shown, {name.removesuffix(".csv"): len(r) for name, r in parts.items()},
                        len(folder_names), val_rule, renamed, notes, str(labels) if labels is not None else "",
                        videos_per_part, clip_seconds)
