"""Importers that turn the annotation formats users bring into a manifest plus a label file.

- Something-Something-V2: the official `something-something-v2-{train,validation}.json` lists (`id`, `template`
  with "[something]" placeholders) or the authors' `*-with-label.json` variants (`id`, `label_idx`), together
  with `something-something-v2-labels.json` ({class name: "index"}); videos are `<video_dir>/<id>.webm` (or .mp4).
- Plain lists, as most Kinetics repos ship (`kinetics400_train_list.txt`): one `relative/path.mp4 label` per
  line, the label a class name without spaces or an integer index (names then come from `--labels`).
- UCF101: the official `ucfTrainTestlist/` (`classInd.txt`: `1 ApplyEyeMakeup`; `trainlist0N.txt`:
  `Class/v_Class_g08_c01.avi 1`; `testlist0N.txt`: `Class/v_Class_g01_c01.avi`) and the `UCF101/` folder of
  one folder per class; one split becomes train.csv, val.csv (the official test list) and labels.json.
- HMDB51: the official `testTrainMulti_7030_splits/` (`<class>_test_split<N>.txt`, lines `<video>.avi <tag>`,
  tag 1 train, 2 test, 0 unused) and a folder of one folder per class; written as UCF101's.
UCF101 and HMDB51 class names become words ("ApplyEyeMakeup" -> "apply eye makeup", "brush_hair" -> "brush hair"):
the model scores videos against the text of the class names.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from workflows.data.manifest import (
    VIDEO_EXTENSIONS,
    class_key,
    earlier_labels_differ,
    load_labels,
    relative_to,
    save_labels,
    write_manifest,
)


def _read_text(path: Path, what: str) -> str:
    """A text file's contents; errors name the file (`what`: which argument it is)."""
    try:
        return path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not part of line 1
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} {path} cannot be read: {exc}") from None


@dataclass
class ImportReport:
    """Counts of an import."""

    videos: int = 0
    classes: int = 0
    missing: int = 0  # listed but not found (only counted when files are checked)
    missing_examples: list[str] = field(default_factory=list)
    manifest: str = ""
    labels: str = ""
    unchecked: str = ""  # when the files were not looked for: the option that looks

    def summary(self) -> str:
        """One line."""
        if self.unchecked:  # nothing was looked for: "0 missing" would claim a check that did not happen
            return (f"wrote {self.manifest}: {self.videos} videos, {self.classes} classes; labels {self.labels}; "
                    f"files not checked ({self.unchecked})")
        extra = f" (e.g. {', '.join(self.missing_examples[:3])})" if self.missing_examples else ""
        return (f"wrote {self.manifest}: {self.videos} videos, {self.classes} classes; labels {self.labels}; "
                f"{self.missing} listed but missing{extra}")


def ssv2_class_name(template: str) -> str:
    """The class name of an SSV2 template: placeholders lose their brackets ("Putting [something] on a surface"
    -> "Putting something on a surface"), which is how the official label file spells classes."""
    return template.replace("[", "").replace("]", "").strip()


def import_ssv2(annotations: str | Path, labels: str | Path, video_dir: str | Path, out_manifest: str | Path, *,
                check_files: bool = True) -> ImportReport:
    """Write a manifest (and labels.json beside it) from SSV2 JSON annotations."""
    label_map = load_labels(str(labels))
    names_by_index = {v: k for k, v in label_map.items()}
    try:
        records = json.loads(_read_text(Path(annotations), "annotations file (--annotations)"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"annotations file (--annotations) {annotations} is not valid JSON: {exc}") from None
    if not isinstance(records, list):
        raise ValueError(f"{annotations}: expected a JSON list of videos")
    if not records:
        raise ValueError(f"annotations file (--annotations) {annotations} lists no videos")
    if check_files and not Path(video_dir).is_dir():
        raise FileNotFoundError(f"video folder (--videos) {video_dir} is not a folder; give the folder holding "
                                f"<id>.webm / <id>.mp4 (or --no-check to write the manifest without looking)")
    out = Path(out_manifest)
    report = ImportReport(manifest=str(out), labels=str(out.parent / "labels.json"), classes=len(label_map),
                          unchecked="" if check_files else "leave out --no-check")
    rows = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"{annotations}, entry {i}: expected an object with 'id' and 'template', got {rec!r}")
        vid = str(rec.get("id", "")).strip()
        if "label_idx" in rec:
            name = names_by_index.get(int(rec["label_idx"]))
        elif "template" in rec:
            name = ssv2_class_name(rec["template"])
        else:
            raise ValueError(f"{annotations}, entry {i}: no 'template' or 'label_idx' (test lists are unlabelled)")
        if not vid or name not in label_map:
            raise ValueError(f"{annotations}, entry {i} (id {vid!r}): class {name!r} is not in {labels}")
        candidates = [Path(video_dir) / f"{vid}{ext}" for ext in (".webm", ".mp4")]
        path = next((c for c in candidates if c.is_file()), None) if check_files else candidates[0]
        if path is None:
            report.missing += 1
            if len(report.missing_examples) < 10:
                report.missing_examples.append(vid)
            continue
        rows.append({"path": relative_to(path, out.parent), "label": name})
    if not rows:
        raise ValueError(f"none of the {len(records)} videos of {annotations} is in {video_dir} (looked for "
                         f"<id>.webm and <id>.mp4 directly in it, e.g. {report.missing_examples[0]}.webm); check "
                         f"--videos, or pass --no-check to write the manifest without looking")
    write_manifest(rows, out)
    save_labels(label_map, out.parent / "labels.json")
    report.videos = len(rows)
    return report


def _check_list_path(rel: str, list_file: Path, line: int) -> None:
    """A list line split at the wrong space leaves a video's name inside the path ("a.mp4 playing" + "guitar"):
    refuse it, naming the way to write class names with spaces."""
    words = rel.split()
    if len(words) > 1 and not rel.lower().endswith(VIDEO_EXTENSIONS) and any(
            w.lower().endswith(VIDEO_EXTENSIONS) for w in words[:-1]):
        raise ValueError(f"{list_file}, line {line}: the path {rel!r} does not end in a video file name; a class "
                         f"name with spaces needs a tab between path and class (path<TAB>class name)")


def import_list(list_file: str | Path, out_manifest: str | Path, *, root: str | Path | None = None,
                labels: str | Path | None = None, check_files: bool = False) -> ImportReport:
    """Write a manifest (and labels.json beside it) from a `path label` list. `root` is the folder the list's
    paths are relative to (default: the list's folder)."""
    list_file = Path(list_file)
    base = Path(root) if root is not None else list_file.parent
    out = Path(out_manifest)
    existing = out.parent / "labels.json"
    if labels is None and existing.is_file():  # an earlier import's (train before val): keep its indices
        labels = existing
    label_map = load_labels(str(labels)) if labels is not None else None
    names_by_index = {v: k for k, v in (label_map or {}).items()}
    not_in = (f"{labels} (written by an earlier import into this folder; pass --labels for another label file, or "
              f"import into another folder)" if labels == existing else str(labels))
    report = ImportReport(manifest=str(out), labels=str(existing), unchecked="" if check_files else "add --check")
    if check_files and not base.is_dir():
        raise FileNotFoundError(f"{'--root' if root is not None else 'the list folder'} {base} is not a folder; it "
                                f"is where the list's paths are looked up")
    rows, seen, listed = [], {}, 0
    for n, line in enumerate(_read_text(list_file, "list file (--list)").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        # A tab separates path and class when there is one (class names with spaces); else the last whitespace.
        parts = [part.strip() for part in line.split("\t")] if "\t" in line else line.rsplit(maxsplit=1)
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"{list_file}, line {n}: expected 'path label' (or path<TAB>label), got {line!r}")
        rel, label = parts
        _check_list_path(rel, list_file, n)
        listed += 1
        if label.lstrip("-").isdecimal():
            index = int(label)
            if label_map is not None:
                if index not in names_by_index:
                    raise ValueError(f"{list_file}, line {n}: index {index} is not in {not_in}")
                label = names_by_index[index]
        elif label_map is not None and class_key(label) not in label_map:
            raise ValueError(f"{list_file}, line {n}: class {label!r} is not in {not_in}")
        path = base / rel
        if check_files and not path.is_file():
            report.missing += 1
            if len(report.missing_examples) < 10:
                report.missing_examples.append(str(path))
            continue
        seen.setdefault(label, len(seen))
        rows.append({"path": relative_to(path, out.parent), "label": label})
    if not listed:
        raise ValueError(f"list file (--list) {list_file} has no `path label` lines")
    if not rows:
        relative = "--root" if root is not None else "the list file's folder (pass --root for another)"
        raise ValueError(f"none of the {listed} files listed in {list_file} exists (e.g. "
                         f"{report.missing_examples[0]}): its paths are taken relative to {relative}")
    if label_map is None:  # classes sorted by name, or by index when the list holds integers
        names = list(seen)
        numbers = [s for s in names if s.lstrip("-").isdecimal()]
        if numbers and len(numbers) < len(names):
            raise ValueError(f"{list_file}: labels mix class indices ({numbers[0]!r}) and names "
                             f"({next(s for s in names if s not in numbers)!r}); pass --labels to name the indices")
        if numbers:
            names = sorted(names, key=int)
            if [int(s) for s in names] != list(range(len(names))):
                raise ValueError(f"{list_file}: integer labels must be 0..K-1 without gaps; pass --labels")
        else:
            names = sorted(names)
        label_map = {name: i for i, name in enumerate(names)}
    write_manifest(rows, out)
    save_labels(label_map, out.parent / "labels.json")
    report.videos, report.classes = len(rows), len(label_map)
    return report


# UCF101 and HMDB51: the official split files of the standard transfer benchmarks.

OFFICIAL_SPLITS = (1, 2, 3)
UCF101_SPLITS_HINT = ("the folder holding classInd.txt, trainlist01..03.txt and testlist01..03.txt (ucfTrainTestlist, "
                      "from UCF101TrainTestSplits-RecognitionTask.zip)")
HMDB51_SPLITS_HINT = ("the folder holding <class>_test_split<N>.txt for every class and N = 1, 2, 3 "
                      "(testTrainMulti_7030_splits, from test_train_splits.rar)")


def ucf101_class_text(name: str) -> str:
    """A UCF101 class name as words, what the model's text encoder reads: "ApplyEyeMakeup" -> "apply eye makeup",
    "YoYo" -> "yo yo", "CleanAndJerk" -> "clean and jerk"."""
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", name.replace("_", " "))
    return " ".join(words.lower().split())


def hmdb51_class_text(name: str) -> str:
    """An HMDB51 class name as words: "brush_hair" -> "brush hair", "fall_floor" -> "fall floor"."""
    return " ".join(name.replace("_", " ").lower().split())


@dataclass
class _Listed:
    """One video of a split list: its path below the video folder, its class, and where it was listed."""

    rel: str
    label: str
    source: Path
    line: int


def _check_split(split: int, dataset: str) -> None:
    if isinstance(split, bool) or split not in OFFICIAL_SPLITS:
        raise ValueError(f"--split {split!r}: {dataset} has the official splits 1, 2 and 3")


def _lines(path: Path, what: str) -> list[tuple[int, str]]:
    """(1-based line number, line) of a text file's non-blank lines (CRLF or LF)."""
    return [(n, line) for n, line in enumerate(_read_text(path, what).splitlines(), 1) if line.strip()]


def _splits_folder(splits: Path, hint: str) -> None:
    if not splits.is_dir():
        raise FileNotFoundError(f"split folder (--splits) {splits} is not a folder; give {hint}")


def _split_file(splits: Path, name: str, what: str, hint: str) -> Path:
    path = splits / name
    if not path.is_file():
        nested = next((p for p in splits.iterdir() if p.is_dir() and (p / name).is_file()), None)
        also = f" (did you mean --splits {nested}?)" if nested else ""
        raise FileNotFoundError(f"split folder (--splits) {splits} has no {name} ({what}){also}; give {hint}")
    return path


def _readable_labels(names: list[str], text, source: str) -> dict[str, int]:
    """{class text: 0-based index} in the official order; two classes that read the same are an error."""
    labels: dict[str, int] = {}
    for index, name in enumerate(names):
        key = class_key(text(name))
        if not key:
            raise ValueError(f"{source}: class {name!r} has no words to name it by")
        if key in labels:
            raise ValueError(f"{source}: classes {names[labels[key]]!r} and {name!r} both read {key!r} once written "
                             f"as words; the model could not tell them apart: rename one")
        labels[key] = index
    return labels


def _video_rel(rel: str, source: Path, n: int, expected: str) -> tuple[str, str]:
    """(class folder, file name) of a listed `<class folder>/<video file>` path."""
    parts = PurePosixPath(rel.replace("\\", "/")).parts
    if len(parts) != 2 or not rel.lower().endswith(VIDEO_EXTENSIONS):
        raise ValueError(f"{source}, line {n}: {rel!r} is not a <class folder>/<video file> path; expected {expected}")
    return parts[0], parts[1]


_PART_WORDS = {"train": "train", "val": "test", "unused": "not used (tag 0)"}


def _no_repeats(lists: dict[str, list[_Listed]]) -> None:
    """A video listed twice in one split (in both train and test, or twice in one of them) is an error."""
    seen: dict[str, tuple[str, _Listed]] = {}
    for part, entries in lists.items():
        for e in entries:
            first = seen.setdefault(e.rel.lower(), (part, e))
            if first[1] is not e:
                what = (f"listed twice as {_PART_WORDS[part]}" if first[0] == part else
                        f"both {_PART_WORDS[first[0]]} and {_PART_WORDS[part]}")
                raise ValueError(f"{e.source}, line {e.line}: {e.rel} is {what} in this split (also "
                                 f"{first[1].source}, line {first[1].line}); fix or re-extract the split files")


class _Finder:
    """Listed videos looked up below the video folder; a path that is missing is matched case-insensitively, one
    folder at a time, before it counts as missing (UCF101's HandstandPushups folder is HandStandPushups in some
    extracted copies)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._listings: dict[Path, dict[str, str]] = {}
        self._class_folders: dict[str, str] = {}

    def in_class_folder(self, rel: str) -> Path:
        """Where a listed video is, its class folder spelt as on disk, without looking for the file itself (one
        listing of the video folder, not a look per video): what is written without --check."""
        first, *rest = PurePosixPath(rel).parts
        if first not in self._class_folders:
            self._class_folders[first] = first if (self.root / first).is_dir() else \
                self._entries(self.root).get(first.lower(), first)
        return self.root.joinpath(self._class_folders[first], *rest)

    def _entries(self, folder: Path) -> dict[str, str]:
        if folder not in self._listings:
            entries: dict[str, str] = {}
            if folder.is_dir():
                for child in sorted(folder.iterdir()):
                    entries.setdefault(child.name.lower(), child.name)
            self._listings[folder] = entries
        return self._listings[folder]

    def find(self, rel: str) -> Path | None:
        path = self.root / rel
        if path.is_file():
            return path
        current = self.root
        for part in PurePosixPath(rel).parts:
            real = part if (current / part).exists() else self._entries(current).get(part.lower())
            if real is None:
                return None
            current = current / real
        return current if current.is_file() else None


def _write_benchmark(lists: dict[str, list[_Listed]], label_map: dict[str, int], videos: Path, out_dir: Path,
                     check_files: bool, dataset: str) -> list[ImportReport]:
    """train.csv / val.csv / labels.json of one official split in `out_dir`; nothing is written when any check
    fails."""
    if check_files and not videos.is_dir():
        raise FileNotFoundError(f"video folder (--videos) {videos} is not a folder; it is the {dataset} folder holding "
                                f"one folder per class, where the lists' paths are looked up")
    existing = out_dir / "labels.json"
    if existing.is_file() and load_labels(str(existing)) != label_map:
        raise earlier_labels_differ(str(existing), len(label_map), f"the {dataset} split files")
    finder = _Finder(videos)
    reports, manifests = [], []
    for part, entries in lists.items():
        out = out_dir / f"{part}.csv"
        report = ImportReport(manifest=str(out), labels=str(existing), classes=len(label_map),
                              unchecked="" if check_files else "add --check")
        rows = []
        for e in entries:
            path = finder.find(e.rel) if check_files else finder.in_class_folder(e.rel)
            if path is None:
                report.missing += 1
                if len(report.missing_examples) < 10:
                    report.missing_examples.append(str(videos / e.rel))
                continue
            rows.append({"path": relative_to(path, out_dir), "label": e.label})
        if not entries:
            raise ValueError(f"the {dataset} split files list no {part} videos ({part}.csv would be empty)")
        if not rows:
            raise ValueError(f"none of the {len(entries)} {part} videos of the {dataset} split files is below video "
                             f"folder (--videos) {videos} (e.g. {report.missing_examples[0]}); give the folder holding "
                             f"one folder per class")
        report.videos = len(rows)
        reports.append(report)
        manifests.append((rows, out))
    for rows, out in manifests:
        write_manifest(rows, out)
    save_labels(label_map, existing)
    return reports


def _ucf101_classes(path: Path) -> list[str]:
    """classInd.txt's class names in index order (indices 1..K)."""
    by_index: dict[int, tuple[str, int]] = {}
    lines_by_name: dict[str, int] = {}
    for n, line in _lines(path, "UCF101 class list"):
        fields = line.split()
        if len(fields) != 2 or not fields[0].isdecimal():
            many = " (too many fields)" if len(fields) > 2 else ""
            raise ValueError(f"{path}, line {n}: expected '<index> <ClassName>' (e.g. '1 ApplyEyeMakeup'), got "
                             f"{line!r}{many}")
        index, name = int(fields[0]), fields[1]
        if index in by_index:
            raise ValueError(f"{path}, line {n}: index {index} is given twice (also line {by_index[index][1]})")
        if name.lower() in lines_by_name:
            raise ValueError(f"{path}, line {n}: class {name!r} is given twice (also line "
                             f"{lines_by_name[name.lower()]})")
        by_index[index] = (name, n)
        lines_by_name[name.lower()] = n
    if not by_index:
        raise ValueError(f"UCF101 class list {path} lists no classes")
    gaps = sorted(set(range(1, len(by_index) + 1)) - set(by_index))
    if gaps:
        raise ValueError(f"{path}: class indices must be 1..{len(by_index)}; missing {gaps[:10]}")
    return [by_index[i][0] for i in sorted(by_index)]


def import_ucf101(videos: str | Path, splits: str | Path, split: int, out_dir: str | Path, *,
                  check_files: bool = False) -> list[ImportReport]:
    """Write `out_dir`/train.csv, val.csv (the official test list) and labels.json for one official UCF101 split.
    `videos`: the UCF101 folder of one folder per class; `splits`: ucfTrainTestlist. Labels are classInd's classes
    as words, 0-based in its order."""
    _check_split(split, "UCF101")
    videos, splits, out_dir = Path(videos), Path(splits), Path(out_dir)
    _splits_folder(splits, UCF101_SPLITS_HINT)
    class_file = _split_file(splits, "classInd.txt", "the class list", UCF101_SPLITS_HINT)
    train_file = _split_file(splits, f"trainlist0{split}.txt", f"split {split}'s training list", UCF101_SPLITS_HINT)
    test_file = _split_file(splits, f"testlist0{split}.txt", f"split {split}'s test list", UCF101_SPLITS_HINT)
    names = _ucf101_classes(class_file)
    label_map = _readable_labels(names, ucf101_class_text, str(class_file))
    by_folder = {name.lower(): name for name in names}
    lists: dict[str, list[_Listed]] = {"train": [], "val": []}
    for n, line in _lines(train_file, "UCF101 training list"):
        fields = line.split()
        expected = "'<Class>/<video>.avi <class index>' (e.g. 'ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1')"
        if len(fields) != 2:
            many = " (too many fields)" if len(fields) > 2 else ""
            raise ValueError(f"{train_file}, line {n}: expected {expected}, got {line!r}{many}")
        rel, index = fields
        if not index.isdecimal() or not 1 <= int(index) <= len(names):
            raise ValueError(f"{train_file}, line {n}: class index {index!r} is not in {class_file} (1..{len(names)});"
                             f" the lists and classInd.txt must come from the same download")
        folder, _ = _video_rel(rel, train_file, n, expected)
        name = names[int(index) - 1]
        if folder.lower() != name.lower():
            raise ValueError(f"{train_file}, line {n}: {rel} is in folder {folder!r}, but class {index} is {name!r} "
                             f"in {class_file}; the lists and classInd.txt must come from the same download")
        lists["train"].append(_Listed(rel, ucf101_class_text(name), train_file, n))
    for n, line in _lines(test_file, "UCF101 test list"):
        fields = line.split()
        expected = "'<Class>/<video>.avi' (e.g. 'ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi')"
        if len(fields) != 1:
            raise ValueError(f"{test_file}, line {n}: expected {expected}, got {line!r} (too many fields)")
        folder, _ = _video_rel(fields[0], test_file, n, expected)
        if folder.lower() not in by_folder:
            raise ValueError(f"{test_file}, line {n}: folder {folder!r} of {fields[0]} is not a class of {class_file}; "
                             f"a test video's class is its folder")
        lists["val"].append(_Listed(fields[0], ucf101_class_text(by_folder[folder.lower()]), test_file, n))
    _no_repeats(lists)
    return _write_benchmark(lists, label_map, videos, out_dir, check_files, "UCF101")


HMDB51_TAGS = {"1": "train", "2": "val"}  # "0": not used in this split


def _hmdb51_split_files(splits: Path, split: int) -> dict[str, Path]:
    """{class: its <class>_test_split<split>.txt}, sorted by class; every class with a split file must have this
    split's."""
    _splits_folder(splits, HMDB51_SPLITS_HINT)
    by_class: dict[str, dict[int, Path]] = {}
    for path in splits.iterdir():
        # Class names hold underscores (fall_floor): the class is what precedes the last "_test_split".
        name, sep, number = path.name.removesuffix(".txt").rpartition("_test_split")
        if path.name.endswith(".txt") and sep and name and number.isdecimal() and path.is_file():
            by_class.setdefault(name, {})[int(number)] = path
    if not by_class:
        nested = next((p for p in splits.iterdir() if p.is_dir() and any(p.glob("*_test_split*.txt"))), None)
        also = f" (did you mean --splits {nested}?)" if nested else ""
        raise FileNotFoundError(f"split folder (--splits) {splits} holds no <class>_test_split<N>.txt files{also}; "
                                f"give {HMDB51_SPLITS_HINT}")
    lacking = sorted(name for name, files in by_class.items() if split not in files)
    if lacking:
        shown = ", ".join(f"{name}_test_split{split}.txt" for name in lacking[:5])
        raise FileNotFoundError(f"split folder (--splits) {splits} lacks split {split}'s file of {len(lacking)} of "
                                f"its {len(by_class)} classes: {shown}{', ...' if len(lacking) > 5 else ''}; give "
                                f"{HMDB51_SPLITS_HINT}")
    return {name: by_class[name][split] for name in sorted(by_class)}


def import_hmdb51(videos: str | Path, splits: str | Path, split: int, out_dir: str | Path, *,
                  check_files: bool = False) -> list[ImportReport]:
    """Write `out_dir`/train.csv, val.csv (the official test videos) and labels.json for one official HMDB51 split.
    `videos`: the folder of one folder per class (hmdb51_org); `splits`: testTrainMulti_7030_splits. Labels are
    the classes as words, 0-based in sorted order of the class names."""
    _check_split(split, "HMDB51")
    videos, splits, out_dir = Path(videos), Path(splits), Path(out_dir)
    files = _hmdb51_split_files(splits, split)
    label_map = _readable_labels(list(files), hmdb51_class_text, f"split folder (--splits) {splits}")
    lists: dict[str, list[_Listed]] = {"train": [], "val": []}
    expected = "'<video>.avi <tag>' (tag 1: train, 2: test, 0: not in this split)"
    for name, path in files.items():
        for n, line in _lines(path, "HMDB51 split file"):
            fields = line.split()
            if len(fields) != 2:
                many = " (too many fields)" if len(fields) > 2 else ""
                raise ValueError(f"{path}, line {n}: expected {expected}, got {line!r}{many}")
            video, tag = fields
            if tag not in ("0", "1", "2"):
                raise ValueError(f"{path}, line {n}: tag {tag!r} of {video} is not 0 (not in this split), 1 (train) "
                                 f"or 2 (test)")
            rel = f"{name}/{video}"
            _video_rel(rel, path, n, expected)
            entry = _Listed(rel, hmdb51_class_text(name), path, n)
            if tag == "0":  # still a listing: a video tagged twice in one split is caught below
                lists.setdefault("unused", []).append(entry)
            else:
                lists[HMDB51_TAGS[tag]].append(entry)
    _no_repeats(lists)
    lists.pop("unused", None)
    return _write_benchmark(lists, label_map, videos, out_dir, check_files, "HMDB51")
