"""The browser UI: submit, recent jobs, a live job page, the queue; server-rendered templates."""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlencode

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.datastructures import Cookie, State
from litestar.enums import RequestEncodingType
from litestar.exceptions import HTTPException, PermissionDeniedException
from litestar.params import Body, FromPath, QueryParameter
from litestar.response import Redirect, Template
from litestar.status_codes import HTTP_303_SEE_OTHER, HTTP_401_UNAUTHORIZED, HTTP_500_INTERNAL_SERVER_ERROR

from app._auth import SESSION_COOKIE, UI_PREFIX, Caller, Keys, LoginRequired, session_cookie
from app._deps import Access, FilesDep, Owner, Queries, StatsDep
from app._exceptions import error_body
from app._forms import operation_forms
from app._queries import JobFilter
from app._schemas import MAX_INT, Job
from streams import (
    ACTIVE_STATUSES,
    OPERATIONS,
    PIPELINE_POOL,
    TERMINAL_STATUSES,
    Event,
    JobcastError,
    JobStatus,
)

PAGE_SIZE = 20
EVENT_KINDS = tuple(str(kind.__struct_config__.tag) for kind in get_args(Event))
"""Every `event:` name an SSE stream can carry (EventSource needs a listener per name)."""


class LoginForm(msgspec.Struct, kw_only=True):
    """The login form's fields."""

    key: Annotated[str, msgspec.Meta(max_length=500)] = ""
    next: Annotated[str, msgspec.Meta(max_length=2000)] = UI_PREFIX


def _page(name: str, request: Request[Any, Any, Any], status_code: int = 200, **context: Any) -> Template:
    """A page with what the header needs: who is signed in, and whether sessions exist at all."""
    keys: Keys = request.app.state.api_keys
    caller = request.scope.get("user")
    context.update(caller=caller, sessions=not keys.empty, prefix=UI_PREFIX)
    return Template(template_name=name, context=context, status_code=status_code)


def _safe_next(target: str) -> str:
    """Only redirect within the UI (no open redirect)."""
    return target if target.startswith(UI_PREFIX) and not target.startswith("//") else UI_PREFIX


def login_redirect(request: Request[Any, Any, Any], _: LoginRequired) -> Response[Any]:
    """An unauthenticated page view goes to the login form, remembering where it was going."""
    wanted = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return Redirect(f"{UI_PREFIX}/login?{urlencode({'next': wanted})}", status_code=HTTP_303_SEE_OTHER)


def error_page(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """Errors on a page are shown as a page, with the status, detail and request id the API would give."""
    body = error_body(request, exc)
    problems = [f"{e['key']}: {e['message']}" for e in body.extra or () if isinstance(e, dict) and "key" in e]
    detail = "; ".join(problems) or body.detail  # which field was wrong, as the API's `extra` says
    return _page("error.html", request, status_code=body.status_code, status=body.status_code, detail=detail,
                 request_id=body.request_id)  # fmt: skip


@get("/", include_in_schema=False, exclude_from_auth=True)
async def to_ui() -> Redirect:
    """The bare address opens the UI."""
    return Redirect(UI_PREFIX, status_code=HTTP_303_SEE_OTHER)


class UiController(Controller):
    """Pages for people; every action on them calls the same JSON API a script would."""

    path = UI_PREFIX
    include_in_schema = False
    exception_handlers = {
        JobcastError: error_page,
        HTTPException: error_page,
        HTTP_500_INTERNAL_SERVER_ERROR: error_page,
    }

    @get("/", name="ui:submit")
    async def submit(self, request: Request[Any, Any, Any]) -> Template:
        """Upload files, pick an operation and its options, submit one job or a batch."""
        return _page("submit.html", request, operations=operation_forms())

    @get("/jobs", name="ui:jobs")
    async def jobs(
        self,
        request: Request[Any, Any, Any],
        queries: Queries,
        files: FilesDep,
        owner: Owner,
        access: Access,
        status: Annotated[list[JobStatus] | None, QueryParameter()] = None,
        job_type: Annotated[str | None, QueryParameter(name="type", max_length=64)] = None,
        page: Annotated[int, QueryParameter(ge=1, le=MAX_INT // PAGE_SIZE)] = 1,
        of_owner: Annotated[str | None, QueryParameter(name="owner", max_length=128)] = None,
    ) -> Template:
        """Recent jobs, newest first: filter by statuses and type (admins: by owner too; every
        owner's without one), page by page."""
        admin = access is None  # an admin sees (and may filter by) every owner's jobs
        if of_owner and of_owner != owner and not admin:
            raise PermissionDeniedException("only an admin key may list the jobs of other owners")
        chosen, of_owner = frozenset(status or ()), of_owner or None
        where = JobFilter(owner=of_owner if admin else owner, statuses=chosen, type=job_type or None)
        found = await queries.find(where, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
        unnamed = {job.file_id for job in found.items if job.file_id and not job.file_name}  # older jobs
        names = await files.names(unnamed, access)
        query = [("status", s) for s in sorted(chosen)] + ([("type", job_type)] if job_type else [])
        query += [("owner", of_owner)] if of_owner and admin else []

        def page_url(number: int) -> str:
            return f"{UI_PREFIX}/jobs?{urlencode([*query, ('page', number)])}"

        last_page = max(1, -(-found.total // PAGE_SIZE))
        return _page(
            "jobs.html", request, jobs=found.items, total=found.total, first=found.offset + 1,
            names=names, statuses=list(JobStatus), chosen=chosen, job_type=job_type or "",
            types=list(OPERATIONS), page=page, last_page=last_page, owner_filter=of_owner or "",
            prev_url=page_url(page - 1) if page > 1 else None,
            next_url=page_url(page + 1) if page < last_page else None,
        )  # fmt: skip

    @get("/jobs/{job_id:str}", name="ui:job")
    async def job(
        self, request: Request[Any, Any, Any], job_id: FromPath[str], queries: Queries, files: FilesDep,
        access: Access, part: Annotated[Literal["summary"] | None, QueryParameter(
            description="Only the result panel (the page fetches it once when the job ends)")] = None,
    ) -> Template:  # fmt: skip
        """One job, live: progress, step, events, result and actions; a batch's children, a
        pipeline's stages too."""
        job = await queries.get(job_id, access)  # admins open any owner's job from their list
        if part == "summary":
            return _page("_summary.html", request, **await self._view(job, [], files, access))
        children = await queries.children(job_id, access)
        return _page("job.html", request, kinds=EVENT_KINDS, **await self._view(job, children, files, access))

    @staticmethod
    async def _view(job: Job, children: list[Job], files: FilesDep, owner: str | None) -> dict[str, Any]:
        ids = {j.file_id for j in (job, *children) if j.file_id}
        result = job.result or {}
        # A pipeline's result lists each stage's outputs: every one is a download of the pipeline.
        staged = [o for s in result.get("stages", ()) if isinstance(s, dict) for o in s.get("outputs", ())]
        outputs = [o for o in (*result.get("outputs", ()), *staged) if isinstance(o, dict)]
        text_keys = ("text", "text_truncated", "text_file_id", "text_url")
        details = {
            k: v
            for k, v in result.items()
            if k not in ("outputs", "stages", "segments", "quality", *text_keys)
        }
        return {
            "job": job, "children": children, "pipeline": job.pool == PIPELINE_POOL, "names": await files.names(ids, owner), "outputs": outputs,
            "text": result.get("text") if isinstance(result.get("text"), str) else None,
            "text_cut_url": result.get("text_url") if result.get("text_truncated") else None,
            "details": msgspec.json.format(msgspec.json.encode(details)).decode() if details else "",
            "terminal": sorted(TERMINAL_STATUSES), "active": sorted(ACTIVE_STATUSES),
        }  # fmt: skip

    @get("/queue", name="ui:queue")
    async def queue(self, request: Request[Any, Any, Any], stats: StatsDep, owner: Owner) -> Template:
        """The queue's figures; workers and per-type statistics for admins."""
        caller: Caller = request.user
        heartbeats = await stats.heartbeats()  # read once for the page's three parts
        figures = await stats.queue_stats(owner, heartbeats)
        workers = (heartbeats or []) if caller.admin else []
        by_type = (await stats.statistics(workers)).by_type if caller.admin else {}
        return _page("queue.html", request, stats=figures, workers=workers, by_type=by_type)

    @get("/login", name="ui:login", exclude_from_auth=True)
    async def login_form(self, request: Request[Any, Any, Any], next_page: Annotated[
        str, QueryParameter(name="next", max_length=2000)] = UI_PREFIX,
    ) -> Response[Any]:  # fmt: skip
        """The key form (straight to the UI when no key is configured)."""
        keys: Keys = request.app.state.api_keys
        if keys.empty:
            return Redirect(_safe_next(next_page), status_code=HTTP_303_SEE_OTHER)
        return _page("login.html", request, next=_safe_next(next_page), error=None)

    @post("/login", name="ui:login-submit", exclude_from_auth=True, status_code=HTTP_303_SEE_OTHER)
    async def login(
        self,
        request: Request[Any, Any, Any],
        state: State,
        data: Annotated[LoginForm, Body(media_type=RequestEncodingType.URL_ENCODED)],
    ) -> Response[Any]:
        """Trade a key for the session cookie, then go where the user was heading."""
        keys: Keys = state.api_keys
        record = keys.lookup(data.key) if data.key else None
        if record is None:
            return _page("login.html", request, HTTP_401_UNAUTHORIZED, next=_safe_next(data.next),
                         error="That key is not valid.")  # fmt: skip
        cookie = session_cookie(state.token_secret, Caller(owner=record.name, admin=record.admin, key=record))
        return Redirect(_safe_next(data.next), status_code=HTTP_303_SEE_OTHER, cookies=[cookie])

    @post("/logout", name="ui:logout", exclude_from_auth=True, status_code=HTTP_303_SEE_OTHER)
    async def logout(self) -> Redirect:
        """Forget the session."""
        gone = Cookie(key=SESSION_COOKIE, value="", max_age=0, path="/")
        return Redirect(f"{UI_PREFIX}/login", status_code=HTTP_303_SEE_OTHER, cookies=[gone])
