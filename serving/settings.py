"""Every limit and choice of the service, from CIFAR10_* environment variables, with defaults."""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path

from bundle.images import DEFAULT_LIMITS, Limits
from bundle.manifest import DEFAULT_BUNDLE, MODELS_DIR, PRECISIONS
from bundle.runtime import available_cores


def _flag(value: str) -> bool | str:
    """0/1 (or false/true, no/yes) as a bool; anything else as given, for the settings check to name."""
    return {"0": False, "false": False, "no": False, "1": True, "true": True, "yes": True}.get(value.strip().lower(), value)


def _names(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _optional_int(value: str) -> int | None:
    return int(value) if value.strip() else None


# How each field's environment variable is read, by the field's type
PARSERS = {"Path": Path, "tuple[str, ...]": _names, "str": str, "int": int, "int | None": _optional_int, "float": float, "bool": _flag}


@dataclass(frozen=True)
class Settings:
    models_dir: Path = Path(MODELS_DIR)
    models: tuple[str, ...] = ()  # bundles to load; empty: every bundle in models_dir
    default_model: str = DEFAULT_BUNDLE  # used when a request names none; this one, not served, gives way to the first loaded
    providers: tuple[str, ...] = ()  # onnxruntime providers in order; empty: CUDA when available, else CPU
    sessions: int = 2  # onnxruntime sessions per bundle and worker that run batches side by side under load, splitting the threads (Triton's instance count); 1: one batch at a time; none beyond the threads, none on a GPU
    threads: int | None = None  # onnxruntime intra-op threads of a worker's main session (the sessions split them); None: the cores shared among the workers; 0: its own choice
    thread_spinning: bool = False  # onnxruntime's threads spin-wait between calls; off, they sleep and leave the cores to HTTP and decoding
    broken_bundles: str = "fail"  # a bundle that cannot load at start: "fail" stops the server, "skip" logs it and serves the rest
    precision: str = "fp32"  # int8: each bundle's int8 variant where it has one (`cifar10 quantize`), else fp32; or per bundle, "airbench:int8" (others fp32), "int8,cnn:fp32"
    max_images: int = 64  # images per request
    max_image_bytes: int = 10_000_000  # per uploaded file
    max_request_bytes: int = 100_000_000  # a whole multipart request (411 without a Content-Length)
    max_neighbours: int = 50
    workers: int = 1  # serving processes, each with every bundle loaded (BentoML's workers)
    max_batch_size: int = 8  # images in one onnxruntime call, a larger request's too; rates are flat from 8 up, memory is not (docs/performance.md)
    max_latency_ms: float = 0.0  # extra wait for more requests once some are queued; 0: take what is there
    max_concurrency: int = 64  # requests in flight per worker at most; the next ones wait for a place (below), then get 429
    target_latency_s: float = 0.5  # the admitted requests' median time in service each worker steers to, by admitting fewer at once (down to 2); 0: always max_concurrency
    max_queue: int = 256  # requests per worker waiting for a place; beyond it 429 at once
    max_queue_wait_s: float = 0.5  # how long a request waits for a place before its 429; 0: refused at once
    timeout_s: float = 60.0  # a request not answered by then gets 504
    max_pixels: int = DEFAULT_LIMITS.max_pixels  # width × height as decoded (a large JPEG at its reduced scale), checked from the header first
    max_request_pixels: int = 200_000_000  # the pixels a request's images decode to in all (a large JPEG counts at its reduced scale)
    cors_origins: tuple[str, ...] = ()  # web pages whose scripts may call the service from a browser (CORS): origins, or *; empty: none

    def http(self) -> dict:
        """BentoML's `http` configuration of the service: CORS for the origins named, with the headers a
        browser's script needs to read (a 429's Retry-After, the protocol's binary header length)."""
        if not self.cors_origins:
            return {}
        return {"cors": {
            "enabled": True, "access_control_allow_origins": list(self.cors_origins), "access_control_allow_methods": ["GET", "HEAD", "POST"],
            "access_control_allow_headers": ["*"], "access_control_expose_headers": ["Retry-After", "Inference-Header-Content-Length"],
        }}  # fmt: skip

    def __post_init__(self) -> None:
        positive = ("workers", "sessions", "max_batch_size", "max_concurrency", "max_images", "max_image_bytes", "max_request_bytes", "max_neighbours", "max_pixels", "max_request_pixels", "timeout_s")
        bad = [f"{env_name(name)}={getattr(self, name)} (must be > 0)" for name in positive if getattr(self, name) <= 0]
        bad += [f"{env_name(name)}={value} (must be >= 0)" for name in ("threads", "max_latency_ms", "max_queue", "max_queue_wait_s", "target_latency_s") if (value := getattr(self, name)) is not None and value < 0]
        bad += [f"{env_name(f.name)}={getattr(self, f.name)} (must be a finite number)" for f in fields(self) if f.type == "float" and not math.isfinite(getattr(self, f.name))]
        if not isinstance(self.thread_spinning, bool):
            bad.append(f"CIFAR10_THREAD_SPINNING={self.thread_spinning!r} (must be 0 or 1)")
        # as a browser sends an origin, which Starlette compares as written: lowercase, no path, no default port
        origin = r"\*|[a-z][a-z0-9+.-]*://[^/\s?#A-Z]+"
        if bad_origins := [o for o in self.cors_origins if not re.fullmatch(origin, o) or re.search(r"^https://.*:443$|^http://.*:80$", o)]:
            bad.append(f"CIFAR10_CORS_ORIGINS={','.join(bad_origins)!r} (each origin as a browser sends it: scheme://host[:port] in lowercase, with no path, trailing slash or default port; or *)")
        if self.broken_bundles not in ("fail", "skip"):
            bad.append(f"CIFAR10_BROKEN_BUNDLES={self.broken_bundles!r} (must be fail or skip)")
        try:
            self.precisions()
        except ValueError as exc:
            bad.append(f"CIFAR10_PRECISION={self.precision!r} ({exc})")
        if bad:
            raise ValueError(f"settings without meaning: {'; '.join(bad)}")
        if self.threads is None:  # frozen: set once, here
            object.__setattr__(self, "threads", max(1, available_cores() // self.workers))

    def precisions(self) -> dict[str | None, str]:
        """CIFAR10_PRECISION as {bundle name: precision}, with None for the bundles it does not name.

        A bare precision applies to every bundle not named; "airbench:int8" serves only that bundle's
        int8 variant, since a variant pays for some networks and not others (docs/performance.md)."""
        parsed: dict[str | None, str] = {}
        for part in (p.strip() for p in self.precision.split(",")):
            name, _, precision = part.rpartition(":")
            key = name.strip() or None
            if precision.strip() not in PRECISIONS or (":" in part and key is None):
                raise ValueError(f"each part must be a precision ({', '.join(PRECISIONS)}) or BUNDLE:PRECISION, got {part!r}")
            if key in parsed:
                raise ValueError(f"{'bundle ' + key if key else 'the precision for the other bundles'} given twice")
            parsed[key] = precision.strip()
        return parsed

    def precision_of(self, bundle: str) -> str:
        """The precision CIFAR10_PRECISION asks for this bundle (by its folder name)."""
        parsed = self.precisions()
        return parsed.get(bundle, parsed.get(None, "fp32"))

    @property
    def limits(self) -> Limits:
        """The decoder's limits: bundle.images' defaults, with this service's pixel limit."""
        return replace(DEFAULT_LIMITS, max_pixels=self.max_pixels, pixels_setting=env_name("max_pixels"))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """Each field from CIFAR10_<FIELD NAME>, else its default above; a variable a letter or two
        away from a setting's name is a typo the service would otherwise silently ignore."""
        values, bad = {}, []
        known = [env_name(f.name) for f in fields(cls)]
        for name in sorted(environ):
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.9) if name.startswith("CIFAR10_") and name not in known else []
            bad += [f"{name} is no setting (did you mean {close[0]}?)"] if close else []
        for f in fields(cls):
            raw = environ.get(env_name(f.name))
            if raw is None or (f.type == "Path" and not raw.strip()):  # an empty folder setting (`CIFAR10_MODELS_DIR=`) is unset, as the CLI reads it
                continue
            try:
                values[f.name] = PARSERS[f.type](raw)
            except ValueError:
                bad.append(f"{env_name(f.name)}={raw!r} (must be {'an integer' if 'int' in f.type else 'a number'})")
        if bad:
            raise ValueError(f"settings without meaning: {'; '.join(bad)}")
        return cls(**values)


def env_name(field_name: str) -> str:
    return f"CIFAR10_{field_name.upper()}"
