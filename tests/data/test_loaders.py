"""Loaders: each reads a small copy in its dataset's exact format, and refuses a broken one by name."""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from mechbiqa.data.loaders import (
    DatasetFormatError,
    load_agiqa3k,
    load_csiq,
    load_dataset,
    load_kadid10k,
    load_koniq10k,
    load_livec,
    load_qalign_json,
    load_qinstruct_json,
    load_spaq,
    load_tid2013,
    read_xlsx,
)

# ---------------------------------------------------------------------------------------------------------
# Writers of the original formats
# ---------------------------------------------------------------------------------------------------------


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(path)


def _csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _col(i: int) -> str:
    s = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        s = chr(65 + r) + s
    return s


def write_xlsx(path: Path, sheets: dict[str, dict[tuple[int, int], object]]) -> None:
    """A minimal OOXML workbook as Excel writes it: text in sharedStrings, numbers inline.

    Cells are keyed (row, col), 0-based.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    ns = 'xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"'
    rns = 'xmlns:r="http://schemas.openxmlformats.org/officeDocument/2006/relationships"'
    shared: list[str] = []
    parts = {}
    for n, cells in enumerate(sheets.values(), 1):
        rows: dict[int, list[str]] = {}
        for (r, c), v in sorted(cells.items()):
            ref = f"{_col(c)}{r + 1}"
            if isinstance(v, str):
                shared.append(v)
                xml = f'<c r="{ref}" t="s"><v>{len(shared) - 1}</v></c>'
            else:
                xml = f'<c r="{ref}"><v>{v}</v></c>'
            rows.setdefault(r, []).append(xml)
        body = "".join(f'<row r="{r + 1}">{"".join(cs)}</row>' for r, cs in sorted(rows.items()))
        parts[f"xl/worksheets/sheet{n}.xml"] = (
            f'<?xml version="1.0"?><worksheet {ns}><sheetData>{body}</sheetData></worksheet>'
        )
    sheet_xml = "".join(
        f'<sheet name="{escape(name)}" sheetId="{n}" r:id="rId{n}"/>' for n, name in enumerate(sheets, 1)
    )
    parts["xl/workbook.xml"] = (
        f'<?xml version="1.0"?><workbook {ns} {rns}><sheets>{sheet_xml}</sheets></workbook>'
    )
    rels = "".join(
        f'<Relationship Id="rId{n}" '
        'Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/worksheet" '
        f'Target="worksheets/sheet{n}.xml"/>'
        for n in range(1, len(sheets) + 1)
    )
    parts["xl/_rels/workbook.xml.rels"] = (
        '<?xml version="1.0"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
        f"{rels}</Relationships>"
    )
    parts["xl/sharedStrings.xml"] = (
        f'<?xml version="1.0"?><sst {ns} count="{len(shared)}">'
        + "".join(f"<si><t>{escape(s)}</t></si>" for s in shared)
        + "</sst>"
    )
    parts["[Content_Types].xml"] = (
        '<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"/>'
    )
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in parts.items():
            zf.writestr(name, text)


def _table(header: list[str], rows: list[list], top: int = 0, left: int = 0) -> dict[tuple[int, int], object]:
    cells = {(top, left + j): h for j, h in enumerate(header)}
    for i, row in enumerate(rows, 1):
        cells.update({(top + i, left + j): v for j, v in enumerate(row)})
    return cells


# ---------------------------------------------------------------------------------------------------------
# KonIQ-10k
# ---------------------------------------------------------------------------------------------------------

KONIQ_SCORES = ["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "MOS_zscore"]
KONIQ_SETS = ["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "set"]


def make_koniq(root: Path) -> Path:
    names = ["826373.jpg", "10004473376.jpg", "10007357496.jpg"]
    _csv(
        root / "koniq10k_scores_and_distributions.csv",
        KONIQ_SCORES,
        [
            [n, 0, 0.1, 0.2, 0.5, 0.2, 100, m, 0.7, z]
            for n, m, z in zip(names, [3.9, 2.1, 1.4], [77.4, 31.0, 6.2], strict=True)
        ],
    )
    _csv(
        root / "koniq10k_distributions_sets.csv",
        KONIQ_SETS,
        [
            [n, 0, 0, 0, 0, 0, 100, z, 10, s]
            for n, z, s in zip(names, [77.4, 31.0, 6.2], ["training", "validation", "test"], strict=True)
        ],
    )
    for n in names:
        _image(root / "1024x768" / n)
    return root


def test_koniq(tmp_path):
    recs = load_koniq10k(make_koniq(tmp_path))
    assert [r.id for r in recs] == ["826373.jpg", "10004473376.jpg", "10007357496.jpg"]
    assert recs[0].score == 77.4 and recs[0].scale == (0.0, 100.0) and recs[0].mos01 == pytest.approx(0.774)
    assert [r.split for r in recs] == ["train", "val", "test"]
    assert load_koniq10k(tmp_path, score_column="MOS")[1].scale == (1.0, 5.0)
    assert load_dataset("KonIQ-10k", tmp_path)[2].image_path == tmp_path / "1024x768" / "10007357496.jpg"
    # The official-split file alone is enough (its MOS is the 0-100 score).
    (tmp_path / "koniq10k_scores_and_distributions.csv").unlink()
    assert load_koniq10k(tmp_path)[0].score == 77.4


def test_koniq_broken(tmp_path):
    root = make_koniq(tmp_path)
    with pytest.raises(DatasetFormatError, match=r"image \(512x384\) folder at .*512x384"):
        load_koniq10k(root, resolution="512x384")
    _csv(root / "koniq10k_scores_and_distributions.csv", KONIQ_SCORES[:-1], [["826373.jpg"] + [0] * 8])
    with pytest.raises(
        DatasetFormatError, match=r"\['MOS_zscore'\] missing from .*koniq10k_scores_and_distributions"
    ):
        load_koniq10k(root)
    (root / "1024x768" / "826373.jpg").unlink()
    with pytest.raises(DatasetFormatError, match="1 of 1 image file"):
        load_koniq10k(root, score_column="MOS")
    with pytest.raises(DatasetFormatError, match="koniq10k_scores_and_distributions.csv"):
        load_koniq10k(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------------------
# SPAQ (xlsx)
# ---------------------------------------------------------------------------------------------------------

SPAQ_HEADER = ["Image name", "MOS", "Brightness", "Colorfulness", "Contrast", "Noisiness", "Sharpness"]


def make_spaq(root: Path, header=SPAQ_HEADER) -> Path:
    rows = [["00001.jpg", 42.5, 50, 40, 44, 60, 38], ["00002.jpg", 80.1, 70, 65, 72, 81, 79]]
    write_xlsx(root / "Annotations" / "MOS and Image attribute scores.xlsx", {"Sheet1": _table(header, rows)})
    for r in rows:
        _image(root / "TestImage" / r[0])
    return root


def test_spaq(tmp_path):
    recs = load_spaq(make_spaq(tmp_path))
    assert [(r.id, r.score) for r in recs] == [("00001.jpg", 42.5), ("00002.jpg", 80.1)]
    assert recs[1].meta["Sharpness"] == 79 and recs[1].mos01 == pytest.approx(0.801)


def test_spaq_broken(tmp_path):
    make_spaq(tmp_path, header=["Image name", "Score"] + SPAQ_HEADER[2:])
    with pytest.raises(DatasetFormatError, match=r"no header row with columns \['Image name', 'MOS'\]"):
        load_spaq(tmp_path)
    with pytest.raises(DatasetFormatError, match="MOS and Image attribute scores.xlsx"):
        load_spaq(tmp_path / "elsewhere")


# ---------------------------------------------------------------------------------------------------------
# LIVE Challenge (.mat)
# ---------------------------------------------------------------------------------------------------------


def make_livec(root: Path, mos_key: str = "AllMOS_release") -> Path:
    names = [f"t{i}.bmp" for i in range(1, 8)] + ["3.bmp", "10.JPG"]
    cell = np.empty((len(names), 1), dtype=object)
    for i, n in enumerate(names):
        cell[i, 0] = np.array([n])
    mos = np.array([[50.0] * 7 + [63.9, 25.3]])
    (root / "Data").mkdir(parents=True)
    savemat(root / "Data" / "AllImages_release.mat", {"AllImages_release": cell})
    savemat(root / "Data" / "AllMOS_release.mat", {mos_key: mos})
    savemat(root / "Data" / "AllStdDev_release.mat", {"AllStdDev_release": mos / 5})
    for n in names[:7]:
        _image(root / "Images" / "trainingImages" / n)
    for n in names[7:]:
        _image(root / "Images" / n)
    return root


def test_livec(tmp_path):
    recs = load_livec(make_livec(tmp_path))
    assert [(r.id, r.score) for r in recs] == [("3.bmp", 63.9), ("10.JPG", 25.3)]
    assert recs[0].meta["std"] == pytest.approx(63.9 / 5) and recs[1].scale == (0.0, 100.0)
    both = load_livec(tmp_path, drop_training=False)
    assert len(both) == 9 and both[0].image_path == tmp_path / "Images" / "trainingImages" / "t1.bmp"


def test_livec_broken(tmp_path):
    make_livec(tmp_path, mos_key="MOS")
    with pytest.raises(
        DatasetFormatError, match=r"variable 'AllMOS_release' missing from .*AllMOS_release.mat.*\['MOS'\]"
    ):
        load_livec(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# CSIQ (xlsx: sheet all_by_image, header on row 4, columns D-I)
# ---------------------------------------------------------------------------------------------------------

CSIQ_HEADER = ["image", "dst_idx", "dst_type", "dst_lev", "dmos_std", "dmos"]


def make_csiq(root: Path, sheet: str = "all_by_image", header=CSIQ_HEADER) -> Path:
    rows = [
        [1600, 1, "noise", 1, 0.02, 0.062],
        ["sunset_sparrow", 4, "jpeg 2000", 3, 0.03, 0.41],
        ["1600", 6, "contrast", 2, 0.01, 0.15],
    ]
    cells = {(0, 0): "CSIQ DMOS scores", (1, 0): "by image"}
    cells.update(_table(header, rows, top=3, left=3))  # header on row 4, columns D-I
    write_xlsx(root / "csiq.DMOS.xlsx", {"info": {(0, 0): "notes"}, sheet: cells})
    _image(root / "dst_imgs" / "awgn" / "1600.AWGN.1.png")
    _image(root / "dst_imgs" / "jpeg2000" / "sunset_sparrow.jpeg2000.3.png")
    _image(root / "dst_imgs" / "contrast" / "1600.CONTRAST.2.png")  # case differs from the tag: still found
    _image(root / "src_imgs" / "1600.png")
    return root


def test_csiq(tmp_path):
    recs = load_csiq(make_csiq(tmp_path))
    assert [r.id for r in recs] == ["1600.AWGN.1.png", "sunset_sparrow.jpeg2000.3.png", "1600.contrast.2.png"]
    assert recs[0].higher_is_better is False and recs[0].scale == (0.0, 1.0)
    assert recs[0].mos01 == pytest.approx(1 - 0.062)  # DMOS flipped
    assert recs[1].distortion == "jpeg2000" and recs[1].level == 3 and recs[1].ref_id == "sunset_sparrow"
    assert recs[2].image_path.name == "1600.CONTRAST.2.png"


def test_csiq_broken(tmp_path):
    make_csiq(tmp_path, sheet="Sheet1")
    with pytest.raises(DatasetFormatError, match=r"no sheet 'all_by_image'; sheets are \['info', 'Sheet1'\]"):
        load_csiq(tmp_path)
    other = tmp_path / "other"
    make_csiq(other, header=["image", "dst_idx", "dst_type", "dst_lev", "dmos_std", "score"])
    with pytest.raises(DatasetFormatError, match=r"columns \['image', 'dst_type', 'dst_lev', 'dmos'\]"):
        load_csiq(other)


# ---------------------------------------------------------------------------------------------------------
# KADID-10k, TID2013, AGIQA-3k
# ---------------------------------------------------------------------------------------------------------


def make_kadid(root: Path, header=("dist_img", "ref_img", "dmos", "var")) -> Path:
    rows = [["I01_01_01.png", "I01.png", 4.57, 0.496], ["I01_10_05.png", "I01.png", 1.2, 0.16]]
    _csv(root / "dmos.csv", list(header), rows)
    for r in rows:
        _image(root / "images" / r[0])
    return root


def test_kadid(tmp_path):
    recs = load_kadid10k(make_kadid(tmp_path))
    assert recs[0].score == 4.57 and recs[0].scale == (1.0, 5.0) and recs[0].higher_is_better
    assert (recs[0].distortion, recs[0].level, recs[0].ref_id) == ("gaussian_blur", 1, "I01")
    assert (recs[1].distortion, recs[1].level) == ("jpeg", 5) and recs[1].mos01 == pytest.approx(0.05)


def test_kadid_broken(tmp_path):
    make_kadid(tmp_path, header=("dist_img", "ref_img", "mos", "var"))
    with pytest.raises(DatasetFormatError, match=r"\['dmos'\] missing from .*dmos.csv"):
        load_kadid10k(tmp_path)
    (tmp_path / "dmos.csv").unlink()
    with pytest.raises(DatasetFormatError, match=r"expected the rating file at .*dmos.csv"):
        load_kadid10k(tmp_path)


def test_tid2013(tmp_path):
    (tmp_path / "mos_with_names.txt").write_text("5.51429 i01_01_1.bmp\n2.1 I25_17_5.BMP\n")
    _image(tmp_path / "distorted_images" / "i01_01_1.bmp")
    _image(tmp_path / "distorted_images" / "i25_17_5.bmp")
    recs = load_tid2013(tmp_path)
    assert recs[0].score == pytest.approx(5.51429) and recs[0].scale == (0.0, 9.0) and recs[0].level == 1
    assert recs[1].image_path.name == "i25_17_5.bmp" and recs[1].distortion == "tid17"
    (tmp_path / "mos_with_names.txt").write_text("5.5\n")
    with pytest.raises(DatasetFormatError, match="expected '<mos> <name>'"):
        load_tid2013(tmp_path)


AGIQA_HEADER = [
    "name",
    "prompt",
    "adj1",
    "adj2",
    "style",
    "mos_quality",
    "std_quality",
    "mos_align",
    "std_align",
]


def make_agiqa(root: Path, header=AGIQA_HEADER) -> Path:
    rows = [
        ["AttnGAN_normal_000.jpg", "a cat", "", "", "", 1.05, 0.6, 2.1, 0.5],
        ["sd1.5_highcorr_181.jpg", "a dog", "old", "", "oil painting", 3.87, 0.4, 3.5, 0.3],
    ]
    _csv(root / "data.csv", header, rows)
    for r in rows:
        _image(root / "AGIQA-3K" / r[0])
    return root


def test_agiqa3k(tmp_path):
    recs = load_agiqa3k(make_agiqa(tmp_path))
    assert recs[1].score == 3.87 and recs[1].scale == (0.0, 5.0) and recs[1].meta["style"] == "oil painting"
    assert recs[0].image_path == tmp_path / "AGIQA-3K" / "AttnGAN_normal_000.jpg"


def test_agiqa3k_broken(tmp_path):
    make_agiqa(tmp_path, header=[h if h != "mos_quality" else "mos" for h in AGIQA_HEADER])
    with pytest.raises(DatasetFormatError, match=r"\['mos_quality'\] missing"):
        load_agiqa3k(tmp_path)
    other = make_agiqa(tmp_path / "o")
    (other / "AGIQA-3K" / "AttnGAN_normal_000.jpg").rename(other / "moved.jpg")
    with pytest.raises(DatasetFormatError, match="AttnGAN_normal_000.jpg' not found in any of"):
        load_agiqa3k(other)


# ---------------------------------------------------------------------------------------------------------
# Q-Align and Q-Instruct JSON
# ---------------------------------------------------------------------------------------------------------


def _conv(answer: str, placeholder: str = "<|image|>") -> list[dict]:
    return [
        {"from": "human", "value": f"How would you rate the quality of this image?\n{placeholder}"},
        {"from": "gpt", "value": answer},
    ]


def test_qalign_training_and_test_shapes(tmp_path):
    _image(tmp_path / "koniq" / "10004473376.jpg")
    _image(tmp_path / "koniq" / "826373.jpg")
    train = [
        {
            "id": "10004473376.jpg->77.3836206897",
            "image": "koniq/10004473376.jpg",
            "conversations": _conv("The quality of the image is excellent."),
        },
        {
            "id": "826373.jpg->30.5",
            "image": "koniq/826373.jpg",
            "conversations": _conv("The quality of the image is poor."),
        },
    ]
    (tmp_path / "train_koniq.json").write_text(json.dumps(train))
    recs = load_qalign_json(tmp_path / "train_koniq.json", tmp_path)
    assert recs[0].score == pytest.approx(77.3836206897) and recs[0].scale == (0.0, 100.0)
    assert [r.level_word for r in recs] == ["excellent", "poor"] and recs[0].split == "train"
    assert recs[0].id == "10004473376.jpg"

    test = [
        {"id": "826373.jpg->30.5", "image": "koniq/826373.jpg", "conversations": _conv(""), "gt_score": 30.5}
    ]
    (tmp_path / "test_koniq.json").write_text(json.dumps(test))
    assert load_qalign_json(tmp_path / "test_koniq.json", tmp_path)[0].split == "test"

    _image(tmp_path / "agi" / "DALLE2_normal_256.jpg")
    (tmp_path / "agi.json").write_text(
        json.dumps([{"img_path": "agi/DALLE2_normal_256.jpg", "gt_score": "2.81"}])
    )
    agi = load_qalign_json(tmp_path / "agi.json", tmp_path)
    assert agi[0].score == 2.81 and agi[0].scale == (0.0, 5.0)

    _image(tmp_path / "csiq" / "a.png")
    (tmp_path / "csiq.json").write_text(json.dumps([{"image": "csiq/a.png", "gt_score": 0.2}]))
    csiq = load_qalign_json(tmp_path / "csiq.json", tmp_path, scale=(0, 1), higher_is_better=False)
    assert csiq[0].mos01 == pytest.approx(0.8)
    # CSIQ's DMOS scale (0-1, lower is better) is known, so it need not be given
    assert load_qalign_json(tmp_path / "csiq.json", tmp_path)[0].mos01 == pytest.approx(0.8)

    _image(tmp_path / "cgi" / "b.png")  # a source with no known scale
    (tmp_path / "cgi.json").write_text(json.dumps([{"image": "cgi/b.png", "gt_score": 0.2}]))
    with pytest.raises(DatasetFormatError, match=r"cannot infer the score scale.*cgi/b\.png.*--scale cgi="):
        load_qalign_json(tmp_path / "cgi.json", tmp_path)
    cgi = load_qalign_json(tmp_path / "cgi.json", tmp_path, scale=(0, 1), higher_is_better=False)
    assert cgi[0].mos01 == pytest.approx(0.8)


def test_qalign_broken(tmp_path):
    (tmp_path / "test_spaq.json").write_text(
        json.dumps([{"id": "x.jpg", "image": "x.jpg", "conversations": []}])
    )
    with pytest.raises(DatasetFormatError, match="no 'gt_score' and its id 'x.jpg' has no '-><score>'"):
        load_qalign_json(tmp_path / "test_spaq.json", tmp_path)
    (tmp_path / "test_spaq.json").write_text(json.dumps([{"gt_score": 3}]))
    with pytest.raises(DatasetFormatError, match="neither 'image' nor 'img_path'"):
        load_qalign_json(tmp_path / "test_spaq.json", tmp_path)
    (tmp_path / "test_spaq.json").write_text(json.dumps({"not": "a list"}))
    with pytest.raises(DatasetFormatError, match="JSON list of objects"):
        load_qalign_json(tmp_path / "test_spaq.json", tmp_path)


def test_qinstruct(tmp_path):
    _image(tmp_path / "spaq_koniq" / "01.jpg")
    _image(tmp_path / "livefb_liveitw_aigc" / "02.jpg")
    data = [
        {
            "id": "a",
            "image": "spaq_koniq/01.jpg",
            "conversations": _conv("The image is slightly blurry, colors are dull.", placeholder="<image>"),
        },
        {
            "id": "b",
            "image": "livefb_liveitw_aigc/02.jpg",
            "conversations": _conv("Yes.")
            + [{"from": "human", "value": "Is it noisy?"}, {"from": "gpt", "value": "No."}],
        },
        {"id": "text-only", "conversations": _conv("hello")},
    ]
    (tmp_path / "cleaned_labels.json").write_text(json.dumps(data))
    recs = load_qinstruct_json(tmp_path / "cleaned_labels.json", tmp_path)
    assert [r.id for r in recs] == ["a", "b"]
    assert recs[0].description == "The image is slightly blurry, colors are dull." and recs[0].score is None
    assert recs[0].mos01 is None and not recs[0].has_score
    assert recs[0].meta["turns"][0] == ["human", "How would you rate the quality of this image?"]
    assert recs[1].description is None and len(recs[1].meta["turns"]) == 4
    (tmp_path / "bad.json").write_text(json.dumps([{"id": "c", "image": "spaq_koniq/01.jpg"}]))
    with pytest.raises(DatasetFormatError, match="has an image but no 'conversations'"):
        load_qinstruct_json(tmp_path / "bad.json", tmp_path)


def test_read_xlsx_and_unknown_dataset(tmp_path):
    write_xlsx(tmp_path / "w.xlsx", {"S": {(0, 0): "a", (0, 2): 1.5, (2, 1): "b"}})
    assert read_xlsx(tmp_path / "w.xlsx") == [["a", None, 1.5], [], [None, "b"]]
    (tmp_path / "not.xlsx").write_text("plain text")
    with pytest.raises(DatasetFormatError, match="not an .xlsx workbook"):
        read_xlsx(tmp_path / "not.xlsx")
    with pytest.raises(KeyError, match="unknown dataset 'live-fb'"):
        load_dataset("live-fb", tmp_path)
