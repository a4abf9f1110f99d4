"""Launch the edit step as its own DeepSpeed (or torchrun) job; plain functions the Prefect task wraps.

The flow writes an :class:`~mip_core.entrypoints.edit.EditSpec` and a DeepSpeed config next to it, runs
``deepspeed --num_gpus N --module mip_core.entrypoints.edit --spec SPEC`` as a subprocess (an argv list,
never a shell string), streams both ranks' output into one log (uploaded beside the batch when remote) and
reads back the summary the job wrote. ``launcher="inprocess"`` (or ``n_ranks=0``) runs the same entrypoint
function in this process, for one device and for tests.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from mip_core.entrypoints.edit import SUMMARY_FILE, EditSpec, run_edit, write_spec, write_text, zero3_config
from mip_core.entrypoints.edit_plan import check_ds_config, ds_config_for, resolve_profile
from mip_core.errors import InputError, MipError
from mip_core.progress import MARKER
from mip_core.storage import filesystem, is_remote

Launcher = Literal["deepspeed", "torchrun", "inprocess"]
LOG_TAIL_LINES = 40


class EditJobError(MipError, RuntimeError):
    """The edit job exited non-zero (or timed out); the message carries the exit code, argv and log tail."""


def _tool(name: str, python: str) -> str:
    """The console script ``name`` installed beside ``python`` (same venv), else the one on PATH."""
    beside = Path(python).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise InputError(f"launcher executable {name!r} is neither next to {python} nor on PATH; install it "
                         f"in the job's environment (pip install deepspeed / torch)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def edit_argv(spec_uri: str, *, launcher: Literal["deepspeed", "torchrun"], n_ranks: int,
              hostfile: str | None = None, master_addr: str = "127.0.0.1", master_port: int | None = None,
              ds_config_uri: str | None = None, python: str = sys.executable) -> list[str]:
    """The job's argv (a list: no shell, so URIs with spaces or ``;`` are passed through as they are).

    ``n_ranks`` is ranks per node (``--num_gpus`` / ``--nproc_per_node``); on CPU each rank is one process.
    ``hostfile`` (DeepSpeed's ``worker-0 slots=8`` format, infra/deepspeed/hostfile.example) spans nodes.
    """
    if n_ranks < 1:
        raise InputError(f"n_ranks={n_ranks}: a launched job needs at least one rank "
                         f"(use launcher='inprocess')")
    port = str(master_port if master_port is not None else free_port())
    tail = ["--spec", spec_uri] + (["--ds-config", ds_config_uri] if ds_config_uri else [])
    if launcher == "deepspeed":
        argv = [_tool("deepspeed", python)]
        if hostfile:
            argv += ["--hostfile", hostfile]
        return [*argv, "--num_gpus", str(n_ranks), "--master_addr", master_addr, "--master_port", port,
                "--module", "mip_core.entrypoints.edit", *tail]
    if launcher == "torchrun":
        if hostfile:
            raise InputError("hostfile is a DeepSpeed launcher option; for torchrun pass --nnodes / "
                             "--rdzv-endpoint through the cluster's launcher instead")
        return [_tool("torchrun", python), "--nproc_per_node", str(n_ranks), "--master_addr", master_addr,
                "--master_port", port, "-m", "mip_core.entrypoints.edit", *tail]
    raise InputError(f"launcher={launcher!r} is unknown; use 'deepspeed', 'torchrun' or 'inprocess'")


def job_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The job's environment: this one, plus CPU-safe DeepSpeed defaults a caller's ``env`` may override."""
    out = dict(os.environ)
    if not _has_cuda():
        out.setdefault("DS_ACCELERATOR", "cpu")  # silences DeepSpeed's accelerator detection warning
    out.setdefault("GLOO_SOCKET_IFNAME", "lo")
    out.setdefault("OMP_NUM_THREADS", "1")
    out.setdefault("TORCH_EXTENSIONS_DIR", str(Path(tempfile.gettempdir()) / "mip-torch-extensions"))
    # ZeRO-3 gathers and frees each layer's weights over and over (MiB-sized blocks). glibc raises its mmap
    # threshold after such frees and then keeps the blocks in its heap: measured on a 0.1 B bf16 model with 2
    # ranks, each rank's peak RSS was 1.2 GiB with the dynamic threshold and 0.7 GiB with a fixed 1 MiB one.
    out.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    out["PYTHONUNBUFFERED"] = "1"
    out.update(env or {})
    return out


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:  # pragma: no cover - torch is a dependency
        return False


def _sibling(uri: str, name: str) -> str:
    return f"{uri.rsplit('/', 1)[0]}/{name}" if "/" in uri else name


def launch_edit(spec: EditSpec, spec_uri: str, log_uri: str, *, launcher: Launcher = "deepspeed",
                n_ranks: int = 2, timeout_s: float = 1800, env: dict[str, str] | None = None,
                hostfile: str | None = None, ds_config: dict[str, Any] | None = None, ds_profile: str = "auto",
                relay: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write the spec (and its DeepSpeed config) beside ``spec_uri``, run the edit job, return its summary.

    The job's DeepSpeed config is ``ds_config`` if given, else the named profile's (``ds_config_for``); either is
    validated here, before launch, so a bad one is an InputError (not retried) instead of a failed job.
    ``relay`` gets the job's progress lines as they are written (the flow logs them in the Prefect run).

    Raises :class:`EditJobError` with the exit code, the argv and the last lines of the log when the job fails
    or runs past ``timeout_s``. The log (both ranks' stdout and stderr) goes to ``log_uri``, also on failure.
    """
    resolve_profile(ds_profile)  # a bad name fails before anything is written, for every launcher
    if ds_config is not None:
        check_ds_config(ds_config)
    write_spec(spec, spec_uri)
    if launcher == "inprocess" or n_ranks == 0:
        return _inprocess(spec, log_uri)
    config = ds_config or ds_config_for(ds_profile, zero_stage=spec.zero_stage)
    config_uri = _sibling(spec_uri, "ds_config.json")
    write_text(config_uri, json.dumps(config, indent=1) + "\n")
    argv = edit_argv(spec_uri, launcher=launcher, n_ranks=n_ranks, hostfile=hostfile,
                     ds_config_uri=config_uri)
    with _local_log(log_uri) as log_path:
        code = _run(argv, log_path, job_env(env), timeout_s, relay)
        if code != 0:
            what = f"timed out after {timeout_s:.0f} s" if code is None else f"exited with code {code}"
            raise EditJobError(f"edit job {what}; argv: {argv}; log: {log_uri}; last {LOG_TAIL_LINES} "
                               f"lines:\n{_tail(log_path)}")
    return _read_summary(spec.output_uri)


def _run(argv: list[str], log_path: Path, env: dict[str, str], timeout_s: float,
         relay: Callable[[str], None] | None = None) -> int | None:
    """Run ``argv`` with stdout+stderr appended to ``log_path``; ``None`` when it ran past ``timeout_s``.

    The job gets its own process group, so a timeout stops the launcher and every rank it started. While it
    runs, the log's progress lines (``mip_core.progress``) go to ``relay`` every ~2 s.
    """
    with log_path.open("ab") as log:
        log.write(f"$ {shlex.join(argv)}\n".encode())  # for reading only: the job itself gets no shell
        log.flush()
        offset = log.tell()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                code: int | None = proc.wait(timeout=max(0.0, min(2.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                code = None
            if relay is not None:
                offset = _relay_progress(log_path, offset, relay)
            if code is not None:
                return code
            if time.monotonic() >= deadline:
                _stop_group(proc)
                return None


def _relay_progress(log_path: Path, offset: int, relay: Callable[[str], None]) -> int:
    """Pass the complete progress lines written to ``log_path`` since ``offset`` to ``relay``; the new offset."""
    with log_path.open("rb") as f:
        f.seek(offset)
        chunk = f.read()
    end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next round
    for line in chunk[:end].decode(errors="replace").splitlines():
        if MARKER in line:
            relay(line[line.index(MARKER):])
    return offset + end


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    import signal

    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def _local_log(uri: str) -> Iterator[Path]:
    """A local file for the log; copied to ``uri`` on exit when ``uri`` is remote (also after a failure)."""
    if not is_remote(uri):
        path = Path(uri.removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        yield path
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "edit.log"
        path.touch()
        try:
            yield path
        finally:
            fs, remote = filesystem(uri)
            fs.put_file(str(path), remote)


def _tail(path: Path, n: int = LOG_TAIL_LINES) -> str:
    with path.open("r", errors="replace") as f:
        return "".join(deque(f, maxlen=n))


def _read_summary(output_uri: str) -> dict[str, Any]:
    fs, path = filesystem(f"{output_uri.rstrip('/')}/{SUMMARY_FILE}")
    if not fs.exists(path):
        raise EditJobError(f"the edit job exited 0 but wrote no {SUMMARY_FILE} under {output_uri}; "
                           f"see its log")
    with fs.open(path, "r") as f:
        return json.load(f)


def _inprocess(spec: EditSpec, log_uri: str) -> dict[str, Any]:
    """``run_edit`` in this process, its log lines in the same log file; errors become EditJobError too."""
    with _local_log(log_uri) as log_path, log_path.open("a") as log:
        def write(msg: str) -> None:
            log.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
            log.flush()

        try:
            return run_edit(spec, distributed=False, log=write)
        except Exception as err:
            write(f"error: {type(err).__name__}: {err}")
            log.flush()
            raise EditJobError(f"in-process edit failed ({type(err).__name__}: {err}); log: {log_uri}; last "
                               f"{LOG_TAIL_LINES} lines:\n" + _tail(log_path)) from err


__all__ = ["EditJobError", "ds_config_for", "edit_argv", "job_env", "launch_edit", "zero3_config"]
