"""The tiny data helper the FWP scripts share: download, text corpora, stream batching.

    download(url, dest, sha256=None)          -> dest (a verified file, written atomically)
    fetch_uea(name, data_dir)                 -> paths of NAME_TRAIN.ts, NAME_TEST.ts (UEA/UCR archive)
    fetch_speech_commands(words, data_dir)    -> folder with one sub-folder of .wav files per word
    fetch_sepsis(data_dir)                    -> folder with the PhysioNet 2019 .psv files (sets A and B)
    load_text(name_or_path, tokenizer, data_dir) -> train, valid, test (LongTensors), vocab (list of str)
    batchify(tokens, n_streams)               -> (n_streams, n) parallel streams
    segment(streams, i, seq_len)              -> inputs, targets of the i-th segment (state can be carried)

Every URL lives in URLS below so a mirror can be swapped in (WikiText from wikitext.smerity.com, enwik8 from
mattmahoney.net, UEA/UCR sets from timeseriesclassification.com, Speech Commands from download.tensorflow.org,
PhysioNet 2019 from physionet.org, one .psv per patient listed from the set's index page). Downloads are cached under
--data_dir (default ~/.cache/fwp), verified and written atomically; a failed download prints the URL and the path
where the files can be put by hand. The tests run the download code against a local HTTP server serving small files
they build, not against these hosts. User-facing problems raise DataError (the scripts print it and exit non-zero).
"""

import hashlib
import os
import re
import shutil
import tarfile
import urllib.request
import zipfile
from array import array

import numpy as np
import torch
from tqdm import tqdm

URLS = {
    "wikitext-103": "https://wikitext.smerity.com/wikitext-103-v1.zip",
    "wikitext-2": "https://wikitext.smerity.com/wikitext-2-v1.zip",
    "enwik8": "http://mattmahoney.net/dc/enwik8.zip",
    "uea": "https://timeseriesclassification.com/aeon-toolkit/{name}.zip",  # {name}: EigenWorms, ...
    "speech_commands": "http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz",
    "sepsis": "https://physionet.org/files/challenge-2019/1.0.0/training/",  # + training_setA/ and training_setB/
}
DATA_DIR = os.path.expanduser("~/.cache/fwp")


class DataError(Exception):
    """A problem the user can fix (missing file, failed download, empty corpus)."""


def sha256sum(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(url, dest, sha256=None):
    """Fetch url to dest (temp file + rename) with a progress bar; verify sha256 when given."""
    if os.path.exists(dest) and (sha256 is None or sha256sum(dest) == sha256):
        return dest
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    tmp = f"{dest}.part{os.getpid()}"
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(dest)) as bar:
                for block in iter(lambda: r.read(1 << 20), b""):
                    f.write(block)
                    bar.update(len(block))
        if sha256 is not None and sha256sum(tmp) != sha256:
            raise DataError(f"checksum mismatch for {url}: the download is corrupt or the file changed upstream.")
        os.replace(tmp, dest)
    except (OSError, ValueError) as e:
        raise DataError(f"could not download {url} ({e}). Download it by hand and put it at {dest}") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def _unzip_member(zip_path, member, dest):
    """Extract one member of a zip to dest atomically."""
    if not os.path.exists(dest):
        try:
            with zipfile.ZipFile(zip_path) as z, open(dest + ".part", "wb") as f:
                f.write(z.read(member))
        except (zipfile.BadZipFile, KeyError) as e:
            raise DataError(f"{zip_path} is not the expected archive ({e}); delete it and run again.") from e
        os.replace(dest + ".part", dest)
    return dest


def fetch_uea(name, data_dir=DATA_DIR):
    """NAME_TRAIN.ts and NAME_TEST.ts of one UEA/UCR data set, from the archive's zip (members found by name)."""
    folder = os.path.join(data_dir, "uea")
    dests = [os.path.join(folder, f"{name}_{split}.ts") for split in ("TRAIN", "TEST")]
    if not all(os.path.exists(d) for d in dests):
        zip_path = download(URLS["uea"].format(name=name), os.path.join(folder, f"{name}.zip"))
        try:
            with zipfile.ZipFile(zip_path) as z:
                members = {os.path.basename(m): m for m in z.namelist()}
        except zipfile.BadZipFile as e:
            raise DataError(f"{zip_path} is not a zip archive ({e}); delete it and run again.") from e
        for dest in dests:
            if os.path.basename(dest) not in members:
                raise DataError(f"{zip_path} has no {os.path.basename(dest)}: is {name!r} a UEA/UCR data set name?")
            _unzip_member(zip_path, members[os.path.basename(dest)], dest)
    return dests


def fetch_speech_commands(words, data_dir=DATA_DIR):
    """Speech Commands v0.02: download the archive (2.3 GB) once and extract the .wav files of the given words."""
    folder = os.path.join(data_dir, "speech_commands")
    if not all(os.path.isdir(os.path.join(folder, w)) for w in words):
        archive = download(URLS["speech_commands"], os.path.join(data_dir, "speech_commands_v0.02.tar.gz"))
        tmp = folder + f".part{os.getpid()}"
        try:
            with tarfile.open(archive) as tar:
                keep = [m for m in tar.getmembers() if m.isfile() and m.name.lstrip("./").split("/")[0] in words]
                tar.extractall(tmp, members=keep, filter="data")
        except (tarfile.TarError, OSError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise DataError(f"{archive} could not be extracted ({e}); delete it and run again.") from e
        for w in words:  # one rename per word folder: a folder that exists is complete
            if os.path.isdir(os.path.join(tmp, w)) and not os.path.isdir(os.path.join(folder, w)):
                os.makedirs(folder, exist_ok=True)
                os.replace(os.path.join(tmp, w), os.path.join(folder, w))
        shutil.rmtree(tmp, ignore_errors=True)
        missing = [w for w in words if not os.path.isdir(os.path.join(folder, w))]
        if missing:
            raise DataError(f"{archive} holds no folder for {', '.join(missing)}.")
    return folder


def fetch_sepsis(data_dir=DATA_DIR):
    """PhysioNet 2019: one .psv per patient, listed on the index pages of training_setA/ and training_setB/."""
    folder = os.path.join(data_dir, "sepsis")
    for part in ("training_setA", "training_setB"):
        dest_dir = os.path.join(folder, part)
        if os.path.exists(os.path.join(dest_dir, "COMPLETE")):
            continue
        url = URLS["sepsis"] + part + "/"
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                names = sorted(set(re.findall(r'href="(p\d+\.psv)"', r.read().decode("utf-8", "replace"))))
        except (OSError, ValueError) as e:
            raise DataError(f"could not list {url} ({e}). Download the .psv files by hand into {dest_dir}/ and "
                            "create an empty file COMPLETE there.") from e
        if not names:
            raise DataError(f"{url} lists no p*.psv files; download them by hand into {dest_dir}/ (then COMPLETE).")
        for name in tqdm(names, desc=part):
            download(url + name, os.path.join(dest_dir, name))  # skips files already there
        open(os.path.join(dest_dir, "COMPLETE"), "w").close()
    return folder


def _read(path, encoding="utf-8"):
    try:
        with open(path, encoding=encoding) as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from e


def _raw_splits(name_or_path, data_dir):
    """The three splits of a corpus as raw strings."""
    if name_or_path in ("wikitext-103", "wikitext-2"):
        zip_path = download(URLS[name_or_path], os.path.join(data_dir, os.path.basename(URLS[name_or_path])))
        out = []
        for split in ("train", "valid", "test"):
            dest = os.path.join(data_dir, f"{name_or_path}.{split}.tokens")
            out.append(_read(_unzip_member(zip_path, f"{name_or_path}/wiki.{split}.tokens", dest)))
        return out
    if name_or_path == "enwik8":  # 100M bytes; the usual 90M/5M/5M split, one byte per symbol
        zip_path = download(URLS["enwik8"], os.path.join(data_dir, "enwik8.zip"))
        raw = _read(_unzip_member(zip_path, "enwik8", os.path.join(data_dir, "enwik8")), "latin-1")
        return raw[:90_000_000], raw[90_000_000:95_000_000], raw[95_000_000:]
    if os.path.isdir(name_or_path):  # a folder with train/valid/test files (e.g. wiki.train.tokens)
        files = sorted(os.listdir(name_or_path))
        pick = [[f for f in files if s in f.lower()] for s in ("train", "valid", "test")]
        if not all(pick):
            raise DataError(f"{name_or_path} must hold files whose names contain 'train', 'valid' and 'test'.")
        return [_read(os.path.join(name_or_path, p[0])) for p in pick]
    if os.path.isfile(name_or_path):  # one text file: the first 90% trains, 5% validates, 5% tests
        text = _read(name_or_path)
        a, b = int(len(text) * 0.9), int(len(text) * 0.95)
        return text[:a], text[a:b], text[b:]
    raise DataError(
        f"unknown dataset {name_or_path!r}: use wikitext-103, wikitext-2, enwik8, a text file or a folder "
        "with train/valid/test files."
    )


def _encode(text, tokenizer, vocab):
    """Token ids as a LongTensor, without a Python object per token (WikiText-103 has 103M words)."""
    index = {s: i for i, s in enumerate(vocab)}
    unk = index["<unk>"]
    if tokenizer == "char":  # a lookup table over code points
        table = np.full(0x110000, unk, dtype=np.int64)
        table[[ord(c) for c in vocab if len(c) == 1]] = [index[c] for c in vocab if len(c) == 1]
        return torch.from_numpy(table[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)])
    ids, eos = array("q"), index["<eos>"]
    for line in text.splitlines():  # word level as WikiText: whitespace-separated, <eos> at each line end
        ids.extend([index.get(w, unk) for w in line.split()])
        ids.append(eos)
    return torch.frombuffer(ids, dtype=torch.long) if ids else torch.zeros(0, dtype=torch.long)


def load_text(name_or_path, tokenizer="word", data_dir=DATA_DIR):
    """Train/valid/test token tensors and the vocabulary (built on train; unseen tokens map to <unk>)."""
    if tokenizer not in ("word", "char"):
        raise DataError(f"unknown tokenizer {tokenizer!r}: use word or char.")
    os.makedirs(data_dir, exist_ok=True)
    splits = _raw_splits(name_or_path, data_dir)
    if not splits[0].strip() or not splits[1].strip():
        raise DataError(f"{name_or_path}: the training or validation text is empty.")
    if tokenizer == "char":
        vocab = sorted(set(splits[0]) | {"<unk>"})
    else:
        words = set()
        for line in splits[0].splitlines():
            words.update(line.split())
        vocab = sorted(words | {"<unk>", "<eos>"})
    return (*(_encode(text, tokenizer, vocab) for text in splits), vocab)


def batchify(tokens, n_streams):
    """Lay a token stream out as n_streams parallel streams (B, N): row b continues across segments."""
    n = tokens.numel() // n_streams
    if n < 2:
        raise DataError(f"the corpus ({tokens.numel()} tokens) is too short for {n_streams} streams.")
    return tokens[: n * n_streams].view(n_streams, n)


def n_segments(streams, seq_len):
    return (streams.size(1) - 1 + seq_len - 1) // seq_len


def segment(streams, i, seq_len):
    """Inputs and next-token targets of segment i (the last one may be shorter)."""
    start = i * seq_len
    end = min(start + seq_len, streams.size(1) - 1)
    return streams[:, start:end], streams[:, start + 1 : end + 1]
