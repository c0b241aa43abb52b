"""The servers a benchmark run compares, started one at a time with the same engine.

plain   vLLM's own OpenAI server on the model, nothing of ours loaded;
stack   ``refusal-gateway serve`` (the gateway layer in the API server, the
        refusal processor in the engine), canary off;
litellm the LiteLLM proxy (its own venv, see :mod:`bench.peer`) in front of a
        running plain server.

plain and stack get the same engine arguments and the same CPU environment
(:func:`engine_env`): the launcher only ``setdefault``s ``VLLM_CPU_*``, so the
values set here win on both sides. Each :class:`Running` knows the pid of its
API-server process (where the layer runs) and of its engine core, so a
benchmark can read their CPU time from ``/proc/<pid>/stat``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

SERVED_NAME = "bench"
#: The demo model's context; :func:`engine_args` takes another for longer prompts.
MAX_MODEL_LEN = 512


def engine_args(max_model_len: int = MAX_MODEL_LEN) -> list[str]:
    """The engine arguments of both sides of a run.

    ``--enforce-eager`` keeps start-up short (no compile); ``--max-num-seqs 256``
    lets concurrency 256 run as one batch. ``--no-enable-chunked-prefill``: the
    launcher prefills unchunked on CPU (vLLM 0.32's CPU worker crashes on
    seeded chunked prefills), so plain vLLM is told the same — otherwise a
    prompt that straddles a step's token budget is prefilled in two steps on
    one side and one on the other, different engine work.
    """
    return [
        "--dtype", "float32", "--enforce-eager", "--max-model-len", str(max_model_len),
        "--max-num-seqs", "256", "--seed", "0", "--disable-log-stats", "--no-enable-chunked-prefill",
    ]  # fmt: skip


ENGINE_ARGS = engine_args()
#: The policy file of the stack: the profile the "stack + fields" case names.
POLICY = """\
profiles:
  bench:
    refusal_bias: {refuse: -50.0}
    refusal_threshold: {safety: 0.9}
"""


def engine_env(bind: str, kv_gib: int = 1, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every vLLM process of a run: same OMP pinning on both sides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_CPU_")}
    env.update({
        "PYTHONUNBUFFERED": "1",
        "VLLM_CPU_KVCACHE_SPACE": str(kv_gib),
        "VLLM_CPU_OMP_THREADS_BIND": bind,
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    })  # fmt: skip
    env.update(extra or {})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """CPU time of one process (all its threads, not its children), in seconds.

    The sum of ``/proc/<pid>/task/*/schedstat`` (nanoseconds on a CPU): the
    same time as ``utime + stime`` of ``/proc/<pid>/stat`` but without its
    10 ms ticks, which would round a short batch's per-request cost away.
    Falls back to ``stat`` where schedstat is missing.
    """
    total, found = 0, False
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
                found = True
            except (OSError, ValueError, IndexError):
                continue
    except OSError:
        return float("nan")
    if found:
        return total / 1e9
    return cpu_seconds_ticks(pid)


def cpu_seconds_ticks(pid: int) -> float:
    """utime + stime from ``/proc/<pid>/stat`` (10 ms resolution)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc/*/stat's ppid)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@dataclass
class Running:
    kind: str
    base_url: str
    proc: subprocess.Popen
    log: Path
    api_pid: int = 0
    engine_pids: list[int] = field(default_factory=list)
    started_s: float = 0.0

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of the API-server process and of the engine process(es)."""
        return {
            "api": cpu_seconds(self.api_pid),
            "engine": sum(cpu_seconds(p) for p in self.engine_pids),
        }

    def stop(self) -> None:
        stop(self.proc)


def stop(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    """SIGTERM, then SIGKILL what is left of the process group it leads."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers (EngineCore) of this group only
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait()


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float, path: str = "/health") -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url + path, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def _tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _spawn(kind: str, cmd: list[str], env: dict[str, str], port: int, log: Path,
           timeout_s: float, health: str = "/health") -> Running:  # fmt: skip
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log.open("w") as out:
        # A process group of its own: stop() can kill whatever it leaves behind.
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    if not wait_healthy(url, proc, timeout_s, health):
        stop(proc)
        raise RuntimeError(f"{kind} server did not become healthy; {log}:\n{_tail(log)}")
    running = Running(kind, url, proc, log, started_s=time.monotonic() - started)
    tree = descendants(proc.pid)
    if kind == "stack":  # launcher -> refusal_gateway.vllm_entry (API server) -> EngineCore
        api = [p for p in tree if "refusal_gateway.vllm_entry" in _cmdline(p)]
        running.api_pid = api[0] if api else 0
    else:
        running.api_pid = proc.pid
    # vLLM's engine: the EngineCore process (scheduler) and its Worker(s) (the model).
    running.engine_pids = [p for p in tree if any(k in _comm(p) + _cmdline(p) for k in ("EngineCore", "Worker"))]
    return running


def start_plain(model: str, log: Path, bind: str, timeout_s: float = 600,
                engine_args: list[str] | None = None, env: dict[str, str] | None = None) -> Running:  # fmt: skip
    port = free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model, "--served-model-name", SERVED_NAME,
        "--host", "127.0.0.1", "--port", str(port),
        *(ENGINE_ARGS if engine_args is None else engine_args),
    ]  # fmt: skip
    return _spawn("plain", cmd, env if env is not None else engine_env(bind), port, log, timeout_s)


def start_stack(model: str, log: Path, bind: str, policy: Path, timeout_s: float = 600,
                engine_args: list[str] | None = None) -> Running:  # fmt: skip
    port = free_port()
    cmd = [
        sys.executable, "-m", "refusal_gateway.cli", "serve",
        "--model", model, "--served-model-name", SERVED_NAME,
        "--host", "127.0.0.1", "--port", str(port),
        "--canary-interval-s", "0", "--policy-file", str(policy),
        *(ENGINE_ARGS if engine_args is None else engine_args),
    ]  # fmt: skip
    return _spawn("stack", cmd, engine_env(bind), port, log, timeout_s)


def start_litellm(python: Path, config: Path, hook_dir: Path, log: Path, extra_env: dict[str, str],
                  timeout_s: float = 300) -> Running:  # fmt: skip
    port = free_port()
    cmd = [str(python), "-m", "litellm.proxy.proxy_cli", "--config", str(config),
           "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "PYTHONPATH"))}
    env.update({
        "PYTHONPATH": str(hook_dir), "PYTHONUNBUFFERED": "1",
        # No telemetry, no network look-ups (the model cost map ships with the package).
        "LITELLM_TELEMETRY": "False", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOG": "ERROR", "DISABLE_SCHEMA_UPDATE": "True", **extra_env,
    })  # fmt: skip
    return _spawn("litellm", cmd, env, port, log, timeout_s, health="/health/liveliness")
