"""The data contract: records with a prompt, a privileged reference and an optional answer, how a
row of JSONL, CSV/TSV, Parquet or a saved `datasets` dataset becomes one (datafile.py reads the
files), and how records are rendered into student and teacher prompts.

A record is `prompt` (a string, or chat `messages`), `solution` (the reference the teacher
sees; alias `privileged_context`) and optional `answer` (what a verifier checks). Every bad
record is reported as `file:line: field 'x': problem`; nothing is dropped silently.

Common layouts are read as they are: a problem under `question`, `problem` or `instruction`
stands in for `prompt`; a GSM8K-style `answer` holding worked text that ends `#### 42` becomes
the solution, with 42 as the answer; a MATH-style `solution` without `####` has its last
`\\boxed{...}` as the answer. Other names are mapped with `fields` ("prompt=query,solution=target",
our name = the file's). Messages name the file's own field.

A *logged conversation* is `messages` in which one assistant turn has `"accepted": true`: the
output the user finally kept. It becomes one record per assistant turn up to the accepted one,
each with the conversation before that turn as the prompt, the turn itself as `completion` (text
the student already wrote) and the accepted turn as `solution`. See examples/conversations.jsonl.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from handrail.errors import UsageError
from handrail.data.answers import ANSWER_MARK, extract_answer, last_boxed
from handrail.data.tasks import Problem

ROLES = ("system", "user", "assistant")


class DataError(UsageError):
    """A bad input record; the message names file, line and field."""


@dataclass
class Record:
    prompt: str | list[dict]  # a string, or chat messages ending with a user turn
    solution: str | None = None
    answer: str | None = None
    source: str = ""  # "file:line", for messages about this record
    level: int = 0  # difficulty, for embedded tasks (leak rate needs it)
    completion: str | None = None  # logged conversations: an assistant turn already sampled

    @property
    def text(self) -> str:
        """The problem as plain text (the last user turn for chats)."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[-1]["content"]


@dataclass
class Templates:
    """How the student and teacher prompts are written. `{prompt}` and `{solution}` are filled in;
    with a chat tokenizer this text becomes the content of the last user turn."""

    student: str = "{prompt}\n\nSolve step by step. End with the final answer as '#### <answer>'."
    teacher: str = (
        "{prompt}\n\nA reference solution follows. Solve the problem yourself, step by step, "
        "using it only as a hint.\n\nReference solution:\n{solution}\n\n"
        "End with the final answer as '#### <answer>'."
    )


# The embedded tiny models have no chat template; short templates keep their sequences short.
TINY_TEMPLATES = Templates(student="{prompt}\n", teacher="{prompt}\n[{solution}]\n")


def records_from_task(problems: list[Problem]) -> list[Record]:
    return [Record(p.prompt, p.solution, p.answer, source=f"task:{i}", level=p.level)
            for i, p in enumerate(problems)]


# -- loading -------------------------------------------------------------------------------------
FIELDS = ("prompt", "messages", "solution", "answer")
PROMPT_ALIASES = ("question", "problem", "instruction")


def parse_fields(spec: str | None) -> dict[str, str]:
    """"prompt=query,solution=target" -> {"prompt": "query", "solution": "target"} (ours -> the file's)."""
    out = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        ours, sep, theirs = (x.strip() for x in item.partition("="))
        if not sep or ours not in FIELDS or not theirs:
            raise UsageError(f"config key 'fields': expected name=file_field with name one of "
                             f"{', '.join(FIELDS)}, got {item.strip()!r}")
        out[ours] = theirs
    return out


def _layout(row: dict, fields: dict[str, str]) -> tuple[dict, dict[str, str]]:
    """The row under our field names, and for each of our names the file's (for messages)."""
    names = dict(fields)
    row = dict(row)
    for ours, theirs in fields.items():
        if theirs in row:
            row[ours] = row.pop(theirs) if theirs not in FIELDS else row[theirs]
    if "prompt" not in row and "messages" not in row:
        alias = next((k for k in PROMPT_ALIASES if k in row), None)
        if alias:
            row["prompt"], names["prompt"] = row[alias], alias
    has_solution = "solution" in row or "privileged_context" in row
    if not has_solution and isinstance(row.get("answer"), str) and ANSWER_MARK in row["answer"]:
        # GSM8K: the worked answer is the reference, its '#### 42' the answer
        row["solution"], names["solution"] = row["answer"], names.get("answer", "answer")
        row["answer"] = extract_answer(row["answer"])
    elif row.get("answer") is None and isinstance(row.get("solution"), str) and ANSWER_MARK not in row["solution"]:
        boxed = last_boxed(row["solution"])  # MATH: the last \boxed{} is the answer
        if boxed:
            row["answer"], names["answer"] = boxed, names.get("solution", "solution")
    return row, names


def refuse_bad(errors: list[str]) -> None:
    """The first bad record's message, and how many more there are: never a partial read."""
    if errors:
        more = f" ({len(errors) - 1} more bad records)" if len(errors) > 1 else ""
        raise DataError(errors[0] + more)


def read_csv(path: Path, fields: str | None = None) -> list[Record]:
    """Every record of a CSV/TSV file, validated (datafile.load_records reads every format)."""
    mapping = parse_fields(fields)
    records, errors = [], []
    for line, row in _csv_rows(path, "\t" if path.suffix.lower() == ".tsv" else ","):
        try:
            records.extend(parse_row(row, f"{path}:{line}", mapping))
        except DataError as e:
            errors.append(str(e))
    refuse_bad(errors)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _csv_rows(path: Path, delimiter: str):
    """Rows of a CSV file with a header line; an empty cell is an absent field. A row is named by
    the line it starts on (a quoted cell may span lines)."""
    import csv
    import io

    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        yield line, _Bad(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x})")
        return
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        start = reader.line_num + 1
        for cells in reader if header else ():
            if any(c.strip() for c in cells):
                if len(cells) != len(header):
                    yield start, _Bad(f"{path}:{start}: {len(cells)} cells, the header has {len(header)}")
                else:
                    yield start, {k: v for k, v in zip(header, cells) if v != ""}
            start = reader.line_num + 1
    except csv.Error as e:
        yield reader.line_num, _Bad(f"{path}:{reader.line_num}: not valid CSV ({e})")


@dataclass
class _Bad:
    message: str


def parse_row(row, where: str, fields: dict[str, str] | None = None) -> list[Record]:
    """One input row: a single record, or the records of a logged conversation."""
    if isinstance(row, _Bad):
        raise DataError(row.message)
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    row, names = _layout(row, fields or {})
    messages = row.get("messages")
    if isinstance(messages, list) and any(isinstance(m, dict) and "accepted" in m for m in messages):
        return parse_conversation(row, where)
    return [parse_record(row, where, names)]


def parse_conversation(row: dict, where: str) -> list[Record]:
    messages = row["messages"]
    _check_roles(messages, where, "messages")
    accepted = [i for i, m in enumerate(messages) if m.get("accepted")]
    for i, m in enumerate(messages):
        if "accepted" in m and not isinstance(m["accepted"], bool):
            raise DataError(f"{where}: field 'messages[{i}].accepted': expected true or false")
        if m.get("accepted") and m["role"] != "assistant":
            raise DataError(f"{where}: field 'messages[{i}].accepted': only an assistant turn can be accepted")
    if len(accepted) != 1:
        raise DataError(f"{where}: field 'messages': expected exactly one turn with \"accepted\": true, "
                        f"found {len(accepted)}")
    answer = _answer(row, where)
    final = messages[accepted[0]]["content"]
    records = []
    for i, m in enumerate(messages[:accepted[0] + 1]):
        if m["role"] != "assistant":
            continue
        if i == 0 or messages[i - 1]["role"] != "user":
            raise DataError(f"{where}: field 'messages[{i}]': an assistant turn must follow a user turn")
        prompt = [{"role": t["role"], "content": t["content"]} for t in messages[:i]]
        records.append(Record(prompt, final, answer, f"{where} (turn {i})", completion=m["content"]))
    return records


def parse_record(row: dict, where: str, names: dict[str, str] | None = None) -> Record:
    names = names or {}

    def field(ours: str) -> str:
        return names.get(ours, ours)

    prompt = row.get("prompt", row.get("messages"))
    key = "prompt" if "prompt" in row else "messages"
    if prompt is None:
        raise DataError(f"{where}: field 'prompt': missing (give 'prompt', 'messages', one of "
                        f"{', '.join(PROMPT_ALIASES)}, or map yours with fields=prompt=NAME)")
    if key == "messages" and not isinstance(prompt, list):
        raise DataError(f"{where}: field '{field(key)}': expected a list of chat messages, got {type(prompt).__name__}")
    if isinstance(prompt, list):
        _check_messages(prompt, where, field(key))
    elif not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: field '{field(key)}': expected a non-empty string or chat messages")
    solution = row.get("solution", row.get("privileged_context"))
    skey = field("solution") if "solution" in row else "privileged_context"
    if solution is not None and not isinstance(solution, str):
        raise DataError(f"{where}: field '{skey}': expected a string, got {type(solution).__name__}")
    answer = _answer(row, where, field("answer"))
    if not solution and answer is None:
        raise DataError(f"{where}: field '{field('solution')}': missing (a record needs 'solution' or 'answer')")
    return Record(prompt, solution or None, answer, where)


def _answer(row: dict, where: str, name: str = "answer") -> str | None:
    answer = row.get("answer")
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise DataError(f"{where}: field '{name}': expected a string or number, got {type(answer).__name__}")
    return None if answer is None else str(answer)


def _check_roles(messages: list, where: str, key: str) -> None:
    if not messages:
        raise DataError(f"{where}: field '{key}': empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: field '{key}[{i}]': expected {{'role': one of {ROLES}, 'content': str}}")


def _check_messages(messages: list, where: str, key: str) -> None:
    _check_roles(messages, where, key)
    if messages[-1]["role"] != "user":
        raise DataError(f"{where}: field '{key}': the last message must be a user turn "
                        f"(or mark the accepted assistant turn of a logged conversation)")


def reference_answer(rec: Record) -> str | None:
    """The answer to verify against: `answer`, else the text after the last '####' of the solution."""
    if rec.answer is not None:
        return rec.answer
    return extract_answer(rec.solution) if rec.solution else None


# -- rendering -----------------------------------------------------------------------------------
def _as_chat(rec: Record, content: str) -> list[dict]:
    turns = [] if isinstance(rec.prompt, str) else [dict(m) for m in rec.prompt[:-1]]
    return turns + [{"role": "user", "content": content}]


def _render(tokenizer, messages: list[dict]) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if len(messages) == 1:
        return messages[0]["content"]
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def student_prompt(tokenizer, rec: Record, t: Templates) -> str:
    return _render(tokenizer, _as_chat(rec, t.student.format(prompt=rec.text)))


def teacher_prompt(tokenizer, rec: Record, t: Templates, hint: str | None = None) -> str:
    """The teacher sees the same problem plus `hint` (default: the record's solution)."""
    hint = rec.solution if hint is None else hint
    if hint is None:
        raise DataError(f"{rec.source}: field 'solution': missing, and the teacher needs a hint")
    return _render(tokenizer, _as_chat(rec, t.teacher.format(prompt=rec.text, solution=hint)))


def hint_for(rec: Record, mode: str) -> str | None:
    """`none` → no hint (student prompt), `solution` → full reference, `answer` → '#### answer',
    `blank` → an empty reference (the teacher's prompt without one: the no-reference control)."""
    if mode == "none":
        return None
    if mode == "blank":
        return ""
    if mode == "solution":
        return rec.solution or f"#### {reference_answer(rec)}"
    if mode == "answer":
        ans = reference_answer(rec)
        if ans is None:
            raise DataError(f"{rec.source}: field 'answer': missing, needed for answer-only hints")
        return f"#### {ans}"
    raise UsageError(f"unknown hint mode {mode!r}; choose none, solution, answer or blank")
