"""Row readers for JSONL, CSV/TSV and parquet tables: (line number, row dict), strict about format.

Rows come out in file order. Text is decoded per line with ``surrogateescape`` so one non-UTF-8
caption becomes a counted skip (see ``records.check_text``) instead of failing the whole file; a line
that is not valid JSON, or a header without the required columns, raises InputFormatError.
"""
from __future__ import annotations

import csv
import os
from typing import Any, Iterator, Sequence

from data_prep.jsonio import loads_unique
from data_prep.records import InputFormatError

TABLE_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "csv",
                  ".parquet": "parquet"}
Row = tuple[int | None, dict[str, Any]]


def table_kind(path: str) -> str:
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in TABLE_SUFFIXES:
        raise InputFormatError(path, None, f"unknown table type {suffix!r}; expected one of "
                                           f"{sorted(TABLE_SUFFIXES)}")
    return TABLE_SUFFIXES[suffix]


def iter_rows(path: str, required: Sequence[str] = ()) -> Iterator[Row]:
    """Rows of a JSONL / CSV / TSV / parquet file. CSV and parquet must have the `required` columns."""
    if not os.path.isfile(path):
        raise InputFormatError(path, None, "file not found")
    kind = table_kind(path)
    if kind == "jsonl":
        return iter_jsonl(path)
    if kind == "csv":
        return iter_csv(path, required, delimiter="\t" if path.lower().endswith(".tsv") else ",")
    return iter_parquet(path, required)


def iter_jsonl(path: str) -> Iterator[Row]:
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            line = raw.decode("utf-8", "surrogateescape").strip()
            if not line:
                continue
            try:
                row = loads_unique(line)
            except ValueError as exc:
                raise InputFormatError(path, line_no, f"expected one JSON object per line ({exc})") from None
            if not isinstance(row, dict):
                raise InputFormatError(path, line_no, f"expected a JSON object, got {type(row).__name__}")
            yield line_no, row


def iter_csv(path: str, required: Sequence[str], delimiter: str = ",") -> Iterator[Row]:
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            raise InputFormatError(path, 1, f"empty file; expected a header with columns {list(required)}")
        header = [h.strip() for h in header]
        missing = [c for c in required if c not in header]
        if missing:
            raise InputFormatError(path, 1, f"header {header} lacks column(s) {missing}; expected columns "
                                            f"{list(required)} (set them with the command's --*-column options, "
                                            f"where it has them)")
        start = reader.line_num + 1
        for values in reader:
            if values and len(values) != len(header):
                runs = (f" (its quoted text runs on to line {reader.line_num}: an unclosed quote?)"
                        if reader.line_num > start else "")
                raise InputFormatError(path, start, f"{len(values)} fields, expected {len(header)} as in the "
                                                    f"header {header}{runs}")
            if values:
                yield reader.line_num, dict(zip(header, values))
            start = reader.line_num + 1


def iter_parquet(path: str, required: Sequence[str]) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise InputFormatError(path, None, f"not a readable parquet file ({exc})") from None
    names = pf.schema_arrow.names
    missing = [c for c in required if c not in names]
    if missing:
        raise InputFormatError(path, None, f"columns {names} lack {missing}; expected columns {list(required)}")
    row_no = 0
    for batch in pf.iter_batches(batch_size=256):
        for row in batch.to_pylist():
            row_no += 1
            yield row_no, row
