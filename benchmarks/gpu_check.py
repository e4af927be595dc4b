"""`make gpu-check`: one prepared run on a lent GPU (<= 8 minutes, no network, no installs).

    python -m benchmarks.gpu_check [--out DIR] [--budget S]      (or bash benchmarks/gpu_check.sh)
    GPU_CHECK_DRY_RUN=1 python -m benchmarks.gpu_check           (CPU rehearsal, <= 2 minutes)

This process imports no torch: it runs every step as a child process in its own process
group with its own time limit (killed with its group when it overruns), under one global
deadline, and writes summary.txt as it goes. Each step writes its own files into OUT as
soon as it has results (see gpu_common.FILES), so a run killed at any point keeps what
was measured. Steps, in order:
  build        (background) the C++/CUDA extension, JIT-built into a fresh
               TORCH_EXTENSIONS_DIR in a temporary folder: a build killed by its limit
               leaves its lock there, never in a folder a later build uses
  env          GPU, driver, versions, TF32 flags, every backend's availability -> run_info.json
  tests-triton tests/test_triton_ops.py on CUDA tensors (-k cuda), per-test limit  -> tests.txt
  correctness-a  torch and triton paths against the float64 literal      -> correctness.json
               (these three run while the extension builds: NORM_FAST_NO_EXTENSION=1)
  build-wait   bounded wait for the build; its availability -> run_info.json
  tests-ext    tests/test_cpp_ops.py on CUDA tensors (-k cuda)               -> tests.txt
  correctness-b  cpp/cuda paths and auto                                  -> correctness.json
  timing       the six paper shapes, every path      -> results.json (+ .md/.png at the end)
  profile      torch.profiler at the main shape, kernel rates vs torch.mm -> profile.txt
  report       results.md, results.png + headline*.png (report.py, plots.py), summary.txt
Without the extension (its build failed or timed out) the later steps run without it and
say so. DRY_RUN: tiny shapes on the CPU (Triton through its interpreter), the pytest
steps run a few CPU cases instead of the CUDA ones, CUDA-only parts say "skipped: no CUDA".
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

from . import gpu_common as C

# Seconds: (GPU, DRY_RUN). The total is the global deadline; the timing step gets what
# the others leave, less the profile's and the report's reserves.
BUDGET = {"total": (450, 110), "build": (240, 75), "env": (45, 30), "tests-triton": (60, 25),
          "correctness-a": (60, 30), "tests-ext": (30, 15), "correctness-b": (60, 25),
          "profile": (40, 12), "report": (15, 8),
          # what the steps after the build need at least (tests-ext, correctness-b, some
          # timing, profile, report): the build is waited for until only this is left
          "after-build": (245, 57)}
MIN_STEP_S = 5
TEST_TIMEOUT_S = {"gpu": 20, "dry": 15}
PYTEST_K = {  # which cases: the CUDA ones on a GPU; a few CPU ones to rehearse the plumbing;
    # last: the backend the step tests, required (a missing one fails the step, never skips it)
    "tests-triton": ("tests/test_triton_ops.py", "cuda", "cpu and moments_matches", "triton"),
    "tests-ext": ("tests/test_cpp_ops.py", "cuda", "cpp and test_errors", "cuda"),
}


def budget(name: str) -> float:
    return BUDGET[name][1 if C.dry_run() else 0]


# --- child processes ----------------------------------------------------------------------

class Child:
    """A child process in its own session (process group); output relayed line by line to
    stderr (profiler chatter dropped) and, if given, to a file."""

    def __init__(self, cmd: List[str], env: Dict[str, str], log: Optional[str] = None,
                 quiet: bool = False):
        self.log = open(log, "a") if log else None
        self.quiet = quiet
        self.start = time.time()
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     start_new_session=True, errors="replace")
        self.tail: List[str] = []
        self.reader = threading.Thread(target=self._relay, daemon=True)
        self.reader.start()

    def _relay(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("USDT:") or "SyncActivityProfilerHandler" in line:
                continue
            if self.log:
                self.log.write(line)
                self.log.flush()
            self.tail = (self.tail + [line.rstrip()])[-20:]
            if not self.quiet:
                sys.stderr.write(line)
                sys.stderr.flush()

    def wait(self, limit: float) -> str:
        """"ok", "FAILED (rc N)" or "TIMEOUT (N s)"; the group is killed on timeout."""
        try:
            rc = self.proc.wait(timeout=max(0.0, limit))
            status = "ok" if rc == 0 else f"FAILED (rc {rc})"
        except subprocess.TimeoutExpired:
            self.kill()
            status = f"TIMEOUT ({max(0.0, limit):.0f} s)"
        self.reader.join(timeout=5)
        if self.log:
            self.log.close()
            self.log = None
        return status

    def kill(self) -> None:
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                continue

    @property
    def seconds(self) -> float:
        return time.time() - self.start


class Run:
    """The run's state: where it writes, its deadline, the steps' outcomes."""

    def __init__(self, out: str, total_s: float):
        self.out = out
        self.start = time.time()
        self.deadline = C.Deadline(self.start + total_s)
        self.work = tempfile.mkdtemp(prefix="gpu_check.")
        self.ext_dir = os.path.join(self.work, "torch_extensions")
        self.steps: List[tuple] = []            # (name, status, seconds, note)
        self.extension_ready = False
        self.current: Optional[Child] = None     # the step child running now
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", TORCH_EXTENSIONS_DIR=self.ext_dir,
                        GPU_CHECK_DRY_RUN="1" if C.dry_run() else "0")
        if C.dry_run():  # 2 shared cores: no OpenMP spin-waits against the build's compiler
            self.env.setdefault("OMP_NUM_THREADS", "1")
        self.env["PYTHONPATH"] = os.pathsep.join(
            [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

    def child_env(self, require: str = "") -> Dict[str, str]:
        """The environment of a child step. NORM_FAST_REQUIRE (tests/conftest.py) is set per
        step to what that step tests, never inherited: the caller's (CI sets cpp,triton)
        would stop the Triton tests that run before the extension is built."""
        env = dict(self.env)
        env.pop("NORM_FAST_REQUIRE", None)
        if require:
            env["NORM_FAST_REQUIRE"] = require
        if not self.extension_ready:
            env["NORM_FAST_NO_EXTENSION"] = "1"
        return env

    def record(self, name: str, status: str, seconds: float, note: str = "") -> None:
        self.steps.append((name, status, round(seconds, 1), note))
        C.say(name, f"{status} in {seconds:.0f} s" + (f": {note}" if note else ""))
        write_summary(self, final=False)

    def limit(self, name: str) -> float:
        """The step's limit, cut to what the global deadline leaves after the reserves."""
        reserve = budget("report") + (budget("profile") if name != "profile" else 0)
        return min(budget(name), self.deadline.left() - reserve)

    def step(self, name: str, module: str, extra: List[str] = (), limit: Optional[float] = None
             ) -> str:
        limit = self.limit(name) if limit is None else limit
        if limit < MIN_STEP_S:
            self.record(name, "skipped: budget", 0)
            return "skipped"
        # the child stops starting work a little before its kill time, and writes
        child_deadline = time.time() + max(1.0, limit - max(5.0, 0.15 * limit))
        cmd = [sys.executable, "-m", module, "--out", self.out, "--deadline",
               f"{child_deadline:.1f}", *extra]
        C.say(name, f"start (limit {limit:.0f} s)")
        child = self.current = Child(cmd, self.child_env())
        status = child.wait(limit)
        self.record(name, status, child.seconds)
        return status

    def pytest(self, name: str) -> None:
        test_file, k_gpu, k_dry, required = PYTEST_K[name]
        limit = self.limit(name)
        if limit < MIN_STEP_S:
            self.record(name, "skipped: budget", 0)
            return
        k = k_dry if C.dry_run() else k_gpu
        env = self.child_env(require="cpp" if C.dry_run() and required == "cuda" else required)
        env["GPU_CHECK_TEST_TIMEOUT_S"] = str(TEST_TIMEOUT_S["dry" if C.dry_run() else "gpu"])
        cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider",
               "-p", "benchmarks.gpu_pytest_timeout", test_file, "-k", k]
        log = C.out_path(self.out, "tests.txt")
        with open(log, "a") as f:
            f.write(f"===== {name}: {' '.join(cmd[2:])} (limit {limit:.0f} s"
                    + (", DRY_RUN: CPU cases" if C.dry_run() else "") + ")\n")
        child = self.current = Child(cmd, env, log=log, quiet=True)
        status = child.wait(limit)
        last = next((ln for ln in reversed(child.tail)
                     if re.search(r"\b(passed|failed|error|skipped|deselected|no tests ran)\b", ln)),
                    child.tail[-1] if child.tail else "")
        if status.startswith("FAILED (rc 5)"):
            status = "ok" if C.dry_run() else "FAILED (no tests collected)"
        with open(log, "a") as f:
            f.write(f"===== {name}: {status} in {child.seconds:.0f} s\n\n")
        self.record(name, status, child.seconds, last.strip("= "))


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- steps that run in a child: env, build ---------------------------------------------------

def _cmd_output(cmd: List[str], timeout: float = 10.0) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout.strip()
    except Exception as exc:  # not installed, or hung
        return f"unavailable ({type(exc).__name__})"


def env_step(out: str) -> int:
    """run_info.json: the environment (and the keys report.render_markdown reads)."""
    import platform

    import torch

    from norm_fast.ops import extension

    env: Dict[str, object] = {"python": platform.python_version(), "torch": torch.__version__,
                              "torch_cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
                              "dry_run": C.dry_run()}
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception as exc:
        env["triton"] = f"not importable: {C.error_text(exc)}"
    for mod in ("pytest", "pytest_timeout", "numpy", "ninja", "matplotlib"):
        try:
            m = __import__(mod)
            env[mod] = getattr(m, "__version__", "yes")
        except Exception:
            env[mod] = None
    env["nvcc"] = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc"
                                           if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   multiprocessors=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}",
                   driver=_cmd_output(["nvidia-smi", "--query-gpu=driver_version",
                                       "--format=csv,noheader"]),
                   clocks=_cmd_output(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm,"
                                       "clocks.mem,temperature.gpu,power.draw",
                                       "--format=csv,noheader"]))
    else:
        env.update(gpu=None, driver=None, note="no CUDA device")
    env["tf32"] = {"torch.backends.cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                   "torch.backends.cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                   "torch.get_float32_matmul_precision()": torch.get_float32_matmul_precision()}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # The precision plan (norm_fast/precision.py): per policy, the precision each product
    # of the fused forms runs in; "policy_now" is what float32 resolves to on this device
    # with these flags (the GPU run's correctness and timing ran under it).
    from norm_fast import dispatch as _dispatch, precision as _plan
    policy_now = _dispatch.resolve_precision("auto", device, torch.float32)
    env["precision_plan"] = {"policy_now": policy_now,
                             "products_now": _plan.table(policy_now),
                             "policies": {p: _plan.table(p) for p in _plan.POLICIES},
                             "ran_on": ("CUDA: as planned (Triton tl.dot input_precision, "
                                        "cuBLAS/cuDNN float32 flags)" if device == "cuda"
                                        else "CPU: Triton interpreter and C++ kernels exact; "
                                        "eager kernel set emulated")}
    backends = {}
    for name, ok, why in C.available_backends(device):
        if name in ("cpp", "cuda") and not extension.load()[0] and "NORM_FAST_NO_EXTENSION" in why:
            why = "pending: the extension is building (see build-wait)"
        backends[name] = {"available": ok, "reason": why}
    env["backends"] = backends
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": "make gpu-check" + (" DRY_RUN=1" if C.dry_run() else ""),
            "torch": torch.__version__, "device": device,
            "device_name": env["gpu"] or f"CPU ({os.cpu_count()} cores), DRY_RUN",
            "tf32": ", ".join(f"{k}={v}" for k, v in env["tf32"].items()),
            "load_average": "%.2f" % os.getloadavg()[0], "environment": env}
    C.write_atomic(C.out_path(out, "run_info.json"), json.dumps(info, indent=1, default=str))
    C.say("env", f"{info['device_name']}, driver {env.get('driver')}, torch {env['torch']} "
          f"(CUDA {env['torch_cuda']}), triton {env['triton']}, python {env['python']}")
    C.say("env", f"TF32: {info['tf32']}")
    for name, b in backends.items():
        C.say("env", f"backend {name}: {'available' if b['available'] else 'NOT available'}"
              f" ({b['reason']})")
    return 0


def build_step(result_path: str) -> int:
    """Load (JIT-build) the extension once; its availability -> `result_path` (JSON)."""
    t0 = time.time()
    from norm_fast import dispatch
    from norm_fast.ops import extension
    module, how = extension.load()
    res = {"seconds": round(time.time() - t0, 1), "how": how,
           "backends": {n: list(dispatch.is_available(n)) for n in ("cpp", "cuda")}}
    with open(result_path, "w") as f:
        json.dump(res, f)
    C.say("build", f"{how} in {res['seconds']} s: " + "; ".join(
        f"{n} {'available' if ok else 'NOT available'} ({why})"
        for n, (ok, why) in res["backends"].items()))
    return 0 if module is not None else 1


def merge_build(run: Run, status: str, seconds: float) -> None:
    """The build's outcome into run_info.json (backends cpp/cuda, and a "build" entry)."""
    path = C.out_path(run.out, "run_info.json")
    info = C.read_json(path, {})
    res = C.read_json(os.path.join(run.work, "build.json"), None)
    env = info.setdefault("environment", {})
    backends = env.setdefault("backends", {})
    if res is not None:
        for name, (ok, why) in res["backends"].items():
            backends[name] = {"available": ok, "reason": why}
    else:
        for name in ("cpp", "cuda"):
            backends[name] = {"available": False, "reason": f"extension build {status}"}
    env["extension_build"] = {"status": status,
                              "seconds": res["seconds"] if res else round(seconds, 1),
                              "how": res["how"] if res else None,
                              "torch_extensions_dir": "a fresh temporary folder"}
    C.write_atomic(path, json.dumps(info, indent=1, default=str))


# --- the end: records, report, summary -------------------------------------------------------

def finish_records(out: str) -> List[dict]:
    """results.json with rows left "pending" by a killed timing step marked as failed."""
    path = C.out_path(out, "results.json")
    records = C.read_json(path, None)
    if records is None:
        return []
    rows = records["rows"] if isinstance(records, dict) else records
    for r in rows:
        if r.get("status") == "pending":
            r.update(status="failed", error="timing step killed (its time limit) during this row")
    C.write_atomic(path, json.dumps(records, indent=1, sort_keys=True))
    return rows


def _fmt(x: Optional[float], unit: str = "") -> str:
    return "-" if x is None else f"{x:.3g}{unit}"


def _ok(r: dict) -> bool:
    return r.get("status") == "ok" and r.get("time_ms") is not None


def auto_lines(rows: List[dict]) -> List[str]:
    """Step 7: per shape and dtype (forward+backward), auto's choice beside the fastest
    path auto could have chosen (eager paths, concrete backend/algorithm)."""
    lines, misses = [], []
    keys = []
    for r in rows:
        k = (r["shape"], r["dtype"])
        if r["pass"] == "forward+backward" and k not in keys:
            keys.append(k)
    for shape, dtype in keys:
        group = [r for r in rows if (r["shape"], r["dtype"], r["pass"]) == (shape, dtype,
                                                                           "forward+backward")]
        auto = next((r for r in group if r["path"] == "norm_fast-auto"), None)
        cands = [r for r in group if _ok(r) and not r.get("compiled") and not r.get("cuda_graph")
                 and "auto" not in (r.get("requested_backend"), r.get("requested_algorithm"))]
        if auto is None or not _ok(auto) or not cands:
            why = (f"{auto.get('status')}: {auto.get('error')}" if auto else "not measured")
            lines.append(f"  {shape:22s} {dtype:8s} auto: {why}"[:100])
            continue
        best = min(cands, key=lambda r: r["time_ms"])
        noise = max(auto.get("time_iqr_ms") or 0, best.get("time_iqr_ms") or 0)
        wrong = best["time_ms"] < 0.95 * auto["time_ms"] and auto["time_ms"] - best["time_ms"] > noise
        lines.append(f"  {shape:22s} {dtype:8s} auto {auto['backend']}/{auto['algorithm']} "
                     f"{_fmt(auto['time_ms'])} ms; fastest {best['path'].replace('norm_fast-', '')}"
                     f" {_fmt(best['time_ms'])} ms" + (f"  MISS x{auto['time_ms'] / best['time_ms']:.2f}"
                                                       if wrong else ""))
        if wrong:
            misses.append(f"{shape} {dtype}")
    head = [f"auto's choice vs the fastest eager path (forward+backward): auto missed "
            f"{len(misses)} of {len(keys)} (MISS: slower by > 5% and > the IQR)"]
    return head + lines


def headline_lines(rows: List[dict]) -> List[str]:
    main = C.MAIN_SHAPE.name
    lines = [f"headline at {main} (B={next((r['batch'] for r in rows if r['shape'] == main), '?')}):"]
    for dtype in C.DTYPE_NAMES:
        for pass_ in ("forward+backward", "forward"):
            g = {r["path"]: r for r in rows if (r["shape"], r["dtype"], r["pass"]) == (main, dtype, pass_)}
            a, ref, comp, gr = (g.get(k, {}) for k in ("norm_fast-auto", "reference",
                                                       "reference-compiled", "norm_fast-auto-cudagraph"))
            if not g:
                continue
            lines.append(
                f"  {dtype:8s} {pass_:16s} eager {_fmt(ref.get('time_ms'))} ms, compiled "
                f"{_fmt(comp.get('time_ms'))} ms (compile {_fmt(comp.get('compile_s'))} s), auto "
                f"{_fmt(a.get('time_ms'))} ms = x{_fmt(a.get('speedup_vs_reference'))} vs eager, "
                f"x{_fmt(a.get('speedup_vs_compiled'))} vs compiled; graph "
                + (f"{_fmt(gr.get('time_ms'))} ms" if _ok(gr) else
                   f"{gr.get('status', '-')}: {gr.get('error', '')}"[:60]))
    return lines


def correctness_lines(out: str) -> List[str]:
    rows = C.read_json(C.out_path(out, "correctness.json"), [])
    counts = {v: sum(r.get("verdict") == v for r in rows) for v in ("PASS", "FAIL", "SKIP")}
    lines = [f"correctness: PASS {counts['PASS']}  FAIL {counts['FAIL']}  SKIP {counts['SKIP']}"
             f"  (err <= 4 x literal's own error + floor 2e-6 fp32 / 1e-3 bf16)"]
    fails = [r for r in rows if r.get("verdict") == "FAIL"]
    for r in fails[:8]:
        lines.append(f"  FAIL {r['shape']} {r['dtype']} {r['path']} {r['quantity']}: "
                     + (r["error"] if r.get("error") else
                        f"err {_fmt(r['err'])} > {_fmt(r['bound'])} (literal {_fmt(r['literal_err'])})"))
    if len(fails) > 8:
        lines.append(f"  ... {len(fails) - 8} more FAIL rows in correctness.json")
    return lines


def tests_counts(out: str) -> str:
    text = ""
    try:
        with open(C.out_path(out, "tests.txt")) as f:
            text = f.read()
    except OSError:
        return "tests: none ran"
    total = {}
    for word in ("passed", "failed", "error", "skipped"):
        total[word] = sum(int(n) for n in re.findall(rf"(\d+) {word}", " ".join(
            ln for ln in text.splitlines() if re.search(r" in [\d.]+s", ln))))
    return (f"tests: PASS {total['passed']}  FAIL {total['failed'] + total['error']}  "
            f"skipped {total['skipped']}")


def write_summary(run: Run, final: bool) -> None:
    info = C.read_json(C.out_path(run.out, "run_info.json"), {})
    env = info.get("environment", {})
    lines = [f"make gpu-check{' DRY_RUN=1 (CPU rehearsal: tiny shapes, Triton interpreter)' if C.dry_run() else ''}"
             f" -- {info.get('date', '')}",
             f"device: {info.get('device_name', '?')}  driver {env.get('driver')}  torch "
             f"{env.get('torch')} (CUDA {env.get('torch_cuda')})  triton {env.get('triton')}  "
             f"python {env.get('python')}",
             f"TF32: {info.get('tf32', '?')}",
             "backends: " + "; ".join(f"{n} {'yes' if b.get('available') else 'no (' + str(b.get('reason'))[:70] + ')'}"
                                      for n, b in env.get("backends", {}).items()),
             "steps: " + "; ".join(f"{n} {s} {t:.0f}s" for n, s, t, _ in run.steps)]
    notes = [f"  {n}: {note}" for n, _, _, note in run.steps if note]
    lines += notes
    if final:
        rows = C.read_json(C.out_path(run.out, "results.json"), [])
        rows = rows["rows"] if isinstance(rows, dict) else rows
        status = {}
        for r in rows:
            status[r.get("status")] = status.get(r.get("status"), 0) + 1
        lines += [tests_counts(run.out)] + correctness_lines(run.out)
        lines.append("timing rows: " + ", ".join(f"{k} {v}" for k, v in sorted(
            status.items(), key=lambda kv: str(kv[0]))) if rows else "timing rows: none")
        lines += headline_lines(rows) + auto_lines(rows)
        lines.append(f"wall {time.time() - run.start:.0f} s; files: "
                     + " ".join(f for f in C.FILES if os.path.exists(C.out_path(run.out, f))))
    C.write_atomic(C.out_path(run.out, "summary.txt"), "\n".join(lines) + "\n")



def default_out() -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    if C.dry_run():
        return os.path.join(ROOT, "build", "gpu-check-dry-run", stamp)
    name = _cmd_output(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]).splitlines()
    slug = re.sub(r"[^a-z0-9]+", "-", (name[0] if name else "cuda").lower()).strip("-") or "cuda"
    return os.path.join(ROOT, "benchmarks", "results", slug, stamp)


def orchestrate(out: str, total_s: float) -> int:
    os.makedirs(out, exist_ok=True)
    for f in C.FILES:                      # a reused OUT must not mix two runs
        if os.path.exists(C.out_path(out, f)):
            os.remove(C.out_path(out, f))
    run = Run(out, total_s)
    C.say("gpu-check", f"{'DRY_RUN (CPU) ' if C.dry_run() else ''}output {out}; budget "
          f"{total_s:.0f} s; extension builds in {run.ext_dir}")
    def on_term(signum, frame):  # killed from outside: still write the report and summary
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    result_path = os.path.join(run.work, "build.json")
    build = Child([sys.executable, "-m", "benchmarks.gpu_check", "--step", "build",
                   "--result", result_path], dict(run.env),
                  log=os.path.join(run.work, "build.log"))
    try:
        run.step("env", "benchmarks.gpu_check", ["--step", "env"])
        run.pytest("tests-triton")
        run.step("correctness-a", "benchmarks.gpu_correctness", ["--backends", "torch,triton"])
        # the build may use what the steps after it can spare (AFTER_BUILD)
        status = build.wait(min(budget("build") - build.seconds,
                                run.deadline.left() - budget("after-build")))
        run.extension_ready = status == "ok"
        merge_build(run, status, build.seconds)
        note = ("; ".join(ln.split("build: ", 1)[-1] for ln in build.tail if "build: " in ln)
                if status == "ok" else " | ".join(build.tail[-3:]))[-300:]
        run.record("build-wait", status, build.seconds, note)
        if run.extension_ready:
            run.pytest("tests-ext")
        else:
            run.record("tests-ext", f"skipped: no extension (build {status})", 0)
        run.step("correctness-b", "benchmarks.gpu_correctness", ["--backends", "cpp,cuda,auto"])
        run.step("timing", "benchmarks.gpu_timing",
                 limit=run.deadline.left() - budget("report") - budget("profile"))
        run.step("profile", "benchmarks.gpu_profile")
    except KeyboardInterrupt as exc:
        run.steps.append(("interrupted", str(exc) or "KeyboardInterrupt", 0.0, ""))
    finally:
        for child in (run.current, build):
            if child is not None:
                child.kill()
        finish_records(out)
        t0 = time.time()
        try:
            from . import report
            if os.path.exists(C.out_path(out, "results.json")):
                report.rerender(out)
                status = "ok"
            else:
                status = "skipped: no results.json"
        except Exception as exc:
            status = f"FAILED: {C.error_text(exc)}"
        run.steps.append(("report", status, round(time.time() - t0, 1), ""))
        write_summary(run, final=True)
        shutil.rmtree(run.work, ignore_errors=True)
    with open(C.out_path(out, "summary.txt")) as f:
        print(f.read())
    bad = [s for s in run.steps if not (s[1] == "ok" or s[1].startswith("skipped"))]
    return 1 if bad else 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check")
    p.add_argument("--out", default=os.environ.get("OUT", ""))
    p.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S", 0)))
    p.add_argument("--step", choices=("env", "build"), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.step == "env":
        return env_step(args.out)
    if args.step == "build":
        return build_step(args.result)
    out = os.path.abspath(args.out or default_out())
    return orchestrate(out, args.budget or budget("total"))


if __name__ == "__main__":
    sys.exit(main())
