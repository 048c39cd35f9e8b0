"""embedjax.data.stsb_files / sick_files: the lookup order, and the download path on archives built
here and served from local files (file:// URLs or a monkeypatched fetch; no network)."""

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from embedjax.data import download, sick_files, stsb_files
from embedjax.data import tfds_builders

STSB_HEADER_ROW = "main-captions\tMSRvid\t2012test\t0001\t5.000\tA plane is taking off.\tAn air plane is taking off.\n"
SICK_ROWS = ("pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"
             "1\tA man plays.\tA man is playing.\t4.5\tENTAILMENT\n")


def write_stsb(d: Path, splits=("train", "dev")) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for split in splits:
        (d / tfds_builders.STSB_FILES[split]).write_text(STSB_HEADER_ROW)
    return d


def write_sick(d: Path, splits=("train", "trial")) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for split in splits:
        (d / tfds_builders.SICK_FILES[split]).write_text(SICK_ROWS)
    return d


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No EMBEDJAX_DATA, an empty cache, a working directory without ../shared/data and no
    repository data: only what each test puts in place is found."""
    monkeypatch.delenv("EMBEDJAX_DATA", raising=False)
    monkeypatch.setenv("EMBEDJAX_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "a" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setattr(download, "_repo_data_dir", lambda: tmp_path / "repo-parent" / "shared" / "data")
    return tmp_path


def no_fetch(*args, **kwargs):
    raise AssertionError(f"unexpected download {args}")


# ---------------------------------------------------------------------------- lookup order


def test_lookup_order(isolated, monkeypatch):
    monkeypatch.setattr(download, "fetch", no_fetch)
    tmp = isolated
    cached = write_stsb(tmp / "cache" / "stsb")
    assert stsb_files() == {"train": cached / "sts-train.csv", "dev": cached / "sts-dev.csv"}

    repo = write_stsb(tmp / "repo-parent" / "shared" / "data" / "stsb")
    assert stsb_files()["dev"] == repo / "sts-dev.csv"  # beside the repository beats the cache

    shared = write_stsb(tmp / "a" / "shared" / "data" / "stsb", ("train", "dev", "test"))
    assert stsb_files() == {s: shared / n for s, n in tfds_builders.STSB_FILES.items()}  # ../shared/data next

    env = write_stsb(tmp / "env" / "stsb")
    monkeypatch.setenv("EMBEDJAX_DATA", str(tmp / "env"))
    assert stsb_files()["train"] == env / "sts-train.csv"

    own = write_stsb(tmp / "own")  # files directly in data_dir
    assert stsb_files(own)["train"] == own / "sts-train.csv"
    assert stsb_files(str(own))["dev"] == own / "sts-dev.csv"


def test_layouts_and_sick(isolated, monkeypatch):
    monkeypatch.setattr(download, "fetch", no_fetch)
    archive_layout = write_stsb(isolated / "x" / "stsbenchmark")
    assert stsb_files(isolated / "x")["train"] == archive_layout / "sts-train.csv"
    sick = write_sick(isolated / "y" / "sick", ("train", "trial", "test"))
    assert sick_files(isolated / "y") == {s: sick / n for s, n in tfds_builders.SICK_FILES.items()}
    monkeypatch.setenv("EMBEDJAX_DATA", str(isolated / "y"))
    assert sick_files()["trial"] == sick / "SICK_trial.txt"


def test_explicit_places_are_strict(isolated, monkeypatch):
    monkeypatch.setattr(download, "fetch", no_fetch)
    write_stsb(isolated / "cache" / "stsb")  # would be found, but a named place must hold the data
    with pytest.raises(FileNotFoundError, match=r"STS-B: data_dir .*missing.* does not hold sts-train.csv and "
                                                r"sts-dev.csv"):
        stsb_files(isolated / "missing")
    monkeypatch.setenv("EMBEDJAX_DATA", str(isolated / "empty"))
    (isolated / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"\$EMBEDJAX_DATA"):
        stsb_files()
    # an incomplete copy is an error naming the missing file, not a silent download
    write_sick(isolated / "part" / "sick", ("train",))
    with pytest.raises(FileNotFoundError, match="lacks SICK_trial.txt"):
        sick_files(isolated / "part")


def test_not_found_without_download(isolated, monkeypatch):
    monkeypatch.setattr(download, "fetch", no_fetch)
    with pytest.raises(FileNotFoundError) as err:
        sick_files(download=False)
    message = str(err.value)
    for what in ("SICK not found", "SICK_train.txt and SICK_trial.txt", "../shared/data", "download cache",
                 str(isolated / "cache"), "EMBEDJAX_DATA", "download=False"):
        assert what in message


# ---------------------------------------------------------------------------- download


def stsb_archive(path: Path, splits=("train", "dev", "test")) -> Path:
    """A tiny Stsbenchmark.tar.gz laid out like the original (stsbenchmark/sts-*.csv + readme)."""
    with tarfile.open(path, "w:gz") as tar:
        for name in [tfds_builders.STSB_FILES[s] for s in splits] + ["readme.txt"]:
            data = STSB_HEADER_ROW.encode()
            info = tarfile.TarInfo(f"stsbenchmark/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sick_zip(path: Path, name: str) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(name, SICK_ROWS)
        z.writestr(f"__MACOSX/._{name}", "junk")
    return path


def test_download_stsb_from_file_url_then_cache(isolated, monkeypatch):
    served = stsb_archive(isolated / "Stsbenchmark.tar.gz")
    monkeypatch.setattr(download.STSB, "archives", {"all": served.as_uri()})
    calls = []
    real = download.fetch
    monkeypatch.setattr(download, "fetch", lambda url, dest, desc="": calls.append(url) or real(url, dest, desc))

    files = stsb_files()
    cache = isolated / "cache" / "stsb"
    assert files == {s: cache / n for s, n in tfds_builders.STSB_FILES.items()}
    assert calls == [served.as_uri()]
    assert (cache / "sts-dev.csv").read_text() == STSB_HEADER_ROW
    assert sorted(p.name for p in (isolated / "cache").iterdir()) == ["stsb"]  # no staging left behind

    assert stsb_files() == files and calls == [served.as_uri()]  # the second call reads the cache
    from embedjax.data import read_stsb

    assert read_stsb(files["train"])[0].score == 5.0


def test_download_sick_through_fetch(isolated, monkeypatch):
    zips = {split: sick_zip(isolated / f"sick_{split}.zip", name) for split, name in tfds_builders.SICK_FILES.items()}
    urls = dict(tfds_builders.SICK_URLS)
    calls = []

    def fake_fetch(url, dest, desc=""):  # serves the archive built above for each real URL
        calls.append(url)
        split = next(s for s, u in urls.items() if u == url)
        dest.write_bytes(zips[split].read_bytes())
        return dest

    monkeypatch.setattr(download, "fetch", fake_fetch)
    files = sick_files()
    cache = isolated / "cache" / "sick"
    assert files == {s: cache / n for s, n in tfds_builders.SICK_FILES.items()}
    assert calls == list(urls.values())
    assert sorted(p.name for p in cache.iterdir()) == sorted(tfds_builders.SICK_FILES.values())
    assert sick_files() == files and len(calls) == 3


def test_corrupt_archive_is_a_clear_error(isolated, monkeypatch):
    bad = isolated / "Stsbenchmark.tar.gz"
    bad.write_bytes(b"<html>404 not found</html>")
    monkeypatch.setattr(download.STSB, "archives", {"all": bad.as_uri()})
    with pytest.raises(download.DownloadError, match=r"STS-B not found.*downloading it failed.*not a readable zip or tar "
                                                     r"archive"):
        stsb_files()
    cache = isolated / "cache"
    assert list(cache.iterdir()) == []  # nothing half-extracted that a later call would take for the data

    # an archive without the expected files
    monkeypatch.setattr(download.STSB, "archives", {"all": sick_zip(isolated / "wrong.zip", "x.txt").as_uri()})
    with pytest.raises(download.DownloadError, match=r"has no sts-train.csv, sts-dev.csv \(it holds .*x.txt"):
        stsb_files()

    # an unreachable URL names it
    missing = (isolated / "nowhere.tar.gz").as_uri()
    monkeypatch.setattr(download.STSB, "archives", {"all": missing})
    with pytest.raises(download.DownloadError, match=f"downloading {missing}"):
        stsb_files()
    assert list(cache.iterdir()) == []

    # and once the archive is good, the same call succeeds
    monkeypatch.setattr(download.STSB, "archives", {"all": stsb_archive(isolated / "good.tar.gz").as_uri()})
    assert stsb_files()["dev"] == cache / "stsb" / "sts-dev.csv"
