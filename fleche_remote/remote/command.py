"""The command line that starts an ``SshCache``'s server: ``ssh`` with the
layer's options, running the remote steps (``cd``, the setup commands)
and then the server, or the stub that finds or ships one.

Apart from the client because it is built from the layer's settings alone
and needs nothing of the connection; ``doctor`` runs its probes through
the same ``ssh_argv`` and ``setup_steps``.
"""

from __future__ import annotations

import shlex
from typing import List, Optional, Tuple

from . import bootstrap as _bootstrap
from .ssh_options import fast_cipher_options, sh_path, timeout_options


class SshCommand:
    """``SshCache``'s command line, from the settings it was made with."""

    host: str
    cache_name: Optional[str]
    python: str
    ssh: str
    ssh_options: Tuple[str, ...]
    setup_commands: Tuple[str, ...]
    workdir: Optional[str]
    fast_cipher: bool
    command: Optional[List[str]]
    bootstrap: str

    @property
    def local_read_only(self) -> bool:
        raise NotImplementedError  # SshCache's

    def remote_command(self) -> str:
        """The shell command line ssh runs on the remote."""
        serve = [sh_path(self.python), "-m", "fleche_remote", "serve"]
        if self.cache_name is not None:
            serve += ["--cache", shlex.quote(self.cache_name)]
        if self.local_read_only:
            serve.append("--read-only")
        steps = self.setup_steps()
        if self.bootstrap == "never":
            steps.append("exec " + " ".join(serve))
        else:  # a stub that runs an installed server, or ships this one
            steps.append("exec " + _bootstrap.stub_command(serve[0], serve[4:], self.bootstrap))
        return " && ".join(steps)

    def setup_steps(self) -> List[str]:
        """What the remote shell does before the server: ``cd workdir`` and
        the setup commands (``doctor`` runs its probe after the same steps)."""
        steps = [f"cd {sh_path(self.workdir)}"] if self.workdir else []
        return steps + list(self.setup_commands)

    def argv(self) -> List[str]:
        """The full local command that starts the connection."""
        if self.command is not None:
            return list(self.command)
        return self.ssh_argv(self.remote_command())

    def ssh_argv(self, remote_command: str) -> List[str]:
        """``ssh`` with this layer's options (cipher, the user's, time-outs)
        running ``remote_command``: one place builds it, for the server and
        for ``doctor``'s probes alike."""
        extra = fast_cipher_options(self.ssh, self.ssh_options, self.host) if self.fast_cipher else ()
        # after the user's options: ssh keeps the first value, so theirs win
        timeouts = timeout_options(self.ssh, self.ssh_options, self.host)
        # "--": nothing after it is an option, whatever the host string holds
        return [self.ssh, "-T", *extra, *self.ssh_options, *timeouts, "--", self.host, remote_command]


__all__ = ["SshCommand"]
