"""CIFAR-10 in the official *binary* layout: read it, check it, and hand it from step to step.

(Where it comes from, a path or a download, is sources.py's job.) The archive is read member by member
straight from the gzip stream into memory; nothing is ever extracted to disk, so a hostile member
cannot write anywhere, and it is rejected all the same. The python-format batches are never touched:
unpickling them can execute code.

Images are kept as one uint8 array per split, NCHW `[N, 3, 32, 32]`, which is the byte order of a
record (1024 red, 1024 green, 1024 blue), so reading needs no transpose.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import constants as C
from .atomic import replacing
from .errors import UserError
from .progress import bar
from .sources import GZIP_MAGIC, Source

_MAX_BATCH_RECORDS = 10_000  # the official files hold exactly this many; more is not CIFAR-10
_MAX_META_BYTES = 4096
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Cifar10:
    train_images: np.ndarray  # uint8 [N_train, 3, 32, 32]
    train_labels: np.ndarray  # uint8 [N_train], values 0..9
    test_images: np.ndarray  # uint8 [N_test, 3, 32, 32]
    test_labels: np.ndarray  # uint8 [N_test]
    class_names: tuple[str, ...]

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train_labels), "test": len(self.test_labels)}

    def digest(self) -> str:
        """sha256 over every pixel, label and class name: equal digests mean equal data."""
        h = hashlib.sha256()
        for array in (self.train_images, self.train_labels, self.test_images, self.test_labels):
            h.update(np.ascontiguousarray(array).data)
        h.update("\n".join(self.class_names).encode())
        return h.hexdigest()

    def class_counts(self, split: str) -> list[int]:
        labels = self.train_labels if split == "train" else self.test_labels
        return np.bincount(labels, minlength=C.NUM_CLASSES).tolist()


def nhwc(images_nchw: np.ndarray) -> np.ndarray:
    """Stored NCHW uint8 -> the NHWC uint8 that the logged models take."""
    return np.ascontiguousarray(images_nchw.transpose(0, 2, 3, 1))


# --- reading and checking ----------------------------------------------------------------------------


def _wanted_members(splits: tuple[str, ...] = ("train", "test")) -> dict[str, str]:
    names = (*(C.TRAIN_BATCHES if "train" in splits else ()), *((C.TEST_BATCH,) if "test" in splits else ()),
             C.META_FILE)
    return {f"{C.BATCH_DIR}/{name}": name for name in names}


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    """Refuse members that an extractor could be tricked by, even though we never extract."""
    name = member.name
    where = f"{archive}: member {name!r}"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UserError(f"{where} has an absolute path; refusing a hostile archive")
    if ".." in name.replace("\\", "/").split("/"):
        raise UserError(f"{where} contains '..'; refusing a hostile archive")
    if member.issym() or member.islnk():
        raise UserError(f"{where} is a link (to {member.linkname!r}); refusing a hostile archive")
    if member.isdev():
        raise UserError(f"{where} is a device or FIFO; refusing a hostile archive")
    if not (member.isfile() or member.isdir()):
        raise UserError(f"{where} is not a regular file or folder; refusing it")


class _BoundedHeaders(tarfile.TarInfo):
    """A long-name or pax header larger than 1 MiB is refused before tarfile reads it into memory (a few kB
    of gzip can claim gigabytes); `_proc_member` is the hook tarfile calls per header (CPython 3.8-3.14)."""

    def _proc_member(self, tar):
        if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                         tarfile.SOLARIS_XHDTYPE) and self.size > 2**20:
            raise tarfile.HeaderError(f"an extended header of {self.size:,} bytes; refusing a hostile archive")
        return super()._proc_member(tar)


def _read_archive(path: Path, splits: tuple[str, ...]) -> dict[str, bytes]:
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"data: {path} is empty (0 bytes)")
    with path.open("rb") as fh:
        if fh.read(2) != GZIP_MAGIC:
            raise UserError(f"data: {path} is not gzip-compressed; expected {C.ARCHIVE_NAME} (binary version)")
    wanted = _wanted_members(splits)
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:gz", tarinfo=_BoundedHeaders) as tar, \
                bar(total=len(wanted), desc="read archive", unit="file") as pbar:
            for member in tar:
                _check_member(member, path)
                name = member.name.removeprefix("./")  # `tar czf x.tar.gz ./cifar-10-batches-bin` writes ./
                if name not in wanted or not member.isfile():
                    continue
                short = wanted[name]
                if short in found:
                    raise UserError(f"data: {path} holds {member.name} twice")
                limit = _MAX_META_BYTES if short == C.META_FILE else _MAX_BATCH_RECORDS * C.RECORD_BYTES
                if member.size > limit:
                    raise UserError(
                        f"data: {path}: {member.name} is {member.size:,} bytes, more than the "
                        f"{limit:,} a CIFAR-10 file can hold"
                    )
                found[short] = tar.extractfile(member).read()
                pbar.update(1)
    except EOFError:
        raise UserError(f"data: {path} is truncated (the compressed stream ends early)") from None
    except (tarfile.TarError, zlib.error, OSError) as exc:
        raise UserError(f"data: {path} is not a readable tar.gz archive ({exc})") from None
    missing = [f"{C.BATCH_DIR}/{n}" for n in wanted.values() if n not in found]
    if missing:
        raise UserError(f"data: {path} lacks {', '.join(missing)} (is it the binary version of CIFAR-10?)")
    return found


def _read_directory(path: Path, splits: tuple[str, ...]) -> dict[str, bytes]:
    folder = path / C.BATCH_DIR if (path / C.BATCH_DIR).is_dir() else path
    found: dict[str, bytes] = {}
    for short in _wanted_members(splits).values():
        file = folder / short
        if not file.is_file():
            raise UserError(f"data: {file} is missing (expected the extracted {C.BATCH_DIR} folder)")
        limit = _MAX_META_BYTES if short == C.META_FILE else _MAX_BATCH_RECORDS * C.RECORD_BYTES
        if file.stat().st_size > limit:
            raise UserError(f"data: {file} is {file.stat().st_size:,} bytes, more than {limit:,}")
        found[short] = file.read_bytes()
    return found


def _records(name: str, raw: bytes, where: str) -> np.ndarray:
    if not raw:
        raise UserError(f"data: {where}/{name} is empty")
    if len(raw) % C.RECORD_BYTES:
        raise UserError(
            f"data: {where}/{name} is {len(raw):,} bytes, not a whole number of "
            f"{C.RECORD_BYTES}-byte records (truncated, or not the binary version)"
        )
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, C.RECORD_BYTES)
    bad = np.flatnonzero(records[:, 0] >= C.NUM_CLASSES)
    if bad.size:
        raise UserError(
            f"data: {where}/{name} record {int(bad[0])} has label {int(records[bad[0], 0])}; "
            f"labels must be 0-{C.NUM_CLASSES - 1} ({bad.size} bad records)"
        )
    return records


def _split(names: tuple[str, ...], files: dict[str, bytes], where: str) -> tuple[np.ndarray, np.ndarray]:
    records = [_records(n, files[n], where) for n in names]
    total = sum(len(r) for r in records)
    images = np.empty((total, *C.IMAGE_SHAPE), dtype=np.uint8)
    labels = np.empty(total, dtype=np.uint8)
    start = 0
    for r in records:
        images[start : start + len(r)] = r[:, 1:].reshape(-1, *C.IMAGE_SHAPE)
        labels[start : start + len(r)] = r[:, 0]
        start += len(r)
    return images, labels


def _class_names(raw: bytes, where: str) -> tuple[str, ...]:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise UserError(f"data: {where}/{C.META_FILE} is not ASCII text") from None
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(names) != C.NUM_CLASSES or len(set(names)) != C.NUM_CLASSES:
        raise UserError(
            f"data: {where}/{C.META_FILE} should list {C.NUM_CLASSES} distinct class names, found {len(names)}"
        )
    # They become parts of metric names (test_accuracy_<name>, count_<name>): what MLflow takes there.
    if bad := next((n for n in names if not re.fullmatch(r"[A-Za-z0-9_\-. :/]{1,100}", n)
                    or posixpath.normpath(f"m_{n}") != f"m_{n}"), None):  # MLflow refuses x/, a//b, a/../b
        raise UserError(f"data: {where}/{C.META_FILE} names a class {bad!r}: class names may hold only letters, "
                        "digits, spaces and _ - . : /")
    return names


def read(source: Source, expected: dict[str, int] | None = C.OFFICIAL_RECORDS,
         splits: tuple[str, ...] = ("train", "test")) -> Cifar10:
    """Read and validate CIFAR-10 from a local archive or folder.

    `expected` gives the record counts each split must hold (the official 50,000 / 10,000 by
    default); None accepts any consistent size, for small synthetic archives. A split left out of
    `splits` is not read and comes back empty.
    """
    files = _read_archive(source.path, splits) if source.kind == "archive" else _read_directory(source.path, splits)
    where = str(source.path) if source.kind == "directory" else f"{source.path}:{C.BATCH_DIR}"
    empty = (np.empty((0, *C.IMAGE_SHAPE), np.uint8), np.empty(0, np.uint8))
    train_images, train_labels = _split(C.TRAIN_BATCHES, files, where) if "train" in splits else empty
    test_images, test_labels = _split((C.TEST_BATCH,), files, where) if "test" in splits else empty
    dataset = Cifar10(train_images, train_labels, test_images, test_labels, _class_names(files[C.META_FILE], where))
    if expected is not None:
        for split in splits:
            count = dataset.sizes()[split]
            if count != expected[split]:
                raise UserError(
                    f"data: {source.path} has {count:,} {split} records, expected {expected[split]:,}"
                )
    return dataset


# --- the hand-off between steps: plain .npy files that load in well under a second -------------------

_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


def save(dataset: Cifar10, directory: Path, digest: str | None = None) -> str:
    """Write the arrays and a meta.json into `directory` atomically (a temp folder renamed into place).

    meta.json records the sha256 of each array, so a reader that needs only the test split can
    verify just that.
    """
    digest = digest or dataset.digest()
    with replacing(directory, folder=True) as tmp:
        arrays = {}
        for name in _ARRAYS:
            array = np.ascontiguousarray(getattr(dataset, name))
            np.save(tmp / f"{name}.npy", array, allow_pickle=False)
            arrays[name] = hashlib.sha256(array.data).hexdigest()
        meta = {
            "class_names": list(dataset.class_names), "sha256": digest, "sizes": dataset.sizes(), "arrays": arrays,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return digest


def files(splits: tuple[str, ...]) -> tuple[str, ...]:
    """The files of what `save` wrote that `load` reads for `splits`."""
    return ("meta.json", *(f"{name}.npy" for name in _ARRAYS if name.split("_")[0] in splits))


def load(directory: Path, splits: tuple[str, ...] = ("train", "test")) -> Cifar10:
    """Load what `save` wrote, refusing any array whose sha256 differs from meta.json.

    Splits not asked for come back as empty arrays (evaluation needs only the test split).
    """
    directory = Path(directory)
    try:
        meta = json.loads((directory / "meta.json").read_text())
        arrays = {}
        for name in _ARRAYS:
            if name.split("_")[0] not in splits:
                shape = (0, *C.IMAGE_SHAPE) if name.endswith("images") else (0,)
                arrays[name] = np.empty(shape, dtype=np.uint8)
                continue
            array = np.load(directory / f"{name}.npy", allow_pickle=False)
            if hashlib.sha256(np.ascontiguousarray(array).data).hexdigest() != meta["arrays"][name]:
                raise UserError(f"dataset at {directory}: {name}.npy does not match its recorded sha256")
            arrays[name] = array
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"dataset at {directory} is unreadable: {exc}") from None
    return Cifar10(**arrays, class_names=tuple(meta["class_names"]))


def holdout(labels: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out): indices into `labels`, each in ascending order; `count` / NUM_CLASSES images of each
    class held out, drawn with `seed`. The same labels, count and seed give the same split everywhere."""
    if count == 0:
        return np.arange(len(labels)), np.empty(0, dtype=np.int64)
    per_class = count // C.NUM_CLASSES
    rng = np.random.default_rng(seed)
    held = []
    for c in range(C.NUM_CLASSES):
        members = np.flatnonzero(labels == c)
        if len(members) <= per_class:
            raise UserError(f"validation={count} holds out {per_class} images of class {c}, but the training set "
                            f"has only {len(members)} of them; hold out fewer")
        held.append(rng.choice(members, per_class, replace=False))
    held_out = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(len(labels)), held_out), held_out


def digest_of(directory: Path) -> str:
    """The dataset sha256 recorded by `save`, without loading the arrays."""
    return json.loads((Path(directory) / "meta.json").read_text())["sha256"]
