"""Loaders for a user's local copy of the standard IQA datasets, into `IQARecord`s.

Each loader reads a dataset in the layout of its original release (file
names, CSV columns, Excel sheet layout, MATLAB variables and JSON shapes are
those of ``shared/reference/iqa_data.md`` section 3) and returns a list of
`mechbiqa.data.records.IQARecord` with the dataset's own score, its scale and
direction, so ``record.mos01`` is always 0-1 with higher better (CSIQ's DMOS
is flipped). Studies use them through `load_dataset(name, root)`; nothing
here downloads anything.

A missing file, column, sheet, variable or image folder raises
`DatasetFormatError` naming what was expected and where, and what was found.
Missing image files are reported (count and examples) unless
``check_images=False``.

Score scales come from one table, `mechbiqa.data.scales.DATASET_SCALES`
(re-exported here with `normalise`); the Q-Align JSON reader takes each
entry's scale from the entry's own source, so mixed files are rated right.

Excel files (SPAQ, CSIQ) are read with a small reader of the OOXML format
(`read_xlsx`), so no spreadsheet package is needed.
"""

from __future__ import annotations

import csv
import json
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any
from xml.etree import ElementTree

from mechbiqa.data.records import LEVEL_WORDS, IQARecord
from mechbiqa.data.scales import (
    DATASET_ALIASES,
    DATASET_SCALES,
    DatasetScale,
    UnknownDatasetError,
    normalise,
    parse_scale,
    resolve,
)

__all__ = [
    "DATASET_SCALES",
    "DatasetFormatError",
    "DatasetScale",
    "DATASETS",
    "UnknownDatasetError",
    "normalise",
    "parse_scale",
    "load_dataset",
    "load_koniq10k",
    "load_spaq",
    "load_livec",
    "load_csiq",
    "load_kadid10k",
    "load_tid2013",
    "load_agiqa3k",
    "load_qalign_json",
    "load_qinstruct_json",
    "entry_source",
    "file_source",
    "read_xlsx",
]


class DatasetFormatError(ValueError):
    """A dataset copy does not have the expected files, columns or folders (the message says which)."""


# ---------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------


def _need_file(path: Path, dataset: str, what: str) -> Path:
    if not path.is_file():
        near = sorted(p.name for p in path.parent.iterdir())[:12] if path.parent.is_dir() else None
        found = f"; {path.parent} holds {near}" if near is not None else f"; {path.parent} does not exist"
        raise DatasetFormatError(f"{dataset}: expected {what} at {path}{found}")
    return path


def _need_dir(path: Path, dataset: str, what: str) -> Path:
    if not path.is_dir():
        raise DatasetFormatError(
            f"{dataset}: expected {what} folder at {path}; "
            + (
                f"{path.parent} holds {sorted(p.name for p in path.parent.iterdir())[:12]}"
                if path.parent.is_dir()
                else f"{path.parent} does not exist"
            )
        )
    return path


def _need_columns(columns: Iterable[str], required: Sequence[str], dataset: str, where: Path | str) -> None:
    have = list(columns)
    missing = [c for c in required if c not in have]
    if missing:
        raise DatasetFormatError(f"{dataset}: column(s) {missing} missing from {where}; it has {have}")


def _read_csv(path: Path, required: Sequence[str], dataset: str) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None:
            raise DatasetFormatError(f"{dataset}: {path} is empty; expected a header with {list(required)}")
        fieldnames = [f.strip() for f in reader.fieldnames]
        _need_columns(fieldnames, required, dataset, path)
        return [
            {k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items() if k is not None}
            for row in reader
        ]


def _float(value: Any, dataset: str, where: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DatasetFormatError(f"{dataset}: {where} holds {value!r}, expected a number") from None


def _check_images(records: list[IQARecord], dataset: str, check: bool) -> list[IQARecord]:
    if check:
        missing = [r.image_path for r in records if not r.image_path.is_file()]
        if missing:
            raise DatasetFormatError(
                f"{dataset}: {len(missing)} of {len(records)} image file(s) not found, e.g. "
                f"{[str(p) for p in missing[:3]]}; check the image folder (or pass check_images=False)"
            )
    return records


class _CaseInsensitiveDir:
    """Resolve file names in a folder whatever their case (CSIQ and TID2013 mix cases across copies)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.names = {p.name.lower(): p.name for p in folder.iterdir()} if folder.is_dir() else {}

    def __call__(self, name: str) -> Path:
        return self.folder / self.names.get(name.lower(), name)


# ---------------------------------------------------------------------------------------------------------
# A small .xlsx reader (OOXML: a zip of XML parts)
# ---------------------------------------------------------------------------------------------------------

_NS = {"m": "http://schemas.openxmlformats.org/spreadsheetml/2006/main"}
_REL_NS = "{http://schemas.openxmlformats.org/officeDocument/2006/relationships}id"


def _col_index(ref: str) -> int:
    letters = re.match(r"[A-Z]+", ref).group(0)
    n = 0
    for ch in letters:
        n = n * 26 + (ord(ch) - 64)
    return n - 1


def read_xlsx(path: Path | str, sheet: str | None = None) -> list[list[Any]]:
    """Cell values of one sheet of an .xlsx workbook.

    Args:
        path: The workbook.
        sheet: Sheet name; None for the first sheet.

    Returns:
        Rows top to bottom from row 1, each a list indexed by column (A = 0);
        empty cells are None, numbers are floats, text is str.

    Raises:
        DatasetFormatError: If the file is not an .xlsx workbook or lacks the sheet (listing the sheets).
    """
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise DatasetFormatError(f"{path} is not an .xlsx workbook (not a zip file)") from None
    with zf:
        workbook = ElementTree.fromstring(zf.read("xl/workbook.xml"))
        sheets = [(s.get("name"), s.get(_REL_NS)) for s in workbook.find("m:sheets", _NS)]
        rels = ElementTree.fromstring(zf.read("xl/_rels/workbook.xml.rels"))
        targets = {r.get("Id"): r.get("Target") for r in rels}
        if sheet is None:
            name, rid = sheets[0]
        else:
            matches = [(n, r) for n, r in sheets if n == sheet]
            if not matches:
                raise DatasetFormatError(f"{path}: no sheet {sheet!r}; sheets are {[n for n, _ in sheets]}")
            name, rid = matches[0]
        target = targets[rid].lstrip("/")
        target = target if target.startswith("xl/") else f"xl/{target}"
        shared: list[str] = []
        if "xl/sharedStrings.xml" in zf.namelist():
            for si in ElementTree.fromstring(zf.read("xl/sharedStrings.xml")).findall("m:si", _NS):
                shared.append("".join(t.text or "" for t in si.iter(f"{{{_NS['m']}}}t")))
        root = ElementTree.fromstring(zf.read(target))
    rows: list[list[Any]] = []
    for row in root.iter(f"{{{_NS['m']}}}row"):
        r = int(row.get("r")) - 1 if row.get("r") else len(rows)
        while len(rows) <= r:
            rows.append([])
        values = rows[r]
        for c in row.findall("m:c", _NS):
            col = _col_index(c.get("r")) if c.get("r") else len(values)
            kind = c.get("t", "n")
            v = c.find("m:v", _NS)
            if kind == "inlineStr":
                value: Any = "".join(t.text or "" for t in c.iter(f"{{{_NS['m']}}}t"))
            elif v is None or v.text is None:
                value = None
            elif kind == "s":
                value = shared[int(v.text)]
            elif kind in ("str", "e"):
                value = v.text
            elif kind == "b":
                value = v.text == "1"
            else:
                value = float(v.text)
            while len(values) <= col:
                values.append(None)
            values[col] = value
    return rows


def _xlsx_table(path: Path, sheet: str | None, required: Sequence[str], dataset: str) -> list[dict[str, Any]]:
    """Rows below the first row (of the first 20) holding every required header, as dicts."""
    rows = read_xlsx(path, sheet)
    where = f"{path}" + (f", sheet {sheet!r}" if sheet else "")
    for i, row in enumerate(rows[:20]):
        header = [str(v).strip() if v is not None else None for v in row]
        if all(name in header for name in required):
            out = []
            for data in rows[i + 1 :]:
                if all(v is None or v == "" for v in data):
                    continue
                out.append({h: (data[j] if j < len(data) else None) for j, h in enumerate(header) if h})
            return out
    raise DatasetFormatError(
        f"{dataset}: no header row with columns {list(required)} in the first 20 rows of {where}"
    )


def _name(value: Any) -> str:
    """An Excel cell holding a file stem: 1600.0 -> '1600'."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


# ---------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------


def load_koniq10k(
    root: Path | str,
    *,
    resolution: str = "1024x768",
    score_column: str = "MOS_zscore",
    check_images: bool = True,
) -> list[IQARecord]:
    """KonIQ-10k: ``koniq10k_scores_and_distributions.csv`` and/or ``koniq10k_distributions_sets.csv``.

    The scores file has ``image_name, c1..c5, c_total, MOS, SD, MOS_zscore``
    (MOS 1-5, MOS_zscore about 0-100, the usual choice). The official-split file
    (``image_name, ..., MOS, SD, set``; here MOS is the 0-100 score and set is
    training/validation/test) gives the splits; alone, it also gives the scores.
    Images are ``<resolution>/<image_name>`` (``1024x768`` or ``512x384``).

    Args:
        root: The dataset folder.
        resolution: Image folder name.
        score_column: ``"MOS_zscore"`` (0-100) or ``"MOS"`` (1-5) of the scores file.
        check_images: Verify that every image exists.
    """
    name = "KonIQ-10k"
    root = Path(root)
    scores = root / "koniq10k_scores_and_distributions.csv"
    sets = next(
        (
            p
            for p in (
                root / "koniq10k_distributions_sets.csv",
                root / "metadata" / "koniq10k_distributions_sets.csv",
            )
            if p.is_file()
        ),
        None,
    )
    if score_column not in ("MOS_zscore", "MOS"):
        raise ValueError(f"score_column must be 'MOS_zscore' or 'MOS', got {score_column!r}")
    split_map = {"training": "train", "train": "train", "validation": "val", "val": "val", "test": "test"}
    splits: dict[str, str] = {}
    if sets is not None:
        set_rows = _read_csv(sets, ["image_name", "MOS", "set"], name)
        for row in set_rows:
            if row["set"] not in split_map:
                raise DatasetFormatError(
                    f"{name}: set {row['set']!r} of {row['image_name']} in {sets} is not one "
                    f"of {sorted(split_map)}"
                )
            splits[row["image_name"]] = split_map[row["set"]]
    if scores.is_file():
        rows = _read_csv(scores, ["image_name", score_column], name)
        # MOS_zscore is the dataset's usual (and Q-Align's) score; the 1-5 MOS column is another one.
        scale = DATASET_SCALES["koniq10k"].range if score_column == "MOS_zscore" else (1.0, 5.0)
        source, column = scores, score_column
    elif sets is not None:
        rows, scale, source, column = set_rows, DATASET_SCALES["koniq10k"].range, sets, "MOS"
    else:
        raise DatasetFormatError(
            f"{name}: expected {scores.name} (or koniq10k_distributions_sets.csv) in {root}; "
            f"found {sorted(p.name for p in root.iterdir())[:12] if root.is_dir() else 'no such folder'}"
        )
    images = _need_dir(root / resolution, name, f"image ({resolution})")
    records = [
        IQARecord(
            id=row["image_name"],
            image_path=images / row["image_name"],
            score=_float(row[column], name, f"{source.name} row {i + 2} column {column}"),
            scale=scale,
            dataset="koniq10k",
            split=splits.get(row["image_name"]),
            meta={k: row[k] for k in ("SD", "c_total") if k in row},
        )
        for i, row in enumerate(rows)
    ]
    return _check_images(records, name, check_images)


def load_spaq(root: Path | str, *, check_images: bool = True) -> list[IQARecord]:
    """SPAQ: ``Annotations/MOS and Image attribute scores.xlsx`` and ``TestImage/``.

    Columns ``Image name, MOS, Brightness, Colorfulness, Contrast, Noisiness,
    Sharpness`` (all 0-100, higher is better); the attributes go to ``meta``.
    """
    name = "SPAQ"
    root = Path(root)
    sheet = _need_file(root / "Annotations" / "MOS and Image attribute scores.xlsx", name, "the MOS workbook")
    rows = _xlsx_table(sheet, None, ["Image name", "MOS"], name)
    images = _need_dir(root / "TestImage", name, "image (TestImage)")
    attributes = ("Brightness", "Colorfulness", "Contrast", "Noisiness", "Sharpness")
    records = [
        IQARecord(
            id=_name(row["Image name"]),
            image_path=images / _name(row["Image name"]),
            score=_float(row["MOS"], name, f"{sheet.name} MOS of {row['Image name']}"),
            scale=DATASET_SCALES["spaq"].range,
            dataset="spaq",
            meta={a: row[a] for a in attributes if row.get(a) is not None},
        )
        for row in rows
    ]
    return _check_images(records, name, check_images)


def _mat_vector(mat: dict, key: str, path: Path, dataset: str) -> list[Any]:
    import numpy as np

    if key not in mat:
        have = sorted(k for k in mat if not k.startswith("__"))
        raise DatasetFormatError(f"{dataset}: variable {key!r} missing from {path}; it has {have}")
    out = []
    for item in np.asarray(mat[key], dtype=object).ravel():
        while isinstance(item, np.ndarray) and item.dtype == object and item.size == 1:
            item = item.ravel()[0]
        if isinstance(item, np.ndarray):
            item = item.ravel()[0] if item.size == 1 else "".join(item.ravel().tolist())
        out.append(item.item() if hasattr(item, "item") else item)
    return out


def load_livec(root: Path | str, *, drop_training: bool = True, check_images: bool = True) -> list[IQARecord]:
    """LIVE In the Wild Challenge: ``Data/AllImages_release.mat``, ``Data/AllMOS_release.mat``, ``Images/``.

    Variables ``AllImages_release`` (cell of names), ``AllMOS_release`` (0-100,
    higher is better) and, if present, ``AllStdDev_release``. The first 7 entries
    (``t1.bmp``..``t7.bmp``, in ``Images/trainingImages/``) are the raters'
    training images and are dropped by default, leaving 1162.
    """
    from scipy.io import loadmat

    name = "LIVE Challenge"
    root = Path(root)
    data = root / "Data"
    names_path = _need_file(data / "AllImages_release.mat", name, "the image-name file")
    mos_path = _need_file(data / "AllMOS_release.mat", name, "the MOS file")
    names = _mat_vector(loadmat(names_path), "AllImages_release", names_path, name)
    mos = _mat_vector(loadmat(mos_path), "AllMOS_release", mos_path, name)
    std_path = data / "AllStdDev_release.mat"
    std = _mat_vector(loadmat(std_path), "AllStdDev_release", std_path, name) if std_path.is_file() else None
    if len(names) != len(mos):
        raise DatasetFormatError(
            f"{name}: {len(names)} names in {names_path} but {len(mos)} scores in {mos_path}"
        )
    images = _need_dir(root / "Images", name, "image (Images)")
    records = []
    for i, (img, score) in enumerate(zip(names, mos, strict=True)):
        training = i < 7
        if training and drop_training:
            continue
        path = images / "trainingImages" / img if training else images / img
        meta = {"std": float(std[i])} if std is not None else {}
        records.append(
            IQARecord(
                id=str(img),
                image_path=path,
                score=float(score),
                scale=DATASET_SCALES["livec"].range,
                dataset="livec",
                meta=meta,
            )
        )
    return _check_images(records, name, check_images)


#: CSIQ's ``dst_type`` -> (folder, file tag)
_CSIQ_TYPES = {
    "noise": ("awgn", "AWGN"),
    "awgn": ("awgn", "AWGN"),
    "jpeg": ("jpeg", "JPEG"),
    "jpeg 2000": ("jpeg2000", "jpeg2000"),
    "jpeg2000": ("jpeg2000", "jpeg2000"),
    "fnoise": ("fnoise", "fnoise"),
    "blur": ("blur", "BLUR"),
    "contrast": ("contrast", "contrast"),
}


def load_csiq(root: Path | str, *, check_images: bool = True) -> list[IQARecord]:
    """CSIQ: ``csiq.DMOS.xlsx`` (sheet ``all_by_image``, header on row 4, columns D-I) and ``dst_imgs/``.

    Columns ``image, dst_idx, dst_type, dst_lev, dmos_std, dmos``; DMOS is 0-1
    with *lower* better (so ``mos01 = 1 - dmos``). Images are
    ``dst_imgs/<folder>/<image>.<TAG>.<level>.png`` (folder/TAG from the type:
    awgn/AWGN, jpeg/JPEG, jpeg2000/jpeg2000, fnoise/fnoise, blur/BLUR,
    contrast/contrast), matched without regard to case.
    """
    name = "CSIQ"
    root = Path(root)
    book = _need_file(root / "csiq.DMOS.xlsx", name, "the DMOS workbook")
    rows = _xlsx_table(book, "all_by_image", ["image", "dst_type", "dst_lev", "dmos"], name)
    dst = _need_dir(root / "dst_imgs", name, "distorted-image (dst_imgs)")
    folders: dict[str, _CaseInsensitiveDir] = {}
    records = []
    for row in rows:
        kind = str(row["dst_type"]).strip().lower()
        if kind not in _CSIQ_TYPES:
            raise DatasetFormatError(
                f"{name}: dst_type {row['dst_type']!r} in {book} is not one of {sorted(_CSIQ_TYPES)}"
            )
        folder, tag = _CSIQ_TYPES[kind]
        if folder not in folders:
            folders[folder] = _CaseInsensitiveDir(_CaseInsensitiveDir(dst)(folder))
        image, level = _name(row["image"]), int(_float(row["dst_lev"], name, f"{book.name} dst_lev"))
        file = f"{image}.{tag}.{level}.png"
        records.append(
            IQARecord(
                id=file,
                image_path=folders[folder](file),
                score=_float(row["dmos"], name, f"{book.name} dmos of {file}"),
                scale=DATASET_SCALES["csiq"].range,
                higher_is_better=DATASET_SCALES["csiq"].higher_is_better,
                dataset="csiq",
                ref_id=image,
                distortion=folder,
                level=level,
                meta={
                    "dmos_std": row.get("dmos_std"),
                    "reference_path": str(root / "src_imgs" / f"{image}.png"),
                },
            )
        )
    return _check_images(records, name, check_images)


def _kadid_type_names() -> dict[int, str]:
    from mechbiqa.data.distortions import DISTORTIONS

    return {d.kadid_id: d.name for d in DISTORTIONS.values()}


def load_kadid10k(root: Path | str, *, check_images: bool = True) -> list[IQARecord]:
    """KADID-10k: ``dmos.csv`` (``dist_img, ref_img, dmos, var``) and ``images/``.

    Despite its name, ``dmos`` is 1-5 with higher better. The distortion type
    and level come from the file name ``I<ref>_<type>_<level>.png``, named as in
    `mechbiqa.data.distortions`.
    """
    name = "KADID-10k"
    root = Path(root)
    table = _need_file(root / "dmos.csv", name, "the rating file")
    rows = _read_csv(table, ["dist_img", "ref_img", "dmos"], name)
    images = _need_dir(root / "images", name, "image (images)")
    types = _kadid_type_names()
    pattern = re.compile(r"I(\d+)_(\d+)_(\d+)\.", re.IGNORECASE)
    records = []
    for i, row in enumerate(rows):
        match = pattern.match(row["dist_img"])
        kind, level = (types.get(int(match.group(2))), int(match.group(3))) if match else (None, None)
        records.append(
            IQARecord(
                id=row["dist_img"],
                image_path=images / row["dist_img"],
                score=_float(row["dmos"], name, f"{table.name} row {i + 2} column dmos"),
                scale=DATASET_SCALES["kadid10k"].range,
                dataset="kadid10k",
                ref_id=Path(row["ref_img"]).stem,
                distortion=kind,
                level=level,
                meta={"var": float(row["var"])} if row.get("var") not in (None, "") else {},
            )
        )
    return _check_images(records, name, check_images)


def load_tid2013(root: Path | str, *, check_images: bool = True) -> list[IQARecord]:
    """TID2013: ``mos_with_names.txt`` (``<mos> <name>`` per line) and ``distorted_images/``.

    MOS is 0-9 with higher better; names ``i<ref>_<type>_<level>.bmp`` (any case).
    """
    name = "TID2013"
    root = Path(root)
    table = _need_file(root / "mos_with_names.txt", name, "the MOS file")
    images = _CaseInsensitiveDir(_need_dir(root / "distorted_images", name, "image (distorted_images)"))
    records = []
    for n, line in enumerate(table.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise DatasetFormatError(f"{name}: {table} line {n} is {line!r}; expected '<mos> <name>'")
        score, file = _float(parts[0], name, f"{table.name} line {n}"), parts[1]
        match = re.match(r"i(\d+)_(\d+)_(\d+)\.", file, re.IGNORECASE)
        records.append(
            IQARecord(
                id=file.lower(),
                image_path=images(file),
                score=score,
                scale=DATASET_SCALES["tid2013"].range,
                dataset="tid2013",
                ref_id=f"i{match.group(1)}" if match else None,
                distortion=f"tid{int(match.group(2)):02d}" if match else None,
                level=int(match.group(3)) if match else None,
            )
        )
    return _check_images(records, name, check_images)


def load_agiqa3k(
    root: Path | str, *, image_dir: str | None = None, check_images: bool = True
) -> list[IQARecord]:
    """AGIQA-3k: ``data.csv`` and the image folder.

    Columns ``name, prompt, adj1, adj2, style, mos_quality, std_quality, mos_align, std_align``.

    ``mos_quality`` is 0-5, higher is better; the prompt, style and alignment
    scores go to ``meta``. Images are looked for in ``image_dir`` or, by
    default, the first of ``AGIQA-3K/``, ``AGIQA-3k/``, ``images/`` and the
    dataset folder itself that holds the first listed image.
    """
    name = "AGIQA-3k"
    root = Path(root)
    table = _need_file(root / "data.csv", name, "the rating file")
    rows = _read_csv(table, ["name", "mos_quality"], name)
    if image_dir is not None:
        images = _need_dir(root / image_dir, name, "image")
    else:
        candidates = [root / "AGIQA-3K", root / "AGIQA-3k", root / "images", root]
        first = rows[0]["name"] if rows else ""
        images = next((c for c in candidates if (c / first).is_file()), None)
        if images is None:
            raise DatasetFormatError(
                f"{name}: image {first!r} not found in any of {[str(c) for c in candidates]}; pass image_dir="
            )
    meta_keys = ("prompt", "adj1", "adj2", "style", "std_quality", "mos_align", "std_align")
    records = [
        IQARecord(
            id=row["name"],
            image_path=images / row["name"],
            score=_float(row["mos_quality"], name, f"{table.name} row {i + 2} column mos_quality"),
            scale=DATASET_SCALES["agiqa3k"].range,
            dataset="agiqa3k",
            meta={k: row[k] for k in meta_keys if k in row},
        )
        for i, row in enumerate(rows)
    ]
    return _check_images(records, name, check_images)


# ---------------------------------------------------------------------------------------------------------
# Q-Align / Q-Instruct JSON
# ---------------------------------------------------------------------------------------------------------

_WORD_RE = re.compile(r"\b(" + "|".join(LEVEL_WORDS) + r")\b", re.IGNORECASE)
_PLACEHOLDERS = ("<|image|>", "<image>")


def _read_json_list(path: Path, dataset: str) -> list[dict[str, Any]]:
    path = _need_file(Path(path), dataset, "the JSON file")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))  # a BOM is common in Windows-saved files
    except json.JSONDecodeError as err:
        raise DatasetFormatError(f"{dataset}: {path} is not valid JSON ({err})") from None
    if not isinstance(data, list):
        raise DatasetFormatError(
            f"{dataset}: {path} should hold a JSON list of objects, got {type(data).__name__}"
        )
    bad = [i for i, d in enumerate(data) if not isinstance(d, dict)]
    if bad:
        raise DatasetFormatError(
            f"{dataset}: {path} should hold a JSON list of objects; {len(bad)} entries are not objects, "
            f"e.g. entry {bad[0]} ({type(data[bad[0]]).__name__}): remove them"
        )
    return data


def _gpt_turns(conversations: Any, path: Path, index: int, dataset: str) -> list[str]:
    if not isinstance(conversations, list) or not all(
        isinstance(t, dict) and "value" in t for t in conversations
    ):
        raise DatasetFormatError(
            f"{dataset}: entry {index} of {path}: 'conversations' should be a list of "
            "{'from': ..., 'value': ...} objects"
        )
    return [t["value"] for t in conversations if t.get("from") in ("gpt", "assistant")]


#: Q-Align's folders of test and training files -> the split of their entries.
_SPLIT_FOLDERS = {"test_jsons": "test", "training_sft": "train"}


#: Image file names that only one dataset uses (its release's naming), for entries whose path names no
#: dataset folder (``"image": "I01_01_05.png"`` in a mixed file).
_NAME_PATTERNS = (
    (re.compile(r"I\d{2}_\d{2}_\d{2}\.png", re.IGNORECASE), "kadid10k"),
    (re.compile(r"i\d{2}_\d{2}_\d\.bmp", re.IGNORECASE), "tid2013"),
    (re.compile(r"\d{5}\.(?:jpe?g|png)", re.IGNORECASE), "spaq"),
    (re.compile(r"\d{6,}\.jpe?g", re.IGNORECASE), "koniq10k"),
    (re.compile(r"(?:attngan|dalle2|glide|midjourney|sd1\.5|xl2\.2)_[a-z]+_\d+\.(?:jpe?g|png)",
                re.IGNORECASE), "agiqa3k"),
    (re.compile(r".+\.(?:awgn|jpeg|jpeg2000|fnoise|blur|contrast)\.\d\.png", re.IGNORECASE), "csiq"),
)


def entry_source(
    entry: Mapping[str, Any], image: str, extra: Mapping[str, Any] = MappingProxyType({})
) -> str | None:
    """The dataset an annotation or Q-Align entry comes from, or None when nothing names one.

    First found: an explicit ``dataset`` / ``source`` field; a folder of its image path, innermost
    first, that is a dataset name or alias (``koniq/``, ``kadid10k/images/``, ``LIVE_Challenge/``; a
    folder naming several, like Q-Instruct's ``spaq_koniq/``, names none); the image's file name when
    it follows one dataset's naming (KADID ``I01_01_05.png``, SPAQ ``00001.jpg``, KonIQ
    ``10004473376.jpg``, AGIQA ``AttnGAN_normal_000.jpg``, CSIQ, TID2013).

    Args:
        entry: The JSON entry.
        image: Its ``image`` / ``img_path`` value.
        extra: Further dataset names to accept (user-given scales).
    """
    for field in ("dataset", "source"):
        if isinstance(entry.get(field), str):
            found = resolve(entry[field], extra)
            if found is not None:
                return found
    parts = PurePosixPath(str(image).replace("\\", "/")).parts
    for folder in reversed(parts[:-1]):
        found = resolve(folder, extra)
        if found is not None:
            return found
    name = parts[-1] if parts else ""
    for pattern, dataset in _NAME_PATTERNS:
        if pattern.fullmatch(name):
            return dataset
    return None


def file_source(path: Path, extra: Mapping[str, Any] = MappingProxyType({})) -> str | None:
    """The one dataset a JSON file's name (or, failing that, its folder's name) names, else None.

    ``test_koniq.json`` and ``ft/agi/train_split_1.json`` name one; a mixed file
    such as ``train_koniq_spaq_kadid.json`` names several, so none is chosen.
    """
    for text in (path.stem, path.parent.name):
        found = {resolve(token, extra) for token in re.split(r"[_\-.\s]+", text)} - {None}
        if len(found) == 1:
            return found.pop()
        if len(found) > 1:
            return None
    return None


def load_qalign_json(
    path: Path | str,
    image_root: Path | str,
    *,
    scales: Mapping[str, DatasetScale | tuple[float | int, float | int]] | None = None,
    scale: tuple[float | int, float | int] | None = None,
    higher_is_better: bool = True,
    split: str | None = None,
    dataset: str | None = None,
    check_images: bool = True,
) -> list[IQARecord]:
    """A Q-Align training or test JSON (``playground/data``) in any of its three shapes.

    - ``{"id": "<file>-><score>", "image", "conversations", ["gt_score"]}``
      (training SFT files, test_koniq/spaq/kadid): the score is ``gt_score`` or
      the part of ``id`` after ``->``; the level word is read from the answer.
    - ``{"img_path", "gt_score"}`` (livec, agi; agi's ``gt_score`` is a string).
    - ``{"image", "gt_score"}`` (live, csiq, ava).

    Each entry is rated on the scale of its own source, so a file that mixes
    datasets (Q-Align's KonIQ + SPAQ + KADID training mix) gives every entry the
    right ``mos01``. The source is, first found: the entry's ``dataset`` /
    ``source`` field; a folder of its image path (``koniq/``, ``spaq/``,
    ``kadid10k/``, ``livec/``, ``agi-cgi/``, ``csiq/``, any name or alias of
    `DATASET_SCALES`, or a key of ``scales``); ``dataset``; the one dataset the
    file name or its folder names (``test_koniq.json``, ``ft/agi/...``); and
    last ``scale``. Entries left without a source are refused, named.

    Args:
        path: The JSON file.
        image_root: Folder the ``image`` / ``img_path`` values are relative to.
        scales: Scales of further sources, or overrides, by name (an image folder
            name or a dataset name): ``{"cgi": (0, 5)}`` or `DatasetScale` values
            (``--scale cgi=0,5`` on the command line, read with `parse_scale`).
        scale: ``(low, high)`` for entries whose source cannot be told otherwise
            (with ``higher_is_better``).
        higher_is_better: Direction of ``scale``.
        split: Split of every record; if None, ``train`` / ``test`` from a prefix of
            the file name (``test_koniq.json``, ``train_split_1.json``), else from
            Q-Align's folder (``test_jsons/``, ``training_sft/``).
        dataset: The source of entries that name none in their image path; if
            not a known name, it only names the records (with ``scale``).
        check_images: Verify that every image exists.

    Raises:
        DatasetFormatError: If the file is malformed, or some entries' source (and
            so scale) cannot be told: the message names them and the fix.
    """
    path = Path(path)
    label = f"Q-Align JSON {path.name}"
    entries = _read_json_list(path, label)
    extra: dict[str, DatasetScale] = {  # a known dataset's alias overrides that dataset
        resolve(name) or name: value if isinstance(value, DatasetScale) else DatasetScale(*value)
        for name, value in (scales or {}).items()
    }
    given = resolve(dataset, extra) if dataset is not None else None
    fallback = given or file_source(path, extra)

    def scale_for(source: str | None) -> DatasetScale | None:
        if source is None:
            return DatasetScale(*scale, higher_is_better=higher_is_better) if scale is not None else None
        return extra.get(source) or DATASET_SCALES[source]

    if split is None:
        stem = path.stem.lower()
        split = "train" if stem.startswith("train") else "test" if stem.startswith("test") else None
        split = split or _SPLIT_FOLDERS.get(path.parent.name.lower())
    image_root = Path(image_root)
    records, unresolved = [], []
    for i, entry in enumerate(entries):
        image = entry.get("image", entry.get("img_path"))
        if image is None:
            raise DatasetFormatError(
                f"{label}: entry {i} has neither 'image' nor 'img_path' (keys {sorted(entry)})"
            )
        source = entry_source(entry, image, extra) or fallback
        entry_scale = scale_for(source)
        if entry_scale is None:
            unresolved.append(str(image))
            continue
        if "gt_score" in entry:
            score = _float(entry["gt_score"], label, f"entry {i} gt_score")
        elif "->" in str(entry.get("id", "")):
            score = _float(str(entry["id"]).rsplit("->", 1)[1], label, f"entry {i} id")
        else:
            raise DatasetFormatError(
                f"{label}: entry {i} has no 'gt_score' and its id {entry.get('id')!r} has no '-><score>' part"
            )
        word, answer = None, None
        if "conversations" in entry:
            turns = _gpt_turns(entry["conversations"], path, i, label)
            answer = turns[-1] if turns else None
            found = _WORD_RE.findall(answer or "")
            word = found[-1].lower() if found else None
        records.append(
            IQARecord(
                id=str(entry.get("id", image)).split("->")[0],
                image_path=image_root / image,
                score=score,
                scale=entry_scale.range,
                higher_is_better=entry_scale.higher_is_better,
                dataset=source or dataset or path.stem,
                split=split,
                level_word=word,
                meta={"answer": answer} if answer is not None else {},
            )
        )
    if unresolved:
        folders = sorted({PurePosixPath(u).parts[0] for u in unresolved if len(PurePosixPath(u).parts) > 1})
        name = folders[0] if folders else "NAME"
        raise DatasetFormatError(
            f"{label}: cannot infer the score scale of {len(unresolved)} of {len(entries)} entries, "
            f"e.g. {unresolved[:3]}: neither an entry field 'dataset', a folder of the image path "
            f"(folders {folders or 'none'}) nor the file name names a known dataset "
            f"({sorted(DATASET_SCALES)}). Give the scale of that source: --scale {name}=LOW,HIGH "
            f"(scales={{{name!r}: (low, high)}}), or scale=(low, high) for every such entry"
        )
    return _check_images(records, label, check_images)


def load_qinstruct_json(
    path: Path | str, image_root: Path | str, *, dataset: str | None = None, check_images: bool = True
) -> list[IQARecord]:
    r"""Q-Instruct (``cleaned_labels.json``) or any LLaVA / mPLUG-Owl2 conversation JSON, as descriptions.

    Entries are ``{"id", "image": "<folder>/<file>", "conversations": [{"from":
    "human", "value": "<image>\n..."}, {"from": "gpt", "value": "..."}, ...]}``;
    the ``<image>`` and ``<|image|>`` placeholders are both accepted. Entries
    without an image (text-only) are skipped. These records carry no rating
    (``score`` is None); ``description`` is the answer when there is a single
    answer, and every (question, answer) pair is kept in ``meta["turns"]``.
    """
    path = Path(path)
    label = f"Q-Instruct JSON {path.name}"
    entries = _read_json_list(path, label)
    image_root = Path(image_root)
    records = []
    for i, entry in enumerate(entries):
        if "image" not in entry:
            continue
        if "conversations" not in entry:
            raise DatasetFormatError(
                f"{label}: entry {i} has an image but no 'conversations' (keys {sorted(entry)})"
            )
        answers = _gpt_turns(entry["conversations"], path, i, label)
        turns = []
        for t in entry["conversations"]:
            value = t["value"]
            for ph in _PLACEHOLDERS:
                value = value.replace(ph, "")
            turns.append([t.get("from"), value.strip()])
        records.append(
            IQARecord(
                id=str(entry.get("id", f"{path.stem}-{i}")),
                image_path=image_root / entry["image"],
                score=None,
                scale=(0.0, 1.0),
                dataset=dataset or path.stem,
                description=answers[0] if len(answers) == 1 else None,
                meta={"turns": turns},
            )
        )
    return _check_images(records, label, check_images)


#: name -> loader(root, **kwargs)
DATASETS: dict[str, Callable[..., list[IQARecord]]] = {
    "koniq10k": load_koniq10k,
    "spaq": load_spaq,
    "livec": load_livec,
    "csiq": load_csiq,
    "kadid10k": load_kadid10k,
    "tid2013": load_tid2013,
    "agiqa3k": load_agiqa3k,
}


def load_dataset(name: str, root: Path | str, **kwargs: Any) -> list[IQARecord]:
    """Load a dataset by name (a key of `DATASETS` or an alias such as ``koniq``) from its folder ``root``.

    For Q-Align / Q-Instruct JSON files use `load_qalign_json` / `load_qinstruct_json`.

    Raises:
        UnknownDatasetError: If the name is not known (a `ValueError` and a `KeyError`; the
            message lists the known names).
    """
    key = resolve(name)
    if key not in DATASETS:
        raise UnknownDatasetError(
            f"unknown dataset {name!r}; known: {sorted(DATASETS)} (also spelt "
            f"{sorted(a for a, k in DATASET_ALIASES.items() if k in DATASETS)}); for a Q-Align JSON file "
            "give the .json path (load_qalign_json)"
        )
    return DATASETS[key](root, **kwargs)
