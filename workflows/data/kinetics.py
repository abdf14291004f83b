"""Kinetics-710 assembly from the official Kinetics-400/600/700 annotation CSVs and a folder of downloaded clips.

K710 (reference §4.3) is the union of the K400, K600 and K700 training sets, de-duplicated by YouTube id, with
every video that appears in any of the three validation or test sets removed from training; its validation set
is the union of the three validation sets (de-duplicated). Classes are merged across releases by a normalised
name (`normalize_class_name`):

- lower case;
- underscores become spaces (`passing_American_football_(in_game)` as in many repos' file lists);
- quotes are removed (' " ` and typographic quotes);
- parentheses and brackets become spaces, so "(in game)" and "in game" match;
- runs of whitespace collapse to one space; leading/trailing whitespace goes.

Releases also renamed 14 classes (K400 "dying hair" is K600/K700 "dyeing hair", K400/K600 "picking fruit" is K700
"picking apples", ...). The built-in alias table `k710_aliases.json` (next to this file) maps each older name
onto its K700 name, so assembling from the official CSVs gives exactly the 710 classes of K710 as UniFormerV2
defined it. The table was derived from UniFormerV2's K710 label file and its K400/K600/K700-to-K710 index maps
(mmaction2's copies; `kinetics_classes.json` holds them and the three release class lists, with sources). A
user alias mapping (`aliases`, JSON {variant: canonical}, e.g. `data k710 --aliases`) extends and overrides
the built-in one; mapping a built-in variant onto itself (`{"hugging": "hugging"}`) keeps it separate again.
The report lists the aliases that fired and the classes present in only one release so they can be checked.
A class's display name (what CLIP's text tower reads) is its spelling in the newest release that has it, with
underscores as spaces and double quotes removed (apostrophes stay: "massaging person's head"); for the merged
classes that is the K700 name (UniFormerV2's label file keeps one older spelling: "throwing ball", where K700 says
"throwing ball (not baseball or American football)"). When the same YouTube id carries different labels in
different releases, the newest release's label wins (counted as label_conflicts).

Clips are found by YouTube id: a file `<id>.<ext>` or `<id>_<start:06d>_<end:06d>.<ext>` anywhere under the
video folder. The official clips are trimmed already, so the manifests carry no start/end.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

from workflows.data.manifest import (
    VIDEO_EXTENSIONS,
    absolute_paths_note,
    relative_to,
    save_labels,
    video_files,
    write_manifest,
)

_CLIP_NAME = re.compile(r"^(?P<id>[A-Za-z0-9_-]{11})(?:_\d+_\d+)?$")
_QUOTES = re.compile(r"[\"'`\u2018\u2019\u201c\u201d]")  # all quotes and apostrophes: ignored when matching names
_DOUBLE_QUOTES = re.compile(r"[\"\u201c\u201d]")  # dropped from display names (the authors strip double quotes)
KINETICS_RELEASES = ("k400", "k600", "k700")
K710_ALIASES_FILE = Path(__file__).with_name("k710_aliases.json")
KINETICS_CLASSES_FILE = Path(__file__).with_name("kinetics_classes.json")


def normalize_class_name(name: str) -> str:
    """The key under which class names of different Kinetics releases are the same class (rules above)."""
    s = _QUOTES.sub("", name.strip().lower().replace("_", " "))
    s = re.sub(r"[()\[\]]", " ", s)
    return re.sub(r"\s+", " ", s).strip()


def display_class_name(name: str) -> str:
    """A class name as the text encoder should read it: underscores as spaces, no double quotes, single spaces.

    Apostrophes stay ("massaging person's head"): they are part of the name CLIP reads. Only matching across
    releases (`normalize_class_name`) ignores them."""
    return re.sub(r"\s+", " ", _DOUBLE_QUOTES.sub("", name.replace("_", " "))).strip()


def alias_table(raw: Mapping[str, object]) -> dict[str, str]:
    """{variant: canonical} from an alias mapping: either flat, or a file like k710_aliases.json whose "aliases"
    key holds it (other keys are notes)."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"class aliases must be a JSON object {{variant: canonical}}, got {type(raw).__name__}")
    inner = raw.get("aliases") if isinstance(raw.get("aliases"), Mapping) else raw
    table = {}
    for k, v in inner.items():  # type: ignore[union-attr]
        if not isinstance(v, str):
            raise ValueError(f"alias {k!r} maps to {v!r}; expected a class name (JSON {{variant: canonical}})")
        table[str(k)] = v
    return table


def load_alias_file(path: str | Path) -> dict[str, str]:
    """The alias table of a JSON file (`data k710 --aliases`); errors name the file."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise FileNotFoundError(f"--aliases file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--aliases file {path} cannot be read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"--aliases file {path} is not valid JSON: {exc}") from None
    try:
        return alias_table(raw)
    except ValueError as exc:
        raise ValueError(f"--aliases file {path}: {exc}") from None


@cache
def builtin_k710_aliases() -> dict[str, str]:
    """The built-in {older class name: K700 name} table for classes renamed between releases (k710_aliases.json)."""
    return alias_table(json.loads(K710_ALIASES_FILE.read_text(encoding="utf-8")))


def alias_resolver(aliases: Mapping[str, str] | None = None, *, builtin: bool = True) -> dict[str, str]:
    """{normalised variant: normalised canonical}: the built-in table (unless `builtin` is False) updated with
    `aliases`, chains followed (a -> b, b -> c gives a -> c), self-maps dropped."""
    raw = dict(builtin_k710_aliases()) if builtin else {}
    raw.update(alias_table(aliases or {}))
    step = {normalize_class_name(k): normalize_class_name(v) for k, v in raw.items()}
    resolved = {}
    for start in step:
        seen, key = {start}, step[start]
        while key in step and step[key] != key:
            if step[key] in seen:
                raise ValueError(f"class aliases form a cycle through {sorted(seen)}")
            seen.add(key)
            key = step[key]
        if key != start:
            resolved[start] = key
    return resolved


def release_of(path: str | Path) -> str:
    """'k400' / 'k600' / 'k700' from a path mentioning 400, 600 or 700 (e.g. kinetics700/train.csv)."""
    found = re.findall(r"(400|600|700)", str(path))
    if not found:
        raise ValueError(f"cannot tell the Kinetics release of {path}; name it as RELEASE:PATH, e.g. k400:{path}")
    return "k" + found[-1]


def _split_of(row: dict[str, str], path: Path) -> str:
    raw = (row.get("split") or "").strip().lower()
    if not raw:
        stem = path.stem.lower()
        raw = next((s for s in ("train", "validate", "val", "test") if s in stem), "")
    if raw in ("val", "validate", "validation"):
        return "val"
    if raw in ("train", "test"):
        return raw
    raise ValueError(f"{path}: row {row} has no usable split (train/val/validate/test)")


@dataclass
class KineticsRow:
    release: str
    split: str  # train / val / test
    youtube_id: str
    label: str  # raw label ("" for unlabelled test rows)


def read_kinetics_csv(path: str | Path, release: str | None = None) -> list[KineticsRow]:
    """Rows of one official annotation CSV (`label,youtube_id,time_start,time_end,split`; test CSVs may lack the
    label column)."""
    path = Path(path)
    release = (release or release_of(path)).lower()
    if release not in KINETICS_RELEASES:
        raise ValueError(f"unknown Kinetics release {release!r} for {path}; valid releases: "
                         f"{', '.join(KINETICS_RELEASES)} (write RELEASE:PATH, e.g. k400:{path})")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # a BOM would rename the first column
            reader = csv.DictReader(f)
            if not reader.fieldnames or "youtube_id" not in reader.fieldnames:
                raise ValueError(f"{path} is not a Kinetics annotation CSV (needs a youtube_id column; has "
                                 f"{reader.fieldnames})")
            rows = [KineticsRow(release=release, split=_split_of(row, path), youtube_id=row["youtube_id"].strip(),
                                label=(row.get("label") or "").strip()) for row in reader]
    except FileNotFoundError:
        raise FileNotFoundError(f"Kinetics annotation CSV {path} does not exist") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"Kinetics annotation CSV {path} cannot be read: {exc}") from None
    if not rows:
        raise ValueError(f"Kinetics annotation CSV {path} has a header but no rows; pass the full annotation file")
    return rows


def index_clips(video_dir: str | Path) -> dict[str, Path]:
    """YouTube id -> clip file, for every video file under `video_dir` named <id> or <id>_<start>_<end>."""
    found: dict[str, Path] = {}
    for p in video_files(video_dir):
        m = _CLIP_NAME.match(p.stem)
        if m and m.group("id") not in found:
            found[m.group("id")] = p
    return found


@dataclass
class K710Report:
    """What the assembly did."""

    dataset: str = "K710"  # or one release's name (`data kinetics`)
    train_videos: int = 0
    val_videos: int = 0
    classes: int = 0
    rows_read: dict[str, int] = field(default_factory=dict)  # "k400/train" -> rows
    duplicates_removed: int = 0  # training rows whose YouTube id was already in the union
    val_leaks_removed: int = 0  # unique training ids that also appear in a val/test set
    label_conflicts: int = 0  # ids labelled differently by different releases
    missing_train: int = 0  # listed but not found under the video folder
    missing_val: int = 0
    missing_examples: list[str] = field(default_factory=list)
    classes_per_release: dict[str, int] = field(default_factory=dict)
    classes_in_one_release: dict[str, list[str]] = field(default_factory=dict)
    aliases_used: dict[str, str] = field(default_factory=dict)  # label as read -> class it was merged into
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """Human-readable counts."""
        lines = [f"{self.dataset}: {self.train_videos} train / {self.val_videos} val videos, {self.classes} classes",
                 f"  rows read: {self.rows_read}",
                 f"  duplicates removed: {self.duplicates_removed}, val/test leaks removed: {self.val_leaks_removed}, "
                 f"label conflicts: {self.label_conflicts}",
                 f"  listed but missing: {self.missing_train} train, {self.missing_val} val"
                 + (f" (e.g. {', '.join(self.missing_examples[:3])})" if self.missing_examples else ""),
                 f"  classes per release: {self.classes_per_release}"]
        if self.aliases_used:
            pairs = [f"{k} -> {v}" for k, v in sorted(self.aliases_used.items())]
            lines.append(f"  renamed classes merged ({len(pairs)}): {'; '.join(pairs)}")
        for release, names in self.classes_in_one_release.items():
            if names:
                more = " ..." if len(names) > 8 else ""
                lines.append(f"  only in {release} ({len(names)}): {', '.join(names[:8])}{more}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _merge_splits(rows: list[KineticsRow], order: list[str], key_of: Callable[[str], str],
                  report: K710Report) -> tuple[dict[str, str], dict[str, str]]:
    """(train, val) as {youtube id: class key}. Training is the union in release order, first occurrence kept and newer
    releases overwriting the label; any video of a val/test split is removed from training (a leak)."""
    held_out = {r.youtube_id for r in rows if r.split in ("val", "test")}
    train: dict[str, str] = {}
    for rel in order:
        for r in rows:
            if r.release != rel or r.split != "train" or not r.label:
                continue
            if r.youtube_id in train:
                report.duplicates_removed += 1
                if train[r.youtube_id] != key_of(r.label):
                    report.label_conflicts += 1
            train[r.youtube_id] = key_of(r.label)
    leaks = [yid for yid in train if yid in held_out]
    report.val_leaks_removed = len(leaks)
    for yid in leaks:
        del train[yid]
    val: dict[str, str] = {}
    for rel in order:
        for r in rows:
            if r.release == rel and r.split == "val" and r.label:
                val[r.youtube_id] = key_of(r.label)
    return train, val


def _manifest_rows(items: dict[str, str], split: str, names: dict[str, str], clips: dict[str, Path],
                   video_dir: str | Path | None, out: Path, keep_missing: bool,
                   report: K710Report) -> list[dict[str, object]]:
    """Manifest rows of one split; videos missing from `video_dir` are counted and left out (unless `keep_missing`)."""
    kept = []
    for yid, key in sorted(items.items()):
        path = clips.get(yid)
        if path is None:
            if video_dir is not None and not keep_missing:
                if split == "train":
                    report.missing_train += 1
                else:
                    report.missing_val += 1
                if len(report.missing_examples) < 10:
                    report.missing_examples.append(yid)
                continue
            path = Path(video_dir or ".") / f"{yid}.mp4"
        kept.append({"path": relative_to(path, out), "label": names[key]})
    return kept


def assemble_k710(
    annotations: Iterable[tuple[str, str | Path]],
    video_dir: str | Path | None,
    out_dir: str | Path,
    *,
    aliases: Mapping[str, str] | None = None,
    builtin_aliases: bool = True,
    keep_missing: bool = False,
    dataset: str = "K710",
) -> K710Report:
    """Build K710 from (release, csv path) pairs; write out_dir/{train.csv, val.csv, labels.json,
    k710_report.json}. Class names merge by `normalize_class_name`, the built-in rename table (unless
    `builtin_aliases` is False) and `aliases` (which override it). With `video_dir` None (or `keep_missing`),
    listed videos are kept without checking files and the manifests name `<id>.mp4` under video_dir. ValueError
    when the CSVs hold no labelled train or val rows, or when none of the videos they list is under `video_dir`
    (unless `keep_missing`); FileNotFoundError when `video_dir` is not a folder (unless `keep_missing`)."""
    if video_dir is not None and not keep_missing and not Path(video_dir).is_dir():
        raise FileNotFoundError(f"--videos {video_dir} is not a folder; give the folder of downloaded clips (or "
                                f"add --keep-missing to write manifests naming <id>.mp4 under it anyway)")
    alias = alias_resolver(aliases, builtin=builtin_aliases)
    rows: list[KineticsRow] = []
    report = K710Report(dataset=dataset)
    csv_paths = []
    for release, path in annotations:
        csv_paths.append(str(path))
        got = read_kinetics_csv(path, release)
        rows += got
        for r in got:
            key = f"{r.release}/{r.split}"
            report.rows_read[key] = report.rows_read.get(key, 0) + 1
    order = sorted({r.release for r in rows}, key=lambda s: int(re.sub(r"\D", "", s) or 0))

    keys: dict[str, str] = {}  # raw label -> class key (a few thousand distinct labels over ~1M rows)

    def key_of(label: str) -> str:
        if label not in keys:
            k = normalize_class_name(label)
            keys[label] = alias.get(k, k)
        return keys[label]

    # Display names from the newest release; classes per release.
    display: dict[str, str] = {}
    per_release: dict[str, set[str]] = {rel: set() for rel in order}
    for rel in order:
        for r in rows:
            if r.release == rel and r.label:
                display[key_of(r.label)] = display_class_name(r.label)
                per_release[rel].add(key_of(r.label))
    merged = {display_class_name(label): key for label, key in keys.items() if normalize_class_name(label) in alias}
    train, val = _merge_splits(rows, order, key_of, report)
    classes = sorted(set(train.values()) | set(val.values()))
    if not classes:
        raise ValueError(f"no labelled train or val rows in {', '.join(csv_paths)} "
                         f"(read {report.rows_read}); K710 needs the train and validate CSVs")
    names = {k: display[k] for k in classes}
    if len(set(names.values())) != len(names):  # two keys with one display name cannot happen, but be safe
        raise ValueError("class display names collide after normalisation")
    labels = {names[k]: i for i, k in enumerate(classes)}

    out = Path(out_dir)
    clips = index_clips(video_dir) if video_dir is not None else {}

    train_rows, val_rows = (_manifest_rows(items, split, names, clips, video_dir, out, keep_missing, report)
                            for items, split in ((train, "train"), (val, "val")))
    if video_dir is not None and not keep_missing and not train_rows and not val_rows:
        raise ValueError(
            f"none of the {len(train) + len(val)} videos the CSVs list was found under --videos {video_dir} "
            f"(missing e.g. {', '.join(report.missing_examples[:3])}; {len(clips)} files there have a clip name): "
            f"clips are looked up by YouTube id, as <id>.<ext> or <id>_<start:06d>_<end:06d>.<ext> (ext one of "
            f"{', '.join(VIDEO_EXTENSIONS)}) at any depth below the folder; pass --keep-missing to write the "
            f"manifests anyway")
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(train_rows, out / "train.csv")
    write_manifest(val_rows, out / "val.csv")
    save_labels(labels, out / "labels.json")
    if video_dir is not None and (note := absolute_paths_note([r["path"] for r in train_rows + val_rows], f"{out}/")):
        report.notes.append(note)
    report.train_videos, report.val_videos, report.classes = len(train_rows), len(val_rows), len(labels)
    report.classes_per_release = {rel: len(keys) for rel, keys in per_release.items()}
    report.aliases_used = {name: display[key] for name, key in sorted(merged.items())}
    if len(order) > 1:
        for rel in order:
            others = set().union(*(per_release[o] for o in order if o != rel))
            report.classes_in_one_release[rel] = sorted(display[k] for k in per_release[rel] - others)
    (out / f"{dataset.lower()}_report.json").write_text(json.dumps(asdict(report), indent=1) + "\n")
    return report


def assemble_release(annotations: Iterable[tuple[str, str | Path]], video_dir: str | Path | None,
                     out_dir: str | Path, *, keep_missing: bool = False) -> K710Report:
    """One Kinetics release (K400, K600 or K700) from its official CSVs, with its own class names: the K710
    assembly of a single release, reported under its name (out_dir/{train.csv, val.csv, labels.json,
    k400_report.json}). ValueError when the CSVs are of several releases (their union is `assemble_k710`'s)."""
    annotations = list(annotations)
    releases = sorted({release for release, _ in annotations})
    if len(releases) != 1:
        raise ValueError(f"`data kinetics` reads one release's CSVs, got {', '.join(releases)}; the union of "
                         f"several releases is `data k710`")
    return assemble_k710(annotations, video_dir, out_dir, builtin_aliases=False, keep_missing=keep_missing,
                         dataset=releases[0].upper())
