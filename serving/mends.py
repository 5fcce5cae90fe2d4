"""Where BentoML 1.4 falls short of this service's promises, the smallest mend for each.

Applied once, when serving/service.py is imported (in BentoML's supervisor and in each worker).
The promises they keep are tested in tests/test_hostile.py, tests/test_faults.py and
tests/test_service.py; the speed they buy is measured by bench/ (docs/operations.md, docs/performance.md).
"""

from __future__ import annotations

from bentoml.exceptions import BadInput
from starlette.datastructures import UploadFile


def apply() -> None:
    refuse_urls_for_files()
    malformed_forms_are_400()
    respawn_workers_in_containers()
    shed_load_early()
    trace_only_for_an_exporter()
    cache_response_media_types()


def refuse_urls_for_files() -> None:
    """A text value where a file upload belongs is a 400, not a download.

    BentoML fetches a URL sent in place of a file (MultipartSerde.ensure_file). A server that
    fetches what clients name can be steered at other hosts (SSRF); this one never fetches.
    """
    from _bentoml_impl.serde import MultipartSerde

    async def files_only(value):
        if isinstance(value, UploadFile):
            return value
        raise BadInput("'images' must be uploaded files (multipart) or the raw body; this service does not fetch URLs")

    MultipartSerde.ensure_file = staticmethod(files_only)


def malformed_forms_are_400() -> None:
    """A malformed multipart body (no boundary, a broken part) is a 400 naming the problem.

    Starlette says so with an HTTPException that BentoML's endpoint wrapper does not expect: it answered 500.
    """
    from _bentoml_impl.serde import MultipartSerde
    from starlette.exceptions import HTTPException

    parse = MultipartSerde.parse_request

    async def parse_or_400(self, request, cls):
        try:
            return await parse(self, request, cls)
        except HTTPException as exc:
            raise BadInput(f"malformed multipart/form-data body: {exc.detail}") from None

    MultipartSerde.parse_request = parse_or_400


def respawn_workers_in_containers() -> None:
    """A worker that dies is replaced, in a container too.

    BentoML turns respawning off when BENTOML_CONTAINERIZED is set (its own images set it): a killed
    worker then leaves the supervisor holding the port with nobody answering, and the container
    looks alive to everything but a probe with a timeout.
    """
    import bentoml.serving

    bentoml.serving.running_inside_container = lambda: False


def shed_load_early() -> None:
    """Refusing a request beyond CIFAR10_MAX_CONCURRENCY costs next to nothing.

    BentoML puts a service's own middleware innermost, under tracing, access logging and its
    timeout; a 429 paid for all of them, and at eight times the saturating load on 2 cores the
    refusals alone took the worker's event loop (docs/operations.md). The admission check moves to
    just under BentoML's request metrics, which still count every refusal.
    """
    from _bentoml_impl.server.app import ServiceAppFactory
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware

    from serving.errors import Admission

    stack = ServiceAppFactory.middlewares

    def admission_early(self):
        middlewares = stack.fget(self)
        admission = [m for m in middlewares if m.cls is Admission]
        rest = [m for m in middlewares if m.cls is not Admission]
        metrics = 1 if rest and rest[0].cls is RunnerTrafficMetricsMiddleware else 0
        return rest[:metrics] + admission + rest[metrics:]

    ServiceAppFactory.middlewares = property(admission_early)


def trace_only_for_an_exporter() -> None:
    """No tracing work unless the traces go somewhere.

    BentoML wraps every request, and every message of its answer, in OpenTelemetry spans even when
    no exporter is configured (its default), and then drops them: leaving the middleware out serves
    1.60× the CNN's single-image requests (docs/performance.md, `python -m bench.ab`). It stays when
    BentoML's configuration names an exporter (`tracing.exporter_type`).
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
    """
    import functools

    from _bentoml_sdk.io_models import IOMixin

    IOMixin.mime_type = classmethod(functools.cache(IOMixin.mime_type.__func__))
