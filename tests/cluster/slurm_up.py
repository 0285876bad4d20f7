#!/usr/bin/env python3
"""Bring up a real single-node SLURM cluster in a directory of its own, for the tests.

    python3 tests/cluster/slurm_up.py DIR     # prints the environment to use it, one per line

Needs Debian's ``slurm-wlm`` and ``munge`` (``.ci/run`` installs them) and root (slurmd runs
the jobs). Everything lives under DIR: a munge daemon with its own key and socket, a
generated ``slurm.conf`` (cons_tres, two fake GPUs in gres.conf, proctrack/linuxproc, short
MinJobAge and scheduler intervals, so a requeue takes seconds) on free ports, slurmctld and
slurmd. Clients find it through ``SLURM_CONF=DIR/slurm.conf``. ``slurm_down.py DIR`` stops it.
Exit 0 once the node is idle; 3 with the reason on stderr when it cannot come up.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
UP_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def which(name: str) -> str:
    for folder in (None, "/usr/sbin", "/sbin"):
        found = shutil.which(name, path=folder)
        if found:
            return found
    raise SystemExit(f"slurm_up: {name} not found (apt-get install slurm-wlm munge)")


def write_config(root: Path) -> Path:
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    for sub in ("state", "spool", "log", "dev", "munge"):
        (root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    for index in range(2):  # fake GPUs: slurmd only checks that the files exist
        (root / "dev" / f"nvidia{index}").touch()
    ctld, slurmd = free_port(), free_port()
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=lorasuptest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld}
SlurmdPort={slurmd}
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.sock,cred_expire=5
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1,sched_min_interval=100000
MinJobAge=2
KillWait=5
InactiveLimit=0
MessageTimeout=10
ReturnToService=2
JobRequeue=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.txt
MpiDefault=none
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""", encoding="utf-8")
    (root / "gres.conf").write_text(
        f"NodeName={host} Name=gpu File={root}/dev/nvidia[0-1]\n", encoding="utf-8")
    return conf


def start_munge(root: Path) -> None:
    key = root / "munge" / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
    subprocess.run([which("munged"), "--force", f"--socket={root}/munge/munge.sock",
                    f"--key-file={key}", f"--pid-file={root}/munge/munged.pid",
                    f"--log-file={root}/log/munged.log", f"--seed-file={root}/munge/seed"],
                   check=True, timeout=20)


def environment(root: Path) -> dict[str, str]:
    return {"SLURM_CONF": str(root / "slurm.conf")}


def node_idle(env: dict[str, str]) -> bool:
    try:
        out = subprocess.run([which("sinfo"), "-h", "-o", "%t"], env={**os.environ, **env},
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and out.stdout.strip() == "idle"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: slurm_up.py DIR\n")
        return 2
    if os.geteuid() != 0:
        sys.stderr.write("slurm_up: slurmd must run as root\n")
        return 3
    root = Path(argv[0]).resolve()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_config(root)
    env = {**os.environ, **environment(root)}
    try:
        start_munge(root)
        subprocess.run([which("slurmctld"), "-i"], env=env, check=True, timeout=20)
        subprocess.run([which("slurmd")], env=env, check=True, timeout=20)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        sys.stderr.write(f"slurm_up: {exc}\n")
        return 3
    deadline = time.monotonic() + UP_TIMEOUT_S
    while time.monotonic() < deadline:
        if node_idle(environment(root)):
            for key, value in environment(root).items():
                print(f"{key}={value}")
            return 0
        time.sleep(0.2)
    logs = "".join((root / "log" / name).read_text(errors="replace")[-1500:]
                   for name in ("slurmctld.log", "slurmd.log") if (root / "log" / name).exists())
    sys.stderr.write(f"slurm_up: the node did not become idle in {UP_TIMEOUT_S:.0f} s\n{logs}")
    return 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
