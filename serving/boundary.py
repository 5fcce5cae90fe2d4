"""Every reliance of the service on BentoML's internals, in one place, checked before it is used.

BentoML 1.4 falls short of some of this service's promises, and no public API reaches the code
that would keep them. Each mend below replaces one internal name, says why, and names the test
that fails without it. `apply()` runs once, when serving/service.py is imported (in BentoML's
supervisor and in each worker). It first checks that the installed BentoML is one these mends
were verified against and that every name they replace is still there: if BentoML moved, the
service stops at start with a message naming what moved, rather than running unmended (a
missing `MultipartSerde.parse_request` mend would mean fetching URLs that clients name).

The HTTP stack, outermost first, as BentoML builds it with these mends applied:

    Starlette's CORS middleware          (only with CIFAR10_CORS_ORIGINS; moved here by cors_outermost)
    BentoML's request metrics            (counts every answer, refusals included)
    serving.admission.Admission          (429 beyond its concurrency limit; moved here by shed_load_early)
    OpenTelemetry tracing                (only when an exporter is configured: trace_only_for_an_exporter)
    BentoML's access log, its timeout (504)
    serving.errors.ErrorAnswers          (one JSON error shape, a JSON 404 too; the corrected /docs.json)
    serving.uploads.Bodies               (400/405/415/411/413 from the request line and headers; a raw image → a form; GET /models → POST)
    serving.admission.Abandonment        (a request whose client has left stops: decoding, batching)
    DirectEndpoints                      (a form to an image endpoint: parse_form, validate, call the API method, answer)
    BentoML's endpoint: the rest; a form parsed likewise (multipart_forms_as_declared)
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import logging
import typing

import bentoml
from bentoml import get_current_service  # once: each `bentoml.` name is looked up by its lazy module (µs a request)
from bentoml.exceptions import BadInput, BentoMLException
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request

from serving.errors import field_problem
from serving.uploads import unknown_field

# The BentoML releases these mends were verified against: the test suite passed on each.
# pyproject.toml pins the same range (tests/test_boundary.py keeps the two equal).
VERIFIED = SpecifierSet("==1.4.40")

# Every internal name replaced below, as "module:attribute.path".
REPLACED = (
    "_bentoml_impl.serde:MultipartSerde.parse_request",
    "bentoml.serving:running_inside_container",
    "_bentoml_impl.server.app:ServiceAppFactory.middlewares",
    "_bentoml_sdk.io_models:IOMixin.mime_type",
)
# Internal names the mends read without replacing them.
READ = (
    "bentoml._internal.server.http.instruments:RunnerTrafficMetricsMiddleware",
    "bentoml._internal.container:BentoMLContainer.tracing.exporter_type",
    "opentelemetry.instrumentation.asgi:OpenTelemetryMiddleware",
    "bentoml._internal.server.http_app:logger",
    "bentoml._internal.server.http_app:log_exception",
    "bentoml._internal.container:BentoMLContainer.http.response.trace_id",
    "_bentoml_sdk.method:APIMethod.func",
    "_bentoml_sdk.method:APIMethod.route",
    "_bentoml_sdk.method:APIMethod.input_spec",
    "_bentoml_sdk.method:APIMethod.output_spec",
    "_bentoml_sdk.method:APIMethod.batchable",
    "_bentoml_sdk.method:APIMethod.ctx_param",
    "_bentoml_sdk.method:APIMethod.is_stream",
    "_bentoml_sdk.io_models:IORootModel",
)


class BentoMLMoved(RuntimeError):
    """The installed BentoML is not the one the mends were verified against."""


def check() -> None:
    """Refuse to go on with an unverified BentoML, or one where a name the mends need is gone."""
    version = bentoml.__version__
    if Version(version) not in VERIFIED:
        raise BentoMLMoved(
            f"BentoML {version} is installed; this service relies on BentoML internals verified with BentoML {VERIFIED} only "
            f"(serving/boundary.py). Install a verified release (pip install 'bentoml{VERIFIED}'), or check each mend in "
            "serving/boundary.py against this release, run the tests, and widen VERIFIED and pyproject.toml's pin together."
        )
    for name in REPLACED + READ:
        try:
            resolve(name, own=name in REPLACED)
        except (ImportError, AttributeError) as exc:
            raise BentoMLMoved(f"BentoML {version} has no {name} ({exc}); serving/boundary.py mends it. Check that mend against this release.") from None


def resolve(name: str, own: bool = False):
    """The object that "module:attribute.path" names; with `own`, its last part must be defined by its
    owner itself, not inherited (a mend replaces that very definition)."""
    module, _, path = name.partition(":")
    value = importlib.import_module(module)
    for part in path.split("."):
        if own and part == path.rpartition(".")[2] and isinstance(value, type) and part not in vars(value):
            raise AttributeError(f"{value.__name__} no longer defines {part} itself")
        value = getattr(value, part)
    return value


_applied = False


def apply() -> None:
    global _applied
    if _applied:
        return
    check()
    multipart_forms_as_declared()
    respawn_workers_in_containers()
    shed_load_early()
    cors_outermost()
    trace_only_for_an_exporter()
    cache_response_media_types()
    refusals_without_tracebacks()
    _applied = True


async def parse_form(request, cls):
    """A multipart form (and the query string's fields) as BentoML's input model `cls`, or a 400 that says what to send."""
    try:
        form = await request.form()  # Starlette's limits: at most 1,000 files and 1,000 fields
    except HTTPException as exc:
        raise BadInput(f"malformed multipart/form-data body: {exc.detail}") from None
    except ClientDisconnect:  # nobody reads the answer, but it is the client's doing: a 400, not a 500
        raise BadInput("the client disconnected before its form was read") from None
    fields: dict[str, list] = {}
    for name, value in form.multi_items():
        fields.setdefault(name, []).append(value)
    for name, value in request.query_params.multi_items():  # `?k=3` works with a form as with a raw body
        if name in form:
            raise BadInput(f"{name!r} is given in both the query string and the request body; give it once")
        fields.setdefault(name, []).append(value)
    declared = ", ".join(cls.model_fields)
    data: dict[str, typing.Any] = {}
    for name, values in fields.items():
        if name not in cls.model_fields:
            raise BadInput(unknown_field(name, declared, request.headers.get("content-type", "")))
        if name in cls.multipart_fields:
            if not all(isinstance(v, UploadFile) for v in values):
                raise BadInput(f"{name!r} must be uploaded files (multipart) or the raw body; this service does not fetch URLs")
            data[name] = values if typing.get_origin(cls.model_fields[name].annotation) is list else values[0]
            continue
        if len(values) > 1:
            raise BadInput(f"{name!r} is given {len(values)} times; give it once")
        if isinstance(values[0], UploadFile):
            raise BadInput(f"form field {name!r} takes a value, not a file; the images go in 'images'")
        try:
            data[name] = json.loads(values[0])
        except json.JSONDecodeError:
            data[name] = values[0]
    return cls.model_validate(data)


def multipart_forms_as_declared() -> None:
    """A form is parsed into the endpoint's parameters, or refused with a 400 that says what to send (parse_form).

    BentoML's parser fetches a URL sent in place of a file (a server that fetches what clients
    name can be steered at other hosts: SSRF); `json.loads` the bytes of a file sent under a
    text field or an unknown name (a 500); and lets Starlette's HTTPException for a malformed
    body escape its endpoint wrapper (a 500). Tests: tests/test_service.py
    (test_a_url_in_place_of_a_file_is_refused_not_fetched, test_a_malformed_form_is_a_400_naming_the_problem,
    test_form_fields_other_than_the_declared_ones_are_400).
    """
    from _bentoml_impl.serde import MultipartSerde

    async def parse_request(self, request, cls):
        return await parse_form(request, cls)

    MultipartSerde.parse_request = parse_request


def respawn_workers_in_containers() -> None:
    """A worker that dies is replaced, in a container too.

    BentoML turns respawning off when BENTOML_CONTAINERIZED is set (its own images set it): a killed
    worker then leaves the supervisor holding the port with nobody answering, and the container
    looks alive to everything but a probe with a timeout.
    Test: tests/test_faults.py::test_a_killed_worker_is_replaced_in_a_container_too.
    """
    import bentoml.serving

    bentoml.serving.running_inside_container = lambda: False


def shed_load_early() -> None:
    """Refusing a request beyond CIFAR10_MAX_CONCURRENCY costs next to nothing.

    BentoML puts a service's own middleware innermost, under tracing, access logging and its
    timeout; a 429 paid for all of them, and at eight times the saturating load on 2 cores the
    refusals alone took the worker's event loop (docs/operations.md). The admission check moves to
    just under BentoML's request metrics, which still count every refusal.
    Test: tests/test_faults.py::test_beyond_the_concurrency_limit_requests_are_refused_at_once_and_the_rest_served.
    """
    from _bentoml_impl.server.app import ServiceAppFactory
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware

    from serving.admission import Admission

    stack = ServiceAppFactory.middlewares

    def admission_early(self):
        middlewares = stack.fget(self)
        admission = [m for m in middlewares if m.cls is Admission]
        rest = [m for m in middlewares if m.cls is not Admission]
        metrics = 1 if rest and rest[0].cls is RunnerTrafficMetricsMiddleware else 0
        return rest[:metrics] + admission + rest[metrics:]

    ServiceAppFactory.middlewares = property(admission_early)


def cors_outermost() -> None:
    """Every answer to a browser's script carries its CORS headers, refusals included.

    BentoML puts its CORS middleware (CIFAR10_CORS_ORIGINS, or `http.cors` in BentoML's configuration)
    innermost, under the service's own middleware: a 400 from the upload checks, a 429 from load
    shedding or a 404 left without Access-Control-Allow-Origin, which a browser hides from the script
    as a network error. Outermost, it also answers preflight requests before anything else runs, and
    a preflight it refuses gets the service's JSON error, not Starlette's plain text.
    Test: tests/test_service.py::test_a_browser_page_of_an_allowed_origin_reads_answers_and_refusals.
    """
    from _bentoml_impl.server.app import ServiceAppFactory
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware
    from starlette.responses import JSONResponse

    class JSONRefusals(CORSMiddleware):
        def preflight_response(self, request_headers):
            answer = super().preflight_response(request_headers)
            if answer.status_code < 400:
                return answer
            headers = {k: v for k, v in answer.headers.items() if k not in ("content-length", "content-type")}
            failures = answer.body.decode()  # Starlette's "Disallowed CORS origin, method, headers"
            hint = " (CIFAR10_CORS_ORIGINS names the pages allowed)" if "origin" in failures else ""
            refused = f"CORS preflight refused: {failures}{hint}"
            return JSONResponse({"error": refused}, status_code=answer.status_code, headers=headers)

    stack = ServiceAppFactory.middlewares

    def cors_first(self):
        middlewares = stack.fget(self)
        cors = [Middleware(JSONRefusals, *m.args, **m.kwargs) for m in middlewares if m.cls is CORSMiddleware]
        return cors + [m for m in middlewares if m.cls is not CORSMiddleware]

    ServiceAppFactory.middlewares = property(cors_first)


def trace_only_for_an_exporter() -> None:
    """No tracing work unless the traces go somewhere.

    BentoML wraps every request, and every message of its answer, in OpenTelemetry spans even when
    no exporter is configured (its default), and then drops them: leaving the middleware out serves
    1.60× the CNN's single-image requests (docs/performance.md, `python -m bench.ab`). It stays when
    BentoML's configuration names an exporter (`tracing.exporter_type`).
    Test: tests/test_service.py::test_requests_are_traced_only_when_traces_go_somewhere.
    """
    from _bentoml_impl.server.app import ServiceAppFactory
    from bentoml._internal.container import BentoMLContainer
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    stack = ServiceAppFactory.middlewares

    def traced_if_exported(self):
        middlewares = stack.fget(self)
        if BentoMLContainer.tracing.exporter_type.get():
            return middlewares
        return [m for m in middlewares if m.cls is not OpenTelemetryMiddleware]

    ServiceAppFactory.middlewares = property(traced_if_exported)


def cache_response_media_types() -> None:
    """A response's media type is worked out once per output model, not once per response.

    BentoML derives it by generating the output model's whole JSON schema, on every response, in
    the worker's one GIL-bound Python thread (it showed under every response in a py-spy --gil
    profile of 64-image requests). It depends on the class alone.
    Test: tests/test_boundary.py::test_a_response_media_type_is_worked_out_once_per_output_model.
    """
    from _bentoml_sdk.io_models import IOMixin

    IOMixin.mime_type = classmethod(functools.cache(IOMixin.mime_type.__func__))


class DirectEndpoints:
    """The image endpoints' forms answered without BentoML's endpoint machinery, by the same parts.

    Between a parsed form and its answer, BentoML's routing, endpoint wrapper, argument binding,
    request context and streamed response held a fifth of a single-image request's Python
    (docs/performance.md). Here a form posted to an image endpoint is parsed by parse_form into the
    endpoint's BentoML input model, which validates it; the service's method answers (the function
    `@bentoml.api` wraps); BentoML's output model serializes the answer, and an error takes the
    status, body and log line BentoML's endpoint wrapper gives it. Everything else goes on to
    BentoML: other bodies, other routes, an endpoint of another shape (`answerable`), and every
    request while traces are exported or their ids answered (BentoML's endpoint adds the spans and
    the X-BentoML-Request-ID and X-BentoML-Trace-ID headers). The OpenAPI document,
    `bentoml.SyncHTTPClient` and in-process calls are BentoML's, unchanged.
    Tests: tests/test_service.py::test_the_direct_path_answers_as_bentoml_s_endpoint_does,
    tests/test_boundary.py::test_direct_endpoints_answer_the_image_endpoints_forms_and_pass_the_rest_on.
    """

    def __init__(self, app, service: type, routes: tuple[str, ...]):
        from bentoml._internal.container import BentoMLContainer

        self.app = app
        traced = BentoMLContainer.tracing.exporter_type.get() or BentoMLContainer.http.response.trace_id.get()
        self.apis = {} if traced else {a.route: a for a in service.apis.values() if a.route in routes and answerable(a)}
        self.headers = [(b"content-type", b"application/json"), (b"server", f"BentoML Service/{service.name}".encode())]
        self.log_exception = resolve("bentoml._internal.server.http_app:log_exception")

    async def __call__(self, scope, receive, send):
        api = self.apis.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if api is None or _media_type(scope) != b"multipart/form-data":
            return await self.app(scope, receive, send)
        request = Request(scope, receive)
        try:
            try:
                data = await parse_form(request, api.input_spec)
                answer = await api.func(get_current_service(), **{name: getattr(data, name) for name in api.input_spec.model_fields})
                status, body = 200, api.output_spec(answer).model_dump_json().encode()
            except Exception as exc:
                self.log_exception(request)  # BentoML's line, which Refusal makes one line for a refusal
                status, body = _error(exc)
            headers = [*self.headers, (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        finally:  # answered, failed or cancelled (the client left, the timeout ran out)
            await request.close()  # the form's spooled files


def answerable(api) -> bool:
    """An endpoint of the one shape DirectEndpoints calls: a coroutine that answers a JSON list, without
    BentoML's batching, request context or streaming."""
    from _bentoml_sdk.io_models import IORootModel

    shaped = inspect.iscoroutinefunction(api.func) and isinstance(api.output_spec, type) and issubclass(api.output_spec, IORootModel)
    return shaped and not api.batchable and api.ctx_param is None and not api.is_stream


def _media_type(scope) -> bytes:
    return next((v for k, v in scope["headers"] if k == b"content-type"), b"").split(b";")[0].strip().lower()


def _error(exc: Exception) -> tuple[int, bytes]:
    """The status and body BentoML's endpoint wrapper (ServiceAppFactory.api_endpoint_wrapper) answers `exc` with;
    serving.errors.ErrorAnswers, outside, gives them the service's one shape."""
    unexpected = {"error": "An unexpected error has occurred, please check the server log."}
    if isinstance(exc, ValidationError):
        content: typing.Any = {"error": f"{exc.error_count()} validation error for {exc.title}", "detail": exc.errors(include_context=False, include_input=False)}
        return 400, json.dumps(content).encode()
    if not isinstance(exc, BentoMLException):
        return 500, json.dumps(unexpected).encode()
    status = exc.error_code.value
    content = {"error": "Authorization error"} if status in (401, 403) else unexpected if status >= 500 else [{"error": str(exc)}]
    return status, json.dumps(content).encode()


INPUT_MODEL = "Input"  # the name BentoML gives each endpoint's input model (`api.input_spec`): its ValidationError's title


class Refusal(logging.Filter):
    """A client's mistake is one line of the log at INFO, not an ERROR with a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        # a request BentoML's input model refused; a ValidationError of any other model (an answer the
        # endpoint built) is a fault of the server, whatever status BentoML gives it, and keeps its traceback
        invalid_request = isinstance(exc, ValidationError) and exc.title == INPUT_MODEL
        refused = invalid_request or (isinstance(exc, BentoMLException) and exc.error_code < 500)
        if refused:
            # BentoML's message is "Exception on PATH [METHOD]"; a filter that raised would make the refusal a 500
            path, method = record.args if isinstance(record.args, tuple) and len(record.args) == 2 else ("?", "?")
            if invalid_request:  # as the answer names them: "neighbours: Input should be ..."
                status, reason = 400, "; ".join(field_problem(e) for e in exc.errors())
            else:
                status, reason = int(exc.error_code), " ".join(str(exc).split())
            record.msg, record.args = "%s %s refused (%d): %s", (method, path, status, reason)
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info = record.exc_text = None
        return True


def refusals_without_tracebacks() -> None:
    """A refused request logs one line, not a traceback.

    BentoML logs every exception its endpoints raise with `logger.error(..., exc_info=True)`, a 400
    for an image that is not one as loudly as a fault of the server: the log of a service that
    refuses bad uploads fills with tracebacks that say nothing about the server. Refusals (request
    validation, BentoML's 4xx exceptions) become one INFO line naming the request and the reason;
    faults (5xx, anything else) keep their traceback.
    Test: tests/test_service.py::test_a_refusal_is_one_line_of_the_log_and_a_fault_keeps_its_traceback.
    """
    logger = resolve("bentoml._internal.server.http_app:logger")
    if not any(isinstance(f, Refusal) for f in logger.filters):
        logger.addFilter(Refusal())
