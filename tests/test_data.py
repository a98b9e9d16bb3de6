import gzip
import hashlib
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest

from cifar10_cnn import constants as C
from cifar10_cnn import data, sources, synthetic
from cifar10_cnn.errors import UserError


def read(path: Path, expected=None) -> data.Cifar10:
    return data.read(sources.Source(path, "archive", str(path)), expected)


def test_reads_every_record_with_labels_and_pixels_intact(archive):
    files = synthetic.batch_files()
    ds = read(archive)
    assert ds.sizes() == {"train": 200, "test": 100}
    assert ds.class_names == C.CLASS_NAMES
    assert ds.train_images.shape == (200, 3, 32, 32) and ds.train_images.dtype == np.uint8
    first = np.frombuffer(files[C.TRAIN_BATCHES[0]], np.uint8).reshape(-1, C.RECORD_BYTES)
    assert np.array_equal(ds.train_labels[:40], first[:, 0])
    assert np.array_equal(ds.train_images[:40].reshape(40, -1), first[:, 1:])
    last = np.frombuffer(files[C.TEST_BATCH], np.uint8).reshape(-1, C.RECORD_BYTES)
    assert np.array_equal(ds.test_images.reshape(100, -1), last[:, 1:])
    assert ds.class_counts("test") == [10] * 10


def test_official_sizes_are_required_by_default(archive):
    with pytest.raises(UserError, match=r"has 200 train records, expected 50,000"):
        data.read(sources.Source(archive, "archive", str(archive)))


def test_reads_an_extracted_folder_and_its_parent(tmp_path):
    root = synthetic.write_folder(tmp_path, synthetic.batch_files())
    for path in (root, root / C.BATCH_DIR):
        ds = data.read(sources.resolve_source(str(path), tmp_path / "cache"), None)
        assert ds.sizes() == {"train": 200, "test": 100}


def test_digest_changes_with_a_single_pixel(archive):
    ds = read(archive)
    before = ds.digest()
    ds.test_images[0, 0, 0, 0] ^= 1
    assert ds.digest() != before


# --- hostile and broken archives: one clear message each ----------------------------------------


def member(name, kind=tarfile.REGTYPE, size=1, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, (size if kind == tarfile.REGTYPE else 0), linkname
    return info


@pytest.mark.parametrize(
    "extra, message",
    [
        (member("/etc/evil"), "absolute path"),
        (member(f"{C.BATCH_DIR}/../../evil"), r"contains '\.\.'"),
        (member("link", tarfile.SYMTYPE, linkname="/etc/passwd"), "is a link"),
        (member("hard", tarfile.LNKTYPE, linkname=f"{C.BATCH_DIR}/{C.TEST_BATCH}"), "is a link"),
        (member("dev", tarfile.CHRTYPE), "device or FIFO"),
        (member("fifo", tarfile.FIFOTYPE), "device or FIFO"),
    ],
)
def test_hostile_members_are_refused(tmp_path, extra, message):
    path = synthetic.write_archive(tmp_path / "evil.tar.gz", synthetic.batch_files(), extra=[extra])
    with pytest.raises(UserError, match=message) as err:
        read(path)
    assert str(path) in str(err.value) and "hostile" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar.gz"]  # nothing extracted


def test_truncated_batch_names_the_file(tmp_path):
    files = synthetic.batch_files()
    files[C.TRAIN_BATCHES[2]] = files[C.TRAIN_BATCHES[2]][:-100]
    path = synthetic.write_archive(tmp_path / "a.tar.gz", files)
    with pytest.raises(UserError, match=r"data_batch_3\.bin is 122,820 bytes, not a whole number of 3073-byte"):
        read(path)


def test_label_above_nine(tmp_path):
    files = synthetic.batch_files()
    raw = bytearray(files[C.TEST_BATCH])
    raw[5 * C.RECORD_BYTES] = 12
    files[C.TEST_BATCH] = bytes(raw)
    with pytest.raises(UserError, match=r"test_batch\.bin record 5 has label 12; labels must be 0-9"):
        read(synthetic.write_archive(tmp_path / "a.tar.gz", files))


def test_empty_batch(tmp_path):
    files = synthetic.batch_files()
    files[C.TEST_BATCH] = b""
    with pytest.raises(UserError, match=r"test_batch\.bin is empty"):
        read(synthetic.write_archive(tmp_path / "a.tar.gz", files))


def test_missing_member(tmp_path):
    files = synthetic.batch_files()
    del files[C.TRAIN_BATCHES[4]]
    with pytest.raises(UserError, match=r"lacks cifar-10-batches-bin/data_batch_5\.bin"):
        read(synthetic.write_archive(tmp_path / "a.tar.gz", files))


def test_oversized_member_is_refused_before_reading(tmp_path):
    files = synthetic.batch_files()
    files[C.TEST_BATCH] = bytes(10_001 * C.RECORD_BYTES)
    with pytest.raises(UserError, match=r"test_batch\.bin is 30,733,073 bytes, more than the 30,730,000"):
        read(synthetic.write_archive(tmp_path / "a.tar.gz", files))


def test_a_long_name_header_claiming_gigabytes_is_refused_before_it_is_read(tmp_path):
    header = tarfile.TarInfo("././@LongLink")
    header.type, header.size = tarfile.GNUTYPE_LONGNAME, 2**30  # tarfile would read a GiB into memory
    path = tmp_path / "a.tar.gz"
    with gzip.open(path, "wb") as gz:
        gz.write(header.tobuf(format=tarfile.GNU_FORMAT)[:512] + bytes(1024))
    with pytest.raises(UserError, match=r"an extended header of 1,073,741,824 bytes; refusing a hostile archive"):
        read(path)


def test_an_archive_packed_with_a_leading_dot_slash_is_read(tmp_path):  # tar czf x ./cifar-10-batches-bin
    dataset = read(synthetic.write_archive(tmp_path / "a.tar.gz", synthetic.batch_files(), prefix=f"./{C.BATCH_DIR}"),
                   expected=None)
    assert len(dataset.train_labels) > 0 and len(dataset.test_labels) > 0


def test_meta_with_wrong_number_of_classes(tmp_path):
    files = synthetic.batch_files()
    files[C.META_FILE] = b"cat\ndog\n"
    with pytest.raises(UserError, match=r"batches\.meta\.txt should list 10 distinct class names, found 2"):
        read(synthetic.write_archive(tmp_path / "a.tar.gz", files))
    for bad in ("cat?", "cat/"):  # no metric could be named after it (MLflow refuses test_accuracy_cat/ too)
        files[C.META_FILE] = "\n".join([*C.CLASS_NAMES[:9], bad]).encode()
        with pytest.raises(UserError, match=rf"batches\.meta\.txt names a class '{re.escape(bad)}': class names"):
            read(synthetic.write_archive(tmp_path / "b.tar.gz", files))


def test_empty_file(tmp_path):
    path = tmp_path / "empty.tar.gz"
    path.touch()
    with pytest.raises(UserError, match=r"empty\.tar\.gz is empty \(0 bytes\)"):
        read(path)


def test_not_gzip(tmp_path):
    path = tmp_path / "plain.tar"
    with tarfile.open(path, "w") as tar:
        tar.add(synthetic.write_folder(tmp_path / "f", synthetic.batch_files()), arcname=".")
    with pytest.raises(UserError, match=r"plain\.tar is not gzip-compressed"):
        read(path)


def test_truncated_gzip_stream(tmp_path, archive):
    path = tmp_path / "cut.tar.gz"
    path.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(UserError, match=r"cut\.tar\.gz is truncated"):
        read(path)


def test_gzip_that_is_not_a_tar(tmp_path):
    path = tmp_path / "notar.tar.gz"
    path.write_bytes(gzip.compress(b"hello world" * 100))
    with pytest.raises(UserError, match=r"notar\.tar\.gz is not a readable tar\.gz archive"):
        read(path)


# --- finding the source ------------------------------------------------------------------------------


def test_auto_prefers_the_cache_then_the_environment(tmp_path, archive):
    cache = tmp_path / "cache"
    src = sources.resolve_source("auto", cache, env={C.ARCHIVE_ENV: str(archive)})
    assert src.path == archive.resolve() and src.kind == "archive"
    cache.mkdir()
    (cache / C.ARCHIVE_NAME).write_bytes(archive.read_bytes())
    src = sources.resolve_source("auto", cache, env={C.ARCHIVE_ENV: str(archive)})
    assert src.path == (cache / C.ARCHIVE_NAME).resolve() and src.origin == C.OFFICIAL_URL


def test_auto_without_cache_or_env_would_download_official(tmp_path):
    assert sources.resolve_source("auto", tmp_path, env={}, fetch=False) is None


def test_a_url_downloaded_before_is_known_without_fetching(tmp_path, archive):
    url = "https://example.org/cifar.tar.gz"
    assert sources.resolve_source(url, tmp_path, fetch=False) is None  # not yet: ingest must download it
    sources.download(archive.as_uri(), sources._cache_path(url, tmp_path))  # as ingest's download leaves it
    src = sources.resolve_source(url, tmp_path, fetch=False)  # now its bytes decide whether ingest is reused
    assert src.origin == url and src.path.read_bytes() == archive.read_bytes()


def test_environment_naming_a_missing_file(tmp_path):
    with pytest.raises(UserError, match=rf"{C.ARCHIVE_ENV} names .*nope\.tar\.gz, which does not exist"):
        sources.resolve_source("auto", tmp_path, env={C.ARCHIVE_ENV: str(tmp_path / "nope.tar.gz")})


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match=r"data: .*missing\.tar\.gz does not exist"):
        sources.resolve_source(str(tmp_path / "missing.tar.gz"), tmp_path)


def test_file_url_is_a_local_path(tmp_path, archive):
    assert sources.resolve_source(archive.as_uri(), tmp_path).path == archive.resolve()


def test_download_checks_md5_and_keeps_nothing_on_mismatch(tmp_path, archive):
    dest = tmp_path / "cache" / C.ARCHIVE_NAME
    with pytest.raises(UserError, match=r"downloaded with md5 [0-9a-f]{32}, expected 0{32}.*nothing was kept"):
        sources.download(archive.as_uri(), dest, md5="0" * 32)
    assert list(dest.parent.iterdir()) == []  # no partial file, no file under the final name


def test_download_renames_into_place_when_md5_matches(tmp_path, archive):
    dest = tmp_path / "cache" / C.ARCHIVE_NAME
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    assert sources.download(archive.as_uri(), dest, md5=md5) == dest.resolve()
    assert dest.read_bytes() == archive.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == [C.ARCHIVE_NAME]


def test_unreachable_url(tmp_path):
    with pytest.raises(UserError, match=r"could not download http://127\.0\.0\.1:9/cifar\.tar\.gz"):
        sources.download("http://127.0.0.1:9/cifar.tar.gz", tmp_path / "x.tar.gz", timeout_s=5)
    assert list(tmp_path.iterdir()) == []
    for url in ("http://[::1/x.tar.gz", "http://exa mple.com/x.tar.gz"):  # malformed: one line, not a traceback
        with pytest.raises(UserError, match="data: "):
            sources.resolve_source(url, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("chunked", [False, True])
def test_a_download_the_server_cuts_short_keeps_nothing(tmp_path, chunked):
    import http.server
    import threading

    class Cut(http.server.BaseHTTPRequestHandler):  # promises 1 MB, sends 1 kB, hangs up
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.send_response(200)
            self.send_header(*(("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(2**20))))
            self.end_headers()
            self.wfile.write(b"400\r\n" + bytes(1024) + b"\r\n" if chunked else bytes(1024))
            self.wfile.flush()
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Cut)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/cut.tar.gz"
    try:
        for _ in range(2):  # and the next run does not take a kept partial file for the archive
            with pytest.raises(UserError, match="stopped after 1,024 of its 1,048,576 bytes" if not chunked
                               else "could not download"):
                sources.resolve_source(url, tmp_path / "cache")
    finally:
        server.shutdown()
    assert not any((tmp_path / "cache").iterdir())


# --- the hand-off between steps ----------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path, archive):
    ds = read(archive)
    digest = data.save(ds, tmp_path / "dataset")
    back = data.load(tmp_path / "dataset")
    assert back.digest() == digest == data.digest_of(tmp_path / "dataset")
    test_only = data.load(tmp_path / "dataset", splits=("test",))
    assert len(test_only.train_labels) == 0 and np.array_equal(test_only.test_images, ds.test_images)
    assert [p.name for p in tmp_path.iterdir()] == ["dataset"]  # the temp folder was renamed, not left


def test_load_refuses_altered_arrays(tmp_path, archive):
    data.save(read(archive), tmp_path / "dataset")
    labels = np.load(tmp_path / "dataset" / "test_labels.npy")
    labels[0] = (labels[0] + 1) % 10
    np.save(tmp_path / "dataset" / "test_labels.npy", labels)
    with pytest.raises(UserError, match=r"test_labels\.npy does not match its recorded sha256"):
        data.load(tmp_path / "dataset")
