"""The JSONL output file of specoffload-run: checked, locked, appended line by line, resumable.

Guarantees:
- An existing file is used only if every complete line is one of this command's output lines
  (a JSON object with exactly the keys of OUTPUT_KEYS, a string id and text, a list of token ids,
  finish_reason "stop" or "length", stop_reason a string, an id or null, usage {prompt_tokens,
  completion_tokens}). A file that is anything else (a plan, notes, a line edited by hand) is
  refused, naming the file and line, and left as it is. A file of an earlier version's lines
  (finish_reason "eos", no stop_reason/usage) is refused by name too: resuming into it would mix
  two line shapes in one file, which breaks whoever reads it with one schema.
- Only an unterminated last line that is the start of an output line (what a crash in the middle of
  a write leaves) is dropped on resume; that sequence is run again.
- One run per file: an exclusive lock (flock) is held on the file for the whole run; a second run
  refuses at once, naming the file and, where the system says, the process holding it.
- Each line is written whole and fsynced before the next; a failed write (disk full, file size
  limit) cuts the file back to its last complete line, fsyncs it and raises OutputFileError naming
  the file and the cause.
- Nothing is created or changed before the file is known to be writable; a file this run created
  and wrote nothing to is removed again if the run stops early.

Test hook: SPECOFFLOAD_RUN_CRASH_AT="N:before|mid|after" makes the process SIGKILL itself at its
N-th output line (1-based): before writing it, after writing half of its bytes, or after the whole
line (before the fsync); "N:sigterm" / "N:sigint" send that signal after half of the line's bytes.
The crash-consistency tests use it to stop runs at chosen points.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import stat
from pathlib import Path

OUTPUT_KEYS = ("id", "text", "tokens", "num_tokens", "prompt_tokens", "finish_reason", "stop_reason", "usage")
#: the line of earlier versions (finish_reason "eos", no stop_reason, no usage): recognised to be refused by name
OLD_OUTPUT_KEYS = ("id", "text", "tokens", "num_tokens", "prompt_tokens", "finish_reason")
FINISH_REASONS = ("stop", "length")
USAGE_KEYS = ("prompt_tokens", "completion_tokens")
#: every output line starts with these bytes (json.dumps of a dict whose first key is "id")
LINE_PREFIX = b'{"id": '
CRASH_ENV = "SPECOFFLOAD_RUN_CRASH_AT"


class OutputFileError(ValueError):
    """The output file cannot be used or written; the message names the file and the fix."""


class OutputWriteError(OutputFileError):
    """Writing a finished sequence failed (disk full, file size limit); what was finished is saved."""


def _holder(fd: int) -> str:
    """'process N' holding a flock on fd's file, read from /proc/locks where the system has it."""
    try:
        st = os.fstat(fd)
        want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as fh:
            for row in fh:
                parts = row.split()
                # "1: FLOCK  ADVISORY  WRITE 12345 08:01:1234567 0 EOF" (blocked waiters have "->")
                if "->" not in parts and len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == want:
                    return f"process {parts[4]}"
    except (OSError, ValueError):
        pass
    return "another process"


def _describe_os_error(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "the disk is full (no space left on device)"
    if exc.errno == errno.EFBIG:
        return "the file size limit was reached (file too large; see `ulimit -f`)"
    if exc.errno == errno.EDQUOT:
        return "the disk quota is exhausted"
    return exc.strerror or str(exc)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_line(raw: bytes) -> dict | None:
    """One complete output line, or None if it is not one of ours."""
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    if not isinstance(obj, dict) or tuple(sorted(obj)) != tuple(sorted(OUTPUT_KEYS)):
        return None
    if not isinstance(obj["id"], str) or not isinstance(obj["text"], str) or not isinstance(obj["tokens"], list):
        return None
    if not all(_is_int(t) for t in obj["tokens"]) or obj["finish_reason"] not in FINISH_REASONS:
        return None
    sr, usage = obj["stop_reason"], obj["usage"]
    if not (sr is None or isinstance(sr, str) or _is_int(sr)):
        return None
    if not isinstance(usage, dict) or tuple(sorted(usage)) != tuple(sorted(USAGE_KEYS)) \
            or not all(_is_int(v) for v in usage.values()):
        return None
    return obj


def _is_old_line(raw: bytes) -> bool:
    """An output line of an earlier version (six keys, finish_reason "eos" / "length")."""
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and tuple(sorted(obj)) == tuple(sorted(OLD_OUTPUT_KEYS)) \
        and isinstance(obj["id"], str) and isinstance(obj["tokens"], list)


def scan(path: Path, data: bytes) -> tuple[set[str], int]:
    """(ids finished, bytes to keep) for the contents of an output file; OutputFileError if it is not ours.

    Blank lines are allowed; an unterminated last line is dropped only if it is the start of an output
    line (a torn write).
    """
    done: dict[str, int] = {}
    pos, n = 0, 0
    while pos < len(data):
        n += 1
        end = data.find(b"\n", pos)
        if end < 0:
            tail = data[pos:]
            if tail.startswith(LINE_PREFIX) or LINE_PREFIX.startswith(tail):
                return set(done), pos  # a line cut short by a crash: redo it
            what = ("this file is not this command's output" if not done else
                    f"after {len(done)} output lines; repair or remove it and rerun, or")
            raise OutputFileError(
                f"{path}:{n}: the last line (no newline) is not a specoffload-run output line: {what}, and it is "
                "left as it is. Give --output a new file (or the JSONL file an earlier run wrote)")
        raw = data[pos:end]
        pos = end + 1
        if not raw.strip():
            continue
        obj = _parse_line(raw)
        if obj is None and _is_old_line(raw):
            raise OutputFileError(
                f"{path}:{n}: an output line of an earlier specoffload-run (finish_reason \"eos\", no stop_reason or "
                "usage); this version writes a different line and does not mix the two shapes in one file, which "
                "is left as it is. Give --output a new file (the ids already in this one can be left out of the "
                "prompts file)")
        if obj is None:
            if not done:
                raise OutputFileError(
                    f"{path}:{n}: not a specoffload-run output line (a JSON object with keys "
                    f"{', '.join(OUTPUT_KEYS)}): this file is not this command's output, and it is left as it is. "
                    "Give --output a new file (or the JSONL file an earlier run wrote)")
            raise OutputFileError(
                f"{path}:{n}: not a specoffload-run output line (a JSON object with keys {', '.join(OUTPUT_KEYS)}), "
                f"after {len(done)} that are; the file is left as it is. Repair or remove line {n} (its sequence "
                "is then run again) and rerun, or give --output a new file")
        if obj["id"] in done:
            raise OutputFileError(f"{path}:{n}: id {obj['id']!r} is already on line {done[obj['id']]}; remove one "
                                  "of the two lines and rerun to resume")
        done[obj["id"]] = n
    return set(done), len(data)


def finished_ids(path: str | Path) -> set[str]:
    """Ids already in an output file (read only; OutputFileError if it is not this command's output)."""
    path = Path(path)
    if not path.exists():
        return set()
    return scan(path, path.read_bytes())[0]


class OutputFile:
    """The locked output of one run. Use `open()` before loading anything, then `write()` per sequence."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fd: int | None = None
        self.created = False
        self.written = 0
        self.dropped_bytes = 0
        self.done: set[str] = set()
        self._crash = self._crash_point()

    @staticmethod
    def _crash_point() -> tuple[int, str] | None:
        spec = os.environ.get(CRASH_ENV)
        if not spec:
            return None
        n, _, phase = spec.partition(":")
        if not n.isdigit() or phase not in ("", "before", "mid", "after", "sigterm", "sigint"):
            return None  # not a crash point this hook knows: ignored
        return int(n), phase or "before"

    def open(self) -> set[str]:
        """Check, create if needed, lock and read the file; return the ids already finished."""
        p = self.path
        if p.exists() and p.is_dir():
            raise OutputFileError(f"--output {p} is a directory; give a file name, e.g. {p / 'out.jsonl'}")
        parent = p.parent
        if not parent.exists():
            try:
                parent.mkdir(parents=True)
            except OSError as exc:
                raise OutputFileError(f"--output {p}: cannot create folder {parent} ({_describe_os_error(exc)})") from None
        elif not parent.is_dir():
            raise OutputFileError(f"--output {p}: {parent} is not a folder")
        existed = p.exists()
        try:
            fd = os.open(p, os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise OutputFileError(f"--output {p} cannot be written ({_describe_os_error(exc)}); give a writable "
                                  "file") from None
        self.fd, self.created = fd, not existed
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode) or str(p.resolve()).startswith("/proc/"):
                raise OutputFileError(f"--output {p} is not a regular file; give a file name for the JSONL output")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise OutputFileError(f"--output {p} is in use by {_holder(fd)} (another specoffload-run is "
                                          "writing it); wait for it to finish, or give another file") from None
                raise OutputFileError(f"--output {p}: cannot lock it ({_describe_os_error(exc)})") from None
            data = self._read_all()
            self.done, keep = scan(p, data)
            if keep < len(data):
                self.dropped_bytes = len(data) - keep
                os.ftruncate(fd, keep)
                os.fsync(fd)
        except BaseException:
            self.close(failed=True)
            raise
        return self.done

    def _read_all(self) -> bytes:
        chunks, off = [], 0
        while True:
            b = os.pread(self.fd, 1 << 20, off)
            if not b:
                return b"".join(chunks)
            chunks.append(b)
            off += len(b)

    def write(self, obj: dict) -> None:
        """Append one line, whole, and fsync it; on failure cut back to the last whole line and raise."""
        assert self.fd is not None
        data = (json.dumps(obj) + "\n").encode("ascii")
        start = os.lseek(self.fd, 0, os.SEEK_END)
        crash = self._crash if self._crash and self._crash[0] == self.written + 1 else None
        if crash and crash[1] == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            view = memoryview(data)
            if crash and crash[1] in ("mid", "sigterm", "sigint"):
                n = os.write(self.fd, view[:len(data) // 2])
                view = view[n:]
                os.kill(os.getpid(), {"mid": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigint": signal.SIGINT}[crash[1]])
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
            if crash and crash[1] == "after":
                os.kill(os.getpid(), signal.SIGKILL)
            os.fsync(self.fd)
        except OSError as exc:
            try:
                os.ftruncate(self.fd, start)
                os.fsync(self.fd)
            except OSError:
                pass  # resume drops a torn last line in any case
            raise OutputWriteError(
                f"cannot write {self.path}: {_describe_os_error(exc)}. The {self.written + len(self.done)} "
                f"sequences finished so far are saved in it; make room (or raise the limit) and rerun the same "
                "command to resume") from None
        self.written += 1

    def close(self, failed: bool = False) -> None:
        """Release the lock; a file this run created and never wrote to is removed if the run failed."""
        if self.fd is None:
            return
        if failed and self.created and self.written == 0:
            try:
                if os.fstat(self.fd).st_size == 0:
                    os.unlink(self.path)
            except OSError:
                pass
        os.close(self.fd)  # releases the flock
        self.fd = None
