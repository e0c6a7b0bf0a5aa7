"""The ``file`` source: customers from CSV, JSON, JSON Lines and Parquet files (gzipped or not),
streamed in batches, in every form Commerce Layer gives them, or as raw rows for a mapping."""

from __future__ import annotations

import codecs
import contextlib
import csv
import glob
import gzip
import hashlib
import io
import os
import re
import shutil
import tempfile
import weakref
import zlib
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, Self

import orjson
from pydantic import Field, field_validator

from custsync.errors import ConfigError, SourceError
from custsync.model import (
    REDACTED,
    SECRET_KEYS,
    from_flat,
    from_resource,
    index_included,
    iter_records,
    parse_timestamp,
)
from custsync.sources._skim import Skimmed, Skimmer
from custsync.sources.base import Checkpoint, RawRecord, SourceBatch, SourceSettings

Format = Literal["csv", "json", "jsonl", "parquet"]

_SUFFIXES: dict[str, Format] = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_GZIP_MAGIC = b"\x1f\x8b"
_DETECT_CHUNK = 1 << 20  # 1 MiB: the encoding scan reads the whole file, in flat memory
_SNIFF_CHARS = 64 * 1024
_DELIMITERS = ",;\t|"
_RAW_LIMIT = 10_000  # characters of a bad line kept for the rejects file
# Checked in order: UTF-8 first, and the UTF-16 marks Excel writes for "Unicode text".
_BOMS: tuple[tuple[bytes, str], ...] = (
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
# The five bytes Windows-1252 leaves undefined; a file holding one is read as Latin-1.
_CP1252_UNDEFINED = re.compile(rb"[\x81\x8d\x8f\x90\x9d]")


class FileSourceSettings(SourceSettings):
    """``[source]`` for files: a path or glob, and how to read what it matches."""

    connector: Literal["file"] = "file"
    # A path or a glob (``**`` included); a relative one resolves against the job file's folder.
    path: str = Field(min_length=1)
    # Default: from the suffix (.json, .jsonl/.ndjson, .csv/.tsv, .parquet/.pq; each + .gz).
    format: Format | None = None
    # Text formats: detected (BOM, UTF-8, Windows-1252, Latin-1) and reported when absent.
    encoding: str | None = None
    # CSV: sniffed among , ; tab | when absent.
    delimiter: str | None = None

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                codecs.lookup(value)
            except LookupError:
                raise ValueError(f"unknown encoding {value!r}") from None
        return value

    @field_validator("delimiter")
    @classmethod
    def _one_character(cls, value: str | None) -> str | None:
        if value is not None and len(value) != 1:
            raise ValueError(f"a delimiter is one character, got {value!r}")
        return value


@dataclass(frozen=True, slots=True)
class _Plan:
    """One matched file and how it is read, settled before the first record is read."""

    path: Path
    name: str  # as messages and origins show it
    format: Format
    gzipped: bool


@dataclass(frozen=True, slots=True)
class _Note:
    text: str


@dataclass(frozen=True, slots=True)
class _Skip:
    """Records left out unread (unnormalised) as older than ``since``, and the newest."""

    count: int
    newest: datetime


@dataclass(frozen=True, slots=True)
class _Line:
    """The next items come from the line at this byte offset (JSON Lines read as bytes)."""

    offset: int
    number: int


@dataclass(frozen=True, slots=True)
class _Cold:
    """Records of an unchanged file's unnoted lines, all older than ``since``: skipped."""

    count: int


_Item = RawRecord | _Note | _Skip | _Line | _Cold


class FileSource:
    """Reads the files a path or glob matches, in sorted order, as one unordered input.

    Files have no order to resume in, so ``since`` and ``cursor`` are ignored and no
    checkpoint is given: the engine advances the watermark once the whole input is read.
    """

    # Nothing is open before ``read``: a run may read it in a forked worker process.
    fork_safe = True
    # Its reads wait on no remote: a run may hold a transaction across its batches.
    local = True

    def __init__(self, settings: FileSourceSettings, *, base_dir: Path) -> None:
        self.settings = settings
        self._base = Path(os.path.abspath(base_dir))
        self._raw_rows = settings.mapping is not None
        self._lookback: timedelta | None = None
        self._skimmer: Skimmer | None = None  # made by the first incremental JSON Lines read
        self._reads: weakref.WeakSet[Generator[SourceBatch, None, None]] = weakref.WeakSet()

    def __repr__(self) -> str:
        return f"FileSource(path={self.settings.path!r}, base_dir={str(self._base)!r})"

    # --- the Source protocol ------------------------------------------------------------

    def expect_lookback(self, lookback: timedelta) -> None:
        self._lookback = lookback

    def files(self) -> list[Path]:
        """The files the path or glob matches, sorted; SourceError when there is none."""
        pattern = os.path.expanduser(self.settings.path)
        literal = Path(self._base, pattern)
        if literal.is_file():
            # Taken as written first: a real file name may hold glob characters ("[1]").
            return [Path(os.path.abspath(literal))]
        matches = glob.glob(pattern, root_dir=self._base, recursive=True)
        found = sorted(
            {
                Path(os.path.abspath(self._base / match))
                for match in matches
                if (self._base / match).is_file()
            }
        )
        if not found:
            if literal.is_dir():
                raise SourceError(
                    f"{self.settings.path} is a folder: name its files with a glob such as "
                    f"{Path(self.settings.path, '*.csv').as_posix()}"
                )
            raise SourceError(f"no file matches {self.settings.path} (under {self._base})")
        return found

    def read(
        self,
        *,
        since: datetime | None,
        cursor: Mapping[str, Any] | None,
        batch_size: int,
    ) -> Iterator[SourceBatch]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        # Every file is matched, opened and given a format before the first batch, so a bad
        # glob or an unknown suffix stops the run before anything is read.
        plans = [self._plan(path) for path in self.files()]
        known = (cursor or {}).get("files") if since is not None else None
        batches = self._batches(plans, batch_size, since, known if isinstance(known, dict) else {})
        self._reads.add(batches)
        return batches

    def check(self) -> list[str]:
        paths = self.files()
        for path in paths:
            self._plan(path)  # each file opens and has a format
        size = sum(path.stat().st_size for path in paths)
        count = "1 file matches" if len(paths) == 1 else f"{len(paths)} files match"
        return [f"{count} {self.settings.path} ({_human_size(size)})"]

    def close(self) -> None:
        for batches in list(self._reads):
            batches.close()  # closes the file a half-consumed read holds open
        self._reads.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- planning -----------------------------------------------------------------------

    def _plan(self, path: Path) -> _Plan:
        name = self._display(path)
        try:
            with path.open("rb") as f:
                magic = f.read(2)
        except OSError as exc:
            raise SourceError(f"cannot open {name}: {exc.strerror or exc}") from exc
        return _Plan(path, name, self._format_of(path), magic == _GZIP_MAGIC)

    def _format_of(self, path: Path) -> Format:
        if self.settings.format is not None:
            return self.settings.format
        name = path.name.lower()
        if name.endswith(".gz"):
            name = name[:-3]
        found = _SUFFIXES.get(os.path.splitext(name)[1])
        if found is None:
            raise ConfigError(
                f"cannot tell the format of {self._display(path)} from its name: "
                "set format to csv, json, jsonl or parquet",
                key="format",
            )
        return found

    def _display(self, path: Path) -> str:
        try:
            return path.relative_to(self._base).as_posix()
        except ValueError:
            return str(path)

    # --- reading ------------------------------------------------------------------------

    def _batches(
        self,
        plans: list[_Plan],
        batch_size: int,
        since: datetime | None,
        known: Mapping[str, Any],
    ) -> Generator[SourceBatch, None, None]:
        # Batches run across file boundaries: a glob of many small files still gives full
        # batches. A file's notes ride on the batch that holds its first record.
        records: list[RawRecord] = []
        notes: list[str] = []
        seen: dict[str, list[Any]] = {}
        skipped = 0
        for plan in plans:
            fingerprint = _fingerprint(plan.path)
            entry = known.get(plan.name)
            if _older_and_unchanged(entry, fingerprint, since):
                # The file is exactly as a completed run read it, and its newest record is
                # older than the lower bound: every record in it would be skipped, so they
                # are counted as skipped without reading it.
                assert isinstance(entry, list)
                seen[plan.name] = entry
                skipped += int(entry[4])
                continue
            # Only plain JSON Lines are read by line offsets.
            lined = plan.format == "jsonl" and not plan.gzipped
            hot = _hot_lines(entry, fingerprint, since) if lined else None
            if hot is not None:
                # Unchanged, and its records at or after the lower bound all lie on lines
                # the last read noted: those lines are read again, the rest counted skipped.
                assert isinstance(entry, list)
                seen[plan.name] = entry
                items = self._jsonl(plan, batch_size, since, lines=hot, cold=int(entry[5]["cold"]))
            else:
                items = self._items(plan, batch_size, since)
            count = 0
            newest: datetime | None = None  # the newest record with a time
            timeless = False  # a record without one: the file is never skipped whole
            noting = _LineNotes(self._lookback) if self._lookback and hot is None else None
            line: list[Any] = [0, 0, 0, None]  # [offset, number, records, newest]
            for item in items:
                if isinstance(item, _Line):
                    line = [item.offset, item.number, 0, None]
                    if noting is not None:
                        noting.add(line, newest)
                    continue
                if isinstance(item, _Note):
                    notes.append(item.text)
                    continue
                if isinstance(item, _Cold):
                    skipped += item.count
                    continue
                if isinstance(item, _Skip):
                    count += item.count
                    skipped += item.count
                    line[2] += item.count
                    line[3] = _later(line[3], item.newest)
                    newest = _later(newest, item.newest)
                    continue
                count += 1
                line[2] += 1
                if self._raw_rows or item.error is not None:
                    # Raw rows have no Commerce Layer updated_at to go by.
                    timeless, line[3] = True, _UNSKIPPABLE
                else:
                    stamp = parse_timestamp(item.data.get("updated_at"))
                    if stamp is None:
                        timeless, line[3] = True, _UNSKIPPABLE
                    else:
                        line[3] = _later(line[3], stamp)
                        newest = _later(newest, stamp)
                        if since is not None and stamp < since:
                            skipped += 1
                            continue
                        item.stamp = stamp
                records.append(item)
                if len(records) >= batch_size or skipped >= _SKIPS_PER_BATCH:
                    yield SourceBatch(records=records, notes=notes, skipped=skipped)
                    records, notes, skipped = [], [], 0
            if hot is None:
                index = noting.index(newest, count) if noting is not None else None
                made = _entry(fingerprint, newest, timeless, count, index)
                if made is not None:
                    seen[plan.name] = made
        if records or skipped:
            yield SourceBatch(records=records, notes=notes, skipped=skipped)
        # The whole input was read: what each file held, for the next run to skip files
        # that have not changed. The watermark is the engine's to set (unordered source).
        yield SourceBatch([], checkpoint=Checkpoint(None, {"files": seen}))

    def _items(self, plan: _Plan, batch_size: int, since: datetime | None) -> Iterator[_Item]:
        readers: dict[Format, Callable[[_Plan, int, datetime | None], Iterator[_Item]]] = {
            "csv": self._csv,
            "json": self._json,
            "jsonl": self._jsonl,
            "parquet": self._parquet,
        }
        try:
            yield from readers[plan.format](plan, batch_size, since)
        except UnicodeDecodeError as exc:
            raise SourceError(
                f"cannot decode {plan.name} as {self.settings.encoding or exc.encoding}: "
                f"{exc.reason}; "
                "fix encoding in [source], or leave it out to have it detected"
            ) from exc
        except (OSError, EOFError, zlib.error) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise SourceError(f"cannot read {plan.name}: {reason}") from exc

    def _jsonl(
        self,
        plan: _Plan,
        batch_size: int,
        since: datetime | None,
        *,
        lines: list[int] | None = None,
        cold: int = 0,
    ) -> Iterator[_Item]:
        """``lines``: only the lines at these offsets (flat pairs of offset and number);
        the ``cold`` records of the others are counted skipped. Read as text (a declared
        encoding other than UTF-8), the notes do not apply and the file is read whole."""
        # JSON Lines is UTF-8 by definition: the encoding is judged on the first MiB only,
        # and a later line that is not UTF-8 is decoded on its own (below), so the whole
        # file is not read twice.
        encoding = yield from self._encoding(plan, sample_only=True)
        if codecs.lookup(encoding).name in ("utf-8", "utf-8-sig"):
            # orjson parses UTF-8 bytes more than twice as fast as str, and the text never
            # needs decoding: the lines go straight from the file to the parser. Each
            # line's offset goes first, so the next run can come back to it.
            mark = not plan.gzipped
            with self._open_binary(plan) as stream:
                noted: list[int] = []  # lines not UTF-8 (the first gets a note)
                if lines is not None and mark:
                    yield _Cold(cold)
                    for at in range(0, len(lines) - 1, 2):
                        stream.seek(lines[at])
                        yield _Line(lines[at], lines[at + 1])
                        line = stream.readline()
                        yield from self._json_line(plan, line, lines[at + 1], since, noted)
                    return
                offset = 0
                for line_no, line in enumerate(stream, 1):
                    if mark:
                        yield _Line(offset, line_no)
                        offset += len(line)
                    yield from self._json_line(plan, line, line_no, since, noted)
            return
        with self._open_text(plan, encoding) as text:
            for line_no, text_line in enumerate(text, 1):
                if text_line.isspace():
                    continue
                location = f"{plan.name}:{line_no}"
                try:
                    value = orjson.loads(text_line)
                except orjson.JSONDecodeError as exc:
                    yield _bad(text_line.rstrip("\r\n"), location, _json_reason(exc))
                    continue
                raw = text_line.rstrip("\r\n")
                yield from self._from_value(value, location, raw=raw, since=since)

    def _json_line(
        self, plan: _Plan, line: bytes, line_no: int, since: datetime | None, noted: list[int]
    ) -> Iterator[_Item]:
        if line_no == 1 and line.startswith(codecs.BOM_UTF8):
            line = line[len(codecs.BOM_UTF8) :]
        if line.isspace() or not line:
            return
        location = f"{plan.name}:{line_no}"
        if since is not None and not self._raw_rows:
            if self._skimmer is None:
                self._skimmer = Skimmer()
            skimmed = self._skimmer.skim(line, since)
            if skimmed is not None:
                yield from _document_items(skimmed, location)
                return
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            decoded = _legacy_text(line)
            if decoded is None:
                yield _bad(_raw_text(None, line), location, _json_reason(exc))
                return
            noted.append(line_no)
            if len(noted) == 1:
                yield _Note(
                    f"{plan.name}: line {line_no} is not UTF-8: lines like it are read as "
                    "windows-1252"
                )
            try:
                value = orjson.loads(decoded)
            except orjson.JSONDecodeError as again:
                yield _bad(decoded.rstrip("\r\n"), location, _json_reason(again))
                return
        yield from self._from_value(value, location, raw=line, since=since)

    def _json(self, plan: _Plan, batch_size: int, since: datetime | None) -> Iterator[_Item]:
        encoding = yield from self._encoding(plan)
        with self._open_text(plan, encoding) as text:
            first = _first_significant(text)
        if not first:
            return
        if first == "[":
            yield from self._json_array(plan, encoding, since)
            return
        # Not an array: an API list document (one page, ``included`` possibly after
        # ``data``) or a single resource, small enough to load whole.
        with self._open_text(plan, encoding) as text:
            content = text.read()
        try:
            value = orjson.loads(content)
        except orjson.JSONDecodeError as exc:
            hint = (
                ' (one JSON value a line? set format = "jsonl")'
                if exc.msg == "unexpected content after document"
                else ""
            )
            raise SourceError(
                f"{plan.name} is not valid JSON: {exc.msg} at line {exc.lineno} "
                f"column {exc.colno}{hint}"
            ) from exc
        yield from self._from_value(value, plan.name, raw=content, since=since)

    def _json_array(self, plan: _Plan, encoding: str, since: datetime | None) -> Iterator[_Item]:
        import ijson

        text = self._open_text(plan, encoding)
        index = -1
        with _Utf8Reader(text) as stream:
            try:
                for index, item in enumerate(ijson.items(stream, "item", use_float=True)):
                    yield from self._from_value(item, f"{plan.name}#{index}", raw=None, since=since)
            except ijson.JSONError as exc:
                # A broken array cannot be resynchronised, and losing its tail quietly would
                # be worse than stopping: the file is unreadable from here on.
                where = f"after item {index}" if index >= 0 else "before its first item"
                raise SourceError(
                    f"{plan.name} is not valid JSON {where}: {_ijson_reason(exc)}"
                ) from exc

    def _from_value(
        self,
        value: Any,
        location: str,
        *,
        raw: str | bytes | None,
        since: datetime | None = None,
    ) -> Iterator[_Item]:
        """The records of one parsed JSON value (a line, an array item, a whole document).

        The value is all or nothing: if any part of it cannot be read, the value becomes
        one error record, so the rejects file holds it whole.
        """
        if self._raw_rows:
            if isinstance(value, dict):
                yield RawRecord(data=value, origin=location)
            else:
                reason = f"expected a JSON object, got {_json_type(value)}"
                yield _bad(_raw_text(value, raw), location, reason)
            return
        if not isinstance(value, dict | list):
            reason = f"expected a JSON object, got {_json_type(value)}"
            yield _bad(_raw_text(value, raw), location, reason)
            return
        resources = _resources_of(value) if since is not None else None
        if resources is not None and isinstance(value, dict) and since is not None:
            yield from _document_items(_document(value, resources, since), location)
            return
        try:
            records = list(iter_records(value))
        except ValueError as exc:
            yield _bad(_raw_text(value, raw), location, str(exc))
            return
        if len(records) == 1:
            yield RawRecord(data=records[0], origin=location)
        else:
            for k, record in enumerate(records):
                yield RawRecord(data=record, origin=f"{location}#{k}")

    def _csv(self, plan: _Plan, batch_size: int, since: datetime | None) -> Iterator[_Item]:
        encoding = yield from self._encoding(plan)
        delimiter = self.settings.delimiter
        if delimiter is None:
            with self._open_text(plan, encoding) as text:
                sample = text.read(_SNIFF_CHARS)
            delimiter = _sniff_delimiter(sample, whole=len(sample) < _SNIFF_CHARS)
            if delimiter != ",":
                yield _Note(f"{plan.name}: delimiter detected as {delimiter!r}")
        with self._open_text(plan, encoding) as text:
            tap = _LineTap(text)
            reader = csv.reader(tap, delimiter=delimiter)
            header: list[str] | None = None
            row_no = 0
            while True:
                try:
                    cells = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    if header is None:
                        raise SourceError(f"{plan.name}: cannot read its header: {exc}") from exc
                    row_no += 1
                    yield _bad(tap.take(), f"{plan.name}:row {row_no}", f"invalid CSV: {exc}")
                    continue
                if header is None:
                    tap.take()
                    if not _is_empty_row(cells):
                        header = [_header_name(cell) for cell in cells]
                    continue
                row_no += 1
                if _is_empty_row(cells):
                    tap.take()
                    continue
                origin = f"{plan.name}:row {row_no}"
                row = _csv_row(header, cells)
                if row is None:
                    reason = f"the row has {len(cells)} cells, the header {len(header)}"
                    tap.take()
                    yield _bad(_masked_row(header, cells, delimiter), origin, reason)
                    continue
                tap.take()
                yield RawRecord(data=row if self._raw_rows else from_flat(row), origin=origin)

    def _parquet(self, plan: _Plan, batch_size: int, since: datetime | None) -> Iterator[_Item]:
        # Imported here: pyarrow is slow to import and only Parquet needs it.
        import pyarrow
        import pyarrow.parquet as pq

        with contextlib.ExitStack() as stack:
            source: Path | IO[bytes] = plan.path
            if plan.gzipped:
                # Parquet reads its footer first and seeks back; a gzip stream seeks only by
                # decompressing again, so the file is unpacked to disk once.
                source = stack.enter_context(tempfile.TemporaryFile())
                with gzip.open(plan.path, "rb") as packed:
                    shutil.copyfileobj(packed, source, _DETECT_CHUNK)
                source.seek(0)
            try:
                parquet = pq.ParquetFile(source)
            except pyarrow.ArrowException as exc:
                raise SourceError(f"{plan.name} is not a readable Parquet file: {exc}") from exc
            with parquet:
                index = 0
                try:
                    for batch in parquet.iter_batches(batch_size=batch_size):
                        for row in batch.to_pylist(maps_as_pydicts="lossy"):
                            data = row if self._raw_rows else from_flat(row)
                            yield RawRecord(data=data, origin=f"{plan.name}#{index}")
                            index += 1
                except pyarrow.ArrowException as exc:
                    raise SourceError(f"cannot read {plan.name} at row {index}: {exc}") from exc

    # --- bytes and text -----------------------------------------------------------------

    def _open_binary(self, plan: _Plan) -> io.BufferedReader | gzip.GzipFile:
        try:
            if plan.gzipped:
                return gzip.open(plan.path, "rb")
            return io.BufferedReader(io.FileIO(plan.path), buffer_size=_READ_BUFFER)
        except OSError as exc:
            raise SourceError(f"cannot open {plan.name}: {exc.strerror or exc}") from exc

    def _open_text(self, plan: _Plan, encoding: str) -> io.TextIOWrapper:
        # newline="" hands line breaks inside quoted CSV cells to the csv module untouched.
        return io.TextIOWrapper(self._open_binary(plan), encoding=encoding, newline="")

    def _encoding(self, plan: _Plan, *, sample_only: bool = False) -> Generator[_Note, None, str]:
        """The codec to read a text file with; yields a note when it had to be guessed.
        ``sample_only``: UTF-8 when the first MiB is (the reader copes with later lines)."""
        declared = self.settings.encoding
        with self._open_binary(plan) as raw:
            head = raw.read(4)
            if declared is not None:
                # A declared UTF-8 file may still start with a BOM; it is not data.
                if codecs.lookup(declared).name == "utf-8" and head.startswith(codecs.BOM_UTF8):
                    return "utf-8-sig"
                return declared
            for bom, codec in _BOMS:
                if head.startswith(bom):
                    return codec
            utf8 = codecs.getincrementaldecoder("utf-8")()
            is_utf8 = in_cp1252 = True
            chunk = head + raw.read(_DETECT_CHUNK)
            while chunk and (is_utf8 or in_cp1252):
                if is_utf8:
                    try:
                        utf8.decode(chunk)
                    except UnicodeDecodeError:
                        is_utf8 = False
                if in_cp1252 and _CP1252_UNDEFINED.search(chunk):
                    in_cp1252 = False
                if sample_only and is_utf8:
                    utf8.reset()  # the sample is UTF-8; one cut off at its end is no error
                    break
                chunk = raw.read(_DETECT_CHUNK)
        if is_utf8:
            try:
                utf8.decode(b"", final=True)  # a sequence cut off by the end of the file
            except UnicodeDecodeError:
                is_utf8 = False
        codec, label = (
            ("utf-8", "utf-8")
            if is_utf8
            else ("cp1252", "windows-1252")
            if in_cp1252
            else ("latin-1", "latin-1")
        )
        yield _Note(f"{plan.name}: encoding detected as {label}")
        return codec


class _LineTap:
    """Hands lines to ``csv.reader`` and keeps those of the row being parsed, so a bad row
    reaches the rejects file as the text the file had (a cell may span lines)."""

    __slots__ = ("_lines", "_taken")

    def __init__(self, lines: Iterator[str]) -> None:
        self._lines = lines
        self._taken: list[str] = []

    def __iter__(self) -> _LineTap:
        return self

    def __next__(self) -> str:
        line = next(self._lines)
        self._taken.append(line)
        return line

    def take(self) -> str:
        text = "".join(self._taken) if len(self._taken) != 1 else self._taken[0]
        self._taken.clear()
        return text.rstrip("\r\n")


class _Utf8Reader:
    """A text stream re-encoded as UTF-8: ijson parses bytes, and the file may be in any
    encoding (a BOM, Windows-1252)."""

    def __init__(self, text: io.TextIOWrapper) -> None:
        self._text = text

    def read(self, size: int = -1) -> bytes:
        return self._text.read(size).encode("utf-8")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._text.close()


_SAMPLE = 65_536
# Lines of an API export are tens of KiB: with the default 8 KiB buffer, reading a line
# costs several reads and joins (measured: 0.074 s for 100,000 customers' lines, 0.033 s
# with this buffer, a tenth of the whole parse).
_READ_BUFFER = 262_144
_UNSKIPPABLE = "unskippable"  # a record without a time, or unreadable: always read the file
_SKIPS_PER_BATCH = 50_000  # a batch goes out after this many skips, so progress shows


def _resources_of(value: Any) -> list[dict[str, Any]] | None:
    """The resources of an API list document whose every item is an object; None for any
    other value (which then takes the general path, errors included)."""
    if not isinstance(value, dict) or "attributes" in value:
        return None
    data = value.get("data")
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        return None
    return data


def _document(value: dict[str, Any], resources: list[dict[str, Any]], since: datetime) -> Skimmed:
    """A parsed list document, its resources older than ``since`` counted and left
    unnormalised (an incremental run skips most of its input: this is its hot path; a
    JSON Lines line is skimmed instead where it can be, see ``_skim``)."""
    kept: list[tuple[int, dict[str, Any]]] = []
    skipped, newest = 0, None
    for k, resource in enumerate(resources):
        attributes = resource.get("attributes")
        stamp = (
            parse_timestamp(attributes.get("updated_at")) if isinstance(attributes, dict) else None
        )
        if stamp is not None and stamp < since:
            skipped += 1
            if newest is None or stamp > newest:
                newest = stamp
            continue
        kept.append((k, resource))
    return Skimmed(len(resources), skipped, newest, kept, value.get("included") if kept else None)


def _document_items(document: Skimmed, location: str) -> Iterator[_Item]:
    """The skipped records' count, then the records kept, normalised."""
    if document.newest is not None:
        yield _Skip(document.skipped, document.newest)
    if document.kept:
        included = index_included(document.included)
        single = document.count == 1
        for k, resource in document.kept:
            origin = location if single else f"{location}#{k}"
            yield RawRecord(data=from_resource(resource, included), origin=origin)


def _later(current: Any, stamp: datetime) -> Any:
    """The later of a newest-so-far (None, a datetime, or _UNSKIPPABLE, which sticks)."""
    if current is None or (isinstance(current, datetime) and stamp > current):
        return stamp
    return current


_HOT_LIMIT = 10_000  # lines noted for the next read at most; beyond, it reads the file


class _LineNotes:
    """The lines of one JSON Lines file that may hold a record within ``lookback`` of its
    newest, or one without a time. Memory stays small: a line older than the newest so
    far minus the lookback can only be older than the final bound, so it is dropped as
    the read goes, and past ``_HOT_LIMIT`` lines the file gets no notes at all."""

    def __init__(self, lookback: timedelta) -> None:
        self.lookback = lookback
        self.kept: list[list[Any]] | None = []
        self.bound = _HOT_LIMIT
        self.marked = False  # the reader gave line offsets (JSON Lines read as bytes)

    def add(self, line: list[Any], newest: datetime | None) -> None:
        """Note a line about to be read (filled in as its records come)."""
        self.marked = True
        kept = self.kept
        if kept is None:
            return
        if kept and self._cold(kept[-1], newest):
            kept.pop()  # the line before, now complete, is already out of the window
        kept.append(line)
        if len(kept) > self.bound:
            kept[:] = [noted for noted in kept if not self._cold(noted, newest)]
            if len(kept) > _HOT_LIMIT:
                self.kept = None  # too many recent lines (a bulk import's tie): read it all
            self.bound = max(_HOT_LIMIT, 2 * len(kept))

    def _cold(self, line: list[Any], newest: datetime | None) -> bool:
        if line[2] == 0:
            return True  # no record: nothing to read again
        stamp = line[3]
        return isinstance(stamp, datetime) and newest is not None and stamp < newest - self.lookback

    def index(self, newest: datetime | None, count: int) -> dict[str, Any] | None:
        # A reader without line offsets (CSV, JSON, gzip, text) leaves nothing to go back to.
        if self.kept is None or newest is None or not self.marked:
            return None
        hot = [line for line in self.kept if not self._cold(line, newest)]
        if len(hot) > _HOT_LIMIT:
            return None
        return {
            "below": (newest - self.lookback).isoformat(),
            "cold": count - sum(line[2] for line in hot),
            "hot": [n for line in hot for n in line[:2]],
        }


def _entry(
    fingerprint: list[Any],
    newest: datetime | None,
    timeless: bool,
    count: int,
    index: dict[str, Any] | None,
) -> list[Any] | None:
    """What the cursor keeps of a file read whole: [size, mtime, hash, newest, records,
    lines]. ``newest`` is None when a record has no time (the file is never skipped whole).
    ``lines`` (JSON Lines only) notes the lines holding a record within the lookback of the
    newest, or one without a time: the next run's lower bound is at least the newest minus
    the lookback, so every other line would be skipped whole."""
    if newest is None or (timeless and index is None):
        return None
    return [*fingerprint, None if timeless else newest.isoformat(), count, index]


def _older_and_unchanged(entry: Any, fingerprint: list[Any], since: datetime | None) -> bool:
    if since is None or not isinstance(entry, list) or len(entry) not in (5, 6):
        return False
    if entry[:3] != fingerprint or entry[3] is None:
        return False
    try:
        newest = datetime.fromisoformat(entry[3])
    except (TypeError, ValueError):
        return False
    return newest < since


def _hot_lines(entry: Any, fingerprint: list[Any], since: datetime | None) -> list[int] | None:
    """The lines an unchanged file must be read at for ``since``, or None (read it all)."""
    if since is None or not isinstance(entry, list) or len(entry) != 6 or entry[:3] != fingerprint:
        return None
    index = entry[5]
    if not isinstance(index, dict) or not isinstance(index.get("hot"), list):
        return None
    if not isinstance(index.get("cold"), int):
        return None
    try:
        below = datetime.fromisoformat(index["below"]) if index.get("below") else None
    except (TypeError, ValueError):
        return None
    if below is None or since < below:
        return None  # records older than the noted bound may count: read the file
    hot = index["hot"]
    return hot if all(isinstance(n, int) for n in hot) else None


def _fingerprint(path: Path) -> list[Any]:
    """Size, modification time, and a hash of the file's first and last 64 KiB: enough to
    tell a file is the one a run read, without reading it whole."""
    stat = path.stat()
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        digest.update(f.read(_SAMPLE))
        if stat.st_size > 2 * _SAMPLE:
            f.seek(-_SAMPLE, os.SEEK_END)
        digest.update(f.read(_SAMPLE))
    return [stat.st_size, stat.st_mtime_ns, digest.hexdigest()]


def _csv_row(header: list[str], cells: list[str]) -> dict[str, str] | None:
    """A data row as a dict, or None when it has cells beyond the header that hold data."""
    width = len(header)
    if len(cells) == width and "" not in header:
        return dict(zip(header, cells, strict=True))
    if len(cells) > width and not _is_empty_row(cells[width:]):
        return None
    row: dict[str, str] = {}
    for i, name in enumerate(header):
        cell = cells[i] if i < len(cells) else ""  # exporters drop trailing empty cells
        if name:
            row[name] = cell
        elif cell:
            row[f"column_{i + 1}"] = cell  # data under a header cell left empty
    return row


def _header_name(cell: str) -> str:
    # A BOM survives when the file was read with a declared encoding that keeps it.
    return cell.strip().lstrip("\ufeff").strip()


def _is_empty_row(cells: list[str]) -> bool:
    return not cells or all(not cell or cell.isspace() for cell in cells)


def _sniff_delimiter(sample: str, *, whole: bool) -> str:
    if not whole:
        cut = sample.rfind("\n")
        if cut > 0:
            sample = sample[:cut]  # a cut-off last line skews the sniffer's per-line counts
    try:
        return csv.Sniffer().sniff(sample, delimiters=_DELIMITERS).delimiter
    except csv.Error:
        return ","


def _first_significant(text: IO[str]) -> str:
    """The first character that is not white space, or "" for a blank file."""
    while chunk := text.read(_SNIFF_CHARS):
        stripped = chunk.lstrip()
        if stripped:
            return stripped[0]
    return ""


def _masked_row(header: list[str], cells: list[str], delimiter: str) -> str:
    """The row's text with the cells under secret-named headers masked."""
    masked = [
        REDACTED if i < len(header) and header[i].lower() in SECRET_KEYS and cell else cell
        for i, cell in enumerate(cells)
    ]
    out = io.StringIO()
    csv.writer(out, delimiter=delimiter, lineterminator="").writerow(masked)
    return out.getvalue()


def _bad(raw: str, origin: str, reason: str) -> RawRecord:
    return RawRecord(data={"_raw": raw[:_RAW_LIMIT]}, origin=origin, error=reason)


def _legacy_text(line: bytes) -> str | None:
    """A line that is not UTF-8, decoded as Windows-1252 (Latin-1 when it holds a byte
    Windows-1252 leaves undefined); None when the line is UTF-8 (its JSON is what fails)."""
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return line.decode("latin-1" if _CP1252_UNDEFINED.search(line) else "cp1252")
    return None


def _raw_text(value: Any, raw: str | bytes | None) -> str:
    if isinstance(raw, bytes):
        return raw.decode("utf-8", "replace").rstrip("\r\n")
    if raw is not None:
        return raw
    return orjson.dumps(value).decode("utf-8")


def _json_reason(exc: orjson.JSONDecodeError) -> str:
    return f"invalid JSON: {exc.msg} at column {exc.colno}"


def _ijson_reason(exc: Exception) -> str:
    # yajl quotes the text around the error; only its first line is kept, so no customer
    # data reaches a log through the exception.
    message = exc.args[0] if exc.args else exc
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    return str(message).strip().splitlines()[0] if str(message).strip() else "invalid JSON"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _human_size(size: int) -> str:
    amount = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if amount < 1000:
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1000
    return f"{amount:.1f} TB"
