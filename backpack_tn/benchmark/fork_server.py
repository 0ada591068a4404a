"""Fresh worker processes in milliseconds, forked from a server that imported torch.

Peak memory is measured in a fresh process per measurement, so that no method finds
the heap, caches or workspaces another one left. Starting Python and importing torch
costs about 1.5 s on 2 cores, more than most measurements. A fork server is an
interpreter started once, with the environment its workers need, that imports some
modules and then only forks: one child per job, which starts with those modules
loaded and exits after the job. The server runs no torch computation itself, so its
children inherit no thread pool (GNU OpenMP's does not survive a fork), no heap of
tensors and no cache of an earlier job.

Protocol (internal): the client writes one JSON line per job to the server's stdin,
``{"target": "module:function", "kwargs": {...}, "timeout": seconds}``; the server
answers one JSON line on its stdout, the dictionary the target returned, or
``{"status": "timeout" | "oom" | "error", "message": ...}`` where the child ran out
of time, was killed, or raised.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

#: Internal command of ``python -m backpack_tn`` that runs :func:`serve`.
COMMAND = "fork-server"


class ForkServer:
    """Client of one fork server, started on first use and again if it died.

    Attributes:
        preload: Modules the server imports before forking.
        env: Variables added to this process's environment for the server.
    """

    def __init__(self, preload: Sequence[str], env: Mapping[str, str] | None = None):
        """Remember what to start; the server starts with the first job.

        Args:
            preload: Modules the server imports before forking.
            env: Variables added to this process's environment for the server
                (read by the C library at start-up, e.g. glibc's ``MALLOC_*``).
        """
        self.preload = tuple(preload)
        self.env = dict(env or {})
        self._process: subprocess.Popen | None = None
        atexit.register(self.close)

    def run(self, target: str, kwargs: Mapping[str, object], timeout: float) -> dict:
        """Run ``target(**kwargs)`` in a fresh child of the server.

        Args:
            target: ``"module:function"``; the function returns a JSON-able dict.
            kwargs: Its JSON-able keyword arguments.
            timeout: Seconds before the child is killed.

        Returns:
            The function's result, or ``{"status", "message"}`` where it gave none.
        """
        job = json.dumps({"target": target, "kwargs": dict(kwargs), "timeout": timeout})
        for _attempt in range(2):
            process = self._running()
            try:
                process.stdin.write(job + "\n")
                process.stdin.flush()
                line = process.stdout.readline()
            except (BrokenPipeError, OSError):
                line = ""
            if line:
                return json.loads(line)
            self.close()
        return {"status": "error", "message": "the fork server exited"}

    def close(self):
        """Stop the server (it also stops when this process closes its stdin)."""
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(OSError):  # the server's end is already gone
            process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()

    def _running(self) -> subprocess.Popen:
        """The server's process, started if it is not running.

        Returns:
            The process, with text pipes to its stdin and stdout.
        """
        if self._process is not None and self._process.poll() is None:
            return self._process
        self.close()
        env = {**os.environ, **self.env}
        root = os.path.dirname(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        )
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        self._process = subprocess.Popen(
            [sys.executable, "-m", "backpack_tn", COMMAND, *self.preload],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        return self._process


def serve(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m backpack_tn fork-server MODULE...`` (internal).

    Imports the modules, then runs one job per line of stdin until it closes.

    Args:
        argv: The modules to import.

    Returns:
        Exit code 0.
    """
    for module in argv or []:
        importlib.import_module(module)
    for line in sys.stdin:
        result = _fork_job(json.loads(line))
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    return 0


def _fork_job(job: dict) -> dict:
    """Run one job in a forked child and collect its result.

    Args:
        job: ``{"target", "kwargs", "timeout"}`` (see the module's protocol).

    Returns:
        The target's result, or why there is none.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _child(job, write_end)
    os.close(write_end)
    chunks = []
    deadline = time.monotonic() + job["timeout"]
    try:
        while True:
            ready, _, _ = select.select([read_end], [], [], deadline - time.monotonic())
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return {
                    "status": "timeout",
                    "message": f"worker exceeded {job['timeout']:.0f} s",
                }
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
    _, status = os.waitpid(pid, 0)
    if chunks:
        return json.loads(b"".join(chunks))
    if os.WIFSIGNALED(status):
        return {
            "status": "oom",
            "message": f"worker killed by signal {os.WTERMSIG(status)}",
        }
    return {
        "status": "error",
        "message": f"worker exit {os.waitstatus_to_exitcode(status)}",
    }


def _child(job: dict, write_end: int):
    """Body of a forked child: run the target, write its result, exit.

    Its stdout goes to stderr, so that nothing it prints enters the protocol.

    Args:
        job: ``{"target", "kwargs", "timeout"}``.
        write_end: Pipe to the server.
    """
    os.dup2(2, 1)
    code = 0
    try:
        module, function = job["target"].split(":")
        result = getattr(importlib.import_module(module), function)(**job["kwargs"])
        payload = json.dumps(result)
    except BaseException as error:  # report anything, then leave
        text = str(error).strip().splitlines()
        message = f"{type(error).__name__}: {text[0] if text else ''}"[:200]
        payload = json.dumps({"status": "error", "message": message})
        code = 1
    with os.fdopen(write_end, "w") as out:
        out.write(payload)
    os._exit(code)
