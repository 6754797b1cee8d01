"""One typed settings model for ``rpnt serve`` (daemon + HTTP control plane + calibration).

Sources, later ones winning::

    defaults (below)  <  TOML file (--config / $RPNT_CONFIG)  <  environment  <  command-line flags

Environment overrides are ``RPNT_<SECTION>__<FIELD>`` (``RPNT_DAEMON__BIN_MS=50``,
``RPNT_HTTP__PORT=9000``); values are read as JSON where they parse (numbers, booleans, lists),
else as plain strings; string settings (``auth.token``, ``registry.root``, …) are always taken verbatim.  The bearer token also comes from ``$RPNT_API_TOKEN``.

Everything is validated once, at start: an unknown key, a wrong type or an impossible value
raises :class:`SettingsError` naming the field (``daemon.bin_ms: must be > 0``), before any
socket is bound.  ``deploy/rpnt.example.toml`` lists every setting with its default; a test
keeps the two in step.

The ``[daemon]`` and ``[model]`` sections extend :class:`streaming.options.DaemonConfig` and
:class:`~streaming.options.EngineConfig`, where the daemon's options are declared once (the same
declarations give the command-line flags and the daemon's run-time options).
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Literal, Mapping, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from streaming.options import LOG_FORMATS, DaemonConfig, EngineConfig, described

ENV_PREFIX = "RPNT_"
TOKEN_ENV = "RPNT_API_TOKEN"
CONFIG_ENV = "RPNT_CONFIG"


class SettingsError(ValueError):
    """The configuration is invalid; the message names every offending field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSettings(EngineConfig):
    """Which decoder the daemon runs, and how."""

    path: str | None = Field(
        None,
        description="model that seeds an empty registry: an export directory "
        "(rpnt export --out DIR) or a checkpoint (.safetensors, exported on "
        "import); ignored once the registry has an active version",
        json_schema_extra={"metavar": "DIR_OR_CKPT"},
    )


class RegistrySettings(_Section):
    """Where model versions live on disk (every version is kept)."""

    root: str = Field(
        "rpnt-registry",
        description="registry directory (created if missing)",
        json_schema_extra={"metavar": "DIR"},
    )


class DaemonSettings(DaemonConfig):
    """The real-time path (see ``rpnt serve --help`` and docs/protocol.md)."""

    switch_interval_ms: float = Field(
        0.5,
        gt=0,
        le=100,
        description="Python's GIL switch interval in the daemon "
        "process: the longest the HTTP thread holds the "
        "interpreter while the decode thread waits "
        "(Python's default: 5 ms)",
    )
    ingest_adapters: list[str] = Field(
        [],
        json_schema_extra={"metavar": "KIND:TARGET"},
        description="foreign sources bridged into the ingest socket, each "
        "KIND:TARGET[?opt=value&...]: lsl:STREAM, redis:KEY, "
        "openephys:tcp://HOST:PORT (docs/adapters.md)",
    )
    publish_adapters: list[str] = Field(
        [],
        json_schema_extra={"metavar": "KIND:TARGET"},
        description="sinks every prediction is republished to: lsl:NAME, redis:KEY (docs/adapters.md)",
    )

    @field_validator("ingest_adapters", "publish_adapters")
    @classmethod
    def _adapter_specs(cls, specs: list[str], info: ValidationInfo) -> list[str]:
        """Each spec parses (kind, direction, options); its library is checked at start (service.cli)."""
        from streaming.adapters import AdapterError, parse_spec

        direction = info.field_name.split("_", 1)[0]
        for text in specs:
            try:
                parse_spec(text, direction=direction)
            except AdapterError as exc:
                raise ValueError(str(exc)) from None
        return specs


class HttpSettings(_Section):
    """The HTTP control plane."""

    enabled: bool = Field(True, description="serve the HTTP control plane beside the daemon")
    host: str = Field("127.0.0.1", description="bind address (loopback unless allow_remote)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port, printed at start)")
    allow_remote: bool = Field(False, description="allow a non-loopback bind address")
    max_upload_mb: float = Field(64.0, gt=0, description="largest calibration upload accepted")
    max_decompressed_mb: float = Field(
        512.0,
        gt=0,
        description=(
            "most a calibration upload may hold uncompressed, checked on its declared sizes before anything is "
            "inflated (an hour of 20 ms bins on 256 channels as int64 counts is 352 MB); the upload is parsed in a "
            "child process limited to 1 GB + 3 × this much memory"
        ),
    )
    upload_parse_timeout_s: float = Field(
        120.0,
        gt=0,
        description="an upload's parse (a child process) running longer is killed and the upload refused",
    )


class AuthSettings(_Section):
    """Bearer token for the mutating endpoints (POST /calibrate, POST /models/*/activate)."""

    token: str | None = Field(None, description="the token itself (prefer token_file or $RPNT_API_TOKEN)")
    token_file: str | None = Field(
        None,
        description="file holding the token; with neither set, a random "
        "token is written to <registry.root>/api-token (mode 0600)",
    )


class CalibrationSettings(_Section):
    """Few-shot recalibration jobs (run in a separate, lower-priority process)."""

    nice: int = Field(
        10,
        ge=0,
        le=19,
        description="niceness added to the calibration process: on a busy host "
        "it gets a smaller share of the cores than the decode loop, "
        "never none",
    )
    threads: int = Field(1, ge=1, le=64, description="torch / BLAS threads of the calibration process")
    affinity: list[int] | None = Field(
        None,
        description="CPU ids the calibration process may run on (e.g. the "
        "cores the decode thread is not pinned to)",
    )
    warm_worker: bool = Field(
        True,
        description="keep a calibration process started (torch and the exporters "
        "imported) waiting for jobs, so that a job starts at once; "
        "false: a new process per job",
    )
    mode: Literal["head", "last", "full"] = Field("full", description="which weights are finetuned")
    epochs: int = Field(12, ge=1, description="most finetuning epochs (early stopping on validation R²)")
    steps_per_epoch: int | None = Field(
        None,
        ge=1,
        description="optimizer steps per epoch (default: one pass "
        "over the training bins, so the steps grow with "
        "the data)",
    )
    max_steps: int = Field(
        16, ge=1, description="most optimizer steps in all (caps epochs × steps_per_epoch)"
    )
    patience: int = Field(4, ge=1, description="epochs without validation improvement before stopping")
    parity_bins: int = Field(
        64,
        ge=2,
        description="bins of each parity stream (random and the holdout's end) "
        "the candidate's ONNX step graph must match its checkpoint on",
    )
    lr: float = Field(1e-3, gt=0, description="learning rate")
    train_fraction: float = Field(0.6, gt=0, lt=1, description="first part of the calibration data: training")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="next part: early stopping")
    holdout_fraction: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="last part: the go-live gate (candidate vs live model, never seen in training)",
    )
    min_bins: int = Field(200, ge=20, description="shortest calibration session accepted, in bins")
    default_seconds: float = Field(
        120.0,
        gt=0,
        description="closed-loop calibration: seconds of recent decoded data when the request names none",
    )
    timeout_s: float = Field(1800.0, gt=0, description="a job running longer is killed and marked failed")
    starved_share: float = Field(
        0.25,
        gt=0,
        le=1,
        description="GET /calibrate/{id} says 'waiting for CPU' while "
        "the worker got less than this share of one core",
    )
    starved_window_s: float = Field(10.0, gt=0, description="over the last this many seconds")
    seed: int = Field(0, description="random seed of the finetuning")

    @model_validator(mode="after")
    def _fractions(self) -> "CalibrationSettings":
        total = self.train_fraction + self.val_fraction + self.holdout_fraction
        if total > 1 + 1e-9:
            raise ValueError(f"train_fraction + val_fraction + holdout_fraction = {total:g} > 1")
        return self


class Settings(_Section):
    """Everything ``rpnt serve`` can be told."""

    model: ModelSettings = ModelSettings()
    registry: RegistrySettings = RegistrySettings()
    daemon: DaemonSettings = DaemonSettings()
    http: HttpSettings = HttpSettings()
    auth: AuthSettings = AuthSettings()
    calibration: CalibrationSettings = CalibrationSettings()
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    log_format: Literal[LOG_FORMATS] = Field(  # type: ignore[valid-type]
        "text",
        description="start and stop messages on stderr: 'text' (a "
        "short summary for people) or 'json' (one JSON "
        "event line each, for supervisors and scripts)",
    )

    @model_validator(mode="after")
    def _loopback(self) -> "Settings":
        if not self.http.allow_remote and self.http.host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(
                f"http.host {self.http.host!r} is not loopback; set http.allow_remote = true to bind it"
            )
        return self


SECTIONS: dict[str, type[BaseModel]] = {
    name: f.annotation
    for name, f in Settings.model_fields.items()
    if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)
}
TOP_LEVEL: tuple[str, ...] = tuple(name for name in Settings.model_fields if name not in SECTIONS)


def _env_value(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return text


def _is_text(section: str, field: str) -> bool:
    """Whether ``section.field`` is a plain string setting (``str`` or ``str | None``): its environment
    value is taken verbatim, so ``RPNT_AUTH__TOKEN=123456`` is the string, not the number."""
    f = SECTIONS[section].model_fields.get(field)
    if f is None:
        return False
    ann = f.annotation
    if ann is str:
        return True
    return get_origin(ann) in (Union, UnionType) and set(get_args(ann)) <= {str, NoneType}


def env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """``RPNT_SECTION__FIELD=value`` → ``{"section": {"field": value}}``; ``RPNT_FIELD`` for a top-level
    setting (``RPNT_LOG_LEVEL``, ``RPNT_LOG_FORMAT``)."""
    out: dict[str, Any] = {}
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX) or key in (TOKEN_ENV, CONFIG_ENV):
            continue
        parts = key[len(ENV_PREFIX) :].lower().split("__")
        if len(parts) == 1 and parts[0] in TOP_LEVEL:
            out[parts[0]] = value
        elif len(parts) == 2 and parts[0] in SECTIONS:
            out.setdefault(parts[0], {})[parts[1]] = value if _is_text(*parts) else _env_value(value)
        elif len(parts) == 2:
            raise SettingsError(f"{key}: no settings section {parts[0]!r} (sections: {', '.join(SECTIONS)})")
    return out


def _merge(base: dict, over: Mapping[str, Any]) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"]) or "settings"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown setting"
        lines.append(f"{where}: {msg}")
    return "invalid settings:\n  " + "\n  ".join(lines)


def load_settings(
    path: str | os.PathLike | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Defaults < TOML file < environment < ``overrides`` (nested dict, e.g. from CLI flags).

    ``path`` None → ``$RPNT_CONFIG`` if set, else no file.  Raises :class:`SettingsError`."""
    env = os.environ if env is None else env
    path = path if path is not None else env.get(CONFIG_ENV)
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise SettingsError(f"config file {p}: not found") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise SettingsError(f"config file {p}: not valid TOML: {exc}") from None
    data = _merge(data, env_overrides(env))
    if overrides:
        data = _merge(data, overrides)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise SettingsError(_format(exc)) from None


def configured_token(settings: Settings, *, env: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """(token, where it came from) when one is configured — ``$RPNT_API_TOKEN`` > ``auth.token`` >
    ``auth.token_file`` — else None.  Writes nothing; raises :class:`SettingsError` for a token
    file that cannot be read or is empty."""
    env = os.environ if env is None else env
    if env.get(TOKEN_ENV, "").strip():
        return env[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    if settings.auth.token:
        return settings.auth.token, "auth.token"
    if settings.auth.token_file:
        p = Path(settings.auth.token_file)
        try:
            tok = p.read_text().strip()
        except OSError as exc:
            raise SettingsError(f"auth.token_file: cannot read {p}: {exc.strerror or exc}") from None
        if not tok:
            raise SettingsError(f"auth.token_file: {p} is empty")
        return tok, str(p)
    return None


def resolve_token(settings: Settings, *, env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(token, where it came from): :func:`configured_token`, else a generated one written to
    ``<registry.root>/api-token`` (mode 0600, reused on restart)."""
    import secrets

    found = configured_token(settings, env=env)
    if found is not None:
        return found
    p = Path(settings.registry.root) / "api-token"
    try:
        tok = p.read_text().strip()
    except FileNotFoundError:
        tok = ""
    if tok:
        return tok, str(p)
    # Missing (or empty): write a new one to a private temporary file and rename it into place, so
    # the token file is never seen empty or half-written.
    p.parent.mkdir(parents=True, exist_ok=True)
    tok = secrets.token_urlsafe(32)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(tok + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tok, f"{p} (generated)"


def example_toml(settings: Settings | None = None) -> str:
    """Every setting with its default and description, as TOML (what deploy/rpnt.example.toml holds)."""
    s = settings or Settings()
    lines = [
        "# rpnt serve — every setting with its default.  Environment overrides: RPNT_<SECTION>__<FIELD>.",
        "# Unset optional values are shown commented out.",
        "",
    ]

    def val(v: Any) -> str:
        return json.dumps(v) if not isinstance(v, bool) else ("true" if v else "false")

    top = [(n, f) for n, f in Settings.model_fields.items() if n not in SECTIONS]
    for name, f in top:
        lines.append(f"# {described(f)}")
        lines.append(f"{name} = {val(getattr(s, name))}")
    for section, cls in SECTIONS.items():
        lines += ["", f"[{section}]  # {(cls.__doc__ or '').strip().splitlines()[0]}"]
        obj = getattr(s, section)
        for name, f in cls.model_fields.items():
            v = getattr(obj, name)
            lines.append(f"# {described(f)}")
            lines.append(f"# {name} = ..." if v is None else f"{name} = {val(v)}")
    return "\n".join(lines) + "\n"
