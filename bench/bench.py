#!/usr/bin/env python3
"""kiln benchmarks. Writes bench/RESULTS.md.

W1: a context of 2,000 files in 40 folders, sizes uniform in 20-180 KB, half
random bytes and half repetitive text (~200 MB, fixed seed); one `copy` into
`scratch` plus a `[config]`. Measures cold build, no-op rebuild,
one-file-changed rebuild and peak RSS; with a Docker engine, the same
workload as a Dockerfile under BuildKit, for ratios.
"""
import datetime
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "bench", "work")
KILN = os.path.join(ROOT, "target", "release", "kiln")
# Debian's docker.io client has BuildKit built in; a newer client on PATH may need buildx.
DOCKER = "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else "docker"


def make_w1(ctx):
    rng = random.Random(20261122)
    text = b"kiln builds reproducible images from declarative recipes. " * 4
    total = 0
    for i in range(2000):
        d = os.path.join(ctx, "data", f"dir{i % 40:02d}")
        os.makedirs(d, exist_ok=True)
        size = rng.randint(20_000, 180_000)
        if i % 2 == 0:
            body = rng.randbytes(size)
        else:
            body = (text * (size // len(text) + 1))[:size]
        with open(os.path.join(d, f"file{i:04d}.bin"), "wb") as f:
            f.write(body)
        total += size
    with open(os.path.join(ctx, "kiln.toml"), "w") as f:
        f.write('[image]\nname = "w1"\nbase = "scratch"\n\n[[step]]\ncopy = "data"\nto = "/data"\n\n'
                '[config]\nenv = { APP_MODE = "bench" }\n')
    with open(os.path.join(ctx, "Dockerfile"), "w") as f:
        f.write("FROM scratch\nCOPY data /data\nENV APP_MODE=bench\n")
    with open(os.path.join(ctx, ".dockerignore"), "w") as f:
        f.write("kiln.toml\nDockerfile\n")
    return total


def run(cmd, env=None):
    """Wall time (s) and peak RSS (MiB) of one command."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    err = p.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{err}")
    return wall, ru.ru_maxrss / 1024


def kiln(ctx, cache):
    return run([KILN, "build", os.path.join(ctx, "kiln.toml"), "--cache-dir", cache,
                "-o", f"oci:{os.path.join(WORK, 'out')}", "--progress", "plain"])


def change_one(ctx, n):
    p = os.path.join(ctx, "data", "dir07", "file0007.bin")
    with open(p, "ab") as f:
        f.write(f"change {n}\n".encode())


def docker_ok():
    return shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def buildkit(ctx):
    env = dict(os.environ, DOCKER_BUILDKIT="1")
    return run([DOCKER, "build", "-q", "-t", "kiln-bench-w1", ctx], env=env)


def main():
    shutil.rmtree(WORK, ignore_errors=True)
    ctx = os.path.join(WORK, "w1")
    os.makedirs(ctx)
    total = make_w1(ctx)
    res = {}

    colds = []
    for i in range(3):
        cache = os.path.join(WORK, f"cache-cold-{i}")
        colds.append(kiln(ctx, cache))
    cache = os.path.join(WORK, "cache-cold-0")
    time.sleep(2.5)  # let the stat index entries age past the racy window
    kiln(ctx, cache)  # records the aged stat index
    noops = [kiln(ctx, cache) for _ in range(10)]
    changed = []
    for n in range(5):
        change_one(ctx, n)
        changed.append(kiln(ctx, cache))
    res["kiln"] = {
        "cold": statistics.median(w for w, _ in colds),
        "noop": statistics.median(w for w, _ in noops),
        "changed": statistics.median(w for w, _ in changed),
        "rss": max(r for _, r in colds + noops + changed),
    }

    if docker_ok():
        subprocess.run([DOCKER, "builder", "prune", "-af"], capture_output=True)
        bk_cold = buildkit(ctx)
        bk_noop = statistics.median(buildkit(ctx)[0] for _ in range(5))
        bk_changed = []
        for n in range(5, 8):
            change_one(ctx, n)
            bk_changed.append(buildkit(ctx)[0])
        res["buildkit"] = {"cold": bk_cold[0], "noop": bk_noop, "changed": statistics.median(bk_changed)}
        dv = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True, text=True).stdout.strip()
    else:
        dv = None

    k = res["kiln"]
    targets = {"cold": 3.0, "noop": 0.050, "changed": 2.0}
    lines = [
        "# kiln benchmark results",
        "",
        f"Date: {datetime.date.today().isoformat()}. Machine: {os.cpu_count()} cores, "
        f"{round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB, {platform.platform()}. "
        f"kiln: release build of this checkout (`make bench`).",
        "",
        f"## W1: {total / 1e6:.0f} MB in 2,000 files / 40 folders, one `copy` into `scratch`",
        "",
        "| measure | kiln | target | met |" + (" BuildKit | kiln/BuildKit |" if "buildkit" in res else ""),
        "|---|---|---|---|" + ("---|---|" if "buildkit" in res else ""),
    ]
    for key, label in [("cold", "cold build (median of 3)"), ("noop", "no-op rebuild (median of 10)"),
                       ("changed", "one file changed (median of 5)")]:
        row = f"| {label} | {k[key] * 1000:.0f} ms | <= {targets[key] * 1000:.0f} ms | {'yes' if k[key] <= targets[key] else 'NO'} |"
        if "buildkit" in res:
            b = res["buildkit"][key]
            row += f" {b * 1000:.0f} ms | {k[key] / b:.2f} |"
        lines.append(row)
    lines.append(f"| peak RSS (max over all runs) | {k['rss']:.0f} MiB | <= 100 MiB | {'yes' if k['rss'] <= 100 else 'NO'} |"
                 + (" | |" if "buildkit" in res else ""))
    lines.append("")
    if dv:
        lines.append(f"BuildKit: `DOCKER_BUILDKIT=1 docker build` against Docker {dv} on the same machine "
                     "(`FROM scratch`, `COPY data /data`, `ENV`); cold after `docker builder prune -af`.")
    else:
        lines.append("BuildKit: no Docker engine answered, so no comparison was run.")
    lines.append("")
    out = "\n".join(lines)
    with open(os.path.join(ROOT, "bench", "RESULTS.md"), "w") as f:
        f.write(out)
    print(out)


if __name__ == "__main__":
    main()
