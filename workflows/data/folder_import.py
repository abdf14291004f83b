"""`data import folders`: a user's own videos, laid out as one folder per class, become train.csv, val.csv and
labels.json.

    videos/                              --videos videos  (--val-fraction 0.1: a seeded tenth of each class to val)
      playing_guitar/a.mp4, b.mp4, ...   or --videos train --val-videos val, two folders of the same layout
      ApplyEyeMakeup/clips/c.avi         (videos at any depth below their class folder)

Class names are the folder names as words, what the model's text encoder reads: underscores become spaces
("passing_American_football_(in_game)" -> "passing American football (in game)", Kinetics' own spelling) and a
name written as one CamelCase word is split ("ApplyEyeMakeup" -> "apply eye makeup"). `--labels` maps the folders
onto an existing label file instead (its indices kept). What is not taken is counted and shown, never silently
dropped: files whose extension is not a video's, hidden files (macOS `._name.mp4` metadata files look like
videos), videos lying outside any class folder, class folders without a video.
"""

from __future__ import annotations

import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from workflows.data.manifest import VIDEO_EXTENSIONS, class_key, load_labels, relative_to, save_labels, write_manifest

SPLIT_FOLDER_NAMES = {"train", "training", "val", "valid", "validation", "test", "testing", "eval"}


def folder_class_text(name: str) -> str:
    """A class folder's name as the words of its class: underscores become spaces, case and punctuation are kept
    ("passing_American_football_(in_game)" -> "passing American football (in game)"), and a single CamelCase word
    is split and lower-cased as UCF101's are ("ApplyEyeMakeup" -> "apply eye makeup", "YoYo" -> "yo yo")."""
    words = " ".join(name.replace("_", " ").split())
    if " " not in words and re.search(r"[a-z][A-Z]", words):
        words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", words).lower()
    return words


@dataclass
class FolderScan:
    """The videos of one folder of class folders, and what was not taken from it."""

    root: Path
    videos: dict[str, list[Path]] = field(default_factory=dict)  # class folder name -> its videos, sorted
    other_files: Counter = field(default_factory=Counter)  # extension -> files in class folders that are not videos
    other_examples: list[str] = field(default_factory=list)
    hidden: list[str] = field(default_factory=list)  # hidden files and folders below the class folders
    loose_videos: list[str] = field(default_factory=list)  # videos directly in the root, in no class folder
    empty_classes: list[str] = field(default_factory=list)  # class folders holding no video

    def notes(self, option: str) -> list[str]:
        """One line per kind of thing not taken, naming examples."""
        def examples(items: list[str]) -> str:
            return ", ".join(items[:3]) + (", ..." if len(items) > 3 else "")

        lines = []
        if self.loose_videos:
            lines.append(f"{option} {self.root}: skipped {len(self.loose_videos)} videos lying in no class folder "
                         f"({examples(self.loose_videos)}): a video's class is the folder it is in")
        if self.empty_classes:
            lines.append(f"{option} {self.root}: skipped {len(self.empty_classes)} folders holding no video "
                         f"({examples(self.empty_classes)})")
        if self.other_files:
            counts = ", ".join(f"{ext or '(no extension)'}: {n}" for ext, n in self.other_files.most_common(5))
            lines.append(f"{option} {self.root}: skipped {sum(self.other_files.values())} files that are not videos "
                         f"by their extension ({counts}; e.g. {examples(self.other_examples)}); videos are "
                         f"{', '.join(VIDEO_EXTENSIONS)}")
        if self.hidden:
            lines.append(f"{option} {self.root}: skipped {len(self.hidden)} hidden files or folders "
                         f"({examples(self.hidden)}; a ._name file is macOS metadata, not a video)")
        return lines


def scan_class_folders(root: Path, option: str) -> FolderScan:
    """Every video below each class folder of `root` (symlinked folders followed); ValueError / FileNotFoundError
    naming `option` when `root` is not laid out as one folder per class."""
    if not root.is_dir():
        raise FileNotFoundError(f"{option} {root} is not a folder; give the folder holding one folder per class")
    scan = FolderScan(root)
    folders = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue  # .DS_Store, .ipynb_checkpoints at the top: not classes, and not worth a note
        if entry.is_dir():
            folders.append(entry)
        elif entry.suffix.lower() in VIDEO_EXTENSIONS:
            scan.loose_videos.append(entry.name)
        # other top-level files (this tool's own train.csv and labels.json, a README) are not the dataset's
    if not folders:
        what = (f"holds {len(scan.loose_videos)} videos but no class folder" if scan.loose_videos else
                "holds no folder")
        raise ValueError(f"{option} {root} {what}: this tool takes one folder per class (<class>/<video>); for a "
                         f"list of paths and labels use `data import list`")
    split_named = [f.name for f in folders if f.name.lower() in SPLIT_FOLDER_NAMES]
    if split_named and len(split_named) == len(folders) and any(child.is_dir() for child in folders[0].iterdir()):
        train = next((n for n in split_named if n.lower().startswith("train")), split_named[0])
        val = next((n for n in split_named if n != train), "val")
        raise ValueError(f"{option} {root} holds split folders ({', '.join(split_named)}), not class folders: give "
                         f"--videos {root / train} --val-videos {root / val}")
    for folder in folders:
        found, visited = [], {os.path.realpath(folder)}
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            here = Path(dirpath)
            for name in [d for d in dirnames if d.startswith(".")]:
                dirnames.remove(name)
                scan.hidden.append(str((here / name).relative_to(root)))
            for name in list(dirnames):  # a symlink back up the tree would be walked forever
                real = os.path.realpath(here / name)
                if real in visited:
                    dirnames.remove(name)
                visited.add(real)
            dirnames.sort()
            for name in sorted(filenames):
                rel = str((here / name).relative_to(root))
                suffix = Path(name).suffix.lower()
                if name.startswith("."):
                    scan.hidden.append(rel)
                elif suffix in VIDEO_EXTENSIONS:
                    found.append(here / name)
                else:
                    scan.other_files[suffix] += 1
                    if len(scan.other_examples) < 3:
                        scan.other_examples.append(rel)
        if found:
            scan.videos[folder.name] = found
        else:
            scan.empty_classes.append(folder.name + "/")
    if not scan.videos:
        raise ValueError(f"{option} {root}: none of its {len(folders)} folders holds a video "
                         f"({', '.join(VIDEO_EXTENSIONS)}); give the folder holding one folder per class")
    return scan


@dataclass
class FolderImport:
    """What `import_folders` wrote."""

    out_dir: Path
    counts: dict[str, int]  # manifest name -> videos
    classes: int
    val_rule: str  # how val.csv was chosen
    class_words: list[tuple[str, str]]  # (folder, class) of the folders whose class reads otherwise, a few
    notes: list[str]
    labels_from: str  # "" when labels.json was written from the folders

    def summary(self) -> list[str]:
        """The lines the CLI prints."""
        lines = [f"wrote {self.out_dir / 'train.csv'}: {self.counts['train']} videos of {self.classes} classes",
                 f"wrote {self.out_dir / 'val.csv'}: {self.counts['val']} videos ({self.val_rule})"]
        if self.labels_from:
            lines.append(f"wrote {self.out_dir / 'labels.json'}: the classes and indices of {self.labels_from}")
        else:
            shown = "; ".join(f"{folder!r} -> {text!r}" for folder, text in self.class_words[:3])
            renamed = f" (e.g. {shown})" if shown else ""
            lines.append(f"wrote {self.out_dir / 'labels.json'}: {self.classes} classes, the folder names as "
                         f"words{renamed}")
        return lines + [f"note: {note}" for note in self.notes]


def _class_map(folders: list[str], labels: str | Path | None) -> tuple[dict[str, str], dict[str, int]]:
    """({folder: class}, label map): the label map from `labels` when given (every folder's class must be in it),
    else from the folders' words in sorted order (two folders reading the same are an error)."""
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
    by_class: dict[str, str] = {}
    for folder in folders:
        if not classes[folder]:
            raise ValueError(f"class folder {folder!r} has no words to name its class by; rename it")
        other = by_class.setdefault(classes[folder], folder)
        if other != folder:
            raise ValueError(f"class folders {other!r} and {folder!r} both read {classes[folder]!r} as words; the "
                             f"model could not tell them apart: merge or rename one")
    return classes, {name: i for i, name in enumerate(sorted(by_class))}


def _seeded_split(videos: list[Path], fraction: float, seed: int, folder: str) -> tuple[list[Path], list[Path]]:
    """(train, val) of one class: a seeded `fraction` of its videos (at least one when it has two or more; none
    from a class of one video), the same for the same files, seed and class however the folder is listed."""
    if len(videos) < 2:
        return list(videos), []
    shuffled = list(videos)
    random.Random(f"{seed}/{folder}").shuffle(shuffled)
    n_val = min(max(1, round(len(videos) * fraction)), len(videos) - 1)
    return sorted(shuffled[n_val:]), sorted(shuffled[:n_val])


def import_folders(videos: str | Path, out_dir: str | Path, *, val_videos: str | Path | None = None,
                   val_fraction: float = 0.1, seed: int = 0, labels: str | Path | None = None) -> FolderImport:
    """Write `out_dir`/train.csv, val.csv and labels.json from `videos`, a folder of one folder per class: val.csv
    is `val_videos` (the same layout) when given, else a seeded `val_fraction` of each class's videos. Nothing is
    written when a check fails."""
    videos, out_dir = Path(videos).expanduser(), Path(out_dir).expanduser()
    if val_videos is None and not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction {val_fraction}: give a fraction between 0 and 1 (e.g. 0.1), or a folder of "
                         f"validation videos with --val-videos (training needs a val.csv)")
    train_scan = scan_class_folders(videos, "--videos")
    val_scan = scan_class_folders(Path(val_videos).expanduser(), "--val-videos") if val_videos is not None else None
    if val_scan is not None:
        alien = sorted(set(val_scan.videos) - set(train_scan.videos))
        if alien:
            raise ValueError(f"--val-videos {val_scan.root}: {len(alien)} class folders have no folder of the same "
                             f"name in --videos {videos} ({', '.join(alien[:5])}); a class the model is validated on "
                             f"must be one it trains on")
    folder_names = sorted(train_scan.videos)
    classes, label_map = _class_map(folder_names, labels)
    existing = out_dir / "labels.json"
    if existing.is_file() and (labels is None or Path(labels).resolve() != existing.resolve()) \
            and load_labels(str(existing)) != label_map:
        raise ValueError(f"{existing} (written by an earlier import into this folder) holds other classes or indices "
                         f"than these folders ({len(label_map)} classes); import into another folder, or delete it")

    parts: dict[str, list[dict[str, str]]] = {"train": [], "val": []}
    for folder in folder_names:
        if val_scan is None:
            train, val = _seeded_split(train_scan.videos[folder], val_fraction, seed, folder)
        else:
            train, val = train_scan.videos[folder], val_scan.videos.get(folder, [])
        for part, files in (("train", train), ("val", val)):
            parts[part] += [{"path": relative_to(path, out_dir), "label": classes[folder]} for path in files]
    notes = train_scan.notes("--videos") + (val_scan.notes("--val-videos") if val_scan else [])
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
        val_rule = f"--val-videos {val_scan.root}"
    if any(Path(row["path"]).is_absolute() for rows in parts.values() for row in rows):
        notes.append(f"the videos are not below --out {out_dir}, so the manifests name them by absolute paths: "
                     f"fine on this machine and a shared disk, but `data upload` needs them below --out")
    if not parts["val"]:
        raise ValueError(f"val.csv would be empty: every class of --videos {videos} has a single video; give "
                         f"--val-videos, or more videos per class")
    out_dir.mkdir(parents=True, exist_ok=True)
    for part, rows in parts.items():
        write_manifest(rows, out_dir / f"{part}.csv")
    save_labels(label_map, existing)
    renamed = [(f, classes[f]) for f in folder_names if classes[f] != f]
    return FolderImport(out_dir, {part: len(rows) for part, rows in parts.items()}, len(folder_names), val_rule,
                        renamed, notes, str(labels) if labels is not None else "")
