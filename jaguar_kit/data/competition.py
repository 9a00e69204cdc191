"""The Kaggle jaguar-re-id competition folder: CSVs and image folders, validated up front.

Layout (facts.md): ``train.csv`` (``filename,ground_truth``), ``test.csv``
(``row_id,query_image,gallery_image``), images in ``train/train/`` and ``test/test/``
(the folder name repeats) or flat ``train/`` and ``test/``.

:func:`load_competition` checks everything before any long work starts and raises one
:class:`JaguarKitError` line naming the file, the CSV line (line 1 is the header, so data
row ``n`` is CSV line ``n + 1``) and the problem. Of each kind of problem the first is
described and the others are counted ("and 12 more"); several kinds are joined with " | ".
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..errors import JaguarKitError
from .images import image_file_problem

TRAIN_COLUMNS = ("filename", "ground_truth")
# An optional column naming each photo's encounter (a burst, one pass in front of a camera);
# the first of these names present is used. Folds never split an encounter.
ENCOUNTER_COLUMNS = ("encounter", "sequence", "sequence_id", "encounter_id")
TEST_COLUMNS = ("row_id", "query_image", "gallery_image")


@dataclass
class Competition:
    """A validated competition folder.

    ``train``: filename, identity, path, encounter (one row per train.csv row, in file order);
    encounter is the text of train.csv's encounter column (:data:`ENCOUNTER_COLUMNS`), ""
    where the column or the cell is missing (``data.encounters.train_encounters`` infers those).
    ``test_images``: filename, path of the unique images named in test.csv, sorted by name.
    ``pairs``: row_id, query_image, gallery_image (test.csv order), None without test.csv.
    """

    root: Path
    train: pd.DataFrame
    test_images: pd.DataFrame
    pairs: pd.DataFrame | None
    train_dir: Path
    test_dir: Path | None


class _Problems:
    """Collects problems by kind; renders the first of each kind plus a count of the rest."""

    def __init__(self) -> None:
        self.kinds: dict[str, list[str]] = {}

    def add(self, kind: str, message: str) -> None:
        self.kinds.setdefault(kind, []).append(message)

    def raise_if_any(self) -> None:
        if not self.kinds:
            return
        parts = []
        for messages in self.kinds.values():
            more = f" (and {len(messages) - 1} more)" if len(messages) > 1 else ""
            parts.append(messages[0] + more)
        raise JaguarKitError(" | ".join(parts))


def read_csv_text(path: str | Path) -> str:
    """A CSV file's text: UTF-8 (a byte-order mark is allowed); anything else is refused in
    one line naming the byte and line where the encoding breaks."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise JaguarKitError(f"{path}: file not found") from None
    except OSError as e:
        raise JaguarKitError(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        offset = e.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data[:offset].count(b"\n") + 1
        raise JaguarKitError(
            f"{path}: not UTF-8 (byte 0x{data[offset]:02x} at byte {offset}, line {line}); "
            "save the file as UTF-8 (e.g. from Latin-1: iconv -f latin1 -t utf-8)"
        ) from None


def read_csv_checked(path: str | Path, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> pd.DataFrame:
    """Read a small CSV as stripped strings, indexed by CSV line number (header = line 1).

    The one reader for every table the kit reads (train.csv, test.csv, labels, solution,
    submissions): fields are stripped of surrounding spaces, and every value stays the text
    it is (``NA``, ``null`` or ``None`` are names, never missing values). Raises one line on
    a missing file, a file that is not UTF-8, an empty file, a wrong delimiter, a missing
    column or a row whose field count differs from the header's. Blank lines are skipped.
    The ``optional`` columns present are kept after the required ones.
    """
    path = Path(path)
    # The csv module rather than pandas.read_csv: pandas silently turns an extra field
    # into an index column or drops it, and renumbers rows around blank lines; here each
    # row keeps its true line number for the error messages.
    if path.is_dir():
        raise JaguarKitError(f"{path}: is a folder, expected a CSV file")
    text = read_csv_text(path)
    if not text.strip():
        raise JaguarKitError(f"{path}: empty CSV (expected a header {','.join(required)})")
    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    rows: list[list[str]] = []
    lines: list[int] = []
    try:
        for row in reader:
            if not any(field.strip() for field in row):
                continue
            if header is None:
                header = [h.strip() for h in row]
                missing = [c for c in required if c not in header]
                if missing:
                    hint = ""
                    for delim, name in ((";", "';'"), ("\t", "tab")):
                        if len(header) == 1 and delim in header[0]:
                            hint = f" - wrong delimiter: the header is separated by {name}, expected ','"
                    raise JaguarKitError(
                        f"{path}: line {reader.line_num}: missing column(s) {', '.join(missing)}; "
                        f"columns found: {', '.join(map(repr, header))}{hint}"
                    )
                continue
            if len(row) != len(header):
                raise JaguarKitError(
                    f"{path}: line {reader.line_num}: {len(row)} fields, but the header has {len(header)}"
                )
            rows.append([field.strip() for field in row])
            lines.append(reader.line_num)
    except csv.Error as e:
        raise JaguarKitError(f"{path}: line {reader.line_num}: cannot parse CSV ({e})") from e
    if not rows:
        raise JaguarKitError(f"{path}: empty CSV (a header but no data rows)")
    assert header is not None
    keep = list(required) + [c for c in optional if c in header and c not in required]
    return pd.DataFrame(rows, columns=header, index=pd.Index(lines, name="line"))[keep]


def _image_dir(root: Path, name: str) -> Path | None:
    """``root/name/name`` (Kaggle's repeated folder) if present, else flat ``root/name``."""
    for d in (root / name / name, root / name):
        if d.is_dir():
            return d
    return None


def _list_files(folder: Path) -> set[str]:
    """Names of the regular files in ``folder`` (a link loop or a dangling link is no file)."""
    names = set()
    with os.scandir(folder) as it:
        for e in it:
            try:
                if e.is_file():
                    names.add(e.name)
            except OSError:
                pass
    return names


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a link loop, a name too long
        return False


def _disk_name(folder: Path, files: set[str], name: str) -> str | None:
    """The name as it is on disk, or None when there is no such file.

    A name typed on one system and the file saved on another may differ only in Unicode
    form (macOS stores ``u`` + combining accent where a CSV has ``ú``): those are the same name.
    """
    for form in (name, unicodedata.normalize("NFC", name), unicodedata.normalize("NFD", name)):
        if form in files or ("/" in form and _is_file(folder / form)):
            return form
    return None


def _exists(folder: Path, files: set[str], name: str) -> bool:
    return _disk_name(folder, files, name) is not None


def load_competition(root: str | Path, check_images: bool = True) -> Competition:
    """Read and validate a competition folder; every problem is found before returning.

    ``check_images`` also reads each image's first and last bytes (no decode) to catch
    zero-byte files, truncated PNGs/JPEGs, a format not matching the extension, and
    unknown formats.
    """
    root = Path(root)
    if not root.is_dir():
        raise JaguarKitError(f"{root}: competition folder not found")
    train_csv, test_csv = root / "train.csv", root / "test.csv"
    train_df = read_csv_checked(train_csv, TRAIN_COLUMNS, ENCOUNTER_COLUMNS)
    encounter_col = next((c for c in ENCOUNTER_COLUMNS if c in train_df.columns), None)
    train_dir = _image_dir(root, "train")
    if train_dir is None:
        raise JaguarKitError(
            f"{root}: train image folder not found (looked for {root / 'train' / 'train'} and {root / 'train'})"
        )
    pairs_df = read_csv_checked(test_csv, TEST_COLUMNS) if test_csv.exists() else None
    test_dir = _image_dir(root, "test")
    if pairs_df is not None and test_dir is None:
        raise JaguarKitError(
            f"{test_csv}: test image folder not found (looked for {root / 'test' / 'test'} and {root / 'test'})"
        )

    problems = _Problems()
    train_files = _list_files(train_dir)
    seen: dict[str, int] = {}
    for idx, fname, ident in train_df[["filename", "ground_truth"]].itertuples():
        line = int(idx)
        if not fname:
            problems.add("empty_name", f"{train_csv}: line {line}: empty filename")
            continue
        if fname in seen:
            problems.add(
                "dup_name",
                f"{train_csv}: filename {fname!r} appears twice, on lines {seen[fname]} and {line}",
            )
        else:
            seen[fname] = line
        if not ident:
            problems.add("empty_identity", f"{train_csv}: line {line}: empty ground_truth for {fname!r}")
        if not _exists(train_dir, train_files, fname):
            problems.add("missing_train", f"{train_csv}: line {line}: image {fname!r} not found in {train_dir}")

    test_names: list[str] = []
    test_files: set[str] = set()
    if pairs_df is not None:
        assert test_dir is not None
        test_files = _list_files(test_dir)
        seen_ids: dict[str, int] = {}
        named: set[str] = set()
        for idx, row_id, query, gallery in pairs_df[list(TEST_COLUMNS)].itertuples():
            line = int(idx)
            if not row_id:
                problems.add("empty_row_id", f"{test_csv}: line {line}: empty row_id")
            elif row_id in seen_ids:
                problems.add(
                    "dup_row_id",
                    f"{test_csv}: row_id {row_id!r} appears twice, on lines {seen_ids[row_id]} and {line}",
                )
            else:
                seen_ids[row_id] = line
            for col, name in (("query_image", query), ("gallery_image", gallery)):
                if not name:
                    problems.add("empty_pair", f"{test_csv}: line {line}: empty {col}")
                elif name not in named:
                    named.add(name)
                    if not _exists(test_dir, test_files, name):
                        problems.add(
                            "missing_test",
                            f"{test_csv}: line {line}: {col} {name!r} is not in the test folder {test_dir}",
                        )
            if query and query == gallery:
                problems.add("self_pair", f"{test_csv}: line {line}: self-pair ({query!r} with itself)")
        test_names = sorted(named)
    problems.raise_if_any()

    train = pd.DataFrame(
        {
            "filename": train_df["filename"].to_numpy(),
            "identity": train_df["ground_truth"].to_numpy(),
            "path": [train_dir / (_disk_name(train_dir, train_files, f) or f) for f in train_df["filename"]],
            "encounter": train_df[encounter_col].to_numpy() if encounter_col else "",
        }
    )
    test_images = pd.DataFrame(
        {"filename": test_names,
         "path": [test_dir / (_disk_name(test_dir, test_files, f) or f) for f in test_names] if test_dir else []}
    )
    if check_images:
        for df in (train, test_images):
            for path in df["path"]:
                problem = image_file_problem(path)
                if problem:
                    problems.add(f"image_{problem[0]}", f"{path}: {problem[1]}")
        problems.raise_if_any()
    pairs = None if pairs_df is None else pairs_df.reset_index(drop=True)
    return Competition(root, train.reset_index(drop=True), test_images, pairs, train_dir, test_dir)


def _is_competition_dir(d: Path) -> bool:
    return (d / "train.csv").is_file() and (d / "test.csv").is_file() and _image_dir(d, "train") is not None


def _digest(d: Path) -> str:
    h = hashlib.sha256()
    for name in ("train.csv", "test.csv"):
        h.update((d / name).read_bytes())
    return h.hexdigest()


def find_competition_dir(search_root: str | Path | None = None, max_depth: int | None = None) -> Path:
    """Find the one folder under the inputs holding train.csv, test.csv and train images.

    Made for ``/kaggle/input`` and its layouts (``competitions/<slug>/``, legacy ``<slug>/``,
    datasets nesting a copy deeper): the inputs' one bounded walk (``kaggle.env.find_folders``),
    not descending into a found folder. ``search_root`` None searches every input root.
    Several folders with identical CSVs are one dataset (the shortest path is returned);
    different ones are ambiguous and an error lists them.
    """
    from ..kaggle.env import INPUT_DEPTH, find_folders, input_roots

    roots = input_roots() if search_root is None else [Path(search_root)]
    missing = [r for r in roots if not r.is_dir()]
    if search_root is not None and missing:
        raise JaguarKitError(f"{search_root}: folder not found (searching for the competition data)")
    depth = INPUT_DEPTH if max_depth is None else max_depth
    found = find_folders(lambda f: "train.csv" in f.files and "test.csv" in f.files and _is_competition_dir(f.path),
                         roots, depth)
    if not found:
        raise JaguarKitError(f"competition data not found: no folder with train.csv, test.csv and train/ (searched "
                             f"{depth} folder levels under {', '.join(map(str, roots))}); attach the competition or "
                             "pass its folder")
    found.sort(key=lambda p: (len(p.parts), str(p)))
    if len({_digest(p) for p in found}) > 1:
        raise JaguarKitError(
            f"several different competition folders found ({', '.join(map(str, found))}); pass the one to use"
        )
    return found[0]


__all__ = ["ENCOUNTER_COLUMNS", "Competition", "load_competition", "find_competition_dir", "read_csv_checked",
           "read_csv_text"]
