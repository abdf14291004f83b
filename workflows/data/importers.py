"""Importers that turn the annotation formats users bring into a manifest plus a label file.

- Something-Something-V2: the official `something-something-v2-{train,validation}.json` lists (`id`, `template`
  with "[something]" placeholders) or the authors' `*-with-label.json` variants (`id`, `label_idx`), together
  with `something-something-v2-labels.json` ({class name: "index"}); videos are `<video_dir>/<id>.webm` (or .mp4).
- Plain lists, as most Kinetics repos ship (`kinetics400_train_list.txt`): one `relative/path.mp4 label` per
  line, the label a class name without spaces or an integer index (names then come from `--labels`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from workflows.data.manifest import VIDEO_EXTENSIONS, class_key, load_labels, relative_to, save_labels, write_manifest


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

    def summary(self) -> str:
        """One line."""
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
    report = ImportReport(manifest=str(out), labels=str(out.parent / "labels.json"), classes=len(label_map))
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
    report = ImportReport(manifest=str(out), labels=str(existing))
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
