"""The benchmark suite: `python -m bench.run [--quick]` writes docs/PERFORMANCE.md and its plots.

Sections (all by default, or `--only a,b`):

- `proxy`: the latency proxy's own overhead (bench/latency_proxy.py --selftest);
- `rtt`: each way of sending at 50 ms RTT, plain and with STARTTLS (bench/rtt.py);
- `headline`: 10 messages/s for a minute against 2 connections at 50 ms RTT with STARTTLS;
- `refusal`: a burst against a destination that answers a 3rd connection with 421;
- `loopback`: messages per second against Postfix's smtp-sink, with smtp-source in
  the same run (bench/loopback.py);
- `dkim`: the whole engine on loopback with DKIM signing off and on (bench/loopback.py);
- `memory`: one worker holding 1,000 open TLS connections (bench/memory.py);
- `profile`: py-spy during the loopback throughput runs (bench/resources.py);
- `experiments`: candidate optimisations of the worker, patched in at run time, against
  the unpatched worker (bench/experiments.py).

Results go to bench/results/latest.json (merged section by section, so `--only`
re-runs a part), then the report is rendered from that file (`--report-only`
re-renders without measuring). `--engine-rev REV` benchmarks the engine as
committed at REV (exported with `git archive` to a temporary folder) instead of
the working tree, e.g. while others are editing it.

Needs: Linux, Postfix's smtp-sink and smtp-source (`apt-get install postfix`), and
bench/requirements.txt (matplotlib, py-spy, aiosmtpd). Full run ~12 minutes on 2 cores;
`--quick` ~5.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench.common import ROOT, cpu_now, log, machine, other_load

RESULTS = os.path.join(ROOT, "bench", "results", "latest.json")
SECTIONS = ("proxy", "rtt", "headline", "refusal", "loopback", "dkim", "memory", "profile",
            "experiments")


def engine_identity() -> dict[str, Any]:
    import engine
    where = os.path.dirname(os.path.dirname(os.path.abspath(engine.__file__)))
    rev = os.environ.get("BENCH_ENGINE_REV")
    if rev:
        return {"source": f"git archive {rev[:12]} (committed tree)", "rev": rev}
    head = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--", "engine")
    return {"source": "working tree" + (" with uncommitted engine changes" if dirty else ""),
            "rev": head, "path": where}


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def run_section(name: str, quick: bool, workdir: str) -> Any:
    img = os.path.join(ROOT, "docs", "img")
    os.makedirs(img, exist_ok=True)
    if name == "proxy":
        from bench.latency_proxy import selftest
        log("proxy: overhead self-test")
        return selftest()
    if name == "rtt":
        from bench import rtt
        return rtt.modes(workdir, quick)
    if name == "headline":
        from bench import rtt
        return rtt.headline(workdir, quick)
    if name == "refusal":
        from bench import rtt
        return rtt.refusal(workdir, quick)
    if name == "experiments":
        from bench import experiments
        return experiments.compare(quick)
    if name == "loopback":
        from bench import loopback
        return loopback.throughput(workdir, quick)
    if name == "dkim":
        from bench import loopback
        return loopback.dkim_cost(workdir, quick)
    if name == "memory":
        from bench import resources
        return resources.memory(1000, 4)
    if name == "profile":
        from bench import resources
        return resources.profile(img, workdir, quick)
    raise ValueError(name)


def load_results() -> dict[str, Any]:
    try:
        with open(RESULTS, encoding="utf-8") as f:
            return dict(json.load(f))
    except (OSError, ValueError):
        return {"sections": {}}


def save_results(results: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    tmp = RESULTS + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=str)
    os.replace(tmp, RESULTS)


def reexec_at(rev: str, argv: list[str]) -> int:
    """Run this very command again against the engine exported from `rev`."""
    full = _git("rev-parse", rev)
    if not full:
        print(f"bench: unknown revision {rev!r}", file=sys.stderr)
        return 2
    snap = tempfile.mkdtemp(prefix="mailengine-bench-engine-")
    try:
        # bin/ holds the worker's entry point (revisions before it ran engine/workerproc.py).
        parts = [p for p in ("engine", "conf", "bin") if _git("ls-tree", full, p)]
        archive = subprocess.run(["git", "-C", ROOT, "archive", full, *parts],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", snap], input=archive, check=True)
        env = dict(os.environ, BENCH_ENGINE_REV=full,
                   PYTHONPATH=os.pathsep.join([snap, ROOT]))
        rest = [a for a in argv if not a.startswith("--engine-rev")]
        if "--engine-rev" in argv:  # "--engine-rev REV" as two words
            i = argv.index("--engine-rev")
            rest = argv[:i] + argv[i + 2:]
        # cwd = the snapshot: `python -m` puts the cwd first on sys.path, so `engine` is
        # the snapshot's everywhere (this process, the engine's, the bench scripts').
        return subprocess.run([sys.executable, "-m", "bench.run", *rest], cwd=snap,
                              env=env).returncode
    finally:
        shutil.rmtree(snap, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m bench.run",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (~5 min)")
    parser.add_argument("--only", help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument("--report-only", action="store_true",
                        help="render docs/PERFORMANCE.md from bench/results/latest.json")
    parser.add_argument("--engine-rev", help="benchmark the engine committed at this revision")
    args = parser.parse_args(argv)
    if args.engine_rev:
        return reexec_at(args.engine_rev, argv)
    results = load_results()
    if not args.report_only:
        sections = args.only.split(",") if args.only else list(SECTIONS)
        unknown = set(sections) - set(SECTIONS)
        if unknown:
            parser.error(f"unknown sections {sorted(unknown)}")
        command = "python -m bench.run" + (" --quick" if args.quick else "")
        if os.environ.get("BENCH_ENGINE_REV"):
            command += f" --engine-rev {os.environ['BENCH_ENGINE_REV'][:12]}"
        if args.only:
            command += f" --only {args.only}"
        workdir = tempfile.mkdtemp(prefix="mailengine-bench-")
        try:
            for name in sections:
                started = time.time()
                cpu_before = cpu_now()
                data = run_section(name, args.quick, workdir)
                foreign = other_load(cpu_before)
                results["sections"][name] = {
                    "data": data, "quick": args.quick, "command": command,
                    "date": time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(started)),
                    "seconds": round(time.time() - started, 1),
                    "machine": machine(), "engine": engine_identity(),
                    "other_load": round(foreign, 3),
                }
                save_results(results)
                log(f"{name}: done in {time.time() - started:.0f} s; other processes kept"
                    f" {100 * foreign:.0f}% of the machine busy meanwhile")
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    from bench import report
    path = report.write(results)
    log(f"wrote {os.path.relpath(path, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
