"""File safety shared by every script: output paths that stay inside their folder, outputs that never replace a
source, nothing overwritten unless asked, devices and output folders checked before anything is written.

Each check raises ValueError with a one-line reason; the script prefixes the flag and exits. Every output of every
tool (a file or a folder of results) goes through check_output_file or check_output_dir before anything is computed
(a benchmark's table, rewritten by every run, through check_table_file), and is written atomically (temp file, then
rename; a benchmark table that grows row by row, so that a run stopped at a time limit keeps its rows, is the
exception); every float flag is parsed by finite_float. A bottom-layer
module: it imports no other module of the project.
"""
import argparse
import glob
import math
import os
import sys
import tempfile
import re
import time

# characters kept in a file name derived from a file's contents; anything else becomes "_"
_SAFE_CHAR = re.compile(r"[^A-Za-z0-9._+=-]")
STALE_TMP_SECONDS = 60  # a temp file of an interrupted save is this old at least (a live save keeps writing)


def safe_name(name):
    """A file name made from untrusted text (a tensor name inside a file): absolute paths, `..` parts and
    control characters are refused; separators and other odd characters become '_'."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise ValueError(f"name {name!r} cannot be a file name")
    if os.path.isabs(name) or name.startswith("\\"):
        raise ValueError(f"name {name!r} is an absolute path; refused")
    if ".." in re.split(r"[/\\]", name) or name in (".", ".."):
        raise ValueError(f"name {name!r} has a '..' part; refused")
    if len(name) > 200:
        raise ValueError(f"name {name[:40]!r}... is longer than 200 characters")
    return _SAFE_CHAR.sub("_", name)


def safe_join(folder, name):
    """folder/<safe_name(name)>, refused unless its real path (symlinks followed) lies inside the folder."""
    path = os.path.join(folder, safe_name(name))
    root = os.path.realpath(folder)
    if os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise ValueError(f"{path} leads outside {folder} (a symlink?); refused")
    return path


def same_file(a, b):
    """Whether two paths name the same file or folder once symlinks are followed (neither needs to exist), or are
    hard links (or bind mounts) of one."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output_file(path, sources=(), overwrite=False, overwrite_flag="--overwrite"):
    """Refuse to write `path` when it is (or links to) one of `sources`, is a folder, or already exists without
    `overwrite`; also when its folder cannot be created or written. Creates nothing."""
    for source in sources:
        if source and same_file(path, source):
            raise ValueError(f"{path} is the source {source} (after following links); it would be replaced")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder, not a file")
    if os.path.lexists(path) and not overwrite:
        raise ValueError(f"{path} exists; pass {overwrite_flag} to replace it")
    check_out_dir(os.path.dirname(os.path.abspath(path)))


def check_table_file(path):
    """A benchmark's table or JSON rows, which every run of it rewrites (replacing an earlier table is the point):
    refuse a folder, and an existing file that is not text, such as a checkpoint, a GGUF or a safetensors file
    (a NUL byte or bytes that are not UTF-8 in its first 4 KiB), which the table would destroy. Creates nothing."""
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder, not a file")
    if os.path.exists(path):
        with open(path, "rb") as f:
            head = f.read(4096)
        try:
            head.decode("utf-8")
            text = b"\0" not in head
        except UnicodeDecodeError as e:  # a character cut at the end of the 4 KiB is still text
            text = e.start >= len(head) - 3 and b"\0" not in head
        if not text:
            raise ValueError(f"{path} exists and is not a text table (a checkpoint?); it would be replaced")
    check_out_dir(os.path.dirname(os.path.abspath(path)))


def table_file_or_exit(path, flag, prog):
    """check_table_file(path), or exit with its reason in one line: `prog: error: flag: reason`."""
    try:
        check_table_file(path)
    except ValueError as e:
        sys.exit(f"{prog}: error: {flag}: {e}")


def check_output_dir(folder, results, sources=(), source_dirs=(), overwrite=False, overwrite_flag="--overwrite"):
    """check_output_file for each of `results` inside `folder`; also refuse a folder that is (or links to) one of
    `source_dirs` (the folder a source checkpoint is read from). Creates nothing."""
    for source_dir in source_dirs:
        if source_dir and same_file(folder, source_dir):
            raise ValueError(f"{folder} is the folder of the source {source_dir} (after following links); "
                             f"it would be replaced")
    for name in results:
        check_output_file(os.path.join(folder, name), sources, overwrite, overwrite_flag)


def write_atomic(path, write, mode="w", prefix=".result-"):
    """Write a file whole: write(f) fills a temp file beside `path` (flushed to disk), then a rename puts it in
    place; a kill leaves the old file or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(path, text):
    """A text result (a table, JSON rows), written whole (write_atomic)."""
    write_atomic(path, lambda f: f.write(text))


def finite_float(text):
    """argparse `type=` of every float flag: a finite number; nan, inf and non-numbers are refused in one line."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def check_out_dir(folder):
    """Refuse a folder that is a file, or that could not be created or written (checked without creating it)."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{folder} is a file, not a folder")
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{existing} is a file, so {folder} cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{existing} is not writable")


def clean_stale_tmp(folder, pattern=".ckpt-*.tmp"):
    """Remove temp files that interrupted saves left in `folder` (older than STALE_TMP_SECONDS)."""
    now = time.time()
    for path in glob.glob(os.path.join(glob.escape(folder), pattern)):
        try:
            if now - os.path.getmtime(path) > STALE_TMP_SECONDS:
                os.remove(path)
        except OSError:
            pass


def check_device(device):
    """'auto', 'cpu', 'mps', 'cuda' or 'cuda:N' that this machine has; ValueError naming what it has otherwise."""
    import torch
    if device in ("auto", "cpu"):
        return device
    if device == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError("MPS is not available on this machine; use --device=cpu")
        return device
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if not match:
        raise ValueError(f"unknown device '{device}'; expected auto, cpu, cuda, cuda:N or mps")
    if not torch.cuda.is_available():
        raise ValueError("CUDA is not available on this machine; use --device=cpu")
    if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
        raise ValueError(f"this machine has {torch.cuda.device_count()} CUDA device(s); {device} does not exist")
    return device


def wandb_needs_offline(environ=None):
    """True when wandb would try to log in online with no key: no WANDB_API_KEY, no WANDB_MODE and no stored
    login in ~/.netrc. Online logging without a key waits for a login prompt."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_API_KEY") or environ.get("WANDB_MODE"):
        return False
    netrc = os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        with open(netrc) as f:
            return "api.wandb.ai" not in f.read()
    except OSError:
        return True
