"""Manifests and label files: what videos a dataset has, where they are, and their classes.

A manifest is a CSV or Parquet table with one row per video and the columns

    path   the video file; relative paths resolve against the manifest's own folder
    label  the class name as written in the label file (matched without surrounding spaces and in Unicode NFC
           form); an integer index is accepted too
    start  optional, seconds: only frames from here on are sampled (empty / null: from the beginning)
    end    optional, seconds: only frames before this are sampled (empty / null: to the end)

A label file is JSON `{class name: index}` with indices 0..K-1, as the authors' releases ship them.
Errors and reports name a CSV/TSV manifest's rows by their line in the file, as an editor numbers them (the header
and blank lines counted; `Manifest.where`), and a Parquet manifest's by row number (1-based, no header).
Paths and manifests may live on any filesystem pyarrow reads (local, `s3://`, `gs://`, `hdfs://`, ...). A
`file:` URI (`file:///data/my%20set/train.csv`, percent-encoded as `Path.as_uri()` writes it) is a local path:
a manifest given that way resolves its relative entries against its folder as plain local paths.
"""

from __future__ import annotations

import csv
import difflib
import functools
import io
import json
import math
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from workflows.runtime import is_remote, storage_of, write_text

MANIFEST_COLUMNS = ("path", "label", "start", "end")
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp",
                    ".vob", ".mts", ".m2ts", ".ts")


def video_files(folder: str | Path) -> list[Path]:
    """The video files (by extension) at any depth below a local folder, sorted; hidden files and folders left out
    (a macOS copy's `._name.mp4` is metadata, not a video)."""
    root = Path(folder).expanduser()
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def bucket_video_files(uri: str) -> list[str] | None:
    """The video files (by extension) at any depth below a bucket prefix (or any pyarrow URI naming a folder), as
    URIs that keep `uri`'s query (endpoint, credentials), sorted; hidden files and folders left out as in
    `video_files`. None when `uri` names no folder (a file, or nothing). A listing that fails (an OSError: no answer,
    refused credentials) is retried as reads are (`video.from_storage`), then raises StorageUnreachable."""
    from workflows.checkpoints import child_uri
    from workflows.data.video import from_storage

    fs, root = resolve_filesystem(uri)
    root = root.rstrip("/")
    if from_storage(uri, fs, lambda: fs.get_file_info(root)).type != pafs.FileType.Directory:
        return None
    found = []
    for info in from_storage(uri, fs, lambda: fs.get_file_info(pafs.FileSelector(root, recursive=True))):
        rel = info.path[len(root) + 1:]
        if info.type == pafs.FileType.File and Path(rel).suffix.lower() in VIDEO_EXTENSIONS and \
                not any(part.startswith(".") for part in rel.split("/")):
            found.append(child_uri(uri, root, info.path))
    return sorted(found)


class ManifestError(ValueError):
    """A manifest or label file that cannot be used; the message names the file, row and value."""


def _has_scheme(uri: str) -> bool:
    head = uri.split("/", 1)[0]
    return head.endswith(":") and len(head) > 2 and "://" in uri  # "C:" style drive letters are not schemes


def _is_file_uri(uri: str) -> bool:
    return uri[:5].lower() == "file:"


def file_uri_path(uri: str) -> str:
    """The local path of a `file:` URI (file:///abs, file:/abs or file://localhost/abs; percent-escapes decoded)."""
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise ManifestError(f"{uri}: a file URI on another host ({parts.netloc}) cannot be read; mount it or use a "
                            f"remote filesystem URI")
    if not parts.path.startswith("/"):
        raise ManifestError(f"{uri}: a file URI needs an absolute path (file:///...)")
    return unquote(parts.path)


def resolve_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path, a `file:` URI or a URI pyarrow understands."""
    if _is_file_uri(uri):
        return pafs.LocalFileSystem(), file_uri_path(uri)
    if _has_scheme(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).expanduser())


# A relative path pathlib would leave as written (no empty or "." component, no trailing slash, no backslash): it is
# joined with plain string operations, giving what `Path(base) / path` gives at a fraction of its cost (a K710
# manifest has 0.66 M rows, and every worker loads it).
_PLAIN_RELATIVE = re.compile(r"(?!\./)(?:[^/\\]+/)*[^/\\]+")
_PLAIN_COMPONENTS = re.compile(r"(?:^|/)\.(?:/|$)")


def resolve_path(path: str, base_dir: str) -> str:
    """A manifest entry made absolute: URIs and absolute paths as they are, `~/...` in the home folder, others
    joined onto `base_dir`."""
    if path.startswith("~"):
        return str(Path(path).expanduser())
    if _has_scheme(path) or _is_file_uri(path) or os.path.isabs(path):
        return path
    if _has_scheme(base_dir):
        return base_dir.rstrip("/") + "/" + path
    if os.sep == "/" and _PLAIN_RELATIVE.fullmatch(path) and not _PLAIN_COMPONENTS.search(path):
        return _local_base(base_dir) + path
    return str(Path(base_dir) / path)


@functools.lru_cache(maxsize=64)
def _local_base(base_dir: str) -> str:
    """`base_dir` as pathlib writes it, with the separator a relative path is joined with."""
    base = str(Path(base_dir))
    return "" if base == "." else base if base.endswith("/") else base + "/"


def parent_dir(uri: str) -> str:
    """The folder holding `uri`: a URI's folder as a URI; a local path's or a `file:` URI's as a local path."""
    if _is_file_uri(uri):
        return str(Path(file_uri_path(uri)).resolve().parent)
    if _has_scheme(uri):
        return uri.rsplit("/", 1)[0]
    return str(Path(uri).expanduser().resolve().parent)


def storage_hint(uri: str) -> str:
    """What to set when a remote file cannot be reached: the environment pyarrow's filesystem for `uri` reads its
    endpoint and credentials from ("" for a local path)."""
    scheme = uri.split("://", 1)[0].lower() if _has_scheme(uri) else ""
    if scheme in ("s3", "s3a"):
        return ("; check the bucket and key, and set AWS_ENDPOINT_URL (an S3-compatible store such as MinIO), "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary credentials) and "
                "AWS_DEFAULT_REGION as the bucket needs")
    if scheme in ("gs", "gcs"):
        return "; check the bucket and object, and set GOOGLE_APPLICATION_CREDENTIALS to a service account key file"
    if scheme:
        return ("; check the URI (pyarrow's filesystems read s3://, gs://, hdfs://, ...) and the endpoint and "
                "credentials it needs")
    return ""


def unreadable(kind: str, uri: str, exc: BaseException) -> ManifestError:
    """The error for a file that cannot be opened or reached: names the file, the reason and (for a bucket) the
    environment to set."""
    from workflows.runtime import redact_secrets

    return ManifestError(f"cannot read {kind} {redact_secrets(uri)}: {exc}{storage_hint(uri)}")


def read_bytes(uri: str) -> bytes:
    """Whole file contents from any pyarrow filesystem."""
    fs, path = resolve_filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def class_names(label_map: dict[str, int]) -> list[str]:
    """The class names of a label map in index order (name i is class i): what the text classifier scores."""
    return [name for name, _ in sorted(label_map.items(), key=lambda kv: kv[1])]


def class_key(name: object) -> str:
    """A class name as labels are matched: stripped, in Unicode NFC form ("café" typed or pasted either way)."""
    return unicodedata.normalize("NFC", str(name)).strip()


def text_key(name: object) -> str:
    """A class name as the model's text encoder reads it: CLIP's tokenizer lower-cases and collapses whitespace, so
    "Big" and "big " get one text embedding; two classes with the same text_key cannot be told apart."""
    return " ".join(class_key(name).split()).lower()


def closest_class(name: str, labels: dict[str, int] | list[str]) -> str | None:
    """The class of `labels` a label not in it most likely meant (a typo, another case or spacing), or None."""
    by_text = {text_key(known): known for known in labels}
    if text_key(name) in by_text:
        return by_text[text_key(name)]
    close = difflib.get_close_matches(text_key(name), list(by_text), n=1, cutoff=0.8)
    return by_text[close[0]] if close else None


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """json object hook: a class written twice (the last would silently win) is an error."""
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise ManifestError(f"class {key!r} appears twice (indices {seen[key]!r} and {value!r})")
        seen[key] = value
    return seen


def utf16_hint(data: bytes) -> str:
    """What to say of a text file saved as UTF-16 (a byte-order mark first: Excel's "Unicode Text", Windows
    Notepad's "Unicode"), else ""."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return ("is UTF-16 text (Excel's \"Unicode Text\" and Notepad's \"Unicode\" save that); save it as UTF-8 "
                "(Excel: \"CSV UTF-8\") or convert it: iconv -f UTF-16 -t UTF-8 FILE > NEW")
    return ""


def csv_text(data: bytes) -> tuple[str, str]:
    """(a manifest file's text, "") when it can be a CSV; else ("", what to say of it): JSON (SSV2's annotations, a
    list of rows), or not UTF-8 (a spreadsheet's Latin-1 or Windows-1252 export), naming the line. One decode."""
    if data.lstrip()[:1] in (b"{", b"["):
        return "", ("is JSON, not a CSV/TSV or Parquet file of path,label[,start,end] rows (`python -m workflows "
                    "data import ssv2` turns Something-Something-V2's JSON annotations into one)")
    try:
        return data.decode("utf-8-sig"), ""
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        return "", (f"is not UTF-8 text (line {line}: byte 0x{data[exc.start]:02x}; a Latin-1 or Windows-1252 export "
                    f"saves accents so); save it as UTF-8 (Excel: \"CSV UTF-8\") or convert it: iconv -f WINDOWS-1252 "
                    f"-t UTF-8 FILE > NEW")


def _meant(name: str, labels: dict[str, int]) -> str:
    meant = closest_class(name, labels)
    return f"; did you mean {meant!r}?" if meant else ""


def load_labels(path: str) -> dict[str, int]:
    """Read a label file `{class name: index}`; indices must be 0..K-1, each used once. Names are stripped and put
    in Unicode NFC form (`class_key`), as manifest labels are when matched against them; two names the text encoder
    reads alike (`text_key`: "Big" and "big") are an error."""
    try:
        data = read_bytes(path)
        utf16 = utf16_hint(data)
        raw = None if utf16 else json.loads(data.decode("utf-8-sig"), object_pairs_hook=_unique_keys)
    except ManifestError as exc:
        raise ManifestError(f"label file {path}: {exc}") from None
    except FileNotFoundError as exc:
        raise ManifestError(f"label file {path} does not exist") from exc
    except (OSError, pa.ArrowInvalid) as exc:  # unreachable storage, missing credentials, a folder, a bad URI
        raise unreadable("label file", path, exc) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"label file {path} is not valid JSON: {exc}") from exc
    if raw is None:
        raise ManifestError(f"label file {path} {utf16}")
    if not isinstance(raw, dict) or not raw:
        raise ManifestError(f"label file {path} must hold a non-empty JSON object {{class name: index}}")
    labels: dict[str, int] = {}
    for name, index in raw.items():
        if isinstance(index, str) and index.strip().isdecimal():  # SSV2 ships {"name": "12"}
            index = int(index)
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ManifestError(f"label file {path}: class {name!r} has index {index!r}; expected an integer >= 0")
        key = class_key(name)
        if key in labels:
            raise ManifestError(f"label file {path}: classes {name!r} and another one are the same name once spaces "
                                f"and Unicode form are set aside ({key!r})")
        labels[key] = index
    read_as: dict[str, str] = {}
    for name in labels:
        other = read_as.setdefault(text_key(name), name)
        if other != name:
            raise ManifestError(f"label file {path}: classes {other!r} and {name!r} both read {text_key(name)!r} to "
                                f"the model's text encoder (it ignores case and repeated spaces), so the model could "
                                f"not tell them apart: rename one, or merge the two classes")
    _check_indices(labels, path)
    return labels


def _check_indices(labels: dict[str, int], source: str) -> None:
    by_index: dict[int, str] = {}
    for name, index in labels.items():
        if index in by_index:
            raise ManifestError(f"{source}: classes {by_index[index]!r} and {name!r} share index {index}")
        by_index[index] = name
    missing = sorted(set(range(len(labels))) - set(by_index))
    if missing:
        raise ManifestError(f"{source}: indices must be 0..{len(labels) - 1}; missing {missing[:10]}")


def earlier_labels_differ(where: str, classes: int, source: str) -> ValueError:
    """The refusal of an import into a folder whose labels.json (`where`), written by an earlier import, holds
    other classes or indices than this import's `classes` (from `source`): rewriting it would change the meaning of
    the earlier manifests' labels and of checkpoints trained on them."""
    return ValueError(f"{where} (written by an earlier import into this folder) holds other classes or indices than "
                      f"{source} ({classes} classes); import into another folder, or delete it")


def save_labels(labels: dict[str, int], path: str | Path) -> None:
    """Write a label file (sorted by index), at a local path or a URI."""
    _check_indices(labels, str(path))
    ordered = dict(sorted(labels.items(), key=lambda kv: kv[1]))
    text = json.dumps(ordered, indent=1, ensure_ascii=False) + "\n"
    if is_remote(str(path)):
        write_text(str(path), text)
    else:
        Path(path).write_text(text)


@dataclass
class Manifest:
    """A loaded manifest. `table` columns: video_index int64, path str (resolved), label int64 (-1 when the
    label is not in the label file), label_name str, start float64, end float64 (NaN = not set)."""

    table: pa.Table
    source: str
    unknown_labels: dict[str, list[int]] = field(default_factory=dict)  # label -> 0-based rows (first few)
    # Rows naming the same clip (path, start, end) as an earlier row: 0-based (row, earlier row) pairs.
    repeated_rows: list[tuple[int, int]] = field(default_factory=list)  # ... with the same label
    label_conflicts: list[tuple[int, int]] = field(default_factory=list)  # ... with another label
    lines: list[int] | None = None  # the file line of each row (CSV/TSV); None: rows are numbered (Parquet)

    def number(self, row: int) -> int:
        """The number a user finds 0-based `row` by: its line in a CSV/TSV file, else its 1-based row."""
        return _number(self.lines, row)

    def where(self, rows: int | list[int]) -> str:
        """`row` (0-based) or rows as a user finds them: "line 5" / "lines 5, 9" of a CSV/TSV file (the header
        and blank lines counted, as an editor numbers them), "row 4" / "rows 4, 8" of a Parquet table."""
        return _where(self.lines, rows)

    def duplicate_warnings(self) -> list[str]:
        """One line per kind of repeated clip, with examples (file lines, or rows of a Parquet table); [] when every
        clip is listed once."""
        out = []
        for pairs, what in ((self.repeated_rows, "repeat an earlier row (the clip is then sampled that many times "
                                                 "more often)"),
                            (self.label_conflicts, "name the same clip as an earlier row with another label")):
            if pairs:
                shown = ", ".join(f"{self.where(r)} = {self.where(e)}" for r, e in pairs[:5])
                out.append(f"manifest {self.source}: {len(pairs)} row(s) {what}: {shown}")
        return out

    def __len__(self) -> int:
        return self.table.num_rows

    def stratified_subset(self, n: int, seed: int) -> Manifest:
        """At most `n` of the rows, each class keeping its share of them (largest remainders; a class may get none
        when `n` is below the number of classes), chosen with `seed` and kept in manifest order: the same rows for
        the same manifest, `n` and seed on every worker. The manifest itself when it has no more than `n` rows."""
        if n >= len(self):
            return self
        labels = self.table.column("label").to_numpy()
        classes, counts = np.unique(labels, return_counts=True)
        quota = n * counts / len(self)
        share = np.floor(quota).astype(np.int64)
        extra = np.argsort(-(quota - share), kind="stable")[: n - int(share.sum())]
        share[extra] += 1
        rng = np.random.default_rng([seed, 0x5EED])
        rows = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:k]
                                       for c, k in zip(classes, share, strict=True)]))
        lines = None if self.lines is None else [self.lines[i] for i in rows]
        return Manifest(table=self.table.take(pa.array(rows)), source=self.source, lines=lines)


def _number(lines: list[int] | None, row: int) -> int:
    return lines[row] if lines is not None else row + 1


def _where(lines: list[int] | None, rows: int | list[int]) -> str:
    """See `Manifest.where`."""
    rows = [rows] if isinstance(rows, int) else rows
    kind = "line" if lines is not None else "row"
    return f"{kind}{'s' if len(rows) > 1 else ''} {', '.join(str(_number(lines, r)) for r in rows)}"


def _records(text: str, delimiter: str) -> list[tuple[int, int]] | None:
    """(file line it starts on, fields) of each record of a CSV/TSV text, the header first, as pyarrow reads them:
    empty lines skipped, a quoted value may run over several lines, a line ends at \\n, \\r\\n or \\r. None when
    Python's csv module cannot read it (a value over its size limit)."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    out, consumed = [], 0
    try:
        for record in reader:
            if record:
                out.append((consumed + 1, len(record)))
            consumed = reader.line_num
    except csv.Error:
        return None
    return out


def _read_table_lines(path: str) -> tuple[pa.Table, list[int] | None]:
    """(the manifest file as a table, the file line each of its rows starts on: None for Parquet, which has no lines,
    and in the unlikely case that Python's csv module splits a CSV into other records than pyarrow did)."""
    lines = None
    try:
        fs, inner = resolve_filesystem(path)
        info = fs.get_file_info(inner)
    except (OSError, pa.ArrowInvalid) as exc:  # unreachable storage, missing credentials, a scheme pyarrow lacks
        raise unreadable("manifest", path, exc) from None
    if info.type == pafs.FileType.NotFound:
        raise ManifestError(f"manifest {path} does not exist")
    if info.type == pafs.FileType.Directory:
        raise ManifestError(f"manifest {path} is a folder: a manifest is a CSV/TSV or Parquet file of path,label"
                            f"[,start,end] rows; for a folder of one folder per class, `python -m workflows data "
                            f"import folders --videos {path} --out <folder>` writes train.csv, val.csv and labels.json")
    parquet = inner.lower().endswith((".parquet", ".pq"))
    try:
        if parquet:
            table = pq.read_table(inner, filesystem=fs)
        else:
            with fs.open_input_stream(inner) as f:
                data = f.read()
            utf16 = utf16_hint(data)
            if utf16:
                raise ManifestError(f"manifest {path} {utf16}")
            text, not_csv = csv_text(data)
            if not_csv:
                raise ManifestError(f"manifest {path} {not_csv}")
            # Every column as text: labels like "0" must not become numbers; only an empty cell is missing (a
            # class may be called "NA" or "null", which pyarrow's default null markers would empty).
            convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in MANIFEST_COLUMNS},
                                           strings_can_be_null=True, null_values=[""])
            header = re.match(rb"[^\r\n]*", data.lstrip(b"\r\n")).group()  # the first line that is not empty
            delimiter = "\t" if b"\t" in header and b"," not in header else ","  # .tsv, a spreadsheet's text export
            records = _records(text, delimiter)
            try:
                table = pacsv.read_csv(io.BytesIO(data), convert_options=convert,
                                       parse_options=pacsv.ParseOptions(delimiter=delimiter))
            except pa.ArrowInvalid as exc:  # "Expected 2 columns, got 3": say on which line
                uneven = [line for line, fields in records[1:] if fields != records[0][1]] if records else []
                where = f" at line {uneven[0]}" if uneven and "columns, got" in str(exc) else ""
                raise ManifestError(f"manifest {path} cannot be read as CSV{where}: {exc}") from exc
            if records is not None and len(records) == table.num_rows + 1:
                lines = [line for line, _ in records[1:]]
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(f"manifest {path} cannot be read as {'Parquet' if parquet else 'CSV'}:"
                            f" {exc}{storage_hint(path) if isinstance(exc, OSError) else ''}") from exc
    video = next((c for c in table.column_names if c.strip().lower().endswith(VIDEO_EXTENSIONS)), None)
    if video is not None and "path" not in table.column_names:  # the first row was taken for the column names
        raise ManifestError(f"manifest {path} has no header line: its first line names a video ({video!r}), not the "
                            f"columns; add the line path,label (path<TAB>label in a TSV) above it")
    twice = sorted({c for c in table.column_names if table.column_names.count(c) > 1})
    if twice:
        raise ManifestError(f"manifest {path} has column(s) {twice} more than once; keep one of each")
    return table, lines


def _float_or_nan(value: object, column: str) -> float:
    """A start/end cell in seconds (NaN: not set); ValueError naming the cell when it is not a usable one."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return math.nan
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{column}={value!r} is not a number of seconds") from None
    if out < 0 and not math.isnan(out):
        raise ValueError(f"{column}={value!r} is negative")
    return out


def load_manifest(path: str, labels: dict[str, int] | None, *, strict: bool = True,
                  labelled: bool = True) -> Manifest:
    """Read and validate a manifest. With `strict`, a label missing from `labels` is an error naming the rows;
    otherwise such rows get label -1 and are listed in `Manifest.unknown_labels`. `labels=None` skips the check
    (every label is then -1 unless it is an integer). `labelled=False`: a manifest without a label column is read
    too (a list of videos to classify), every label then empty."""
    table, lines = _read_table_lines(path)
    missing = [c for c in ("path", "label") if c not in table.column_names and (labelled or c == "path")]
    if missing:
        raise ManifestError(f"manifest {path} lacks column(s) {missing}; it has {table.column_names} "
                            f"(expected path{',label' if labelled else '[,label]'}[,start,end])")
    base = parent_dir(path)
    raw_paths = table.column("path").to_pylist()
    raw_labels = table.column("label").to_pylist() if "label" in table.column_names else [None] * len(raw_paths)
    starts = table.column("start").to_pylist() if "start" in table.column_names else [None] * len(raw_paths)
    ends = table.column("end").to_pylist() if "end" in table.column_names else [None] * len(raw_paths)
    n = len(raw_paths)
    if n == 0:
        raise ManifestError(f"manifest {path} has no rows")
    num_classes = len(labels) if labels is not None else None
    names_by_index = {v: k for k, v in labels.items()} if labels is not None else {}
    paths, label_ids, names = [], np.empty(n, np.int64), []
    start_arr, end_arr = np.empty(n, np.float64), np.empty(n, np.float64)
    unknown: dict[str, list[int]] = {}
    for i in range(n):
        p = raw_paths[i]
        if isinstance(p, bytes):  # a Parquet binary column
            p = p.decode("utf-8", errors="replace")
        # the row's place (`_where`) is formatted only when raising: this loop runs once per row
        if p is None or not str(p).strip():
            raise ManifestError(f"manifest {path}, {_where(lines, i)}: empty path")
        paths.append(resolve_path(str(p).strip(), base))
        name = "" if raw_labels[i] is None else class_key(raw_labels[i])
        index = -1
        if labels is not None and name in labels:
            index = labels[name]
        elif name.lstrip("-").isdecimal() and (num_classes is None or 0 <= int(name) < num_classes):
            index = int(name)  # an integer label is taken as the class index
            name = names_by_index.get(index, name)
        else:
            rows = unknown.setdefault(name, [])
            if len(rows) < 5:
                rows.append(i)
        label_ids[i] = index
        names.append(name)
        try:
            start_arr[i] = _float_or_nan(starts[i], "start")
            end_arr[i] = _float_or_nan(ends[i], "end")
        except ValueError as exc:
            raise ManifestError(f"manifest {path}, {_where(lines, i)}: {exc}") from None
        if start_arr[i] >= end_arr[i]:
            raise ManifestError(f"manifest {path}, {_where(lines, i)}: start={start_arr[i]} is not before "
                                f"end={end_arr[i]}")
    first_row: dict[tuple[str, float, float], int] = {}
    repeated, conflicts = [], []
    for i in range(n):
        clip = (paths[i], -1.0 if math.isnan(start_arr[i]) else start_arr[i], -1.0 if math.isnan(end_arr[i])
                else end_arr[i])
        earlier = first_row.setdefault(clip, i)
        if earlier != i:
            (repeated if names[earlier] == names[i] else conflicts).append((i, earlier))
    if labels is not None and unknown and strict:
        shown = "; ".join(f"{name!r} ({_where(lines, rows)}{_meant(name, labels)})"
                          for name, rows in list(unknown.items())[:5])
        raise ManifestError(f"manifest {path}: {len(unknown)} label(s) not in the label file ({len(labels)} "
                            f"classes): {shown}")
    out = pa.table({
        "video_index": pa.array(np.arange(n, dtype=np.int64)),
        "path": pa.array(paths, pa.string()),
        "label": pa.array(label_ids),
        "label_name": pa.array(names, pa.string()),
        "start": pa.array(start_arr),
        "end": pa.array(end_arr),
    })
    return Manifest(table=out, source=path, unknown_labels=unknown, repeated_rows=repeated,
                    label_conflicts=conflicts, lines=lines)


def write_manifest(rows: list[dict[str, object]], path: str | Path) -> None:
    """Write manifest rows ({path, label[, start, end]}) as CSV or (by suffix) Parquet, at a local path or a URI
    (one attempt). Paths are written as given; pass paths relative to the manifest's folder to keep a dataset
    relocatable."""
    columns: dict[str, list[object]] = {"path": [str(r["path"]) for r in rows],
                                        "label": [str(r["label"]) for r in rows]}
    for extra in ("start", "end"):
        if any(r.get(extra) is not None for r in rows):
            columns[extra] = [None if r.get(extra) is None else float(r[extra]) for r in rows]  # type: ignore[arg-type]
    table = pa.table(columns)
    parquet = str(path).split("?", 1)[0].endswith((".parquet", ".pq"))
    if is_remote(str(path)):
        fs, inner = storage_of(str(path))
        if isinstance(fs, pafs.LocalFileSystem):  # a file:// URI; an object store has no folders to make
            fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(inner) as out:
            (pq.write_table if parquet else pacsv.write_csv)(table, out)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    (pq.write_table if parquet else pacsv.write_csv)(table, str(path))


def check_output_folder(path: str | Path, option: str = "--out") -> Path:
    """`path` as a local folder a tool may create and write into; ValueError naming `option` when it, or a folder
    above it, is an existing file."""
    out = Path(path).expanduser()
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        where = "is an existing file" if existing == out.absolute() else f"lies below the file {existing}"
        raise ValueError(f"{option} {path} {where}; give a folder (it is created when missing)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: {existing} is not writable here; give a folder you can write")
    return out


def absolute_paths_note(paths: list[str], out: str) -> str | None:
    """The note for manifests written in `out` that name local videos by absolute paths (they do not lie below it),
    or None: such a manifest works where those paths exist, but a copy of the folder elsewhere does not find them."""
    if not any(Path(path).is_absolute() for path in paths if not is_remote(path)):
        return None
    return (f"the videos are not below {out}, so the manifests name them by absolute paths: fine on this machine and "
            f"a shared disk, but `data upload` needs them below it")


def relative_to(path: str | Path, base: str | Path) -> str:
    """`path` relative to `base` when it lies below it, else absolute: what a relocatable manifest stores. Below
    it as written (a `videos/` symlink to shared storage stays `videos/...`), or else once symlinks are resolved."""
    for resolve in (lambda q: Path(os.path.normpath(Path(q).expanduser().absolute())), lambda q: Path(q).resolve()):
        p, b = resolve(path), resolve(base)
        try:
            return p.relative_to(b).as_posix()
        except ValueError:
            continue
    return str(Path(path).resolve())
