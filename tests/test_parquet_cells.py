"""Images addressed as Parquet cells (``ImageRef(path, column=, row=)``): raw binary and Hugging Face
``Image`` structs, rows across several row groups, and one-line errors for cells without bytes."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.records import ImageRef
from pipeline.stages.decode import ByteReader, DecodeError


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 5, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_cells_across_row_groups_raw_and_struct(tmp_path):
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    n = 7
    table = pa.table(
        {
            "raw": pa.array([_png(i) for i in range(n)], pa.binary()),
            "hf": pa.array([{"bytes": _png(100 + i), "path": None} for i in range(n)], image_type),
        }
    )
    path = tmp_path / "part.parquet"
    pq.write_table(table, path, row_group_size=3)  # groups of rows 0-2, 3-5, 6
    reader = ByteReader()
    for row in (0, 4, 6, 2):  # out of order: another row group each time
        raw = reader.read(ImageRef(path=str(path), column="raw", row=row))
        hf = reader.read(ImageRef(path=str(path), column="hf", row=row))
        assert np.asarray(Image.open(io.BytesIO(raw)))[0, 0, 0] == row
        assert np.asarray(Image.open(io.BytesIO(hf)))[0, 0, 0] == 100 + row


def test_cells_without_bytes_are_one_line_errors(tmp_path):
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    path = tmp_path / "bad.parquet"
    pq.write_table(
        pa.table(
            {
                "hf": pa.array([{"bytes": None, "path": "x.jpg"}, None], image_type),
                "label": pa.array(["a", "b"]),
            }
        ),
        path,
    )
    reader = ByteReader()
    cases = [
        (ImageRef(path=str(path), column="hf", row=0), "only a path, 'x.jpg'"),
        (ImageRef(path=str(path), column="hf", row=1), "no image bytes"),
        (ImageRef(path=str(path), column="label", row=0), "expected image bytes, found str"),
        (ImageRef(path=str(path), column="nope", row=0), "no column 'nope'"),
        (ImageRef(path=str(path), column="hf", row=5), "no row 5 (it has 2)"),
        (ImageRef(path=str(tmp_path / "missing.parquet"), column="hf", row=0), "cannot open Parquet file"),
    ]
    for ref, words in cases:
        with pytest.raises(DecodeError) as e:
            reader.read(ref)
        assert words in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError):
        ImageRef(path=str(path), column="hf")
