"""Realistic, deterministic Commerce Layer customers for tests, benchmarks and the demo.

Standard library only (one ``random.Random(seed)``), streaming, and shaped exactly like
``GET /api/customers?include=customer_group`` answers.
"""

from __future__ import annotations

import functools
import gzip
import random
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sized
from datetime import UTC, datetime, timedelta
from itertools import islice
from pathlib import Path
from typing import Any

import orjson

__all__ = ["customer_groups", "make_customers", "touch", "write_list_documents"]

ORGANIZATION = "acme"
API = f"https://{ORGANIZATION}.commercelayer.io/api"
DEFAULT_START = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
TIERS: tuple[str, ...] = ("gold", "silver", "standard")
GROUP_NAMES: tuple[str, ...] = (
    "VIP",
    "Wholesale",
    "Retail",
    "Staff",
    "B2B Partners",
    "Loyalty Club",
    "Resellers",
    "Employees EU",
)
# Mean time between two successive edits in the generated history: 2,000 customers span
# a working day, a million about eight months.
MEAN_GAP_MS = 15_000

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)

# (country, cities, first names, last names): names stay plausible for their country,
# and carry what real data carries: diacritics, apostrophes, hyphens, CJK, particles.
_LOCALES: tuple[tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]], ...] = (
    (
        "IT",
        ("Milano", "Roma", "Torino", "Firenze", "Forlì"),
        ("Giulia", "Marco", "Francesca", "Luca", "Niccolò", "Chiara"),
        ("Rossi", "Bianchi", "Esposito", "De Luca", "D'Angelo", "Ricci"),
    ),
    (
        "DE",
        ("München", "Berlin", "Köln", "Düsseldorf", "Hamburg"),
        ("Jürgen", "Lena", "Maximilian", "Sophie", "Günther", "Anna-Lena"),
        ("Müller", "Schäfer", "Weiß", "Groß", "Schmidt", "von Bülow"),
    ),
    (
        "FR",
        ("Paris", "Lyon", "Besançon", "Orléans", "Nantes"),
        ("Renée", "François", "Zoë", "Chloé", "Jean-Luc", "Hélène"),
        ("Dubois", "Lefèvre", "Girard", "Le Goff", "Bélanger", "Moreau"),
    ),
    (
        "PL",
        ("Kraków", "Łódź", "Gdańsk", "Warszawa"),
        ("Łukasz", "Małgorzata", "Paweł", "Zofia", "Wojciech"),
        ("Kowalski", "Wiśniewska", "Żak", "Nowak", "Szczęsny"),
    ),
    (
        "ES",
        ("Málaga", "Córdoba", "Madrid", "A Coruña"),
        ("José", "María", "Iñigo", "Lucía", "Ángel"),
        ("Núñez", "García", "Peña", "Muñoz", "de la Fuente"),
    ),
    (
        "IE",
        ("Dublin", "Cork", "Galway"),
        ("Siobhán", "Seán", "Aoife", "Niamh", "Pádraig"),
        ("O'Brien", "O'Sullivan", "McCarthy", "Kelly", "Ní Bhriain"),
    ),
    (
        "US",
        ("New York", "San Francisco", "Austin", "Chicago", "Seattle"),
        ("Emily", "Michael", "Ashley", "Chris", "D'Andre", "Mary Kate"),
        ("Smith", "Johnson", "Williams", "Brown", "Van der Berg", "O'Neil"),
    ),
    (
        "GB",
        ("London", "Manchester", "Edinburgh", "Bristol"),
        ("Oliver", "Amelia", "Harry", "Isla", "Zoë"),
        ("Taylor", "Smith-Jones", "Wright", "Evans", "Ffrench"),
    ),
    (
        "CN",
        ("北京", "上海", "深圳", "Hangzhou"),
        ("伟", "娜", "芳", "秀英", "Wei"),
        ("李", "王", "张", "刘", "Chen"),
    ),
    (
        "JP",
        ("東京", "大阪", "Kyoto"),
        ("さくら", "翔太", "Yuki", "Haruto"),
        ("佐藤", "鈴木", "Tanaka", "Watanabe"),
    ),
    (
        "DK",
        ("København", "Aarhus", "Odense"),
        ("Søren", "Åse", "Mette", "Bjørn"),
        ("Jørgensen", "Ødegaard", "Kierkegaard", "Nielsen"),
    ),
    (
        "TR",
        ("İstanbul", "İzmir", "Ankara"),
        ("Gülşen", "Ömer", "Çağla", "İbrahim"),
        ("Öztürk", "Yılmaz", "Şahin", "Doğan"),  # noqa: RUF001 (Turkish dotless i, on purpose)
    ),
    (
        "VN",
        ("Hà Nội", "Hồ Chí Minh", "Đà Nẵng"),
        ("Thảo", "Minh", "Đức"),
        ("Nguyễn", "Trần", "Phạm"),
    ),
)
# Countries weighted the way a European shop's customer base is.
_LOCALE_WEIGHTS = (18, 16, 14, 8, 8, 5, 12, 10, 3, 2, 2, 1, 1)
_LOCALE_TABLE = tuple(
    locale for locale, weight in zip(_LOCALES, _LOCALE_WEIGHTS, strict=True) for _ in range(weight)
)
_DOMAINS = ("example.com", "example.org", "example.net", "mail.example", "shop.example")
_TAGS = ("newsletter", "b2b", "returning", "wholesale", "eu", "beta", "gift-card", "influencer")
_TAX_CODES = ("E", "G", "M", "EU-REVERSE-CHARGE")

# Letters NFKD does not decompose into ASCII.
_FOLD = str.maketrans(
    {
        "ł": "l",
        "Ł": "L",
        "ø": "o",
        "Ø": "O",
        "ß": "ss",
        "æ": "ae",
        "đ": "d",
        "Đ": "D",
        "\u0131": "i",
    }
)


@functools.cache  # a few dozen distinct names, folded a million times
def _ascii_fold(name: str) -> str:
    decomposed = unicodedata.normalize("NFKD", name.translate(_FOLD))
    return "".join(ch for ch in decomposed.lower() if ch.isascii() and ch.isalpha())


# --- ids -------------------------------------------------------------------------------

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_HALF_BITS = 28
_HALF_MASK = (1 << _HALF_BITS) - 1


class _Ids:
    """Index -> 10-letter id, a bijection, so ids are unique without remembering them.

    A 4-round Feistel network permutes 56-bit numbers (56 bits < 52**10, so every value
    has a 10-letter form); the letters are written least significant first through a
    seeded shuffle of the alphabet, so ids look like Commerce Layer's opaque hashes.
    """

    def __init__(self, seed: int, kind: str) -> None:
        rng = random.Random(f"custsync-fake:{seed}:{kind}")
        self._keys = tuple(rng.getrandbits(_HALF_BITS) for _ in range(4))
        letters = list(_ALPHABET)
        rng.shuffle(letters)
        self._letters = "".join(letters)

    def __call__(self, index: int) -> str:
        left, right = index >> _HALF_BITS, index & _HALF_MASK
        for key in self._keys:
            mixed = ((right ^ key) * 0x9E3779B1) & 0xFFFFFFFF
            left, right = right, left ^ ((mixed ^ (mixed >> 15)) & _HALF_MASK)
        number = (left << _HALF_BITS) | right
        out = []
        for _ in range(10):
            number, digit = divmod(number, 52)
            out.append(self._letters[digit])
        return "".join(out)


def _organization_id(seed: int) -> str:
    return _Ids(seed, "organizations")(0)


# --- timestamps ------------------------------------------------------------------------


def _to_ms(value: datetime) -> int:
    if value.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware (UTC)")
    return (value - _EPOCH) // _MS


def _iso(ms: int) -> str:
    """Commerce Layer's form: UTC, milliseconds, ``Z``."""
    seconds, millis = divmod(ms, 1000)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(seconds))}.{millis:03d}Z"


def _status(orders: int) -> str:
    return "prospect" if orders == 0 else "acquired" if orders == 1 else "repeat"


# --- customers -------------------------------------------------------------------------


def make_customers(
    n: int,
    *,
    seed: int = 0,
    start: datetime = DEFAULT_START,
    tie_fraction: float = 0.25,
    mode: str = "live",
    groups: int = 4,
) -> Iterator[dict[str, Any]]:
    """``n`` customers as JSON:API resource objects, exactly as ``GET /api/customers`` has them.

    The same arguments give the same records. The first record is updated at ``start``;
    apart from ``round(n * tie_fraction)`` records that share one ``updated_at`` (a bulk
    import, stamped about halfway through the history and scattered through the output),
    ``updated_at`` strictly increases in output order. Ids and e-mails are unique, e-mails
    also after strip and lower-casing; every record has a key for the ``erp_customer``
    preset (``reference`` or ``metadata.erp_id``).
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    if not 0.0 <= tie_fraction <= 1.0:
        raise ValueError("tie_fraction must be between 0 and 1")
    if mode not in ("live", "test"):
        raise ValueError("mode must be 'live' or 'test'")
    if groups < 0:
        raise ValueError("groups must be >= 0")
    return _customers(n, seed, _to_ms(start), tie_fraction, mode, groups)


def _customers(
    n: int, seed: int, start_ms: int, tie_fraction: float, mode: str, groups: int
) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    random_ = rng.random
    ids = _Ids(seed, "customers")
    group_ids = [_Ids(seed, "customer_groups")(j) for j in range(groups)]
    meta_template = {"mode": mode, "organization_id": _organization_id(seed)}
    tied_total = round(n * tie_fraction)
    bulk_ms = start_ms + MEAN_GAP_MS * (n - tied_total) // 2
    bulk_at = _iso(bulk_ms)
    tied_so_far = 0
    next_ms = start_ms

    for index in range(n):
        # Selection sampling: exactly tied_total records tie, spread at random.
        tied = random_() * (n - index) < tied_total - tied_so_far
        if tied:
            tied_so_far += 1
            updated_ms = bulk_ms
            created_ms = start_ms + int((bulk_ms - start_ms) * random_())
        else:
            updated_ms = next_ms
            next_ms += 1 + int(rng.expovariate(1.0 / MEAN_GAP_MS))
            if next_ms == bulk_ms:
                next_ms += 1  # only the bulk import shares its instant
            # About a third were never edited after they signed up.
            if random_() < 0.35:
                created_ms = updated_ms
            else:
                created_ms = start_ms + int((updated_ms - start_ms) * random_())

        customer_id = ids(index)
        self_url = f"{API}/customers/{customer_id}"
        country, cities, first_names, last_names = _LOCALE_TABLE[
            int(random_() * len(_LOCALE_TABLE))
        ]
        first = first_names[int(random_() * len(first_names))]
        last = last_names[int(random_() * len(last_names))]

        orders_draw = random_()
        if orders_draw < 0.38:
            orders = 0
        elif orders_draw < 0.68:
            orders = 1
        else:
            orders = 2 + int(rng.expovariate(0.3))

        has_reference = random_() < 0.7
        reference = f"CUST-{index + 1:06d}" if has_reference else None
        attributes: dict[str, Any] = {
            "email": _email(rng, first, last, index),
            "status": _status(orders),
            "has_password": random_() < (0.8 if orders else 0.45),
            "total_orders_count": orders,
            "shopper_reference": f"{rng.getrandbits(48):012x}" if random_() < 0.1 else None,
            "profile_id": f"prof_{rng.getrandbits(40):010x}" if random_() < 0.08 else None,
            "tax_exemption_code": (
                _TAX_CODES[int(random_() * len(_TAX_CODES))] if random_() < 0.04 else None
            ),
            "anonymization_status": None,
            "anonymization_info": None,
            "created_at": _iso(created_ms),
            "updated_at": bulk_at if tied else _iso(updated_ms),
            "reference": reference,
            "reference_origin": "erp" if has_reference else None,
            "metadata": _metadata(rng, index, has_reference, country, cities, first, last),
        }
        if random_() < 0.004:
            attributes["anonymization_status"] = "requested"
            attributes["anonymization_info"] = {
                "requested_at": attributes["updated_at"],
                "requester_email": "privacy@acme.example",
            }

        group: dict[str, str] | None = None
        if group_ids and random_() < 0.6:
            # Skewed: the first groups are the big ones.
            group_id = group_ids[int(random_() ** 1.5 * len(group_ids))]
            group = {"type": "customer_groups", "id": group_id}

        yield {
            "id": customer_id,
            "type": "customers",
            "links": {"self": self_url},
            "attributes": attributes,
            "relationships": {
                "customer_group": {
                    "links": {
                        "self": f"{self_url}/relationships/customer_group",
                        "related": f"{self_url}/customer_group",
                    },
                    "data": group,
                },
                "customer_addresses": {
                    "links": {
                        "self": f"{self_url}/relationships/customer_addresses",
                        "related": f"{self_url}/customer_addresses",
                    },
                },
            },
            "meta": dict(meta_template),
        }


def _email(rng: random.Random, first: str, last: str, index: int) -> str:
    # The index is the trailing number of the local part and names hold no digits, so
    # addresses stay unique even once stripped and lower-cased.
    f = _ascii_fold(first) or "customer"
    la = _ascii_fold(last) or "cl"
    pattern = rng.random()
    if pattern < 0.5:
        local = f"{f}.{la}{index}"
    elif pattern < 0.7:
        local = f"{f[0]}{la}{index}"
    elif pattern < 0.85:
        local = f"{f}_{la}{index}"
    else:
        local = f"{la}.{f}{index}"
    domain = _DOMAINS[int(rng.random() * len(_DOMAINS))]
    casing = rng.random()
    if casing < 0.05:
        local = ".".join(part.capitalize() for part in local.split("."))
        domain = domain.capitalize()
    email = f"{local}@{domain}"
    spacing = rng.random()
    if spacing < 0.006:
        return f" {email} "
    if spacing < 0.012:
        return f"{email} "
    return email


def _metadata(
    rng: random.Random,
    index: int,
    has_reference: bool,
    country: str,
    cities: tuple[str, ...],
    first: str,
    last: str,
) -> dict[str, Any]:
    random_ = rng.random
    # Empty metadata only where a reference already gives the record its ERP key.
    if has_reference and random_() < 0.03:
        return {}
    metadata: dict[str, Any] = {}
    if not has_reference or random_() < 0.8:
        metadata["erp_id"] = f"E{index + 1:07d}"
    messy = random_()
    if messy < 0.02:
        first_value: str | None = f"  {first} "
    elif messy < 0.03:
        first_value = None
    else:
        first_value = first
    messy = random_()
    if messy < 0.02:
        last_value: str | None = last.replace(" ", "  ") + " "
    elif messy < 0.03:
        last_value = None
    else:
        last_value = last
    metadata["first_name"] = first_value
    metadata["last_name"] = last_value
    tier_draw = random_()
    metadata["tier"] = (
        "gold"
        if tier_draw < 0.1
        else "silver"
        if tier_draw < 0.35
        else "standard"
        if tier_draw < 0.96
        else None
    )
    newsletter_draw = random_()
    metadata["newsletter"] = None if newsletter_draw < 0.05 else newsletter_draw < 0.5
    if random_() < 0.92:
        city = cities[int(random_() * len(cities))] if random_() < 0.97 else None
        metadata["address"] = {"city": city, "country": country}
    tag_count = int(random_() * 4)
    metadata["tags"] = rng.sample(_TAGS, tag_count) if tag_count else []
    return metadata


# --- customer groups -------------------------------------------------------------------


def customer_groups(groups: int = 4, *, seed: int = 0, mode: str = "live") -> list[dict[str, Any]]:
    """The customer_groups resources ``make_customers`` (same seed) links to, in the form
    they take in a list document's ``included``. Group ``j`` is the same for any ``groups``."""
    if groups < 0:
        raise ValueError("groups must be >= 0")
    ids = _Ids(seed, "customer_groups")
    organization_id = _organization_id(seed)
    created_base = _to_ms(datetime(2025, 3, 3, 9, 0, tzinfo=UTC))
    out = []
    for j in range(groups):
        rng = random.Random(f"custsync-fake:{seed}:customer_group:{j}")
        group_id = ids(j)
        name = GROUP_NAMES[j] if j < len(GROUP_NAMES) else f"Segment {j + 1}"
        created_ms = created_base + j * 86_400_000 + rng.randrange(3_600_000)
        updated_ms = created_ms + rng.randrange(90 * 86_400_000)
        metadata: dict[str, Any] = (
            {}
            if j % 3 == 2
            else {"discount_pct": rng.choice((5, 10, 15, 20)), "price_list": f"PL-{j + 1:02d}"}
        )
        self_url = f"{API}/customer_groups/{group_id}"
        out.append(
            {
                "id": group_id,
                "type": "customer_groups",
                "links": {"self": self_url},
                "attributes": {
                    "name": name,
                    "code": name.lower().replace(" ", "-"),
                    "created_at": _iso(created_ms),
                    "updated_at": _iso(updated_ms),
                    "reference": None,
                    "reference_origin": None,
                    "metadata": metadata,
                },
                "relationships": {
                    rel: {
                        "links": {
                            "self": f"{self_url}/relationships/{rel}",
                            "related": f"{self_url}/{rel}",
                        }
                    }
                    for rel in ("customers", "markets")
                },
                "meta": {"mode": mode, "organization_id": organization_id},
            }
        )
    return out


# --- list documents --------------------------------------------------------------------


def _page_url(number: int, size: int) -> str:
    return f"{API}/customers?include=customer_group&page%5Bnumber%5D={number}&page%5Bsize%5D={size}"


def write_list_documents(
    path: Path,
    customers: Iterable[dict[str, Any]],
    *,
    page_size: int = 25,
    groups: int = 4,
    seed: int = 0,
    record_count: int | None = None,
) -> int:
    """Write ``customers`` as JSON Lines, one API list document per line, as successive
    pages of ``GET /api/customers?include=customer_group`` are; return how many were written.

    Streams: at most two pages are held. ``included`` carries only the groups the page
    references (``groups`` and ``seed`` must be those given to ``make_customers``).
    ``meta.record_count`` / ``page_count`` and ``links.last`` are written when the count is
    known (``record_count``, or ``customers`` has a length). A ``.gz`` suffix writes gzip.
    """
    if page_size < 1:
        raise ValueError("page_size must be >= 1")
    if record_count is None and isinstance(customers, Sized):
        record_count = len(customers)
    page_count = None if record_count is None else -(-record_count // page_size)
    known_groups: dict[str, dict[str, dict[str, Any]]] = {}

    def groups_for(mode: str) -> dict[str, dict[str, Any]]:
        if mode not in known_groups:
            known_groups[mode] = {
                group["id"]: group for group in customer_groups(groups, seed=seed, mode=mode)
            }
        return known_groups[mode]

    path = Path(path)
    # Level 6: nearly level 9's size at a fraction of its time on large files.
    gzipped = path.suffix == ".gz"
    written = 0
    with gzip.open(path, "wb", compresslevel=6) if gzipped else path.open("wb") as stream:
        records = iter(customers)
        page = list(islice(records, page_size))
        number = 1
        while True:
            following = list(islice(records, page_size))
            document = _list_document(
                page,
                number=number,
                page_size=page_size,
                is_last=not following,
                record_count=record_count,
                page_count=page_count,
                groups_for=groups_for,
            )
            stream.write(orjson.dumps(document) + b"\n")
            written += len(page)
            if not following:
                break
            page = following
            number += 1
    if record_count is not None and written != record_count:
        raise ValueError(f"record_count says {record_count} records, {written} were written")
    return written


def _list_document(
    page: list[dict[str, Any]],
    *,
    number: int,
    page_size: int,
    is_last: bool,
    record_count: int | None,
    page_count: int | None,
    groups_for: Callable[[str], dict[str, dict[str, Any]]],
) -> dict[str, Any]:
    included: dict[str, dict[str, Any]] = {}
    for customer in page:
        linkage = customer.get("relationships", {}).get("customer_group", {}).get("data")
        if not linkage or linkage["id"] in included:
            continue
        mode = customer.get("meta", {}).get("mode") or "live"
        group = groups_for(mode).get(linkage["id"])
        if group is None:
            raise ValueError(
                f"customer {customer.get('id')} links to customer group {linkage['id']}, "
                "which this seed and group count do not produce"
            )
        included[linkage["id"]] = group
    links = {"first": _page_url(1, page_size)}
    if number > 1:
        links["prev"] = _page_url(number - 1, page_size)
    if not is_last:
        links["next"] = _page_url(number + 1, page_size)
    meta: dict[str, int] = {}
    if record_count is not None and page_count is not None:
        meta = {"record_count": record_count, "page_count": page_count}
        links["last"] = _page_url(max(page_count, 1), page_size)
    return {"data": page, "included": list(included.values()), "meta": meta, "links": links}


# --- edits -----------------------------------------------------------------------------


def touch(customer: dict[str, Any], *, at: datetime, rng: random.Random) -> dict[str, Any]:
    """A copy of ``customer`` as an edit at ``at`` leaves it: ``updated_at`` becomes ``at``
    and one of ``metadata.tier``, the e-mail's letter case, or the order count (and with
    it ``status``) changes. ``at`` may not precede ``created_at``."""
    at_ms = _to_ms(at)
    copy: dict[str, Any] = orjson.loads(orjson.dumps(customer))
    attributes: dict[str, Any] = copy.setdefault("attributes", {})
    created = attributes.get("created_at")
    if isinstance(created, str) and at_ms < _to_ms(datetime.fromisoformat(created)):
        raise ValueError(f"customer {copy.get('id')} cannot be edited before it was created")
    attributes["updated_at"] = _iso(at_ms)
    change = rng.randrange(3)
    if change == 1:
        recased = _recase(attributes.get("email"))
        if recased is not None:
            attributes["email"] = recased
            return copy
        change = 0  # no letters to recase: change the tier instead
    if change == 0:
        metadata = attributes.get("metadata")
        if not isinstance(metadata, dict):
            metadata = attributes["metadata"] = {}
        metadata["tier"] = rng.choice([tier for tier in TIERS if tier != metadata.get("tier")])
    else:
        orders = int(attributes.get("total_orders_count") or 0) + 1
        attributes["total_orders_count"] = orders
        attributes["status"] = _status(orders)
    return copy


def _recase(email: Any) -> str | None:
    if not isinstance(email, str) or not any(ch.isalpha() for ch in email):
        return None
    if email == email.lower():
        local, at, domain = email.partition("@")
        recased = ".".join(part.capitalize() for part in local.split(".")) + at + domain
        return recased if recased != email else email.upper()
    return email.lower()
