"""Jane Austen's novels from r-cran-janeaustenr, and the rootless Debian fetch behind them.

Like the shipped-model tests, these use the real cache ($RAYLIN_CACHE, default ~/.cache/raylin):
the first run downloads the package (about 1.6 MB) with apt-get, later runs read cached text.
"""

from __future__ import annotations

import os
import shutil

import pytest

from raylin.data.austen import NOVELS, load_austen
from raylin.data.debian import debian_dir, debian_package


def require_apt() -> None:
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        if os.environ.get("CI"):
            pytest.fail("apt-get and dpkg are needed to fetch Debian packages (Debian/Ubuntu runners)")
        pytest.skip("apt-get and dpkg are needed to fetch Debian packages")


@pytest.fixture(scope="module")
def novels() -> dict[str, str]:
    if not (debian_dir() / "r-cran-janeaustenr").is_dir():
        require_apt()
    return load_austen()


def test_six_novels_with_their_openings_and_lengths(novels):
    assert tuple(novels) == NOVELS
    assert novels["prideprejudice"].startswith("PRIDE AND PREJUDICE")
    assert "It is a truth universally acknowledged, that a single man in possession" in novels["prideprejudice"]
    assert novels["emma"].startswith("EMMA") and novels["persuasion"].startswith("Persuasion")
    words = {name: len(text.split()) for name, text in novels.items()}
    # janeaustenr 1.0.0; a loose band so another packaged version of the same texts still passes.
    expected = {"emma": 157_441, "mansfieldpark": 159_540, "northangerabbey": 77_141,
                "persuasion": 83_283, "prideprejudice": 121_567, "sensesensibility": 118_565}
    for name, count in expected.items():
        assert abs(words[name] - count) < 0.02 * count, (name, words[name])
    assert all("\n\n" in text and "None" not in text.split("\n") for text in novels.values())


def test_later_loads_read_the_cached_text(novels, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "no-programs"))  # no apt-get: the cached files must suffice
    assert load_austen(("persuasion",)) == {"persuasion": novels["persuasion"]}


def test_unknown_novel_names_the_six():
    with pytest.raises(ValueError, match="prideprejudice"):
        load_austen(("lady_susan",))


def test_debian_package_extracts_once_into_the_cache(tmp_path, monkeypatch):
    require_apt()
    monkeypatch.setenv("RAYLIN_CACHE", str(tmp_path))
    root = debian_package("libsonic0")  # 11 kB
    assert root == tmp_path / "debian" / "libsonic0"
    assert list(root.glob("usr/lib/*/libsonic.so.0*"))
    assert [p.name for p in (tmp_path / "debian").iterdir()] == ["libsonic0"]  # no staging left behind
    monkeypatch.setenv("PATH", str(tmp_path / "no-programs"))
    assert debian_package("libsonic0") == root  # already extracted: apt is not asked again


def test_debian_errors_name_the_problem_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYLIN_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="not a Debian package name"):
        debian_package("../etc")
    monkeypatch.setenv("PATH", str(tmp_path / "no-programs"))
    with pytest.raises(FileNotFoundError, match=r"apt-get.*not found.*apt-get download r-cran-janeaustenr"):
        debian_package("r-cran-janeaustenr")
