"""The ``fortunes`` corpus: quotations, aphorisms, jokes and verse by many authors, offline, from the
Debian package ``fortunes`` (the data files of the BSD ``fortune`` program).

It is the language-modelling out-of-distribution set: other authors and other genres than the Jane
Austen novels raylin's language-model students train on (raylin.data.austen), in modern English.
Only the prose and verse collections are read, each fortune one document:

    art education food humorists kids law love medicine men-women miscellaneous people platitudes
    politics science songs-poems sports wisdom work

(7,877 fortunes, about 239,000 words, in Debian 12's ``fortunes`` 1.99.1). Left out are the collections of code,
ASCII art, Unix and Debian tips and the like (computers, linux, perl, ascii-art, ...), which are not
running text. The package is fetched with ``apt-get download`` (no root, raylin.data.debian) and
each collection is read from its plain-text file, where fortunes are separated by lines holding
a single ``%``.

Limits: fortunes are short (most under 60 words), so a 64-token window often spans two of them
(they are joined with the tokenizer's end-of-text token, like the novels); attributions ("-- Mark
Twain") are kept as part of their fortune. The package's contents change with Debian releases.
"""

from __future__ import annotations

from pathlib import Path

from raylin.data.debian import debian_package

PACKAGE = "fortunes"
COLLECTIONS = ("art", "education", "food", "humorists", "kids", "law", "love", "medicine", "men-women",
               "miscellaneous", "people", "platitudes", "politics", "science", "songs-poems", "sports", "wisdom",
               "work")
_FOLDER = Path("usr/share/games/fortunes")


def load_fortunes(collections: tuple[str, ...] = COLLECTIONS) -> list[str]:
    """Every fortune of ``collections``, in collection then file order, stripped of surrounding
    blank lines; see the module doc for what is read and its limits."""
    unknown = [name for name in collections if name not in COLLECTIONS]
    if unknown:
        raise ValueError(f"Unknown fortune collection(s) {unknown}; raylin reads {COLLECTIONS}.")
    folder = debian_package(PACKAGE) / _FOLDER
    fortunes: list[str] = []
    for name in collections:
        file = folder / name
        if not file.is_file():
            raise FileNotFoundError(f"The {PACKAGE} package has no {_FOLDER / name}; delete {folder.parent.parent.parent} "
                                    "to fetch it again.")
        entries, lines = [], []
        for line in file.read_text(encoding="utf-8", errors="replace").splitlines() + ["%"]:
            if line.strip() == "%":
                entries.append("\n".join(lines).strip())
                lines = []
            else:
                lines.append(line.rstrip())
        fortunes += [entry for entry in entries if entry]
    return fortunes
