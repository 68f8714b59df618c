"""Text that exists on every machine where the project is installed, for the embedded defaults.

- ``general_text``: English prose from the docstrings of the Python standard library (modules,
  classes and functions of a fixed module list, in a fixed order). It pretrains the embedded base
  model and serves as the "general" replay / regression set.
- ``general_heldout_text``: the same kind of prose from other standard-library modules, never seen
  in pretraining: the general-text regression set (WiSE-FT budget, replay, benchmarks).
- ``licence_texts``: the licence files that installed packages ship in their ``*.dist-info``
  folders, the legal domain of the demo commission.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path

GENERAL_MODULES = (
    "abc argparse ast asyncio base64 bisect calendar collections contextlib copy csv dataclasses "
    "datetime decimal difflib email enum fractions functools glob gzip hashlib heapq hmac html "
    "http.client imaplib inspect io ipaddress itertools json logging mailbox math mimetypes "
    "multiprocessing numbers operator optparse os pathlib pickle pprint queue random re sched "
    "secrets select shelve shlex shutil signal smtplib socket sqlite3 ssl statistics string "
    "struct subprocess tarfile tempfile textwrap threading time timeit tkinter tokenize trace "
    "traceback types typing unittest urllib.parse urllib.request uuid warnings weakref "
    "xml.dom.minidom xml.etree.ElementTree zipfile zlib"
).split()


def _clean(doc: str) -> str:
    doc = re.sub(r"[ \t]+", " ", doc)
    return doc.strip()


HELDOUT_MODULES = (
    "array binascii bz2 cmd code codecs colorsys compileall concurrent.futures configparser "
    "contextvars copyreg dbm dis doctest email.message email.policy filecmp fileinput fnmatch "
    "ftplib getopt getpass gettext graphlib http.cookiejar http.server keyword linecache locale "
    "lzma modulefinder netrc pkgutil platform plistlib poplib pstats py_compile pyclbr quopri "
    "reprlib rlcompleter runpy selectors smtplib socketserver stat stringprep symtable sysconfig "
    "tabnanny tomllib tracemalloc turtle unittest.mock urllib.robotparser wave webbrowser "
    "wsgiref.simple_server xml.sax zipapp zipimport zoneinfo"
).split()


def general_text(max_chars: int | None = None) -> list[str]:
    """Paragraphs (>= 80 chars) of standard-library docstrings, deterministic order."""
    return _docstring_paragraphs(GENERAL_MODULES, max_chars)


def general_heldout_text(max_chars: int | None = None) -> list[str]:
    """General prose never used to pretrain the embedded base (other modules, same kind)."""
    seen = set(general_text())
    return [p for p in _docstring_paragraphs(HELDOUT_MODULES, max_chars) if p not in seen]


def _docstring_paragraphs(modules: tuple[str, ...] | list[str], max_chars: int | None) -> list[str]:
    paragraphs: list[str] = []
    seen: set[str] = set()
    total = 0
    for name in modules:
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an optional stdlib module (tkinter) may be absent
            continue
        docs = [inspect.getdoc(module) or ""]
        for _, member in sorted(vars(module).items()):
            if (inspect.isclass(member) or inspect.isfunction(member)) and getattr(
                member, "__module__", None
            ) == module.__name__:
                docs.append(inspect.getdoc(member) or "")
        for doc in docs:
            for para in re.split(r"\n\s*\n", doc):
                para = _clean(para.replace("\n", " "))
                if len(para) < 80 or para in seen or ">>>" in para:
                    continue
                seen.add(para)
                paragraphs.append(para)
                total += len(para)
                if max_chars is not None and total >= max_chars:
                    return paragraphs
    return paragraphs


def licence_paragraphs(min_chars: int = 40) -> list[str]:
    """Unique whitespace-normalized paragraphs of the installed packages' licence files."""
    paragraphs: dict[str, None] = {}
    for path in licence_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for para in re.split(r"\n\s*\n", text):
            para = " ".join(para.split())
            if len(para) >= min_chars:
                paragraphs.setdefault(para)
    return list(paragraphs)


def licence_files(roots: list[Path] | None = None) -> list[Path]:
    """Licence files shipped in ``*.dist-info`` folders of the running interpreter's packages."""
    roots = roots or [Path(p) for p in sys.path if p.endswith("site-packages")]
    found: dict[str, Path] = {}
    for root in roots:
        for path in sorted(root.glob("*.dist-info/**/*")):
            if path.is_file() and re.match(r"(?i)^(licen[cs]e|copying|notice)", path.name):
                found.setdefault(path.read_bytes()[:2048].decode("utf-8", "replace"), path)
    return sorted(found.values())
