"""Reading and writing bbolt database files, the format etcd keeps its store in.

etcd's `Maintenance.Snapshot` sends its bbolt file, and etcd's tools
(`etcdctl snapshot status`, `etcdctl snapshot restore`) open what was saved
as one. metastore's own stores are not bbolt files, so its client snapshots
are written in this format (metastore.etcd_snapshot says what goes in) and
etcd's snapshots are read from it.

The format, as bbolt 1.3 lays it out (native little-endian integers):
- The file is a sequence of pages of `page_size` bytes. Every page starts
  with a 16-byte header: page id (u64), flags (u16), element count (u16)
  and overflow (u32, how many further pages the page continues onto).
- Pages 0 and 1 are meta pages: magic, version, page size, the root
  bucket, the freelist's page, the page count, the transaction id and an
  FNV-1a checksum of the fields before it. A reader takes the valid one with
  the higher transaction id.
- Buckets are B+trees. A leaf page holds 16-byte elements (flags, offset,
  key size, value size) followed by the keys and values, each element's
  offset counted from the element itself; a branch page holds (offset, key
  size, child page) elements, keyed by each child's first key. A value whose
  leaf element is flagged as a bucket is that bucket's header: its root
  page and sequence, then, for a small bucket stored inline (root page 0), the
  bucket's single leaf page itself.
- The root bucket's leaf lists the top-level buckets by name.

The writer here produces what a reader needs and nothing it does not: every
bucket has a page tree of its own (never inline), pages are packed full,
the freelist is empty. bbolt and etcd open such a file, read it and write
to it like any other (a write transaction just allocates past its end).
"""
from __future__ import annotations

import mmap
import os
import struct
from typing import BinaryIO, Iterable, Iterator

PAGE_SIZE = 4096
MAGIC = 0xED0CDAED
VERSION = 2

_BRANCH = 0x01
_LEAF = 0x02
_META = 0x04
_FREELIST = 0x10
_BUCKET_ELEMENT = 0x01  # leaf element flag: the value is a bucket header

_PAGE_HEADER = struct.Struct("<QHHI")  # id, flags, count, overflow
_LEAF_ELEMENT = struct.Struct("<IIII")  # flags, pos, key size, value size
_BRANCH_ELEMENT = struct.Struct("<IIQ")  # pos, key size, child page
_BUCKET = struct.Struct("<QQ")  # root page, sequence
# magic, version, page size, flags, root bucket (root page, sequence),
# freelist page, page count, transaction id; then the checksum of all that.
_META_FIELDS = struct.Struct("<IIIIQQQQQ")
_CHECKSUM = struct.Struct("<Q")
_ELEMENT_SIZE = 16
assert _LEAF_ELEMENT.size == _BRANCH_ELEMENT.size == _ELEMENT_SIZE == _PAGE_HEADER.size


class BoltError(Exception):
    """A file that is not a bbolt database, or a damaged one."""


def fnv64a(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def _meta_page(page_id: int, page_size: int, root: int, freelist: int, pages: int, txid: int) -> bytes:
    fields = _META_FIELDS.pack(MAGIC, VERSION, page_size, 0, root, 0, freelist, pages, txid)
    body = fields + _CHECKSUM.pack(fnv64a(fields))
    return _PAGE_HEADER.pack(page_id, _META, 0, 0) + body


# -- writing ---------------------------------------------------------------------
class Writer:
    """Writes a bbolt file of top-level buckets, one bucket at a time.

    `bucket()` takes the bucket's items already sorted by key and writes its
    pages as they fill, so a bucket of any size is written in constant
    memory apart from one (first key, page) pair per page. `close()` writes
    the root bucket, the freelist and, last, the two meta pages; a file that
    was not closed has no valid meta page and no reader opens it.
    """

    def __init__(self, f: BinaryIO, page_size: int = PAGE_SIZE) -> None:
        self._f = f
        self._page_size = page_size
        self._next_page = 2  # 0 and 1 are the meta pages, written by close()
        self._buckets: dict[bytes, int] = {}  # name -> root page
        f.seek(2 * page_size)

    def bucket(self, name: bytes, items: Iterable[tuple[bytes, bytes]]) -> None:
        if name in self._buckets:
            raise ValueError(f"bucket {name!r} written twice")
        children: list[tuple[bytes, int]] = []  # (first key, page) of each leaf
        elements: list[tuple[bytes, bytes]] = []
        used = _PAGE_HEADER.size
        last: bytes | None = None
        for key, value in items:
            if last is not None and key <= last:
                raise ValueError(f"bucket {name!r}: keys not in ascending order at {key!r}")
            last = key
            size = _ELEMENT_SIZE + len(key) + len(value)
            if elements and used + size > self._page_size:
                children.append((elements[0][0], self._write_leaf(elements)))
                elements, used = [], _PAGE_HEADER.size
            elements.append((key, value))
            used += size
        if elements or not children:
            children.append((elements[0][0] if elements else b"", self._write_leaf(elements)))
        while len(children) > 1:
            children = self._write_branches(children)
        self._buckets[name] = children[0][1]

    def close(self) -> int:
        """Finish the file; returns its size in bytes (a whole number of pages)."""
        root = self._write_leaf([(name, _BUCKET.pack(page, 0)) for name, page in sorted(self._buckets.items())],
                                flags=_BUCKET_ELEMENT)
        freelist = self._write_page(_FREELIST, 0, b"")
        pages = self._next_page
        self._f.seek(0)
        for page_id, txid in ((0, 2), (1, 3)):
            raw = _meta_page(page_id, self._page_size, root, freelist, pages, txid)
            self._f.write(raw + bytes(self._page_size - len(raw)))
        self._f.seek(pages * self._page_size)
        self._f.truncate()
        return pages * self._page_size

    def _write_leaf(self, elements: list[tuple[bytes, bytes]], flags: int = 0) -> int:
        table = bytearray()
        data = bytearray()
        start = _ELEMENT_SIZE * len(elements)
        for i, (key, value) in enumerate(elements):
            pos = start + len(data) - _ELEMENT_SIZE * i
            table += _LEAF_ELEMENT.pack(flags, pos, len(key), len(value))
            data += key
            data += value
        return self._write_page(_LEAF, len(elements), bytes(table + data))

    def _write_branches(self, children: list[tuple[bytes, int]]) -> list[tuple[bytes, int]]:
        """One level of branch pages over `children`; their (first key, page)."""
        parents: list[tuple[bytes, int]] = []
        group: list[tuple[bytes, int]] = []
        used = _PAGE_HEADER.size
        for key, page in children:
            size = _ELEMENT_SIZE + len(key)
            if len(group) >= 2 and used + size > self._page_size:
                parents.append((group[0][0], self._write_branch(group)))
                group, used = [], _PAGE_HEADER.size
            group.append((key, page))
            used += size
        parents.append((group[0][0], self._write_branch(group)))
        return parents

    def _write_branch(self, group: list[tuple[bytes, int]]) -> int:
        table = bytearray()
        data = bytearray()
        start = _ELEMENT_SIZE * len(group)
        for i, (key, page) in enumerate(group):
            table += _BRANCH_ELEMENT.pack(start + len(data) - _ELEMENT_SIZE * i, len(key), page)
            data += key
        return self._write_page(_BRANCH, len(group), bytes(table + data))

    def _write_page(self, flags: int, count: int, body: bytes) -> int:
        """Write one page (and the pages it overflows onto); returns its id."""
        if count > 0xFFFF:
            raise ValueError("too many elements for one page")
        page_id = self._next_page
        total = _PAGE_HEADER.size + len(body)
        span = max(1, -(-total // self._page_size))
        self._f.write(_PAGE_HEADER.pack(page_id, flags, count, span - 1) + body
                      + bytes(span * self._page_size - total))
        self._next_page += span
        return page_id


def write(path: str, buckets: Iterable[tuple[bytes, Iterable[tuple[bytes, bytes]]]],
          page_size: int = PAGE_SIZE) -> int:
    """Write a bbolt file at `path` holding `buckets` ((name, sorted items)
    pairs); returns its size."""
    with open(path, "wb") as f:
        w = Writer(f, page_size)
        for name, items in buckets:
            w.bucket(name, items)
        return w.close()


# -- reading ---------------------------------------------------------------------
class Reader:
    """Reads the top-level buckets of a bbolt file (etcd's schema has no
    nested buckets). The file must not change while it is read."""

    def __init__(self, path: str, size: int | None = None) -> None:
        """`size`: how much of the file is the database (a saved snapshot has
        its sha256 after it); the whole file by default."""
        self._file = open(path, "rb")
        try:
            length = os.fstat(self._file.fileno()).st_size if size is None else size
            if length < 2 * _PAGE_HEADER.size + _META_FIELDS.size:
                raise BoltError(f"{path} is too small to be a bbolt database ({length} bytes)")
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        except BaseException:
            self._file.close()
            raise
        self._length = length
        self._page_size, self._root, self.pages, self.txid = self._choose_meta(path)

    def close(self) -> None:
        self._map.close()
        self._file.close()

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def size(self) -> int:
        """The database's size as bbolt counts it (pages in use)."""
        return self.pages * self._page_size

    def _choose_meta(self, path: str) -> tuple[int, int, int, int]:
        found = []
        first = _parse_meta(self._map, 0, self._length)
        page_size = first[0] if first else PAGE_SIZE
        for meta in (first, _parse_meta(self._map, page_size, self._length)):
            if meta is not None:
                found.append(meta)
        if not found:
            raise BoltError(f"{path} is not a bbolt database (no valid meta page)")
        size, root, freelist, pages, txid = max(found, key=lambda m: m[4])
        if pages * size > self._length:
            raise BoltError(f"{path} is truncated: its meta page counts {pages} pages of {size} bytes, "
                            f"the file holds {self._length} bytes")
        return size, root, pages, txid


    def buckets(self) -> list[bytes]:
        """Names of the top-level buckets, in order."""
        return [name for name, _value in self._walk(self._root, None, buckets=True)]

    def items(self, name: bytes) -> Iterator[tuple[bytes, bytes]]:
        """A top-level bucket's (key, value) pairs in key order; empty when
        there is no such bucket."""
        for bucket, header in self._walk(self._root, None, buckets=True):
            if bucket == name:
                if len(header) < _BUCKET.size:
                    raise BoltError(f"bucket {name!r} has a damaged header")
                root, _seq = _BUCKET.unpack_from(header)
                if root == 0:  # inline: the bucket's leaf follows its header
                    if len(header) < _BUCKET.size + _PAGE_HEADER.size:
                        raise BoltError(f"bucket {name!r} has a damaged inline page")
                    yield from self._walk(0, header[_BUCKET.size:], buckets=False)
                else:
                    yield from self._walk(root, None, buckets=False)
                return

    def _page(self, page_id: int) -> bytes:
        if page_id < 2 or page_id >= self.pages:
            raise BoltError(f"page {page_id} is outside the database ({self.pages} pages)")
        start = page_id * self._page_size
        _id, _flags, _count, overflow = _PAGE_HEADER.unpack_from(self._map, start)
        end = start + (overflow + 1) * self._page_size
        if end > self._length:
            raise BoltError(f"page {page_id} runs past the end of the file")
        # A copy, not a view: a view left in a traceback would keep the map
        # from closing.
        return self._map[start:end]

    def _walk(self, page_id: int, inline: bytes | None, *, buckets: bool) -> Iterator[tuple[bytes, bytes]]:
        """Every leaf element under a page, depth first, checked to be in
        strictly ascending key order; `buckets`: the elements must be
        buckets (True) or must not be. A page reached twice (a cycle, or
        pages shared between branches) is refused, as bbolt's check does."""
        seen: set[int] = set()
        stack: list[int | bytes] = [inline if inline is not None else page_id]
        last: bytes | None = None
        while stack:
            item = stack.pop()
            if isinstance(item, int):
                if item in seen:
                    raise BoltError(f"page {item} is referenced twice")
                seen.add(item)
                page = self._page(item)
            else:
                page = item
            pid, flags, count, _overflow = _PAGE_HEADER.unpack_from(page)
            if _PAGE_HEADER.size + count * _ELEMENT_SIZE > len(page):
                raise BoltError(f"page {pid} claims {count} elements, more than it can hold")
            if flags & _BRANCH:
                children = [_BRANCH_ELEMENT.unpack_from(page, _PAGE_HEADER.size + i * _ELEMENT_SIZE)[2]
                            for i in range(count)]
                stack.extend(reversed(children))
            elif flags & _LEAF:
                for i in range(count):
                    at = _PAGE_HEADER.size + i * _ELEMENT_SIZE
                    eflags, pos, ksize, vsize = _LEAF_ELEMENT.unpack_from(page, at)
                    if bool(eflags & _BUCKET_ELEMENT) != buckets:
                        kind = "a bucket" if buckets else "a key"
                        raise BoltError(f"expected {kind} in page {pid} (etcd's schema has no nested buckets)")
                    start = at + pos
                    if start + ksize + vsize > len(page):
                        raise BoltError(f"an element of page {pid} runs past the page")
                    key = page[start:start + ksize]
                    if last is not None and key <= last:
                        raise BoltError(f"page {pid}: keys out of order")
                    last = key
                    yield key, page[start + ksize:start + ksize + vsize]
            else:
                raise BoltError(f"page {pid} is neither a branch nor a leaf (flags {flags:#x})")


def is_bbolt(path: str) -> bool:
    """Whether `path` starts with a valid bbolt meta page (either of the two:
    bbolt opens a file whose first meta page was torn)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2 * _MAX_PAGE_SIZE)
    except OSError:
        return False
    # Meta page 1 starts one page in, at any page size bbolt allows.
    offsets = (0, 4096, 512, 1024, 2048, 8192, 16384, 32768, _MAX_PAGE_SIZE)
    return any(_parse_meta(head, offset, len(head)) is not None for offset in offsets)


_MAX_PAGE_SIZE = 65536


def _parse_meta(data: bytes | mmap.mmap, offset: int, length: int) -> tuple[int, int, int, int, int] | None:
    """(page size, root bucket page, freelist page, page count, txid) of
    the meta page at `offset`, or None if it is not a valid one."""
    start = offset + _PAGE_HEADER.size
    end = start + _META_FIELDS.size
    if end + _CHECKSUM.size > length:
        return None
    fields = data[start:end]
    magic, version, page_size, _flags, root, _seq, freelist, pages, txid = _META_FIELDS.unpack(fields)
    (checksum,) = _CHECKSUM.unpack_from(data, end)
    if magic != MAGIC or version != VERSION or checksum != fnv64a(fields):
        return None
    if page_size < 512 or page_size & (page_size - 1):
        return None
    return page_size, root, freelist, pages, txid
