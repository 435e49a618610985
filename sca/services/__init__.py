"""Sample service images: four small, deliberately vulnerable C servers, like a user would bring.

Each lives in ``sca/services/<name>/``: the C source, the committed static binary ``bin/<name>``
(rebuilt byte for byte by ``scripts/build_services.sh``), a ``service.toml`` manifest and a
``traffic`` module that writes benign sessions and exploits for it:

=========  =====  ====  =====================  =============================================
name       proto  port  class                  exploit is detected as
=========  =====  ====  =====================  =============================================
resolver   udp    1434  Slammer (strcpy)       execution-control
httpd      tcp    80    CodeRed (query strcpy) execution-control
rpcd       tcp    135   Blaster (memcpy)       code-execution
mgmtd      tcp    7070  execve path overwrite  function-argument
=========  =====  ====  =====================  =============================================

The binaries are only ever run inside herdwall's emulator (``sca.emu``), never natively.
"""

from __future__ import annotations

import functools
import importlib
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

SAMPLES = ("resolver", "httpd", "rpcd", "mgmtd")
SERVICES_DIR = Path(__file__).resolve().parent
REQUIRED_KEYS = ("name", "binary", "proto", "port")


def service_dir(name: str) -> Path:
    """The folder of sample ``name``; only the known samples, so a name is never a path."""
    if name not in SAMPLES:
        raise KeyError(f"no sample service {name!r}; the samples are {', '.join(SAMPLES)}")
    return SERVICES_DIR / name


def manifest_path(name: str) -> Path:
    """The ``service.toml`` of sample ``name`` (what ``sca.emu``'s ``load_image`` takes)."""
    return service_dir(name) / "service.toml"


def load_manifest(name: str) -> dict[str, Any]:
    """The parsed manifest of sample ``name``, as written (no defaults filled in)."""
    return tomllib.loads(manifest_path(name).read_text(encoding="utf-8"))


def binary_path(name: str) -> Path:
    """The committed static binary of sample ``name``."""
    return service_dir(name) / load_manifest(name)["binary"]


def traffic(name: str) -> ModuleType:
    """The traffic module of sample ``name``: ``EXPECTED_TYPE``, ``benign``, ``exploit``,
    ``exploit_case``."""
    service_dir(name)
    return importlib.import_module(f"{__name__}.{name}.traffic")


@functools.cache
def symbols(name: str) -> dict[str, int]:
    """Name -> address of every function and object symbol of sample ``name``'s binary.

    Exploits read addresses from here at generation time (never hard-coded), so a rebuilt
    binary with a different layout still gets working exploits.
    """
    from elftools.elf.elffile import ELFFile

    out: dict[str, int] = {}
    with binary_path(name).open("rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        if symtab is None:
            raise ValueError(f"{name}: binary has no symbol table")
        for sym in symtab.iter_symbols():
            if sym.name and sym["st_info"]["type"] in ("STT_FUNC", "STT_OBJECT", "STT_NOTYPE"):
                out.setdefault(sym.name, sym["st_value"])
    return out


def symbol_address(name: str, symbol: str) -> int:
    """The address of ``symbol`` in sample ``name``'s binary; KeyError if it has none."""
    try:
        return symbols(name)[symbol]
    except KeyError:
        raise KeyError(f"{name}: no symbol {symbol!r} in {binary_path(name)}") from None
