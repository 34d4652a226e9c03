"""Paged listings (AIP-158): page sizes, page tokens, and the orders pages follow.

A listing in one message breaks at gRPC's message limit on a large cluster, so the three
listings answer a page at a time. Each listing walks its items in an order whose key an
item keeps while it exists and that grows for new items: hosts by row (a host keeps its
row; a removed host's row goes to a later host, which a listing already past it does not
need), allocations by the sequence of their PLACED event, volumes by creation. A token is
the key to resume from, so between pages each item is listed at most once, in order, and
an item that exists from the first page to the last is listed, whatever changed.

A token is urlsafe base64 of a fixed struct: a version, the listing, a digest of the
filter it was issued for, and the key. It holds no id and nothing the server trusts
beyond where to resume: a forged token can only start a listing somewhere else.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from bisect import bisect_left
from typing import Callable, Hashable, Iterable, Iterator, TypeVar

from ..errors import ValidationError

#: Items per page when the request leaves page_size 0 (the proto promises 1,000).
DEFAULT_PAGE_SIZE = 1_000
#: The largest page; a larger page_size is read as this one (AIP-158 coerces).
MAX_PAGE_SIZE = 10_000
#: A page stops early once its items reach this many bytes, so that a page of large items
#: (hosts with 128 labels, workload specs) stays well under gRPC's 4 MiB default limit.
MAX_PAGE_BYTES = 2 << 20

HOSTS, ALLOCATIONS, VOLUMES = 1, 2, 3
_NAMES = {HOSTS: "ListHosts", ALLOCATIONS: "ListAllocations", VOLUMES: "ListVolumes"}
_VERSION = 1
_TOKEN = struct.Struct(">BB8sQ")  # version, listing, filter digest, key to resume from
_TOKEN_CHARS = len(base64.urlsafe_b64encode(bytes(_TOKEN.size)))
_MAX_KEY = 1 << 62
T = TypeVar("T")


def page_size(requested: int) -> int:
    """The number of items a page holds for a request's page_size."""
    if requested < 0:
        raise ValidationError(f"page_size must not be negative, got {requested}")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _digest(listing: int, filter_: str) -> bytes:
    return hashlib.blake2b(filter_.encode(), digest_size=8, person=b"hci-page%d" % listing).digest()


def encode_token(listing: int, filter_: str, key: int) -> str:
    """The token that resumes `listing` (with this filter) at the first item whose key >= key."""
    raw = _TOKEN.pack(_VERSION, listing, _digest(listing, filter_), key)
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, listing: int, filter_: str) -> int:
    """The key a request's page_token resumes at (0 for the first page).

    Raises ValidationError when the token is not one this server issued for the same
    listing and filter.
    """
    if not token:
        return 0
    try:
        if len(token) > _TOKEN_CHARS:
            raise ValueError
        raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
        version, kind, digest, key = _TOKEN.unpack(raw)
    except (ValueError, binascii.Error, struct.error):
        raise ValidationError(f"page_token {token[:40]!r} is not a page token of this service") from None
    if version != _VERSION or kind not in _NAMES or key > _MAX_KEY:
        raise ValidationError(f"page_token {token!r} is not a page token of this service")
    if kind != listing:
        raise ValidationError(f"page_token belongs to {_NAMES[kind]}, not {_NAMES[listing]}")
    if digest != _digest(listing, filter_):
        raise ValidationError(f"page_token was issued for another filter than {filter_!r}: "
                              f"repeat the first request's filter on every page")
    return key


def take_page(entries: Iterable[tuple[int, T]], size: int,
              cost: Callable[[T], int] | None = None) -> tuple[list[T], int | None]:
    """The first `size` items of (key, item) pairs in key order, and the key the next page
    starts at (None when nothing follows). With `cost` (an item's bytes), the page also
    ends once it holds MAX_PAGE_BYTES; it always holds at least one item."""
    items: list[T] = []
    used = 0
    for key, item in entries:
        if len(items) == size or used >= MAX_PAGE_BYTES:
            return items, key
        items.append(item)
        if cost is not None:
            used += cost(item)
    return items, None


class KeyOrder:
    """Ids in ascending key order, for a listing whose new items always get larger keys.

    The source of truth stays elsewhere (the state's placements, the Cluster's volumes):
    an entry here is only a hint, checked by the caller's `live(key, id)` as a page reads
    it. Entries whose item is gone are skipped, and dropped all at once when they outnumber
    the live ones, so a page costs O(log n + page size), amortized.
    """

    def __init__(self) -> None:
        self.keys: list[int] = []
        self.ids: list[Hashable] = []

    @property
    def last_key(self) -> int:
        return self.keys[-1] if self.keys else -1

    def extend(self, entries: Iterable[tuple[int, Hashable]]) -> None:
        """Append (key, id) pairs, keys ascending and above `last_key`."""
        for key, id_ in entries:
            self.keys.append(key)
            self.ids.append(id_)

    def reset(self, entries: Iterable[tuple[int, Hashable]]) -> None:
        """Replace every entry by (key, id) pairs in any order."""
        pairs = sorted(entries, key=lambda e: e[0])
        self.keys = [k for k, _ in pairs]
        self.ids = [i for _, i in pairs]

    def stale(self, n_live: int) -> bool:
        """Whether dead entries outnumber the live ones (time to `reset`)."""
        return len(self.keys) > 2 * n_live + 1024

    def live_from(self, start: int, live: Callable[[int, Hashable], bool]) -> Iterator[tuple[int, Hashable]]:
        """(key, id) of the live entries with key >= start, in key order."""
        keys, ids = self.keys, self.ids
        for i in range(bisect_left(keys, start), len(keys)):
            if live(keys[i], ids[i]):
                yield keys[i], ids[i]


class PlacementOrder(KeyOrder):
    """Placed workload ids by the sequence of their PLACED event.

    Kept in step with the state's `placed` map (workload id -> (sequence, spec)) when a
    page is read: the map gains entries in sequence order (a dict keeps insertion order,
    and a workload placed again is a new entry at its end), so the entries new since the
    last page are the ones at its end above `last_key`, found walking it backwards.
    """

    def live(self, placed: dict) -> Callable[[int, Hashable], bool]:
        """The check that an entry still names a placement (same id, same sequence)."""
        gone = (None,)
        return lambda seq, wid: placed.get(wid, gone)[0] == seq

    def sync(self, placed: dict) -> "PlacementOrder":
        """Take in the placements made since the last call; returns self."""
        if self.stale(len(placed)):
            self.reset((seq, wid) for wid, (seq, _) in placed.items())
            return self
        last, new = self.last_key, []
        for wid, (seq, _) in reversed(placed.items()):
            if seq <= last:
                break
            new.append((seq, wid))
        new.reverse()
        self.extend(new)
        if len(self.keys) < len(placed):  # the map was filled out of order: rebuild, sorted
            self.reset((seq, wid) for wid, (seq, _) in placed.items())
        return self


class CreationOrder:
    """Ordinals for items the source lists whole, in creation order (the Cluster's volumes).

    An item gets the next ordinal when first seen; one deleted and created again under the
    same id is another object and gets a new ordinal, as it sits at the end of the creation
    order. Every call walks all items: O(items), as the source lists them.
    """

    def __init__(self) -> None:
        self._seen: dict[Hashable, tuple[int, object]] = {}
        self._next = 0

    def ordinals(self, items: Iterable[tuple[Hashable, object]]) -> list[tuple[int, Hashable]]:
        """(ordinal, id) per (id, object) given in creation order; ordinals ascend."""
        seen, out = {}, []
        for id_, obj in items:
            known = self._seen.get(id_)
            if known is None or known[1] is not obj:
                known = (self._next, obj)
                self._next += 1
            seen[id_] = known
            out.append((known[0], id_))
        self._seen = seen
        return out
