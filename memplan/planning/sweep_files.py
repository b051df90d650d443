"""Sweep frames to and from files: CSV, Parquet and Excel, by the file's extension (re-exported by
`memplan.planning.sweep`). `read_sweep` restores the documented dtypes (`sweep.column_dtypes`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memplan.errors import MemplanError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["EXPORT_FORMATS", "MAX_EXCEL_ROWS", "check_output", "write_sweep", "read_sweep"]

EXPORT_FORMATS = {".csv": "CSV", ".parquet": "Parquet", ".xlsx": "Excel"}
MAX_EXCEL_ROWS = 1_048_575  # an Excel sheet holds 1,048,576 rows, one of them the header


def _format_of(path: Any) -> str:
    from pathlib import Path

    suffix = Path(path).suffix.lower()
    if suffix not in EXPORT_FORMATS:
        raise MemplanError(f"--out {path}: write .csv, .parquet or .xlsx (the format follows the extension), not {suffix or 'no extension'}")
    return suffix


def check_output(path: Any, rows: int | None = None) -> str:
    """Refuse an output path before any work: unknown extension, missing folder, too many rows for Excel."""
    from pathlib import Path

    suffix = _format_of(path)
    parent = Path(path).expanduser().resolve().parent
    if not parent.is_dir():
        raise MemplanError(f"--out {path}: folder {parent} does not exist")
    if suffix == ".xlsx" and rows is not None and rows > MAX_EXCEL_ROWS:
        raise MemplanError(f"--out {path}: {rows:,} rows exceed an Excel sheet's {MAX_EXCEL_ROWS:,}; write .parquet or .csv")
    return suffix


def write_sweep(frame: "pd.DataFrame", path: Any) -> None:
    """Write a sweep frame as CSV, Parquet or Excel, by the file's extension."""
    suffix = check_output(path, len(frame))
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        _write_xlsx(frame, path)


def _write_xlsx(frame: "pd.DataFrame", path: Any) -> None:
    """One sheet named `sweep`: a bold, frozen header row with a filter, then one row per setup.

    Written row by row with xlsxwriter in constant_memory mode (each row goes to disk as it is
    done) rather than through `DataFrame.to_excel`, which builds a styled cell object per value:
    about 2x faster on the 9,600-row example sweep (benchmarks/README.md, `bench_report.py`). Cells are
    typed (numbers, booleans, text) and NA is a blank cell, which `read_sweep` reads back as NA.
    Text is never turned into a formula, a link or a number. openpyxl, which `read_sweep` needs
    anyway, is the fallback."""
    try:
        import xlsxwriter
    except ImportError:
        try:
            frame.to_excel(path, index=False, sheet_name="sweep", engine="openpyxl")
        except ImportError:
            raise MemplanError("writing .xlsx needs xlsxwriter (or openpyxl): pip install xlsxwriter") from None
        return

    # Plain Python values per column (int, float, bool, str; None for NA and NaN), then rows.
    columns = [frame[c].to_numpy(dtype=object, na_value=None).tolist() for c in frame.columns]
    workbook = xlsxwriter.Workbook(str(path), {"constant_memory": True, "strings_to_formulas": False,
                                               "strings_to_urls": False, "strings_to_numbers": False})
    try:
        sheet = workbook.add_worksheet("sweep")
        sheet.write_row(0, 0, [str(c) for c in frame.columns], workbook.add_format({"bold": True}))
        sheet.freeze_panes(1, 0)
        if len(frame.columns):
            sheet.autofilter(0, 0, len(frame), len(frame.columns) - 1)
        write_row = sheet.write_row
        for i, row in enumerate(zip(*columns), 1):
            write_row(i, 0, row)
    finally:
        workbook.close()


def read_sweep(path: Any) -> "pd.DataFrame":
    """Read a file written by `write_sweep` back with the documented dtypes."""
    import numpy as np
    import pandas as pd

    from memplan.planning.sweep import _column, column_dtypes  # the one definition of the columns

    suffix = _format_of(path)
    if suffix == ".parquet":
        frame = pd.read_parquet(path)
    elif suffix == ".csv":
        frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
    else:
        frame = pd.read_excel(path, sheet_name="sweep", engine="openpyxl", keep_default_na=False, na_values=[""])
    out: dict[str, Any] = {}
    try:
        dtypes = column_dtypes([str(c) for c in frame.columns])
    except ValueError as exc:
        raise MemplanError(f"{path} is not a memplan sweep: {exc}") from None
    for c, dtype in dtypes.items():
        col = frame[c]
        values = np.asarray([None if pd.isna(v) else v for v in col], dtype=object)
        if dtype == "category":
            values = np.asarray([None if v is None else str(v) for v in values], dtype=object)
        elif dtype in ("bool", "boolean"):  # CSV gives the words True/False, Excel 1/0 where a column has blanks
            values = np.asarray([v if v is None or isinstance(v, (bool, np.bool_)) else str(v) == "True" if isinstance(v, str)
                                 else bool(v) for v in values], dtype=object)
        out[c] = _column(values, dtype)
    return pd.DataFrame(out, index=pd.RangeIndex(len(frame)))
