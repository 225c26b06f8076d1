"""Data files read at a user's scale: every record validated in one pass before training starts,
then read again from the file only when a batch draws it.

A JSONL file, a Parquet file or a `datasets` folder becomes a `RecordFile`: a sequence whose index
holds, per record, where its row starts, its line, which turn of a logged conversation it is and a
byte bound on its text (about 22 bytes a record; a `datasets` folder stays memory-mapped). Nothing
is tokenised here: `evaluate.fit_records` checks lengths when a record is drawn, and before
training only for the records whose byte bound says they might not fit. The index of a large file
is cached (`$HANDRAIL_CACHE/index`, keyed by the file's path, size and modification time and the
`fields` mapping), so a second run on the same file skips the pass. CSV/TSV files are read whole
into a list (a quoted cell may span lines, so rows have no cheap offsets).

Views (`Mapped`, `shuffle_references`, `Fitted` in evaluate.py) change records as they are read,
so a million-record file is never copied. `facts(records)` counts what the loop needs to know
before it starts (logged turns, answer-only records) from the index when there is one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from handrail.data.records import (DataError, Record, _Bad, hint_for, parse_fields, parse_row, read_csv, reference_answer,
                           refuse_bad)

CACHE_FROM = 10_000  # records: smaller files are read faster than a cache is checked
INDEX_VERSION = 1  # bump when what an index holds, or how rows are parsed, changes


@dataclass(frozen=True)
class Facts:
    """What the loop must know about all records before it starts."""
    n: int
    logged: int  # records that carry an already-written completion (logged conversations)
    answer_only: int  # records without a worked solution
    first_unlogged: str | None = None  # source of the first record that is not a logged turn


def facts(records) -> Facts:
    known = getattr(records, "facts", None)
    if known is not None:
        return known
    logged = [r.completion is not None for r in records]
    return Facts(len(logged), sum(logged), sum(not r.solution for r in records),
                 next((r.source for r, lg in zip(records, logged) if not lg), None))


class Records(Sequence):
    """A read-only sequence of records made on access; a slice is a list."""

    facts: Facts

    def _record(self, i: int) -> Record:
        raise NotImplementedError

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._record(j) for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(i)
        return self._record(i % n)

    def bounds(self):
        """For each record, an upper bound on the UTF-8 bytes of the text its prompts hold."""
        raise NotImplementedError


class RecordFile(Records):
    def __init__(self, path: str | Path, fields: str | None = None):
        self.path, self.fields = Path(path), fields
        self._mapping = parse_fields(fields)
        if not self.path.exists():
            raise DataError(f"{self.path}: no such file or directory")
        self._table = self._file = None
        self._folder = self.path.is_dir()  # a datasets Dataset; else a pyarrow Table (Parquet) or JSONL
        if self._folder:
            import datasets

            try:
                self._table = datasets.load_from_disk(str(self.path))  # memory-mapped Arrow
            except (FileNotFoundError, ValueError) as e:
                raise DataError(f"{self.path}: a folder, but not one saved by datasets' save_to_disk "
                                f"({str(e).splitlines()[0]})") from None
        elif self.path.suffix == ".parquet":
            import pyarrow.parquet as pq

            self._table = pq.read_table(self.path)  # columnar, in memory: no Python object per row
        if not self._load_index():
            if not (self._table is None and self._scan_arrow()):
                self._scan()
            self._save_index()
        if not len(self):
            raise DataError(f"{self.path}: no records")

    # -- the one pass ----------------------------------------------------------------------------
    def _scan(self) -> None:
        self.rows, self.lines, self.turns, self.sizes = array("q"), array("q"), array("h"), array("q")
        errors, logged, answer_only, first_unlogged = [], 0, 0, None
        for row_at, line, size, row in self._rows():
            where = f"{self.path}:{line}"
            if size is not None and _plain(row, self._mapping):  # the common shape, checked without building a record
                made = None
                n = 1
            else:
                try:
                    made = parse_row(row, where, self._mapping)
                except DataError as e:
                    errors.append(str(e))
                    continue
                n = len(made)
            for k in range(n):
                self.rows.append(row_at)
                self.lines.append(line)
                self.turns.append(k)
                self.sizes.append(size if size is not None else _text_bytes(made[k]))
                rec_logged = made is not None and made[k].completion is not None
                logged += rec_logged
                answer_only += made is not None and not made[k].solution
                if first_unlogged is None and not rec_logged:
                    first_unlogged = made[k].source if made else where
        refuse_bad(errors)
        self.facts = Facts(len(self.rows), logged, answer_only, first_unlogged)

    def _scan_arrow(self) -> bool:
        """The common JSONL file, every row a plain record (see `_plain`), checked by Arrow's JSON
        reader in C++ (about 10x faster than a row at a time in Python). False if the file is
        anything else, or not valid: the Python pass then reads it and names the bad row."""
        try:
            import numpy as np
            import pyarrow as pa
            import pyarrow.compute as pc
            import pyarrow.json as pj
        except ImportError:  # an environment without them (a bare GPU image) reads row by row
            return False
        if self._mapping:
            return False
        parts, n, line, at, carry = [], 0, 1, 0, b""
        with open(self.path, "rb") as f:  # in pieces of whole lines: memory stays flat however long the file
            while True:
                block = f.read(1 << 22)
                data = carry + block
                cut = data.rfind(b"\n") + 1 if block else len(data)
                if block and not cut:
                    carry = data  # a line longer than a block: read on
                    continue
                piece, carry = data[:cut], data[cut:]
                if piece:
                    got = _arrow_piece(piece, at, line, pa, pc, pj, np)
                    if got is None:
                        return False
                    parts.append(got[:3])
                    n += len(got[0])
                    line += got[3]
                    at += len(piece)
                if not block:
                    break
        if not n:
            return False
        self.rows, self.lines, self.sizes = (array("q", np.concatenate([p[k] for p in parts]).astype(np.int64).tobytes())
                                             for k in range(3))
        self.turns = array("h", bytes(2 * n))
        self.facts = Facts(n, 0, 0, f"{self.path}:{self.lines[0]}")
        return True

    def _rows(self):
        """(where the row is read from, its line, a byte bound on its text or None, the row)."""
        if self._table is not None:
            keys = self._table.column_names
            at = 0
            batches = (self._table.iter(batch_size=4096) if self._folder
                       else (b.to_pydict() for b in self._table.to_batches(max_chunksize=4096)))
            for batch in batches:
                for values in zip(*(batch[k] for k in keys)):
                    yield at, at + 1, None, dict(zip(keys, values))
                    at += 1
            return
        with open(self.path, "rb") as f:
            at = 0
            for line, raw in enumerate(f, start=1):
                start, at = at, at + len(raw)
                row = _json_row(raw, f"{self.path}:{line}", first=start == 0)
                if row is not None:
                    yield start, line, len(raw), row

    # -- reading one record ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    def _record(self, i: int) -> Record:
        at, line = self.rows[i], self.lines[i]
        if self._table is not None:
            row = (self._table[at] if self._folder
                   else self._table.slice(at, 1).to_pylist()[0])
        else:
            if self._file is None:
                self._file = open(self.path, "rb")
            row = _json_row(os.pread(self._file.fileno(), self.sizes[i], at), f"{self.path}:{line}", first=at == 0)
        return parse_row(row, f"{self.path}:{line}", self._mapping)[self.turns[i]]

    def bounds(self):
        return self.sizes

    def __getstate__(self):  # an open file does not travel to another process
        return {**self.__dict__, "_file": None}

    def __del__(self):
        if getattr(self, "_file", None) is not None:
            self._file.close()

    # -- the cached index ------------------------------------------------------------------------
    def _index_file(self) -> Path | None:
        if self._folder:
            return None  # a datasets folder is many files; its own cache is its business
        from handrail.folders import cache_dir

        st = self.path.stat()
        key = json.dumps([str(self.path.resolve()), st.st_size, st.st_mtime_ns, self._mapping, INDEX_VERSION])
        return cache_dir() / "index" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.idx"

    def _load_index(self) -> bool:
        file = self._index_file()
        if file is None or not file.exists():
            return False
        try:
            with open(file, "rb") as f:
                head = json.loads(f.readline())
                arrays = []
                for code, name in (("q", "rows"), ("q", "lines"), ("h", "turns"), ("q", "sizes")):
                    a = array(code)
                    a.fromfile(f, head["n"])
                    arrays.append(a)
        except (OSError, ValueError, KeyError, EOFError):
            return False  # unreadable: scan again
        self.rows, self.lines, self.turns, self.sizes = arrays
        self.facts = Facts(**head["facts"])
        return True

    def _save_index(self) -> None:
        file = self._index_file()
        if file is None or len(self) < CACHE_FROM:
            return
        tmp = file.with_suffix(f".tmp{os.getpid()}")
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write((json.dumps({"n": len(self), "facts": self.facts.__dict__}) + "\n").encode())
                for a in (self.rows, self.lines, self.turns, self.sizes):
                    a.tofile(f)
            os.replace(tmp, file)
        except OSError:  # a read-only or full cache costs the next run one pass, nothing more
            tmp.unlink(missing_ok=True)


def _plain(row, mapping: dict) -> bool:
    """A row that `parse_row` accepts as one record with a worked solution, known without parsing it:
    prompt and solution non-empty strings, answer absent or a string or number, nothing else of ours."""
    if mapping or type(row) is not dict or "messages" in row:
        return False
    p, s, a = row.get("prompt"), row.get("solution"), row.get("answer")
    return (type(p) is str and bool(p.strip()) and type(s) is str and bool(s)
            and (a is None or type(a) in (str, int, float)))


def _arrow_piece(piece: bytes, at: int, line: int, pa, pc, pj, np):
    """(row starts, their lines, their byte lengths, lines in the piece) for a piece of whole JSONL
    lines whose every non-blank line is a plain record; None otherwise."""
    try:
        piece.decode("utf-8")  # Arrow's reader lets some invalid UTF-8 through
    except UnicodeDecodeError:
        return None
    buf = np.frombuffer(piece, dtype=np.uint8)
    nl = np.flatnonzero(buf == 10)
    starts = np.concatenate(([0], nl + 1))
    stops = np.append(nl + 1, len(buf))
    keep = starts < len(buf)
    starts, stops = starts[keep], stops[keep]
    lines = np.arange(len(starts)) + line
    odd = np.flatnonzero(buf[starts] != ord("{"))  # a row starts with '{'; anything else is looked at
    if len(odd) > 1000 or any(piece[starts[i]:stops[i]].strip() for i in odd):
        return None  # indented rows, a byte-order mark, a stray value: the Python pass reads them
    row = np.ones(len(starts), dtype=bool)
    row[odd] = False  # blank lines
    longest = int((stops - starts).max())
    try:
        table = pj.read_json(pa.BufferReader(piece), read_options=pj.ReadOptions(block_size=max(1 << 22, longest + 1)))
        if table.num_rows != int(row.sum()) or not all(_plain_batch(b, pa, pc) for b in table.to_batches()):
            return None
    except pa.ArrowException:  # not valid JSON, mixed types: the Python pass names the row
        return None
    return starts[row] + at, lines[row], (stops - starts)[row], len(starts)


def _plain_batch(batch, pa, pc) -> bool:
    """`_plain` for every row of an Arrow batch read from JSONL."""
    names = set(batch.schema.names)
    if "messages" in names or not {"prompt", "solution"} <= names:
        return False
    prompt, solution = batch.column("prompt"), batch.column("solution")
    if not (pa.types.is_string(prompt.type) and pa.types.is_string(solution.type)):
        return False
    if prompt.null_count or solution.null_count:
        return False
    if "answer" in names:
        t = batch.column("answer").type
        if not (pa.types.is_string(t) or pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t)):
            return False
    return bool(pc.min(pc.utf8_length(pc.utf8_trim_whitespace(prompt))).as_py() or 0) and \
        bool(pc.min(pc.utf8_length(solution)).as_py() or 0)


def _json_row(raw: bytes, where: str, first: bool):
    """One JSONL line as a row (None for a blank line, `_Bad` for one that is not JSON)."""
    try:
        text = raw.decode("utf-8-sig" if first else "utf-8")  # a byte-order mark is read, not refused
    except UnicodeDecodeError as e:
        return _Bad(f"{where}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})")
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return _Bad(f"{where}: not valid JSON ({e.msg} at column {e.colno})")


def _text_bytes(rec: Record) -> int:
    text = rec.prompt if isinstance(rec.prompt, str) else "".join(m["content"] for m in rec.prompt)
    return len(text.encode()) + len((rec.solution or "").encode()) + len((rec.answer or "").encode()) + 16


# -- views ---------------------------------------------------------------------------------------
class Mapped(Records):
    """`fn(record)` for each record of `base`, made when read."""

    def __init__(self, base: Records, fn: Callable[[Record], Record], facts: Facts | None = None):
        self.base, self.fn = base, fn
        self.facts = facts or base.facts

    def __len__(self) -> int:
        return len(self.base)

    def _record(self, i: int) -> Record:
        return self.fn(self.base[i])

    def bounds(self):
        return self.base.bounds()


class Shuffled(Records):
    """Each record with another record's reference (see `shuffle_references`)."""

    def __init__(self, base: Records, order: array, place: array, hint: str):
        self.base, self.order, self.place, self.hint = base, order, place, hint
        f = base.facts
        self.facts = Facts(f.n, f.logged, 0, f.first_unlogged)

    def __len__(self) -> int:
        return len(self.base)

    def other(self, i: int) -> int:
        return self.order[(self.place[i] + 1) % len(self.order)]

    def _record(self, i: int) -> Record:
        r = self.base[i]
        return Record(r.prompt, hint_for(self.base[self.other(i)], self.hint), reference_answer(r), r.source,
                      r.level, r.completion)

    def bounds(self):
        b = self.base.bounds()
        return (b[i] + b[self.other(i)] for i in range(len(self)))


def shuffle_references(records, seed: int, hint: str = "solution"):
    """The shuffled-reference control: each record shows the teacher another record's `hint` (its
    reference, or its answer) as its solution, while the answer it is checked against stays its own.
    A derangement: no record keeps its own. A list gives a list; a file's records give a view."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    place = array("q", bytes(8 * len(order)))
    for k, i in enumerate(order):
        place[i] = k
    view = Shuffled(records if isinstance(records, Records) else _Listed(records), array("q", order), place, hint)
    return view if isinstance(records, Records) else view[:]


class _Listed(Records):
    def __init__(self, records: list[Record]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def _record(self, i: int) -> Record:
        return self.records[i]

    @property
    def facts(self) -> Facts:
        return facts(self.records)


def load_records(path: str | Path, fields: str | None = None) -> Sequence[Record]:
    """Every record validated; raises DataError naming the first bad record (and how many more
    there are), never a partial sequence. `fields` maps other field names (data.parse_fields).
    JSONL, Parquet and `datasets` folders give a RecordFile (read on demand); CSV/TSV a list."""
    path = Path(path)
    if path.suffix.lower() in (".csv", ".tsv") and path.is_file():
        return read_csv(path, fields)
    return RecordFile(path, fields)


