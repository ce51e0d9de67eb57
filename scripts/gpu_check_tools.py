"""Helpers of ``scripts/gpu_check.sh`` (one subcommand per step; run with the checked Python).

Kept out of the ``harness`` package on purpose: the preflight steps must run before
anything but torch is known to be importable, so they use the standard library only
(and PyYAML / pandas only in the steps that run after the dependency check).

    python scripts/gpu_check_tools.py preflight --device cuda
    python scripts/gpu_check_tools.py describe --device cuda --out DIR
    python scripts/gpu_check_tools.py constraints --lock requirements.lock --out FILE
    python scripts/gpu_check_tools.py download-list --lock requirements.lock --out FILE
    python scripts/gpu_check_tools.py check-deps
    python scripts/gpu_check_tools.py derive --source config/smoke.yaml --out FILE --device cuda \
        --dtype bfloat16 --out-dir DIR --study gpu-smoke [--tiny-smoke]
    python scripts/gpu_check_tools.py summary --out DIR --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

MIN_TORCH = (2, 4)
#: exit status for a missing or unusable environment (torch, CUDA, packages)
ENV_ERROR = 3
#: packages never taken from requirements.lock: the machine's own torch and its CUDA stack
TORCH_STACK = re.compile(r"^(torch|triton|pytorch-triton.*|nvidia-.*)$", re.IGNORECASE)
#: backports that requirements.lock (a CPython 3.11 closure) lacks for older Pythons
BACKPORTS_BEFORE_311 = ["exceptiongroup", "tomli", "async-timeout"]


def fail(message: str, code: int = 1) -> None:
    print(f"gpu_check: error: {message}", file=sys.stderr)
    sys.exit(code)


def slug(text: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s or "unknown"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in re.split(r"[.+]", version):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
    return tuple(parts)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


# -- preflight: torch, its version and CUDA -------------------------------------------------


def _import_torch():
    try:
        import torch
    except Exception as exc:  # ImportError, or a broken CUDA library underneath
        fail(
            f"{sys.executable} cannot import torch ({type(exc).__name__}: {exc}). Install a CUDA "
            f"build of torch >= {'.'.join(map(str, MIN_TORCH))} first (or load your site's PyTorch "
            "module), or point --python at an interpreter that has one; this script never "
            "installs torch",
            ENV_ERROR,
        )
    return torch


def preflight(device: str) -> dict:
    torch = _import_torch()
    version = torch.__version__
    if version_tuple(version) < MIN_TORCH:
        fail(
            f"torch {version} in {sys.executable} is too old: the harness needs torch >= "
            f"{'.'.join(map(str, MIN_TORCH))} (a CUDA build for GPU runs). Load or install a newer "
            "torch; this script uses the torch it finds and never replaces it",
            ENV_ERROR,
        )
    info = {
        "python": sys.executable,
        "python_version": platform.python_version(),
        "torch": version,
        "torch_cuda_build": torch.version.cuda,
        "device": device,
    }
    if device == "cuda":
        if torch.version.cuda is None:
            fail(
                f"CUDA was requested but torch {version} is a CPU-only build (torch.version.cuda "
                "is None). Use a CUDA build of torch (e.g. your cluster's PyTorch module), or run "
                "the CPU fallback: bash scripts/gpu_check.sh --device cpu --tiny",
                ENV_ERROR,
            )
        try:
            available = torch.cuda.is_available()
            count = torch.cuda.device_count()
        except Exception as exc:
            fail(f"CUDA was requested but initialising it failed: {type(exc).__name__}: {exc}", ENV_ERROR)
        if not available or count == 0:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            fail(
                f"CUDA was requested but torch.cuda.is_available() is False (torch {version}, CUDA "
                f"build {torch.version.cuda}, CUDA_VISIBLE_DEVICES={visible!r}). Is this a GPU node "
                "(SLURM: --gres=gpu:1 / --gpus=1), is the NVIDIA driver loaded (nvidia-smi), and is "
                "the driver new enough for this CUDA build?",
                ENV_ERROR,
            )
        info["device_name"] = torch.cuda.get_device_name(0)
        info["slug"] = slug(info["device_name"])
    else:
        info["device_name"] = cpu_name()
        info["slug"] = "cpu-" + slug(info["device_name"])
    return info


# -- the device description ----------------------------------------------------------------


def _nvidia_smi() -> dict:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"present": False}
    out = {"present": True, "path": exe}
    for key, args in (
        ("query", ["--query-gpu=index,name,memory.total,driver_version,compute_cap,pci.bus_id",
                   "--format=csv"]),
        ("full", []),
    ):
        try:
            res = subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)
            out[key] = res.stdout.strip() or res.stderr.strip()
            if res.returncode:
                out[f"{key}_returncode"] = res.returncode
        except (OSError, subprocess.TimeoutExpired) as exc:
            out[key] = f"failed: {exc}"
    return out


def describe(device: str, out: Path) -> dict:
    info = preflight(device)
    torch = _import_torch()
    info["platform"] = platform.platform()
    info["hostname"] = platform.node()
    info["cpu"] = cpu_name()
    info["cpu_count"] = os.cpu_count()
    info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    info["nvidia_smi"] = _nvidia_smi()
    info["env"] = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "SLURM_JOB_GPUS")}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["capability"] = list(torch.cuda.get_device_capability(0))
        info["total_memory_gib"] = round(props.total_memory / 2**30, 2)
        info["multiprocessors"] = props.multi_processor_count
        info["device_count"] = torch.cuda.device_count()
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
        info["arch_list"] = torch.cuda.get_arch_list()
        # a real kernel, a bf16 matmul and a device-to-host copy: fails here on a broken setup
        t0 = time.perf_counter()
        a = torch.randn(1024, 1024, device="cuda")
        b = (a.bfloat16() @ a.bfloat16().T).float()
        torch.cuda.synchronize()
        ok = bool(torch.isfinite(b).all().item())
        info["smoke_kernel"] = {"ok": ok, "seconds": round(time.perf_counter() - t0, 3)}
        if not ok:
            fail("a bf16 matmul on the GPU gave non-finite values")
        major = info["capability"][0]
        if major < 8:
            info["warning"] = (f"compute capability {info['capability']} has no native bf16 "
                               "(needs >= 8.0, Ampere); bf16 runs emulated and slowly")
    out.mkdir(parents=True, exist_ok=True)
    (out / "device.json").write_text(json.dumps(info, indent=2) + "\n")
    lines = [
        f"device:        {info['device_name']} ({device})",
        f"slug:          {info['slug']}",
        f"python:        {info['python']} ({info['python_version']})",
        f"torch:         {info['torch']} (CUDA build {info['torch_cuda_build']}, cuDNN {info['cudnn']})",
    ]
    if device == "cuda":
        lines += [
            f"capability:    {'.'.join(map(str, info['capability']))}, {info['multiprocessors']} SMs, "
            f"{info['total_memory_gib']} GiB, {info['device_count']} visible device(s), "
            f"bf16 {'yes' if info['bf16_supported'] else 'no'}",
            f"torch archs:   {' '.join(info['arch_list'])}",
        ]
        if info.get("warning"):
            lines.append(f"WARNING:       {info['warning']}")
    lines += [f"host:          {info['hostname']}, {info['platform']}, {info['cpu_count']} CPUs ({info['cpu']})"]
    smi = info["nvidia_smi"]
    lines += ["", "nvidia-smi:", smi.get("query", "(not found)") if smi["present"] else "  (not found)"]
    if smi.get("full"):
        lines += ["", smi["full"]]
    (out / "device.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[: 7 if device == "cuda" else 5]))
    return info


# -- wheels ------------------------------------------------------------------------------------


def read_lock(lock: Path) -> list[tuple[str, str]]:
    pins = []
    for raw in lock.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*(\S+)$", line)
        if not m:
            fail(f"{lock}: cannot read the line {raw!r} (expected name==version)")
        pins.append((m.group(1), m.group(2)))
    return pins


def torch_closure() -> set[str]:
    """Canonical names of torch and every installed distribution it requires, recursively."""
    from importlib import metadata

    seen: set[str] = set()
    todo = ["torch"]
    while todo:
        name = canonical(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for req in requires:
            if "extra ==" in req:
                continue
            m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
            if m:
                todo.append(m.group(1))
    return seen


def constraints(lock: Path, out: Path) -> None:
    """The found torch pinned exactly; every other lock pin except torch's stack and the
    packages torch itself requires (those stay as installed unless torch allows a change)."""
    torch = _import_torch()
    closure = torch_closure()
    lines = [
        "# written by scripts/gpu_check.sh --wheels: keep this machine's torch as it is",
        f"torch=={torch.__version__}",
    ]
    kept = skipped = 0
    for name, version in read_lock(lock):
        if TORCH_STACK.match(name) or canonical(name) in closure:
            skipped += 1
            continue
        lines.append(f"{name}=={version}")
        kept += 1
    out.write_text("\n".join(lines) + "\n")
    print(f"constraints: torch=={torch.__version__} (the installed one) + {kept} pins from {lock}; "
          f"{skipped} left to torch's own requirements")


def download_list(lock: Path, out: Path) -> None:
    pins = [(n, v) for n, v in read_lock(lock) if not TORCH_STACK.match(n)]
    out.write_text("\n".join(f"{n}=={v}" for n, v in pins) + "\n")
    print(f"{len(pins)} packages of {lock} (torch, triton and nvidia-* left out)")


def backports(python_version: str) -> None:
    """Print the backports the 3.11 lock lacks for an older target Python (one per line)."""
    if version_tuple(python_version) < (3, 11):
        print("\n".join(BACKPORTS_BEFORE_311))


# -- dependencies the check needs -------------------------------------------------------------

NEEDED = {
    "transformers": "transformers",
    "peft": "peft",
    "lm_eval": "lm_eval",
    "datasets": "datasets",
    "snakemake": "snakemake",
    "pandas": "pandas",
    "matplotlib": "matplotlib",
    "jsonschema": "jsonschema",
    "yaml": "PyYAML",
    "safetensors": "safetensors",
    "filelock": "filelock",
    "pytest": "pytest",
    "xdist": "pytest-xdist",
    "tokenizers": "tokenizers",
}


def check_deps() -> None:
    import importlib.util

    missing = [dist for module, dist in NEEDED.items() if importlib.util.find_spec(module) is None]
    if missing:
        fail(
            f"{sys.executable} lacks {', '.join(missing)}. Install them without touching torch: "
            "bash scripts/gpu_check.sh --wheels DIR (DIR prepared beforehand with "
            "--download-wheels DIR on a machine with the package index), or on a machine with "
            "the index: pip install -c requirements.lock -e '.[test]' (keeping the installed torch)",
            ENV_ERROR,
        )
    print(f"dependencies ok ({len(NEEDED)} packages importable)")


# -- derived configs ---------------------------------------------------------------------------


def derive(source: Path, out: Path, device: str, dtype: str, out_dir: str, study: str, tiny_smoke: bool) -> None:
    import yaml

    config = yaml.safe_load(source.read_text())
    config["study"] = study
    config["out_dir"] = out_dir
    config.setdefault("model", {})
    config["model"]["device"] = device
    config["model"]["dtype"] = dtype
    if tiny_smoke:
        # the CPU fallback's smoke study: the same DAG (data, train, evaluate, summary, tables,
        # figures) with two methods at one granularity and no tune stage (its jobs are the
        # same train and evaluate jobs again), so it takes well under a minute of jobs
        config["methods"] = ["lora", "smora"]
        config.pop("tune", None)
        config["budget"]["granularities"] = [3]
        config.setdefault("eval", {})["include_base"] = False
    header = (f"# derived by scripts/gpu_check.sh from {source} (device {device}, dtype {dtype}"
              f"{', tiny smoke' if tiny_smoke else ''}); do not edit\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + yaml.safe_dump(config, sort_keys=False))


# -- summary -----------------------------------------------------------------------------------


def _junit(path: Path) -> dict:
    import xml.etree.ElementTree as ET

    if not path.exists():
        return {"present": False}
    root = ET.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "xfailed": 0, "xpassed": 0}
    notes = []
    for case in root.iter("testcase"):
        name = case.get("name", "?")
        children = {child.tag: child for child in case}
        if "failure" in children:
            counts["failed"] += 1
            notes.append(("failed", name, (children["failure"].get("message") or "")[:300]))
        elif "error" in children:
            counts["errors"] += 1
            notes.append(("error", name, (children["error"].get("message") or "")[:300]))
        elif "skipped" in children:
            kind = children["skipped"].get("type", "")
            message = children["skipped"].get("message") or ""
            props = {p.get("name"): p.get("value") for p in case.iter("property")}
            if "xfail" in kind or "xfail" in message.lower() or kind == "pytest.xfail":
                counts["xfailed"] += 1
                if props.get("host_sync"):
                    message = f"host sync at {props['host_sync']}"
                notes.append(("xfailed", name, message[:300]))
            else:
                counts["skipped"] += 1
        else:
            counts["passed"] += 1
            props = {p.get("name"): p.get("value") for p in case.iter("property")}
            if props.get("sync_free") == "true":  # an xfail(strict=False) test that passed
                counts["xpassed"] += 1
                notes.append(("xpassed", name, "no host synchronisation in the routed forward"))
    counts["present"] = True
    counts["notes"] = notes
    return counts


def _read_csv(path: Path) -> list[dict]:
    import csv

    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(value, digits: int = 2) -> str:
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return "–"


def summary(out: Path, device: str) -> None:
    # run after the dependency check: the harness is importable here (one crossover rule)
    from harness.bench.crossover import crossover_point

    info = json.loads((out / "device.json").read_text()) if (out / "device.json").exists() else {}
    steps = []
    if (out / "steps.tsv").exists():
        for line in (out / "steps.tsv").read_text().splitlines():
            name, status, seconds, limit, log = (line.split("\t") + [""] * 5)[:5]
            steps.append((name, status, seconds, limit, log))
    parts = [
        f"# GPU check: {info.get('device_name', device)}",
        "",
        f"`scripts/gpu_check.sh` on {info.get('hostname', '?')}, "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}. Device `{device}`"
        + (f", capability {'.'.join(map(str, info['capability']))}, {info.get('total_memory_gib')} GiB"
           if info.get("capability") else "")
        + f"; torch {info.get('torch', '?')} (CUDA build {info.get('torch_cuda_build')}), "
        f"Python {info.get('python_version', '?')}. Details: `device.txt`, `device.json`.",
        "",
        "## Steps",
        "",
        "| step | status | seconds | limit (s) | log |",
        "|---|---|---:|---:|---|",
    ]
    for name, status, seconds, limit, log in steps:
        parts.append(f"| {name} | {status} | {seconds} | {limit} | `{log}` |")
    failed = [s for s in steps if s[1] not in ("ok", "skipped")]
    parts += ["", f"**Result: {'FAILED: ' + ', '.join(s[0] for s in failed) if failed else 'all steps passed'}**", ""]

    junit = _junit(out / "pytest-cuda.xml")
    parts += ["## Method tests on the device (`tests/test_cuda.py`)", ""]
    if not junit.get("present"):
        parts += ["Not run.", ""]
    else:
        parts += [
            ", ".join(f"{k} {junit[k]}" for k in ("passed", "failed", "errors", "skipped", "xfailed"))
            + f" (xpassed, i.e. expected failures that passed, among the passed: {junit['xpassed']})",
            " (junit: `pytest-cuda.xml`)." if device == "cuda" else
            " (junit: `pytest-cuda.xml`; skipped: no CUDA device).",
            "",
        ]
        for kind, name, message in junit["notes"]:
            parts.append(f"- {kind}: `{name}`: {message.strip().splitlines()[0] if message.strip() else ''}")
        if junit["notes"]:
            parts.append("")
    mem = out / "memory_check.json"
    if mem.exists():
        rows = json.loads(mem.read_text())
        parts += ["Memory estimate (`harness.plan.memory`) against `torch.cuda.max_memory_allocated`:", "",
                  "| case | measured GiB | estimated GiB | measured / estimated |", "|---|---:|---:|---:|"]
        for r in rows:
            parts.append(f"| {r['case']} | {r['measured_gib']:.3f} | {r['estimated_gib']:.3f} | "
                         f"{r['measured_gib'] / r['estimated_gib']:.2f} |")
        parts.append("")

    bench = _read_csv(out / "bench" / "bench.csv")
    parts += ["## Step time per method (`python -m harness bench`)", ""]
    if not bench:
        parts += ["No `bench/bench.csv`: the benchmark did not finish.", ""]
    else:
        ref = next((r for r in bench if r["method"] == "lora" and r["ratio_vs_lora_R"] and
                    abs(float(r["ratio_vs_lora_R"]) - 1.0) < 1e-9), bench[0])
        cuda_peak = any(r.get("cuda_peak_mb") for r in bench)
        heads = ["method", "variant", "experts x rank (top-k)", "path", "step ms (median)",
                 f"ratio to peft LoRA {ref['variant']}", "ratio range", "tokens/s"]
        if cuda_peak:
            heads.append("CUDA peak MiB")
        parts += ["| " + " | ".join(heads) + " |", "|---|---|---|---|" + "---:|" * (len(heads) - 4)]
        for r in bench:
            line = [r["method"], r["variant"], f"{r['experts']} x {r['expert_rank']} ({r['top_k']})", r["path"],
                    _num(r["step_ms_median"], 1), _num(r["ratio_vs_lora_R"]),
                    f"{_num(r['ratio_min'])}–{_num(r['ratio_max'])}", _num(r["tokens_per_s"], 0)]
            if cuda_peak:
                line.append(_num(r.get("cuda_peak_mb"), 0))
            parts.append("| " + " | ".join(line) + " |")
        routed = [r for r in bench if r["method"] != "lora"]
        if routed:
            worst = max(routed, key=lambda r: float(r["ratio_vs_lora_R"]))
            parts += ["", f"Every method within **{float(worst['ratio_vs_lora_R']):.2f}x** of peft LoRA "
                      f"{ref['variant']}'s median step (slowest: {worst['method']} {worst['variant']}). "
                      "Full report: `bench/bench.md`."]
        parts.append("")
    cross = _read_csv(out / "bench" / "crossover.csv")
    parts += ["## Sparse vs dense crossover", ""]
    if not cross:
        parts += ["Not measured (`--no-crossover`, or the benchmark did not finish).", ""]
    else:
        parts += ["| experts | top-k | experts / top-k | dense ms | sparse ms | sparse / dense | auto picks |",
                  "|---:|---:|---:|---:|---:|---:|---|"]
        for r in cross:
            if r["path"] != "dense":
                continue
            sp = next(x for x in cross if x["experts"] == r["experts"] and x["path"] == "sparse")
            parts.append(f"| {r['experts']} | {r['top_k']} | {_num(r['experts_per_top_k'], 0)} | "
                         f"{_num(r['step_ms_median'], 1)} | {_num(sp['step_ms_median'], 1)} | "
                         f"{_num(r['sparse_over_dense'])} | {r['auto_picks']} |")
        point = crossover_point(cross)
        parts += ["", ("Sparse is faster from experts / top-k = " + (f"**{point:g}**" if point is not None
                       else "(never, in the measured range)") + " on, on this device; "
                       "`harness.methods.core.SPARSE_CROSSOVER_RATIO` (measured on the default CPU "
                       "setup) is what `path: auto` uses."), ""]
    (out / "summary.md").write_text("\n".join(parts))
    print(f"summary: {out / 'summary.md'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check_tools.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("preflight")
    s.add_argument("--device", choices=["cuda", "cpu"], required=True)
    s.add_argument("--field", default=None, help="print only this field")
    s = sub.add_parser("describe")
    s.add_argument("--device", choices=["cuda", "cpu"], required=True)
    s.add_argument("--out", required=True)
    s = sub.add_parser("constraints")
    s.add_argument("--lock", required=True)
    s.add_argument("--out", required=True)
    s = sub.add_parser("download-list")
    s.add_argument("--lock", required=True)
    s.add_argument("--out", required=True)
    s = sub.add_parser("backports")
    s.add_argument("--python-version", required=True)
    sub.add_parser("check-deps")
    s = sub.add_parser("derive")
    s.add_argument("--source", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--device", required=True)
    s.add_argument("--dtype", required=True)
    s.add_argument("--out-dir", required=True)
    s.add_argument("--study", required=True)
    s.add_argument("--tiny-smoke", action="store_true")
    s = sub.add_parser("summary")
    s.add_argument("--out", required=True)
    s.add_argument("--device", required=True)
    args = p.parse_args(argv)
    if args.cmd == "preflight":
        info = preflight(args.device)
        print(info[args.field] if args.field else json.dumps(info))
    elif args.cmd == "describe":
        describe(args.device, Path(args.out))
    elif args.cmd == "constraints":
        constraints(Path(args.lock), Path(args.out))
    elif args.cmd == "download-list":
        download_list(Path(args.lock), Path(args.out))
    elif args.cmd == "backports":
        backports(args.python_version)
    elif args.cmd == "check-deps":
        check_deps()
    elif args.cmd == "derive":
        derive(Path(args.source), Path(args.out), args.device, args.dtype, args.out_dir, args.study,
               args.tiny_smoke)
    elif args.cmd == "summary":
        summary(Path(args.out), args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
