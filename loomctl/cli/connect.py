"""Connecting CLI commands to a server: one place that turns connection problems into
a one-line error with the 'unavailable' exit code."""

from __future__ import annotations

from loomctl.cli.output import CliError, ExitCode


def connect(server_dir: str | None, address: str | None = None):
    from loomctl.client import Client, LoomConnectionError
    host, port = None, None
    if address:
        host, _, port_text = address.rpartition(":")
        if not host or not port_text.isdigit():
            raise CliError(f"server address {address!r} is not HOST:PORT", ExitCode.USAGE)
        port = int(port_text)
    try:
        return Client(host, port, server_dir_path=server_dir)
    except LoomConnectionError as exc:
        raise CliError(str(exc), ExitCode.UNAVAILABLE) from None
