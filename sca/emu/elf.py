"""A loader for static, non-PIE x86-64 Linux executables (pyelftools parses, we map)."""

from __future__ import annotations

import io
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from .image import ManifestError

PAGE = 0x1000
# Keep the image out of the stack, arenas and trap ranges the sandbox uses.
LOWEST_VADDR = 0x10000
HIGHEST_VADDR = 0x1_0000_0000


@dataclass(frozen=True, slots=True)
class Segment:
    vaddr: int
    memsz: int
    data: bytes
    perms: int  # unicorn UC_PROT_* bits


@dataclass(frozen=True, slots=True)
class Executable:
    entry: int
    phdr_addr: int
    phent: int
    phnum: int
    segments: tuple[Segment, ...]

    @property
    def end(self) -> int:
        return max(s.vaddr + s.memsz for s in self.segments)


def page_down(x: int) -> int:
    return x & ~(PAGE - 1)


def page_up(x: int) -> int:
    return (x + PAGE - 1) & ~(PAGE - 1)


def parse_executable(binary: bytes) -> Executable:
    try:
        elf = ELFFile(io.BytesIO(binary))
        if elf.elfclass != 64 or elf["e_machine"] != "EM_X86_64":
            raise ManifestError("binary is not an x86-64 ELF")
        if elf["e_type"] != "ET_EXEC":
            raise ManifestError("binary must be linked static and non-PIE (-static -no-pie)")
        segments = []
        phdr_addr = None
        for seg in elf.iter_segments():
            kind = seg["p_type"]
            if kind == "PT_INTERP" or kind == "PT_DYNAMIC":
                raise ManifestError("binary is dynamically linked; build it with -static")
            if kind != "PT_LOAD" or seg["p_memsz"] == 0:
                continue
            vaddr, memsz, filesz = seg["p_vaddr"], seg["p_memsz"], seg["p_filesz"]
            if filesz > memsz or vaddr < LOWEST_VADDR or vaddr + memsz > HIGHEST_VADDR:
                raise ManifestError(f"PT_LOAD at {vaddr:#x} is outside the loadable range")
            flags = seg["p_flags"]
            perms = (1 if flags & 4 else 0) | (2 if flags & 2 else 0) | (4 if flags & 1 else 0)
            segments.append(Segment(vaddr, memsz, seg.data()[:filesz], perms))
            off = seg["p_offset"]
            if phdr_addr is None and off <= elf["e_phoff"] < off + filesz:
                phdr_addr = vaddr + elf["e_phoff"] - off
    except ELFError as e:
        raise ManifestError(f"binary is not a valid ELF: {e}") from None
    if not segments:
        raise ManifestError("binary has no loadable segment")
    return Executable(
        entry=elf["e_entry"],
        phdr_addr=phdr_addr or 0,
        phent=elf["e_phentsize"],
        phnum=elf["e_phnum"],
        segments=tuple(segments),
    )


def symbol_address(binary: bytes, name: str) -> int | None:
    """The address of a symbol in the binary's symbol table, if it has one."""
    elf = ELFFile(io.BytesIO(binary))
    symtab = elf.get_section_by_name(".symtab")
    if symtab is None:
        return None
    for sym in symtab.get_symbol_by_name(name) or ():
        return int(sym["st_value"])
    return None
