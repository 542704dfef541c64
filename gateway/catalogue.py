"""Catalogue management on the public API, as plain Python (no gRPC here): a product's attributes
and images (GetProduct, ListProducts), changing its attributes (UpdateProduct), deleting by filter
(PurgeProducts), per-category figures (GetCatalogueStats) and the stored thumbnails (GetProductImage).

A product of a category lives in one index database per signature kind ("<category>.<kind>"), as
a group of items (one per image) with the group's attributes. Reads go to the first kind of
index_kinds, which also holds the thumbnails (gateway.pipeline); writes go to every kind's database
that exists, so that a search with either kind sees the change.
"""

from __future__ import annotations

import re
import threading
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from common.errors import InvalidArgument, NotFound, ServiceError, Unavailable, quote
from common.limits import check_id
from common.names import check_name
from common.serving import Deadline
from gateway.config import GatewayConfig
from gateway.ports import (
    CatalogueImageInfo,
    CatalogueProduct,
    DatabaseInfo,
    Index,
    ProductPage,
    item_id_of,
)
from index_server.domain import Filter, ProductAttributes

# A URI's scheme (RFC 3986): a letter, then letters, digits, "+", "-" or ".", then ":".
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


def check_image_uri(uri: str, limit: int) -> None:
    """Raises InvalidArgument (what to send) unless `uri` is an absolute URI of at most `limit`
    UTF-8 bytes without spaces or control characters (http(s)://, gs://, s3://, data: ...)."""
    size = len(uri.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise InvalidArgument(
            f"image_uri is {size} UTF-8 bytes, above the limit of {limit}: store the image where a "
            "shorter URI reaches it",
            violations=[("image_uri", f"{size} UTF-8 bytes, above the limit of {limit}")],
        )
    problem = ""
    if not _URI_SCHEME.match(uri) or len(uri) == uri.index(":") + 1:
        problem = "is not an absolute URI (it needs a scheme, e.g. https://shop.example/p/1.jpg)"
    elif any(c.isspace() or not c.isprintable() for c in uri):
        problem = "has spaces or control characters (percent-encode them)"
    if problem:
        raise InvalidArgument(f"image_uri {quote(uri)} {problem}", violations=[("image_uri", problem)])


# UpdateProduct's update_mask entries: a whole part, or one label ("labels.KEY").
MASK_PARTS = ("path", "tags", "labels")


@dataclass
class Product:
    """A product of one category, as GetProduct returns it."""

    product_id: str
    category: str
    attributes: ProductAttributes
    images: list[CatalogueImageInfo]


@dataclass
class CategoryFigures:
    """One category of GetCatalogueStats: its products and, per kind, its database."""

    category: str
    products: int
    databases: list[DatabaseInfo]  # in index_kinds order


def parse_mask(mask: Sequence[str]) -> list[tuple[str, str]]:
    """update_mask -> [(part, label key or "")]; empty = every part. InvalidArgument naming the
    entry for anything else than "path", "tags", "labels" or "labels.KEY" (KEY a label key)."""
    if not mask:
        return [(part, "") for part in MASK_PARTS]
    out = []
    for i, entry in enumerate(mask):
        part, dot, key = entry.partition(".")
        if part in MASK_PARTS and not dot:
            out.append((part, ""))
            continue
        if part == "labels" and dot:
            try:
                check_name("label key", key)
            except InvalidArgument as exc:
                raise InvalidArgument(
                    f"update_mask[{i}] {quote(entry)}: {exc.message}",
                    violations=[(f"update_mask[{i}]", exc.message[:200])],
                ) from None
            out.append(("labels", key))
            continue
        raise InvalidArgument(
            f"update_mask[{i}] {quote(entry)} is not a part of a product's attributes: use "
            '"path", "tags", "labels" (all labels, replaced) or "labels.KEY" (one label), or leave '
            "update_mask empty to set all three",
            violations=[(f"update_mask[{i}]", "not path, tags, labels or labels.KEY")],
        )
    return out


def apply_mask(current: ProductAttributes, given: ProductAttributes, mask: list[tuple[str, str]]) -> ProductAttributes:
    """The attributes after an update: the masked parts from `given`, the rest as they are; a
    "labels.KEY" absent from `given` removes that label."""
    path, tags, labels = current.path, current.tags, dict(current.labels)
    for part, key in mask:
        if part == "path":
            path = given.path
        elif part == "tags":
            tags = given.tags
        elif not key:
            labels = dict(given.labels)
        elif key in given.labels:
            labels[key] = given.labels[key]
        else:
            labels.pop(key, None)
    return ProductAttributes(path, tags, labels)


class Catalogue:
    """The management calls over the index port. `check_attributes` raises InvalidArgument (with
    field names under its `field` argument) for attributes the index would refuse."""

    # Products are updated by read-modify-write: updates of one product through this gateway are
    # serialised (by a lock chosen by its id), so two masks on different labels both apply.
    LOCK_STRIPES = 64

    def __init__(
        self,
        config: GatewayConfig,
        index: Index,
        pool: ThreadPoolExecutor,
        check_attributes: Callable[[ProductAttributes, str], None],
    ):
        self.config = config
        self.index = index
        self.pool = pool
        self.kinds = list(config.index_kinds)
        self.check_attributes = check_attributes
        self._locks = [threading.Lock() for _ in range(self.LOCK_STRIPES)]

    # -- reading -----------------------------------------------------------------------------------

    def _kinds_of(self, category: str) -> list[str]:
        """The kinds whose database of `category` exists (index_kinds order)."""
        return [kind for kind in self.kinds if category in self.index.categories(kind)]

    def _in_category(self, product_id: str, category: str, deadline: Deadline) -> CatalogueProduct | None:
        try:
            page = self.index.list_products(category, self.kinds[0], [product_id], None, 1, "", deadline.remaining())
        except NotFound:
            return None  # no database of that category
        return page.products[0] if page.products else None

    def find(self, product_id: str, category: str, deadline: Deadline) -> tuple[str, CatalogueProduct]:
        """The product in `category`, or, with category "", in the one category that holds it ->
        (its category, the product). NotFound when absent; InvalidArgument when several hold it."""
        check_id("product_id", product_id, self.config.max_id_bytes, required=True)
        if category:
            check_name("category", category)
            found = self._in_category(product_id, category, deadline)
            if found is None:
                known = category in self.index.categories(self.kinds[0])
                raise NotFound(
                    f"product {quote(product_id)} is not in category {quote(category)}"
                    if known
                    else f"category {quote(category)} is not in the catalogue (no product was indexed in it)",
                    reason="PRODUCT_NOT_FOUND" if known else "CATEGORY_NOT_FOUND",
                )
            return category, found
        categories = sorted(self.index.categories(self.kinds[0]))
        looked = {c: self.pool.submit(self._in_category, product_id, c, deadline) for c in categories}
        holding: dict[str, CatalogueProduct] = {}
        failed: dict[str, str] = {f.category: f.reason for f in self.index.unreachable()}
        for c, future in looked.items():
            try:
                product = future.result()
            except ServiceError as exc:
                failed[c] = exc.message
                continue
            if product is not None:
                holding[c] = product
        if len(holding) > 1:
            names = sorted(holding)
            raise InvalidArgument(
                f"product {quote(product_id)} is in {len(names)} categories ({', '.join(map(quote, names[:10]))}): "
                "name the one you mean in `category`",
                violations=[("category", f"empty, and the product is in {len(names)} categories")],
            )
        if holding:
            return next(iter(holding.items()))
        if failed:
            names = sorted(c or "(unknown categories)" for c in failed)
            raise Unavailable(
                f"product {quote(product_id)} is in no category that answered; {', '.join(names[:5])} could "
                f"not be searched ({next(iter(failed.values()))[:200]}): retry, or name the category"
            )
        raise NotFound(f"product {quote(product_id)} is not in the catalogue", reason="PRODUCT_NOT_FOUND")

    def get(self, product_id: str, category: str, deadline: Deadline) -> Product:
        category, found = self.find(product_id, category, deadline)
        return Product(found.product_id, category, found.attributes, found.images)

    def page_size(self, requested: int) -> int:
        limit = self.config.max_page_size
        if requested > limit:
            raise InvalidArgument(
                f"page_size {requested} is above the limit of {limit}: ask for at most {limit} products per page "
                "(0 for the default)",
                violations=[("page_size", f"{requested} is above the limit of {limit}")],
                quota=[("page_size", f"at most {limit} products per page")],
            )
        return requested or self.config.default_page_size

    def products(
        self, category: str, filter: Filter | None, page_size: int, page_token: str, deadline: Deadline
    ) -> tuple[list[Product], str, int]:
        """A page of a category's products passing `filter` -> (products, next page token, total)."""
        check_name("category", category)
        size = self.page_size(page_size)
        try:
            page: ProductPage = self.index.list_products(
                category, self.kinds[0], [], filter, size, page_token, deadline.remaining()
            )
        except NotFound:
            raise NotFound(
                f"category {quote(category)} is not in the catalogue (no product was indexed in it)",
                reason="CATEGORY_NOT_FOUND",
            ) from None
        products = [Product(p.product_id, category, p.attributes, p.images) for p in page.products]
        return products, page.next_page_token, page.total

    # -- writing -----------------------------------------------------------------------------------

    def update(
        self,
        product_id: str,
        category: str,
        attributes: ProductAttributes,
        mask: Sequence[str],
        deadline: Deadline,
    ) -> Product:
        """Sets the masked parts of a product's attributes in every kind's database -> the product
        as stored after the change."""
        parts = parse_mask(mask)
        stripe = self._locks[zlib.crc32(product_id.encode("utf-8", "surrogatepass")) % self.LOCK_STRIPES]
        with stripe:
            category, current = self.find(product_id, category, deadline)
            after = apply_mask(current.attributes, attributes, parts)
            self.check_attributes(after, "attributes")
            kinds = self._kinds_of(category) or self.kinds[:1]
            calls = [
                self.pool.submit(self.index.update_products, category, kind, {product_id: after}, deadline.remaining())
                for kind in kinds
            ]
            missing = [call.result() for call in calls]
            if all(product_id in m for m in missing):  # deleted since it was read
                raise NotFound(
                    f"product {quote(product_id)} is not in category {quote(category)}", reason="PRODUCT_NOT_FOUND"
                )
        return Product(product_id, category, after, current.images)

    def purge(self, category: str, filter: Filter | None, force: bool, deadline: Deadline) -> tuple[int, int]:
        """Deletes every product of `category` passing `filter` (None: every product, only with
        `force`) in every kind's database -> (products deleted, images deleted, counted once)."""
        check_name("category", category)
        if filter is None and not force:
            raise InvalidArgument(
                f"an empty filter deletes every product of {quote(category)}: set force to do that, or set "
                "a filter naming the products to delete",
                violations=[("filter", "empty, and force is not set")],
            )
        kinds = self._kinds_of(category)
        if not kinds:
            raise NotFound(
                f"category {quote(category)} is not in the catalogue (no product was indexed in it)",
                reason="CATEGORY_NOT_FOUND",
            )
        calls = [
            self.pool.submit(self.index.purge_products, category, kind, filter, deadline.remaining()) for kind in kinds
        ]
        products: set[str] = set()
        images = 0
        for call in calls:
            groups, deleted = call.result()
            products.update(groups)
            images = max(images, deleted)  # every kind held the same images
        return len(products), images

    # -- figures and images ------------------------------------------------------------------------

    def stats(self, categories: Sequence[str], deadline: Deadline) -> list[CategoryFigures]:
        """Per category (those named, else every one): products and each kind's database."""
        for i, category in enumerate(categories):
            try:
                check_name("category", category)
            except InvalidArgument as exc:
                raise InvalidArgument(
                    f"categories[{i}]: {exc.message}", violations=[(f"categories[{i}]", exc.message[:200])]
                ) from None
        by_category: dict[str, dict[str, DatabaseInfo]] = {}
        for database in self.index.databases(deadline.remaining()):
            by_category.setdefault(database.category, {})[database.kind] = database
        wanted = list(dict.fromkeys(categories)) or sorted(by_category)
        missing = [c for c in wanted if c not in by_category]
        if missing:
            raise NotFound(
                f"{'categories' if len(missing) > 1 else 'category'} {', '.join(map(quote, missing[:10]))} "
                f"{'are' if len(missing) > 1 else 'is'} not in the catalogue",
                reason="CATEGORY_NOT_FOUND",
            )
        out = []
        for category in wanted:
            databases = [by_category[category][k] for k in self.kinds if k in by_category[category]]
            out.append(CategoryFigures(category, max(d.products for d in databases), databases))
        return out

    def image(self, product_id: str, image_id: str, category: str, deadline: Deadline) -> tuple[bytes, str]:
        """One catalogue image's stored thumbnail and image_uri -> (JPEG bytes or b"", URI or "")."""
        check_id("image_id", image_id, self.config.max_id_bytes, required=True)
        category, product = self.find(product_id, category, deadline)
        image = next((i for i in product.images if i.image_id == image_id), None)
        if image is None:
            names = [i.image_id for i in product.images]
            raise NotFound(
                f"product {quote(product_id)} of {quote(category)} has no image {quote(image_id)}; its images: "
                + ", ".join(map(quote, names[:10]))
                + (f" and {len(names) - 10} more" if len(names) > 10 else ""),
                reason="IMAGE_NOT_FOUND",
            )
        item = item_id_of(product_id, image_id)
        thumbnail = b""
        # The first kind holds it (gateway.pipeline); another kind when index_kinds was reordered.
        for kind in self._kinds_of(category) or self.kinds[:1]:
            thumbnail = self.index.thumbnails(category, kind, [item], deadline.remaining()).get(item, b"")
            if thumbnail:
                break
        if not thumbnail and not image.image_uri:
            raise NotFound(
                f"image {quote(image_id)} of product {quote(product_id)} has no stored thumbnail (it was indexed "
                "before thumbnails were kept, or straight into the index) and no image_uri: index it again "
                "through IndexProducts",
                reason="IMAGE_NOT_FOUND",
            )
        return thumbnail, image.image_uri
