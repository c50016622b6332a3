"""Jane Austen's six novels, offline, from the Debian package ``r-cran-janeaustenr``.

| name             | novel                  | first line            | words (whitespace-split) |
|------------------|------------------------|-----------------------|-------------------------:|
| emma             | Emma                   | EMMA                  | 157,441                  |
| mansfieldpark    | Mansfield Park         | MANSFIELD PARK        | 159,540                  |
| northangerabbey  | Northanger Abbey       | NORTHANGER ABBEY      | 77,141                   |
| persuasion       | Persuasion             | Persuasion            | 83,283                   |
| prideprejudice   | Pride and Prejudice    | PRIDE AND PREJUDICE   | 121,567                  |
| sensesensibility | Sense and Sensibility  | SENSE AND SENSIBILITY | 118,565                  |

(Counts from janeaustenr 1.0.0, Debian 12.) The package is fetched with ``apt-get download`` (no
root, see ``raylin.data.debian``); its R lazy-load database is parsed once with the ``rdata``
package and each novel is cached as ``$RAYLIN_CACHE/austen/NAME.txt``, so later loads read plain
text and need neither apt nor rdata.

Limits: the texts are Project Gutenberg transcriptions as janeaustenr ships them (title page and
chapter headings included, one line per source line, blank lines kept as empty lines). Only
zlib-compressed lazy-load databases (R's default) are read.
"""

from __future__ import annotations

import gzip
import warnings
import zlib
from pathlib import Path

from raylin.assets import cache_dir
from raylin.atomic import write_text_atomic
from raylin.data.debian import debian_package

NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
PACKAGE = "r-cran-janeaustenr"
_LAZYLOAD = Path("usr/lib/R/site-library/janeaustenr/data/Rdata")  # .rdx index + .rdb objects


def load_austen(novels: tuple[str, ...] = NOVELS) -> dict[str, str]:
    """Novel name -> full text (lines joined with "\\n"); see the module doc for names and limits."""
    unknown = [name for name in novels if name not in NOVELS]
    if unknown:
        raise ValueError(f"Unknown novel(s) {unknown}; janeaustenr has {NOVELS}.")
    folder = cache_dir() / "austen"
    if not all((folder / f"{name}.txt").is_file() for name in novels):
        _build(folder)
    return {name: (folder / f"{name}.txt").read_text(encoding="utf-8") for name in novels}


def read_r_lazyload(prefix: Path) -> dict:
    """Every object of an R lazy-load database (``prefix.rdx`` + ``prefix.rdb``), converted by rdata.

    The index is a gzipped serialized R list; each object in the .rdb is a 4-byte big-endian
    length followed by a zlib stream of the serialized object.
    """
    try:
        import rdata
    except ImportError as error:
        raise ImportError("Reading R data needs the rdata package: `pip install rdata`.") from error

    def parse(raw: bytes):
        with warnings.catch_warnings():
            # Lazy-load entries carry no RDS/RDA magic; rdata warns, then parses them correctly as RDS.
            warnings.filterwarnings("ignore", message="Unknown file type")
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = parse(gzip.decompress(Path(f"{prefix}.rdx").read_bytes()))
    if index.get("compressed") not in (True, 1):
        raise ValueError(f"{prefix}.rdb uses compression {index.get('compressed')!r}; only zlib (TRUE) is supported.")
    rdb = Path(f"{prefix}.rdb").read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        offset, length = int(offset), int(length)
        objects[str(name)] = parse(zlib.decompress(rdb[offset + 4 : offset + length]))
    return objects


def _build(folder: Path) -> None:
    objects = read_r_lazyload(debian_package(PACKAGE) / _LAZYLOAD)
    missing = [name for name in NOVELS if name not in objects]
    if missing:
        raise ValueError(f"{PACKAGE} lacks {missing}; it holds {sorted(objects)}.")
    for name in NOVELS:
        # R's NA_character_ may come back as None or NaN; it marks no text, so it becomes an empty line.
        lines = [line if isinstance(line, str) else "" for line in objects[name].tolist()]
        write_text_atomic(folder / f"{name}.txt", "\n".join(lines))

