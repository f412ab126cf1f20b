"""CSVs as users save them, read the same by the MIL labels CSV and the tile slide CSV."""

from __future__ import annotations

import pytest

from histodistill.commands.tile import collect_slides
from histodistill.data.bags import SlideLabel, read_labels
from histodistill.data.table import read_table
from histodistill.errors import UserError

EXPECTED = [SlideLabel("A", "a1", "tumor"), SlideLabel("B", "b1", "normal")]
# How users' CSVs differ from a plain comma-separated file, as rewrites of one.
VARIANTS = {
    "plain": lambda text: text,
    "excel utf-8 bom": lambda text: "\ufeff" + text,
    "spaces after commas": lambda text: text.replace(",", ", "),
    "semicolons": lambda text: text.replace(",", ";"),
    "tabs": lambda text: text.replace(",", "\t"),
    "crlf and a blank last line": lambda text: text.replace("\n", "\r\n") + "\r\n",
    "all at once": lambda text: "\ufeff" + text.replace(",", "; ").replace("\n", "\r\n"),
}


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_labels_csv_variants_read_the_same(tmp_path, variant):
    path = tmp_path / "labels.csv"
    path.write_bytes(variant("case_id,slide_id,label\nA,a1,tumor\nB,b1,normal\n").encode())
    assert read_labels(path) == EXPECTED


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_tile_slide_csv_variants_read_the_same(tmp_path, variant):
    path = tmp_path / "slides.csv"
    path.write_bytes(variant("path,mpp\na1.svs,0.25\n").encode())
    assert collect_slides(path, None) == [(tmp_path / "a1.svs", 0.25)]


def test_a_missing_column_shows_how_the_header_was_read(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("case_id|slide_id|label\nA|a1|tumor\n")
    with pytest.raises(UserError) as info:
        read_labels(path)
    message = str(info.value)
    assert "lacks column(s) ['case_id', 'slide_id', 'label']" in message
    assert "read as comma-separated with header ['case_id|slide_id|label']" in message


def test_the_delimiter_read_is_reported(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a;b\n1;2\n")
    assert read_table(path, "t").how_read() == "read as semicolon-separated with header ['a', 'b']"


def test_not_utf8_and_empty_files_are_user_errors(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("case_id,slide_id,label\nA,b\xe9,tumor\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        read_labels(path)
    (tmp_path / "empty.csv").write_text("\n\n")
    with pytest.raises(UserError, match="is empty"):
        read_labels(tmp_path / "empty.csv")
