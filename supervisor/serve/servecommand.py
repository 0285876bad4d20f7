"""``lorasup serve``: the daemon's own command, its options checked before anything starts
(registered by commands.register)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lorasup.supervisor.serve.cliparts import StateDir, fail, max_seconds, valid_seconds


def _daemon_config(config: Path | None) -> dict[str, Any]:
    """``--config``: daemon-wide settings (``[notify]``, ``retry_backoff``)."""
    import tomllib

    from lorasup.supervisor.serve.jobspec import JobError, check_notify

    if config is None:
        return {}
    try:
        data = tomllib.loads(config.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise fail(f"cannot read config file {config}: {exc}") from None
    unknown = sorted(set(data) - {"notify", "retry_backoff"})
    if unknown:
        raise fail(f"{config}: unknown key {unknown[0]!r} (known: notify, retry_backoff)")
    try:
        notify = check_notify(data.get("notify"))
    except JobError as exc:
        raise fail(f"{config}: {exc}") from None
    backoff = data.get("retry_backoff", 10.0)
    if isinstance(backoff, bool) or not isinstance(backoff, int | float) or \
            not valid_seconds(backoff):
        raise fail(f"{config}: retry_backoff must be a number of seconds from 0 to "
                    f"{max_seconds()} (ten years)")
    return {"notify": notify, "retry_backoff": float(backoff)}


def serve(
    state_dir: StateDir = None,
    slots: Annotated[int, typer.Option(help="runs at once on a machine without GPUs")] = 1,
    gpus: Annotated[str, typer.Option(help="auto, none or a list like 0,1: one slot per GPU")
                    ] = "auto",
    until_empty: Annotated[bool, typer.Option(
        "--until-empty", help="exit 0 once the queue has been empty, with nothing "
                              "running, for --idle seconds")] = False,
    idle: Annotated[float, typer.Option(
        metavar="S", help="with --until-empty: seconds of an empty queue (from the start or "
                          "the last job's end) before exiting")] = 10.0,
    listen: Annotated[str | None, typer.Option(
        help="also serve the API on HOST:PORT (needs --token-file)")] = None,
    token_file: Annotated[Path | None, typer.Option(
        help="file holding the bearer token for --listen")] = None,
    tls_cert: Annotated[Path | None, typer.Option(
        help="with --listen: serve HTTPS with this certificate (PEM, chain included)")] = None,
    tls_key: Annotated[Path | None, typer.Option(
        help="with --tls-cert: its private key (PEM, unencrypted)")] = None,
    insecure_listen: Annotated[bool, typer.Option(
        "--insecure-listen", help="allow --listen on a non-loopback address in plain HTTP "
                                  "(the token crosses the network readable)")] = False,
    config: Annotated[Path | None, typer.Option(
        help="daemon TOML: a notify table (webhook, secret, format), retry_backoff")] = None,
    retry_backoff: Annotated[float | None, typer.Option(
        help="seconds before the first retry, doubling after [10]")] = None,
    log_format: Annotated[str, typer.Option(help="auto, json or console")] = "auto",
) -> None:
    import anyio

    from lorasup.supervisor import logs
    from lorasup.supervisor.serve import paths
    from lorasup.supervisor.serve.daemon import Daemon, DaemonConfig
    from lorasup.supervisor.serve.errors import ApiError
    from lorasup.supervisor.serve.gpus import GpuSpecError

    if log_format not in ("auto", "json", "console"):
        raise fail(f"--log-format must be auto, json or console, not {log_format!r}")
    token = tls = None
    if listen is None and (tls_cert or tls_key):
        raise fail("--tls-cert/--tls-key need --listen (the UNIX socket speaks no TLS)")
    if listen is not None:
        if token_file is None:
            raise fail("--listen needs --token-file (the API on TCP requires a bearer token)")
        from lorasup.supervisor.serve import listening

        try:
            tls = listening.check_tls(tls_cert, tls_key)
            listening.check_listen(listen, tls, insecure_listen)
        except listening.ListenError as exc:
            raise fail(str(exc)) from None
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise fail(f"cannot read --token-file {token_file}: {exc.strerror}") from None
        if len(token) < 16:
            raise fail(f"the token in {token_file} is too short (16 characters at least)")
    settings = _daemon_config(config)
    if retry_backoff is not None:
        if not valid_seconds(retry_backoff):
            raise fail(f"--retry-backoff must be a number of seconds from 0 to "
                        f"{max_seconds()}")
        settings["retry_backoff"] = retry_backoff
    if not valid_seconds(idle):
        raise fail(f"--idle must be a number of seconds from 0 to {max_seconds()}")
    from lorasup.supervisor.config import SLOTS_RANGE

    if not SLOTS_RANGE[0] <= slots <= SLOTS_RANGE[1]:
        raise fail(f"--slots must be from {SLOTS_RANGE[0]} to {SLOTS_RANGE[1]}")
    logs.configure(log_format)  # type: ignore[arg-type]
    try:
        daemon = Daemon(DaemonConfig(state_dir=paths.state_dir(state_dir), slots=slots,
                                     gpus=gpus, until_empty=until_empty, idle=idle,
                                     listen=listen, token=token, tls=tls,
                                     **settings))
        code = anyio.run(daemon.run)
    except (ApiError, GpuSpecError) as exc:
        raise fail(getattr(exc, "message", str(exc))) from None
    except OSError as exc:
        raise fail(f"cannot use the state directory: {exc}") from None
    raise typer.Exit(code)
