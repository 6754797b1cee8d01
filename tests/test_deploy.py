"""Deployment files stay in step with the code: the example config with the settings schema, the
systemd unit and the Dockerfile with what they promise, the README's first commands with CI, and
the settings' edge cases (token precedence, loopback guard, calibration fractions).  Real files
only; the one test that builds the image runs where a container builder exists and is skipped
where none does."""

from __future__ import annotations

import configparser
import functools
import json
import re
import shlex
import shutil
import stat
import subprocess
import tomllib
import uuid

import pytest
from conftest import REPO

pytest.importorskip("pydantic")

from service.settings import (  # noqa: E402
    SECTIONS,
    Settings,
    SettingsError,
    example_toml,
    load_settings,
    resolve_token,
)

DEPLOY = REPO / "deploy"
EXAMPLE = DEPLOY / "rpnt.example.toml"
UNIT = DEPLOY / "rpnt.service"
DOCKERFILE = REPO / "Dockerfile"
LIVE = 120.0  # liveness guard for a container command; never a timing assertion
BUILD_TIMEOUT = 3600.0  # an image build downloads torch and the serving stack
REGEN = "python -c \"from service.settings import example_toml; print(example_toml(), end='')\" > deploy/rpnt.example.toml"


def _write(tmp_path, text: str, name: str = "rpnt.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def _replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} should occur once in {EXAMPLE.name}"
    return text.replace(old, new)


# ------------------------------------------------------------------ example config vs schema
def test_example_toml_loads_to_the_defaults():
    assert load_settings(EXAMPLE, env={}) == Settings()


def test_example_toml_is_generated_from_the_schema():
    assert EXAMPLE.read_text() == example_toml(), f"deploy/rpnt.example.toml is stale; regenerate: {REGEN}"
    text = EXAMPLE.read_text()
    names = [n for n in Settings.model_fields if n not in SECTIONS]
    names += [f"{s}.{n}" for s, cls in SECTIONS.items() for n in cls.model_fields]
    for dotted in names:
        section, _, field = dotted.rpartition(".")
        if section:
            body = re.search(rf"^\[{section}\][^\n]*\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
            assert body, f"section [{section}] missing"
            where = body.group(1)
        else:
            where = text.split("\n[", 1)[0]
        assert re.search(rf"^(# )?{re.escape(field)} = ", where, re.M), (
            f"{dotted} missing from {EXAMPLE.name}"
        )


def test_example_toml_is_valid_toml_with_every_section():
    data = tomllib.loads(EXAMPLE.read_text())
    assert set(SECTIONS) <= set(data)


@pytest.mark.parametrize(
    "old,new,field",
    [
        ("port = 8000", "port = 8000\nprot = 8001", "http.prot"),
        ("port = 8000", 'port = "x"', "http.port"),
        ("# bin_ms = ...", "bin_ms = -1", "daemon.bin_ms"),
        ('backend = "onnx-cpu"', 'backend = "tensorflow"', "model.backend"),
        ("nice = 10", "nice = 40", "calibration.nice"),
    ],
)
def test_bad_settings_name_the_field(tmp_path, old, new, field):
    p = _write(tmp_path, _replace_once(EXAMPLE.read_text(), old, new))
    with pytest.raises(SettingsError, match=re.escape(field)):
        load_settings(p, env={})


def test_unknown_section_and_unknown_key_are_reported(tmp_path):
    p = _write(tmp_path, EXAMPLE.read_text() + "\n[deamon]\nbin_ms = 20\n")
    with pytest.raises(SettingsError, match=r"deamon: unknown setting"):
        load_settings(p, env={})
    with pytest.raises(SettingsError, match=r"http.prot: unknown setting"):
        load_settings(EXAMPLE, env={"RPNT_HTTP__PROT": "1"})
    with pytest.raises(SettingsError, match=r"RPNT_DEAMON__BIN_MS: no settings section"):
        load_settings(EXAMPLE, env={"RPNT_DEAMON__BIN_MS": "20"})


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(SettingsError, match="not found"):
        load_settings(tmp_path / "nope.toml", env={})
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(_write(tmp_path, "[http\nport = 1\n"), env={})


def test_env_overrides_win_over_the_file(tmp_path):
    p = _write(tmp_path, _replace_once(EXAMPLE.read_text(), "port = 8000", "port = 8100"))
    assert load_settings(p, env={}).http.port == 8100
    s = load_settings(
        p,
        env={
            "RPNT_HTTP__PORT": "9001",
            "RPNT_DAEMON__AFFINITY": "[1, 2]",
            "RPNT_DAEMON__GC_FREEZE": "true",
            "RPNT_LOG_LEVEL": "debug",
        },
    )
    assert (s.http.port, s.daemon.affinity, s.daemon.gc_freeze, s.log_level) == (9001, [1, 2], True, "debug")
    # flags (overrides) win over the environment; $RPNT_CONFIG names the file when no path is given
    s = load_settings(
        env={"RPNT_CONFIG": str(p), "RPNT_HTTP__PORT": "9001"}, overrides={"http": {"port": 9002}}
    )
    assert s.http.port == 9002 and s.daemon.ingest == "tcp://127.0.0.1:5555"


def test_env_string_settings_are_taken_verbatim():
    s = load_settings(
        env={"RPNT_AUTH__TOKEN": "123456", "RPNT_REGISTRY__ROOT": "2024", "RPNT_HTTP__PORT": "9001"}
    )
    assert (s.auth.token, s.registry.root, s.http.port) == ("123456", "2024", 9001)


# ------------------------------------------------------------------ settings details
def test_non_loopback_http_needs_allow_remote():
    with pytest.raises(SettingsError, match="allow_remote"):
        load_settings(EXAMPLE, env={"RPNT_HTTP__HOST": "0.0.0.0"})
    s = load_settings(EXAMPLE, env={"RPNT_HTTP__HOST": "0.0.0.0", "RPNT_HTTP__ALLOW_REMOTE": "true"})
    assert s.http.host == "0.0.0.0"
    for host in ("127.0.0.1", "localhost", "::1"):
        assert load_settings(env={}, overrides={"http": {"host": host}}).http.host == host


def test_calibration_fractions_over_one_raise(tmp_path):
    p = _write(tmp_path, _replace_once(EXAMPLE.read_text(), "train_fraction = 0.6", "train_fraction = 0.7"))
    with pytest.raises(
        SettingsError, match=r"calibration: train_fraction \+ val_fraction \+ holdout_fraction"
    ):
        load_settings(p, env={})
    s = load_settings(env={}, overrides={"calibration": {"train_fraction": 0.5}})  # < 1 is fine
    assert s.calibration.train_fraction == 0.5


def test_resolve_token_precedence(tmp_path):
    root = tmp_path / "registry"
    tf = tmp_path / "token"
    tf.write_text("from-file\n")
    both = {"auth": {"token": "from-settings", "token_file": str(tf)}, "registry": {"root": str(root)}}
    s = load_settings(env={}, overrides=both)
    assert resolve_token(s, env={"RPNT_API_TOKEN": " from-env \n"}) == ("from-env", "$RPNT_API_TOKEN")
    assert resolve_token(s, env={"RPNT_API_TOKEN": "  "})[0] == "from-settings"  # blank env: not a token
    assert resolve_token(s, env={}) == ("from-settings", "auth.token")
    s = load_settings(env={}, overrides={"auth": {"token_file": str(tf)}, "registry": {"root": str(root)}})
    assert resolve_token(s, env={}) == ("from-file", str(tf))
    assert not root.exists()  # nothing generated while a token was configured

    s = load_settings(env={}, overrides={"registry": {"root": str(root)}})
    tok, where = resolve_token(s, env={})
    gen = root / "api-token"
    assert where.endswith("(generated)") and len(tok) >= 32
    assert stat.S_IMODE(gen.stat().st_mode) == 0o600
    assert gen.read_text().strip() == tok
    assert resolve_token(s, env={}) == (tok, str(gen))  # reused, not regenerated
    assert [p.name for p in root.iterdir()] == ["api-token"]  # no temporary left behind

    gen.write_text("")  # e.g. truncated by a full disk: replaced by a fresh token, never ""
    tok2, where2 = resolve_token(s, env={})
    assert tok2 and tok2 != tok and where2.endswith("(generated)")


def test_resolve_token_bad_token_file(tmp_path):
    s = load_settings(env={}, overrides={"auth": {"token_file": str(tmp_path / "missing")}})
    with pytest.raises(SettingsError, match="auth.token_file: cannot read"):
        resolve_token(s, env={})
    (tmp_path / "empty").write_text("\n")
    s = load_settings(env={}, overrides={"auth": {"token_file": str(tmp_path / "empty")}})
    with pytest.raises(SettingsError, match="auth.token_file: .* is empty"):
        resolve_token(s, env={})


# ------------------------------------------------------------------ systemd unit
def _unit() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None, empty_lines_in_values=False)
    cp.optionxform = str  # keep systemd's CamelCase keys
    cp.read_string(UNIT.read_text())
    return cp


def test_systemd_unit():
    cp = _unit()
    assert {"Unit", "Service", "Install"} <= set(cp.sections())
    svc = cp["Service"]
    assert "rpnt serve" in svc["ExecStart"] and "--config /etc/rpnt/rpnt.toml" in svc["ExecStart"]
    assert svc["Restart"] == "on-failure" and svc["RestartSec"] == "2"
    assert svc["User"] == "rpnt"
    cpus = set()
    for part in re.split(r"[, ]+", svc["CPUAffinity"].strip()):
        lo, _, hi = part.partition("-")
        cpus |= set(range(int(lo), int(hi or lo) + 1))
    assert cpus and 0 not in cpus, "keep core 0 for the OS and IRQs"
    assert cpus <= {0, 1}, "the default must exist on a 2-core host (cores 0-1)"
    assert int(svc["Nice"]) < 0
    for key, value in {
        "StateDirectory": "rpnt",
        "ProtectSystem": "strict",
        "ReadWritePaths": "/var/lib/rpnt",
        "NoNewPrivileges": "true",
        "PrivateTmp": "true",
        "TimeoutStopSec": "20",
        "KillSignal": "SIGTERM",
        "EnvironmentFile": "-/etc/rpnt/rpnt.env",
    }.items():
        assert svc[key] == value, key
    assert "LimitMEMLOCK" in svc
    assert cp["Install"]["WantedBy"] == "multi-user.target"
    envs = re.findall(r"^Environment=(\S+)$", UNIT.read_text(), re.M)
    assert "OMP_NUM_THREADS=1" in envs and "RPNT_REGISTRY__ROOT=/var/lib/rpnt" in envs
    # the unit's environment + the example config is a valid configuration
    env = dict(e.split("=", 1) for e in envs if e.startswith("RPNT_"))
    assert load_settings(EXAMPLE, env=env).registry.root == "/var/lib/rpnt"


# ------------------------------------------------------------------ Dockerfile
def _docker_instructions() -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _docker_args() -> dict[str, str]:
    """ARG name → default ("" when declared without one)."""
    return dict((r.split("=", 1) + [""])[:2] for w, r in _docker_instructions() if w == "ARG")


def _extras() -> dict[str, set[str]]:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return {
        k: {re.match(r"[A-Za-z0-9._-]+", r).group(0).lower().replace("_", "-") for r in v}
        for k, v in extras.items()
    }


def test_dockerfile_installs_cpu_torch_before_the_extra():
    ins = _docker_instructions()
    runs = [rest for word, rest in ins if word == "RUN"]
    torch_i = next(i for i, r in enumerate(runs) if "torch==2.13.0" in r)
    extra_i = next(i for i, r in enumerate(runs) if '".[${RPNT_EXTRA}]"' in r or ".[${RPNT_EXTRA}]" in r)
    assert torch_i < extra_i, "torch must be installed before the package, or pip pulls CUDA torch"
    assert '--index-url "${TORCH_INDEX_URL}"' in runs[torch_i]
    args = _docker_args()
    assert args["RPNT_EXTRA"] == "serve" and args["BASE_IMAGE"] == "python:3.11-slim"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    extras = _extras()
    for extra in ("serve", "gpu"):
        assert extra in extras, f"the Dockerfile may select [{extra}], missing from pyproject.toml"
    assert "onnxruntime" in extras["serve"] and "onnxruntime-gpu" not in extras["serve"]
    assert "onnxruntime-gpu" in extras["gpu"] and "onnxruntime" not in extras["gpu"]


def test_dockerfile_runtime_contract():
    ins = _docker_instructions()
    get = lambda w: [r for word, r in ins if word == w]  # noqa: E731
    assert get("WORKDIR") == ["/srv/rpnt"]
    assert get("USER") and get("USER")[-1] not in ("root", "0")
    assert "/var/lib/rpnt" in get("VOLUME")[0]
    assert sorted(get("EXPOSE")[0].split()) == ["5555", "5556", "8000"]
    assert "urllib" in get("HEALTHCHECK")[0] and "http://127.0.0.1:8000/health" in get("HEALTHCHECK")[0]
    assert get("ENTRYPOINT") == ['["rpnt", "serve"]'] and get("CMD") == [
        '["--config", "/etc/rpnt/rpnt.toml"]'
    ]
    assert "deploy/rpnt.example.toml /etc/rpnt/rpnt.toml" in get("COPY")
    # every COPY source exists and is not excluded by .dockerignore
    ignored = {
        ln.strip()
        for ln in (REPO / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    }
    for c in get("COPY"):
        for src in c.split()[:-1]:
            assert (REPO / src).exists(), src
            assert src not in ignored and src.split("/")[0] not in ignored, src
    # the container's environment + the baked-in config is a valid configuration
    env = {}
    for rest in get("ENV"):
        env.update(tok.split("=", 1) for tok in shlex.split(rest))
    for key in (
        "RPNT_HTTP__HOST",
        "RPNT_HTTP__ALLOW_REMOTE",
        "RPNT_DAEMON__INGEST",
        "RPNT_DAEMON__PUBLISH",
        "RPNT_DAEMON__ALLOW_REMOTE",
        "RPNT_REGISTRY__ROOT",
    ):
        assert key in env, key
    s = load_settings(EXAMPLE, env=env)
    assert (s.http.host, s.http.allow_remote, s.daemon.allow_remote) == ("0.0.0.0", True, True)
    assert (s.daemon.ingest, s.daemon.publish) == ("tcp://0.0.0.0:5555", "tcp://0.0.0.0:5556")
    assert s.registry.root == "/var/lib/rpnt"


def test_dockerfile_builds_offline_or_behind_a_proxy_and_runs_as_a_user_with_a_home():
    """Build args choose the base image and where torch comes from (an index, or a wheel file in
    deploy/wheels/, read through a build mount); the service runs as a non-root user whose HOME
    exists and is its own; podman/buildah users are told to build with --format docker."""
    ins = _docker_instructions()
    args = _docker_args()
    for name in ("BASE_IMAGE", "TORCH_INDEX_URL", "TORCH_WHEEL", "PIP_INDEX_URL"):
        assert name in args, f"ARG {name} missing"
    assert args["TORCH_WHEEL"] == ""  # default: from the index
    assert ins[[w for w, _ in ins].index("FROM")][1] == "${BASE_IMAGE}"
    runs = [r for w, r in ins if w == "RUN"]
    torch_run = next(r for r in runs if "torch==2.13.0" in r)
    mount = re.search(r"--mount=type=bind,source=(\S+?),target=(\S+)", torch_run)
    assert mount, "the wheel directory is mounted, not copied into a layer"
    wheels, target = mount.groups()
    assert (REPO / wheels).is_dir(), wheels
    ignored = {ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()}
    assert wheels not in ignored and wheels.split("/")[0] not in ignored
    assert f'"{target}/${{TORCH_WHEEL}}"' in torch_run and '[ -n "${TORCH_WHEEL}" ]' in torch_run

    user = [r for w, r in ins if w == "USER"][-1]
    assert user not in ("root", "0")
    env = {}
    for rest in (r for w, r in ins if w == "ENV"):
        env.update(tok.split("=", 1) for tok in shlex.split(rest))
    home = env.get("HOME")
    assert home and home not in ("/", "/root"), "a writable HOME for the service user"
    useradd = next(r for r in runs if "useradd" in r)
    assert f"--home-dir {home} --create-home" in useradd and re.search(rf"useradd .*\b{user}\b", useradd)
    assert "--format docker" in DOCKERFILE.read_text(), (
        "podman/buildah drop HEALTHCHECK without --format docker"
    )


# ------------------------------------------------------------------ README and CI
def _readme_first_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    return [ln for ln in block.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_readme_first_commands_use_their_own_fresh_venvs_and_ci_runs_the_test_command():
    demo, test = _readme_first_commands()
    venvs = [re.match(r"python3 -m venv (\S+) && \. (\S+)/bin/activate && ", c) for c in (demo, test)]
    assert all(venvs) and all(m.group(1) == m.group(2) for m in venvs), (demo, test)
    (demo_venv, _), (test_venv, _) = (m.groups() for m in venvs)
    assert demo_venv != test_venv, "the test command needs an environment of its own"
    for venv in (demo_venv, test_venv):
        ignored = subprocess.run(["git", "check-ignore", "-q", f"{venv}/"], cwd=REPO)
        if ignored.returncode == 128:
            pytest.skip("not a git checkout")
        assert ignored.returncode == 0, f".gitignore does not ignore {venv}/"
    ci = [
        ln for ln in (REPO / ".ci" / "run").read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]
    assert test[venvs[1].end() :] == ci[-1], "the README's test command and .ci/run are out of step"


# ------------------------------------------------------------------ building the image (where a builder exists)
@functools.cache
def _builder() -> str | None:
    """The first container builder that works here (``info`` answers: a docker client needs its daemon)."""
    for tool in ("docker", "podman", "buildah"):
        if shutil.which(tool):
            try:
                if subprocess.run([tool, "info"], capture_output=True, timeout=60).returncode == 0:
                    return tool
            except subprocess.TimeoutExpired:
                pass
    return None


@pytest.mark.slow
@pytest.mark.skipif(
    _builder() is None, reason="no working container builder here (docker with its daemon, podman or buildah)"
)
def test_image_builds_and_its_healthcheck_passes(tmp_path_factory):
    """Build the image, start it on a tiny model and run the image's own HEALTHCHECK command in it
    until it passes (liveness-bounded, never a timing assertion)."""
    from test_streaming_support import tiny_export

    builder = _builder()
    model = tiny_export(tmp_path_factory)["export"]
    tag = f"rpnt-test:{uuid.uuid4().hex[:12]}"
    fmt = [] if builder == "docker" else ["--format", "docker"]
    build = [builder, "bud" if builder == "buildah" else "build", *fmt, "-t", tag, str(REPO)]
    r = subprocess.run(build, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    try:
        check = _image_healthcheck(builder, tag)
        assert check[0] == "CMD" and "/health" in " ".join(check), check
        _run_until_healthy(builder, tag, model, check[1:])
    finally:
        subprocess.run([builder, "rmi", "-f", tag], capture_output=True, timeout=LIVE)


def _image_healthcheck(builder: str, tag: str) -> list[str]:
    """The HEALTHCHECK test of the built image, e.g. ["CMD", "python", "-c", "..."].  The builders
    keep it in different places of their inspect output (docker: Config.Healthcheck, podman:
    Healthcheck, buildah: Docker.config.Healthcheck), so it is looked up by key."""
    cmd = (
        [builder, "inspect", "--type", "image", tag]
        if builder == "buildah"
        else [builder, "image", "inspect", tag]
    )
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=LIVE)
    assert r.returncode == 0, r.stderr
    found = _find_healthcheck(json.loads(r.stdout))
    assert found, "the image has no HEALTHCHECK (built without --format docker?)"
    return found


def _find_healthcheck(node) -> list[str] | None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key.lower() == "healthcheck" and isinstance(value, dict) and value.get("Test"):
                return list(value["Test"])
            if (hit := _find_healthcheck(value)) is not None:
                return hit
    elif isinstance(node, list):
        for value in node:
            if (hit := _find_healthcheck(value)) is not None:
                return hit
    return None


def _run_until_healthy(builder: str, tag: str, model, check: list[str]) -> None:
    serve = ["rpnt", "serve", "--config", "/etc/rpnt/rpnt.toml", "--model", "/model"]
    probe = shlex.join(check)
    script = (
        f"{shlex.join(serve)} & for i in $(seq {int(LIVE)}); do {probe} && exit 0; sleep 1; done; "
        "echo 'health check never passed' >&2; exit 1"
    )
    mount = f"{model}:/model:ro,z"  # z: relabelled where SELinux is on
    if builder == "buildah":
        name = f"rpnt-test-{uuid.uuid4().hex[:8]}"
        subprocess.run([builder, "from", "--name", name, tag], check=True, capture_output=True, timeout=LIVE)
        try:
            r = subprocess.run(
                [builder, "run", "--volume", mount, name, "--", "sh", "-c", script],
                capture_output=True,
                text=True,
                timeout=2 * LIVE,
            )
        finally:
            subprocess.run([builder, "rm", name], capture_output=True, timeout=LIVE)
    else:
        r = subprocess.run(
            [builder, "run", "--rm", "-v", mount, "--entrypoint", "sh", tag, "-c", script],
            capture_output=True,
            text=True,
            timeout=2 * LIVE,
        )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_dockerignore_excludes_local_state():
    lines = {ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()}
    for pat in (".venv", ".git", "runs", "bench/results"):
        assert pat in lines, pat
    assert lines & {"__pycache__", "**/__pycache__"} and lines & {"*.egg-info", "**/*.egg-info"}


def test_serve_flags_and_daemon_settings_build_the_same_daemon_options():
    """One declaration (streaming.options.DaemonConfig) serves `rpnt serve` flags, the [daemon]
    section and DaemonOptions; their defaults agree, and a set value arrives converted (ms → s, CPU
    list → tuple)."""
    from service.settings import load_settings
    from streaming.cli import SERVE_FLAGS, build_serve_parser
    from streaming.flags import config_from_args
    from streaming.options import DaemonConfig, DaemonOptions

    def from_flags(*argv: str) -> DaemonOptions:
        a = build_serve_parser().parse_args(["--model", "m", *argv])
        return config_from_args(DaemonConfig, a, SERVE_FLAGS).options()

    assert from_flags() == load_settings(None, env={}).daemon.options() == DaemonOptions()
    set_ = from_flags("--affinity", "0,1", "--stall-ms", "5", "--busy-poll-us", "100")
    assert (set_.affinity, set_.stall_timeout_s, set_.busy_poll_us) == ((0, 1), 0.005, 100)
