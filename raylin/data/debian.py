"""Files from Debian packages, fetched without root: ``apt-get download`` + ``dpkg -x``.

Some offline assets (speech synthesisers, R data packages) ship as Debian packages. Nothing here
installs anything: a package is downloaded as a ``.deb`` and unpacked under
``$RAYLIN_CACHE/debian/NAME/`` (default ``~/.cache/raylin``) with its files at their installed
paths, e.g. ``debian/flite/usr/bin/flite``.

Limits:
- Needs ``apt-get`` and ``dpkg`` (Debian, Ubuntu and derivatives) and access to the configured
  apt mirrors on first use. Elsewhere, install the program with the system's package manager:
  callers prefer programs already on ``PATH``.
- The version fetched is whatever the machine's apt sources hold; an extracted package is not
  refreshed when the sources change (delete its folder to refetch).
- Maintainer scripts are not run, so nothing is registered (alternatives, ldconfig, triggers).
  Extracted programs find their libraries through ``library_path``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from raylin.assets import cache_dir
from raylin.atomic import write_text_atomic

_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]+")  # Debian policy 5.6.1


def debian_dir() -> Path:
    return cache_dir() / "debian"


def debian_package(name: str) -> Path:
    """Root of the unpacked package ``name`` (files at their installed paths below it).

    Downloaded and unpacked once, atomically; later calls return at once. Raises
    FileNotFoundError when apt-get / dpkg are missing or the download fails.
    """
    return debian_packages([name])[0]


def debian_packages(names: list[str]) -> list[Path]:
    """Roots of the unpacked packages ``names``, fetched with one ``apt-get download`` call (apt
    takes seconds to start, so one call per package is slow). See ``debian_package``."""
    for name in names:
        _check_name(name)
    roots = [debian_dir() / name for name in names]
    missing = [name for name, root in zip(names, roots) if not root.is_dir()]
    if not missing:
        return roots
    _require_tools(missing)
    debian_dir().mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download.", dir=debian_dir()))
    try:
        _run(["apt-get", "download", *missing], missing, cwd=staging)
        # A .deb is named NAME_VERSION_ARCH.deb, and "_" cannot occur in a package name.
        debs = {deb.name.split("_")[0]: deb for deb in staging.glob("*.deb")}
        for name in missing:
            if name not in debs:
                raise FileNotFoundError(f"`apt-get download {name}` succeeded but left no {name}_*.deb.")
            _run(["dpkg", "-x", str(debs[name]), str(staging / name)], [name])
            try:
                os.replace(staging / name, debian_dir() / name)
            except OSError:
                if not (debian_dir() / name).is_dir():  # a concurrent fetch that won the race is fine
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return roots


def missing_dependencies(name: str) -> list[str]:
    """Packages apt would add to this machine to install ``name`` (``name`` included unless it is
    installed), in install order. Recommends are left out.

    Asked once per package with a dry run (``apt-get --simulate install``, no root, installs
    nothing) and remembered under ``debian/.needs/NAME``: installing packages on the system later
    does not shrink the remembered list, which only costs extra (harmless) extractions.
    """
    _check_name(name)
    remembered = debian_dir() / ".needs" / name  # a leading dot: no package name can clash
    if remembered.is_file():
        return remembered.read_text().split()
    _require_tools([name])
    result = _run(["apt-get", "--simulate", "--no-install-recommends", "install", name], [name])
    # Lines read "Inst NAME (VERSION ...)" or, for an upgrade, "Inst NAME [OLD] (VERSION ...)".
    needed = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("Inst ")]
    needed = [package.split(":")[0] for package in needed]  # drop a ":amd64" architecture suffix
    write_text_atomic(remembered, "\n".join(needed) + "\n")
    return needed


def debian_package_with_dependencies(name: str) -> list[Path]:
    """Roots of ``name`` and of every dependency this machine lacks, each unpacked (see
    ``debian_package``); pass them to ``library_path`` to run the package's programs."""
    return debian_packages([name] + [package for package in missing_dependencies(name) if package != name])


def library_path(roots: list[Path]) -> str:
    """An ``LD_LIBRARY_PATH`` value: every folder under ``roots`` that holds a shared library.

    All such folders, not just ``usr/lib/<triple>``, because some libraries keep private ones
    (libpulse loads ``usr/lib/<triple>/pulseaudio/libpulsecommon``) that the system linker only
    finds at their installed path.
    """
    folders: list[str] = []
    for root in roots:
        for library in sorted(root.rglob("*.so*")):
            if re.search(r"\.so(\.\d+)*$", library.name) and str(library.parent) not in folders:
                folders.append(str(library.parent))
    return os.pathsep.join(folders)


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a Debian package name (lowercase letters, digits, '+', '-', '.').")


def _require_tools(names: list[str]) -> None:
    missing = [tool for tool in ("apt-get", "dpkg") if shutil.which(tool) is None]
    if missing:
        listed = " ".join(names)
        raise FileNotFoundError(
            f"Cannot fetch the Debian package(s) {listed}: {' and '.join(missing)} not found. On Debian/Ubuntu "
            f"`apt-get download {listed}` needs no root; elsewhere install the program with the system's "
            "package manager so that it is on PATH."
        )


def _run(command: list[str], names: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise FileNotFoundError(
            f"Could not fetch the Debian package(s) {' '.join(names)}: `{' '.join(command)}` failed: "
            f"{' / '.join(detail)}. "
            "Check the name (`apt-cache policy NAME`), refresh the package lists (`apt-get update`, as root) "
            "and the network, or install the program with the system's package manager."
        )
    return result

