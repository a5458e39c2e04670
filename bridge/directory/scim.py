"""SCIM 2.0 push: the identity provider provisions people and groups into Enclave.

Three parts:

* :class:`StoreScimStorage`, a scim2-server storage keeping Users and Groups in Enclave's
  :class:`~bridge.store.domains.ScimStore` (``scim_*`` tables). scim2-server does the protocol
  (validation, filters, PATCH, pagination, ETags); an in-memory cache loaded at start-up
  answers reads and searches, and every write is awaited in the store before the answer, so
  an acknowledged change is durable. A failed store write undoes the cache change.
* :class:`ScimService`, the aiohttp routes under ``path_prefix`` with bearer-token auth, the
  normalisation of what Entra ID sends, and the ``on_change`` signal for the sync service.
* :class:`ScimSource`, the :class:`~.source.DirectorySource` reading the stored resources.
"""

from __future__ import annotations

import asyncio
import datetime
import hmac
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Annotated, Any

import orjson
from aiohttp import web
from pydantic import Field
from scim2_models import (
    AuthenticationScheme,
    Bulk,
    CaseExact,
    ChangePassword,
    ComplexAttribute,
    Context,
    ETag,
    External,
    Filter,
    Group,
    Meta,
    Mutability,
    Patch,
    Reference,
    Required,
    Resource,
    ResourceType,
    ResponseParameters,
    SCIMException,
    ScimPolicy,
    ScimProvider,
    SearchRequest,
    ServiceProviderConfig,
    Sort,
    User,
)
from scim2_models import EnterpriseUser as _EnterpriseUser
from scim2_server.handler import AsyncScimHandler
from scim2_server.memory import InMemoryStorage
from scim2_server.requests import ScimRequest
from scim2_server.responses import SCIM_MEDIA_TYPE, ScimResponse
from scim2_server.service import ScimService as _ProtocolService
from scim2_server.storage import AsyncScimStorage, SearchPage, search_page

from ..kernel.timestamps import utc_datetime
from ..model.people import DirectoryError, DirectorySnapshot, Person
from ..model.people import Group as DirGroup
from ..store.base import ScimResource
from ..store.domains import ScimStore

log = logging.getLogger(__name__)

ENTERPRISE_URN = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
CORE_USER_URN = "urn:ietf:params:scim:schemas:core:2.0:User"
ERROR_URN = "urn:ietf:params:scim:api:messages:2.0:Error"
RESOURCE_TYPES = ("User", "Group")


# -- the resource models ------------------------------------------------------------------

class Manager(ComplexAttribute):
    """The enterprise ``manager``, with ``$ref`` optional.

    scim2-models marks ``$ref`` required, but Entra ID and Okta send ``{"value": id}`` only
    (RFC 7643 §4.3 calls both sub-attributes RECOMMENDED).
    """

    value: Annotated[str | None, CaseExact.true] = None
    ref: Annotated[Reference[User] | None, Required.false] = Field(  # type: ignore[type-arg]
        None, serialization_alias="$ref", validation_alias="$ref")
    display_name: Annotated[str | None, Mutability.read_only] = None


class EnterpriseUser(_EnterpriseUser):
    """The enterprise extension with the relaxed :class:`Manager`."""

    manager: Manager | None = None  # type: ignore[assignment]


BEARER_SCHEME = AuthenticationScheme(
    type=AuthenticationScheme.Type.oauthbearertoken,
    name="OAuth Bearer Token",
    description="Authentication with the bearer token configured in Enclave",
    spec_uri=Reference[External]("https://www.rfc-editor.org/rfc/rfc6750"),
    primary=True,
)


def build_provider() -> ScimProvider:
    """What the endpoint serves and announces on /ServiceProviderConfig."""
    config = ServiceProviderConfig(
        patch=Patch(supported=True),
        bulk=Bulk(supported=False, max_operations=0, max_payload_size=0),
        filter=Filter(supported=True, max_results=1000),
        change_password=ChangePassword(supported=False),
        sort=Sort(supported=True),
        etag=ETag(supported=True),
        authentication_schemes=[BEARER_SCHEME],
    )
    policy = ScimPolicy(
        # identity providers send attributes of their own (Okta profile attributes,
        # custom extensions): keep them rather than refuse the whole request
        unknown=ScimPolicy.Unknown.keep,
        # Entra ID: {"op": "Remove", "path": "members", "value": [{"value": id}]}
        remove_value_as_filter=ScimPolicy.RemoveValue.apply,
        # Entra ID: replace emails[type eq "work"].value on a user with no work email
        unmatched_path_filter=ScimPolicy.UnmatchedPathFilter.create,
    )
    return ScimProvider(
        models=[User, EnterpriseUser, Group],
        resource_types=[ResourceType.from_resource(User[EnterpriseUser]),
                        ResourceType.from_resource(Group)],
        config=config,
        policy=policy,
    )


class _Protocol(_ProtocolService):
    """scim2-server's protocol steps, answering a PATCH with 200 and the resource.

    RFC 7644 §3.5.2 allows 204, but 200 with the whole resource is the answer every
    identity provider accepts (Okta documents it as the expected one).
    """

    def patch_response(self, base_url: str, resource: Resource[Any],
                       response_parameters: ResponseParameters[Any]) -> ScimResponse:
        return self.resource_response(self.publish(base_url, resource),
                                      Context.RESOURCE_PATCH_RESPONSE, response_parameters)


class StoreUnavailable(SCIMException):
    """The store refused a write: nothing changed, the identity provider should retry."""

    status = 503
    _default_detail = "The store is unavailable; nothing was changed, retry later"


class NotReady(SCIMException):
    status = 503
    _default_detail = "The SCIM endpoint is starting; retry later"


# -- storage ------------------------------------------------------------------------------

def _etag(version: int) -> str:
    return f'W/"{version}"'


def _ms_to_dt(ms: int) -> datetime.datetime:
    return utc_datetime(ms)


class _Cache(InMemoryStorage):
    """scim2-server's in-memory storage, with the version and the time set per write."""

    def __init__(self) -> None:
        super().__init__(clock=lambda: _ms_to_dt(self.write_ms))
        self.write_ms = 0
        self.write_version = 1

    def generate_id(self, resource_type: ResourceType, resource: Resource[Any]) -> str:
        return str(uuid.uuid4())

    def next_version(self) -> str:
        return _etag(self.write_version)


class StoreScimStorage(AsyncScimStorage):
    """An asynchronous scim2-server storage over Enclave's store.

    Reads come from the cache (scim2-server filters, sorts and pages it); writes change
    the cache, then await the store, and undo the cache change if the store fails. One lock
    serialises the SCIM operations, so a write's store round-trip is never interleaved
    with another operation. Passwords are never stored.
    """

    def __init__(self, store: ScimStore, provider: ScimProvider,
                 clock_ms: Callable[[], int]) -> None:
        self._store = store
        self._provider = provider
        self._clock_ms = clock_ms
        self._cache = _Cache()
        self._rows: dict[tuple[str, str], ScimResource] = {}
        self._lock = asyncio.Lock()
        self.loaded = False
        self.writes = 0  # successful store writes, for the on_change signal

    async def load(self) -> None:
        """Fill the cache from the store (at start-up, before serving)."""
        async with self._lock:
            rows: dict[tuple[str, str], ScimResource] = {}
            resources: list[Resource[Any]] = []
            with self._provider:
                for rt in RESOURCE_TYPES:
                    model = self._provider.model_for(rt)
                    assert model is not None
                    for row in await self._store.scim_list(rt):
                        resource = model.model_validate_json(row.data)
                        assert isinstance(resource, Resource)
                        resource.meta = Meta(
                            resource_type=rt, created=_ms_to_dt(row.created_at),
                            last_modified=_ms_to_dt(row.updated_at),
                            version=_etag(row.version))
                        resources.append(resource)
                        rows[(rt, row.id)] = row
                self._cache.resources = resources
            self._rows = rows
            self.loaded = True
            log.info("SCIM: loaded %d users and %d groups from the store",
                     sum(1 for k in rows if k[0] == "User"),
                     sum(1 for k in rows if k[0] == "Group"))

    @asynccontextmanager
    async def _operation(self) -> AsyncIterator[None]:
        async with self._lock:
            yield

    def operation(self) -> Any:
        return self._operation()

    async def get(self, resource_type: ResourceType, resource_id: str, *,
                  response_parameters: ResponseParameters[Any] | None = None) -> Resource[Any]:
        return self._cache.get(resource_type, resource_id)

    async def search(self, resource_types: list[ResourceType],
                     search_request: SearchRequest[Any], *, position: Any = None) -> SearchPage:
        return search_page(self._cache, resource_types, search_request, position)

    async def create(self, resource_type: ResourceType,
                     resource: Resource[Any]) -> Resource[Any]:
        now = self._clock_ms()
        self._cache.write_ms, self._cache.write_version = now, 1
        before = self._cache.resources
        created = self._cache.create(resource_type, _without_password(resource))
        assert created.id is not None
        await self._persist(resource_type, created, 1, now, now, before)
        return created

    async def update(self, resource_type: ResourceType, resource: Resource[Any], *,
                     expected_version: str | None = None) -> Resource[Any]:
        key = (str(resource_type.name), str(resource.id))
        row = self._rows.get(key)
        now = self._clock_ms()
        version = (row.version if row else 0) + 1
        self._cache.write_ms, self._cache.write_version = now, version
        before = self._cache.resources
        updated = self._cache.update(resource_type, _without_password(resource),
                                     expected_version=expected_version)
        created_at = row.created_at if row else now
        await self._persist(resource_type, updated, version, created_at, now, before)
        return updated

    async def delete(self, resource_type: ResourceType, resource_id: str, *,
                     expected_version: str | None = None) -> None:
        before = self._cache.resources
        self._cache.delete(resource_type, resource_id, expected_version=expected_version)
        name = str(resource_type.name)
        await _settled(self._store_write(
            self._store.scim_delete(name, resource_id), before, (name, resource_id), None))

    async def _persist(self, resource_type: ResourceType, resource: Resource[Any],
                       version: int, created_at: int, updated_at: int,
                       before: list[Resource[Any]]) -> None:
        name = str(resource_type.name)
        row = ScimResource(
            resource_type=name, id=str(resource.id), external_id=resource.external_id,
            data=resource.model_dump_json(scim_ctx=Context.RESOURCE_QUERY_RESPONSE),
            version=version, created_at=created_at, updated_at=updated_at)
        await _settled(self._store_write(self._store.scim_put(row), before, (name, row.id), row))

    async def _store_write(self, write: Awaitable[Any], before: list[Resource[Any]],
                           key: tuple[str, str], row: ScimResource | None) -> None:
        """Await the store; on failure put the cache back as it was ``before``."""
        try:
            await write
        except Exception as e:
            self._cache.resources = before  # the cache must not hold what was not stored
            log.exception("SCIM: could not write %s %s to the store", key[0], key[1])
            raise StoreUnavailable from e
        if row is None:
            self._rows.pop(key, None)
        else:
            self._rows[key] = row
        self.writes += 1


async def _settled(coro: Coroutine[Any, Any, None]) -> None:
    """Run a store write to its end even if the request is cancelled meanwhile.

    The write and the cache change (or its undoing) then always agree, and the operation
    lock is held until the write is settled, so no other operation sees a half-done one.
    """
    task = asyncio.ensure_future(coro)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        if not task.done():
            await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # retrieved: the cancellation is what propagates
        raise


def _without_password(resource: Resource[Any]) -> Resource[Any]:
    """Okta sends a password on creation; Enclave has no use for it and never keeps it."""
    if getattr(resource, "password", None) is None:
        return resource
    copy = resource.model_copy(deep=True)
    copy.password = None  # type: ignore[attr-defined]
    return copy


# -- normalising what identity providers send ---------------------------------------------

def normalise_body(body: Any) -> Any:
    """Fix what Entra ID sends that scim2-server would refuse (in place; returns ``body``).

    Capitalised ops (``Replace``) and string booleans (``"False"``) need nothing: scim2-models
    reads them. What does need fixing: Entra ID sets the enterprise manager with a bare id,
    ``{"op": "Add", "path": "urn:…:enterprise:2.0:User:manager", "value": "id"}``, where the
    schema has a complex ``{"value": "id"}``; Okta can send the same inside a resource.
    """
    if not isinstance(body, dict):
        return body
    ops = body.get("Operations")
    if isinstance(ops, list):
        manager_path = f"{ENTERPRISE_URN}:manager".casefold()
        for op in ops:
            if not isinstance(op, dict):
                continue
            path = op.get("path")
            value = op.get("value")
            if isinstance(path, str) and path.casefold() == manager_path:
                if str(op.get("op", "")).casefold() == "remove":
                    op.pop("value", None)  # removing the manager: whatever value Entra adds
                elif isinstance(value, list) and len(value) == 1:
                    value = value[0]  # Entra: [{"value": id}] on a single-valued attribute
                if isinstance(value, str) and "value" in op:
                    op["value"] = {"value": value}
                elif isinstance(value, dict) and "value" in op:
                    op["value"] = value
            elif isinstance(value, dict):
                _normalise_resource(value)
    else:
        _normalise_resource(body)
    return body


def _normalise_resource(data: dict[str, Any]) -> None:
    for key in list(data):
        if key.casefold() == ENTERPRISE_URN.casefold() and isinstance(data[key], dict):
            ext = data[key]
            manager = ext.get("manager")
            if isinstance(manager, str):
                ext["manager"] = {"value": manager} if manager else None
        elif key.casefold() == f"{ENTERPRISE_URN}:manager".casefold() and isinstance(
                data[key], str):
            data[key] = {"value": data[key]} if data[key] else None


# -- the HTTP endpoint --------------------------------------------------------------------

def _scim_error(status: int, detail: str, scim_type: str | None = None) -> web.Response:
    body: dict[str, Any] = {"schemas": [ERROR_URN], "status": str(status), "detail": detail}
    if scim_type:
        body["scimType"] = scim_type
    headers = {"WWW-Authenticate": 'Bearer realm="SCIM"'} if status == 401 else None
    return web.Response(status=status, body=orjson.dumps(body), content_type=SCIM_MEDIA_TYPE,
                        headers=headers)


class ScimService:
    """The SCIM 2.0 endpoint (RFC 7644) on Enclave's aiohttp application."""

    def __init__(self, store: ScimStore, *, token: str, path_prefix: str = "/scim/v2",
                 clock_ms: Callable[[], int], on_change: Callable[[], None] | None = None):
        if not token:
            raise ValueError("the SCIM bearer token must not be empty")
        self._token = token.encode()
        self.path_prefix = "/" + path_prefix.strip("/")
        self._on_change = on_change
        self.provider = build_provider()
        self.protocol = _Protocol(self.provider)
        self.storage = StoreScimStorage(store, self.provider, clock_ms)
        self.handler = AsyncScimHandler(self.protocol, self.storage)

    async def load(self) -> None:
        """Load the stored resources; call once before serving."""
        await self.storage.load()

    def add_routes(self, app: web.Application) -> None:
        path = self.path_prefix + "/{tail:.*}"
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            app.router.add_route(method, path, self.handle)

    def _authorised(self, request: web.Request) -> bool:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        value = value.strip()
        if scheme.lower() != "bearer" or not value:
            return False
        return hmac.compare_digest(value.encode(), self._token)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if not self._authorised(request):
            log.info("SCIM: refused %s %s: missing or wrong bearer token",
                     request.method, request.path)
            return _scim_error(401, "Missing or invalid bearer token")
        if not self.storage.loaded:
            return self._respond(self.protocol.error_response(NotReady()))
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _scim_error(413, "Request body too large")
        if raw.strip():
            try:
                parsed = orjson.loads(raw)
            except orjson.JSONDecodeError as e:
                return _scim_error(400, f"Request body is not valid JSON: {e}", "invalidSyntax")
            raw = orjson.dumps(normalise_body(parsed))
        else:
            raw = b""
        tail = request.match_info.get("tail", "")
        scim_request = ScimRequest(
            method=request.method,
            base_url=f"{request.scheme}://{request.host}{self.path_prefix}",
            path="/" + tail.removesuffix(".scim"),
            query=dict(request.query),
            headers=list(request.headers.items()),
            body=raw,
        )
        writes = self.storage.writes
        try:
            response = await self.handler.handle(scim_request)
        except SCIMException as e:
            log.info("SCIM: %s %s -> %s %s", request.method, request.path, e.status, e.detail)
            response = self.protocol.error_response(e)
        except Exception as e:
            log.exception("SCIM: unexpected error on %s %s", request.method, request.path)
            response = self.protocol.error_response(e)
        if self.storage.writes != writes and response.status < 400:
            log.info("SCIM: %s %s -> %d", request.method, request.path, response.status)
            if self._on_change is not None:
                try:
                    self._on_change()
                except Exception:
                    log.exception("SCIM: on_change callback failed")
        return self._respond(response)

    @staticmethod
    def _respond(response: ScimResponse) -> web.Response:
        headers = {k: v for k, v in response.headers.items() if k.lower() != "content-type"}
        if response.body is None or response.status == HTTPStatus.NO_CONTENT:
            return web.Response(status=int(response.status), headers=headers)
        return web.Response(status=int(response.status), body=orjson.dumps(response.body),
                            headers=headers, content_type=SCIM_MEDIA_TYPE)


# -- the directory source -----------------------------------------------------------------

class ScimSource:
    """The people and groups the identity provider pushed, as a directory snapshot."""

    name = "scim"

    def __init__(self, store: ScimStore):
        self._store = store

    async def read(self) -> DirectorySnapshot:
        try:
            user_rows = await self._store.scim_list("User")
            group_rows = await self._store.scim_list("Group")
        except Exception as e:
            raise DirectoryError(f"cannot read the SCIM resources from the store: {e}") from e
        try:
            users = [orjson.loads(r.data) for r in user_rows]
            groups = [orjson.loads(r.data) for r in group_rows]
        except orjson.JSONDecodeError as e:
            raise DirectoryError(f"a stored SCIM resource is not valid JSON: {e}") from e
        people = [person_from_scim(u, r.id) for u, r in zip(users, user_rows, strict=True)]
        user_ids = {p.id for p in people}
        return DirectorySnapshot.build(people, groups_from_scim(groups, group_rows, user_ids),
                                       source=self.name)


def _str(v: Any) -> str | None:
    if isinstance(v, str) and v.strip():
        return v.strip()
    return None


def _primary_first(items: Any) -> list[dict[str, Any]]:
    if not isinstance(items, list):
        return []
    entries = [i for i in items if isinstance(i, dict)]
    return sorted(entries, key=lambda i: i.get("primary") is not True)  # stable


def _bool(v: Any, default: bool) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    return default


def person_from_scim(data: dict[str, Any], resource_id: str) -> Person:
    """A SCIM User (as stored) as a directory person."""
    user_name = _str(data.get("userName")) or resource_id
    name = data.get("name") if isinstance(data.get("name"), dict) else {}
    assert isinstance(name, dict)
    given_family = " ".join(p for p in (_str(name.get("givenName")),
                                        _str(name.get("familyName"))) if p)
    display_name = (_str(data.get("displayName")) or _str(name.get("formatted"))
                    or given_family or user_name)
    email = next((e for e in (_str(i.get("value")) for i in _primary_first(data.get("emails")))
                  if e), None)
    ext = data.get(ENTERPRISE_URN) if isinstance(data.get(ENTERPRISE_URN), dict) else {}
    assert isinstance(ext, dict)
    manager = ext.get("manager")
    manager_id = _str(manager.get("value")) if isinstance(manager, dict) else _str(manager)
    location = next((loc for loc in (_str(a.get("locality"))
                                     for a in _primary_first(data.get("addresses"))) if loc),
                    None)
    if location is None:  # a custom extension's locality (e.g. urn:…:2.0:User: {locality})
        for key, value in data.items():
            if key.startswith("urn:") and isinstance(value, dict):
                location = _str(value.get("locality"))
                if location:
                    break
    return Person(
        id=resource_id,
        username=user_name,
        display_name=display_name,
        email=email,
        title=_str(data.get("title")),
        department=_str(ext.get("department")),
        location=location,
        manager=manager_id,
        disabled=not _bool(data.get("active"), True),
    )


def groups_from_scim(groups: list[dict[str, Any]], rows: list[ScimResource],
                     user_ids: set[str]) -> list[DirGroup]:
    """SCIM Groups as directory groups, keyed by displayName, nested groups expanded.

    Two SCIM groups with one displayName (Entra ID allows it) become one group with the
    members of both, since configuration names groups by displayName.
    """
    by_scim_id: dict[str, dict[str, Any]] = {r.id: g for g, r in zip(groups, rows, strict=True)}

    def members_of(gid: str, seen: set[str]) -> set[str]:
        found: set[str] = set()
        g = by_scim_id.get(gid)
        if g is None or gid in seen:
            return found
        seen.add(gid)
        for m in g.get("members") or []:
            value = _str(m.get("value")) if isinstance(m, dict) else None
            if value is None:
                continue
            if value in user_ids:
                found.add(value)
            elif value in by_scim_id:
                found |= members_of(value, seen)
        return found

    merged: dict[str, set[str]] = {}
    for gid, g in by_scim_id.items():
        name = _str(g.get("displayName")) or gid
        if name in merged:
            log.warning("SCIM: several groups are named %r; merging their members", name)
        merged.setdefault(name, set()).update(members_of(gid, set()))
    return [DirGroup(id=name, name=name, members=frozenset(members))
            for name, members in sorted(merged.items())]
