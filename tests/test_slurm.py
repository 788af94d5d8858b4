"""A sweep through ``hydra/launcher=slurm`` on a real single-node Slurm cluster, with a requeued job.

The module's ``slurm`` fixture starts munged, MariaDB, slurmdbd, slurmctld and slurmd on localhost,
every file of theirs in a temporary folder (``slurm.conf`` with this machine's cores and memory, as
``slurmd -C`` reports them), and stops them at the end, also when a test fails. slurmdbd (on
MariaDB) serves ``sacct``, which submitit reads job states with. It needs root and the Debian
packages slurm-wlm, slurmdbd, munge and mariadb-server-core (``.ci/run`` installs them); without
them every test here skips with one line, or fails under ``QAF_REQUIRE_SLURM=1`` (as in CI); see
"The Slurm test" in docs/sweeps.md.

One sweep of three jobs (fp32, ptq, and admm_epc on the six convs of the first stage) runs through
the launcher. While admm_epc factorizes, ``scontrol requeue`` kills it and puts it back in the
queue, as preemption does; submitit runs the job's pickled callable again and qaf resumes it from
the factor cache. The tests compare every job with the basic launcher's run of the same config and
check the resume, submitit's and sacct's view, and the report.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from omegaconf import OmegaConf

from qaf.report import build_report
from qaf.report.collect import KILLED, OK, collect_sweep

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PROGRAMS = ("munged", "munge", "mariadbd", "slurmdbd", "slurmctld", "slurmd", "sbatch", "srun", "squeue",
            "sacct", "scontrol", "scancel", "sinfo")
INSTALL = "apt-get install slurm-wlm slurmdbd munge mariadb-server-core"
# Three jobs on 64 images; admm_epc factorizes only layer1 (six 16x16x3x3 convs) to stay short.
SWEEP = ["hydra/sweeper=grid",
         '+hydra.sweeper.grid=[{method: fp32}, {method: ptq}, {method: admm_epc, method.include: "[layer1.*]"}]',
         "data.eval_samples=64", "data.calib_samples=64"]
# CPU jobs of one core each: two run at once on a two-core machine.
LAUNCHER = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=15"]
REQUEUED = "method=admm_epc"  # the end of the requeued job's folder name
#: metrics.json fields that say where and when a job ran (its launcher overrides, its folder), not
#: what it computed; per layer, the solver's time and whether the factor cache answered.
WHERE_AND_WHEN = ("timings", "sweep_id", "overrides")
LAYER_WHERE_AND_WHEN = ("seconds", "seconds_als", "seconds_epc", "seconds_admm", "cached")


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll ``condition`` until it returns something truthy (returned); fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def free_ports(n: int) -> list[int]:
    """``n`` different TCP ports that nothing listens on now."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


class LocalSlurm:
    """A single-node Slurm cluster with accounting, every file under ``root``.

    Parameters
    ----------
    root : Path
        An empty folder for keys, sockets, configs, state, spool, database and logs.
    path : str
        ``PATH`` of the daemons and commands.
    """

    def __init__(self, root: Path, path: str):
        self.root = root
        self.user = getpass.getuser()
        self.host = socket.gethostname().split(".")[0]
        # Only this cluster: no variables of an allocation the tests may run in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        self.env = {**env, "SLURM_CONF": str(root / "slurm.conf"), "PATH": path}
        self.daemons: list[tuple[str, subprocess.Popen]] = []

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """A Slurm or munge command against this cluster."""
        return subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60, check=check)

    def ok(self, *args: str) -> bool:
        return self.run(*args, check=False).returncode == 0

    def state(self, job_id: str) -> str:
        """The job's state in the queue (``RUNNING``, ``PENDING``, ...; empty once it left)."""
        return self.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False).stdout.strip()

    def start(self) -> None:
        """Start munged, mariadbd, slurmdbd, slurmctld and slurmd; return when the node is idle."""
        r = self.root
        for name in ("state", "spool", "db", "log"):
            (r / name).mkdir()
        db_port, dbd_port, ctld_port, slurmd_port = free_ports(4)
        key = r / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = r / "munge.socket"
        # --force: munged wants a socket folder every user can reach; pytest's temporary folders are private.
        self._spawn("munged", ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={sock}",
                               f"--pid-file={r / 'munged.pid'}", f"--seed-file={r / 'munged.seed'}",
                               f"--log-file={r / 'log' / 'munged.log'}"],
                    lambda: sock.exists() and self.ok("munge", f"--socket={sock}", "--no-input"))
        # A throwaway database for slurmdbd: an empty data folder, no privilege tables, TCP on localhost.
        self._spawn("mariadbd", ["mariadbd", "--no-defaults", f"--datadir={r / 'db'}", f"--socket={r / 'mysql.sock'}",
                                 f"--port={db_port}", "--bind-address=127.0.0.1", f"--user={self.user}",
                                 "--skip-grant-tables", "--skip-name-resolve", "--innodb-buffer-pool-size=32M",
                                 f"--log-error={r / 'log' / 'mariadb.log'}"],
                    lambda: port_open(db_port))
        node = self.run("slurmd", "-C").stdout.splitlines()[0].split()  # NodeName=... CPUs=... RealMemory=...
        hardware = " ".join(field for field in node if not field.startswith("NodeName="))
        common = f"AuthType=auth/munge\nAuthInfo=socket={sock}\n"
        (r / "slurm.conf").write_text(common + f"""\
ClusterName=qaftest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser={self.user}
SlurmdUser={self.user}
CredType=cred/munge
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
# No cgroups (a container may have none to give): job processes are tracked through /proc.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={dbd_port}
AccountingStoragePass={sock}
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
MpiDefault=none
ReturnToService=2
# A requeued job gets SIGKILL 2 s after SIGTERM (which submitit ignores).
KillWait=2
NodeName={self.host} NodeAddr=127.0.0.1 {hardware} State=UNKNOWN
PartitionName=qaf Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")
        dbd_conf = r / "slurmdbd.conf"  # slurmdbd reads it beside $SLURM_CONF; it must be private
        dbd_conf.write_text(common + f"""\
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={dbd_port}
SlurmUser={self.user}
PidFile={r / 'slurmdbd.pid'}
LogFile={r / 'log' / 'slurmdbd.log'}
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={db_port}
StorageUser={self.user}
StorageLoc=slurm_acct_db
""")
        dbd_conf.chmod(0o600)
        self._spawn("slurmdbd", ["slurmdbd", "-D"], lambda: port_open(dbd_port))
        self._spawn("slurmctld", ["slurmctld", "-D"], lambda: self.ok("scontrol", "ping"))
        self._spawn("slurmd", ["slurmd", "-D"],
                    lambda: self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip() == "idle")

    def _spawn(self, name: str, cmd: list[str], ready: Callable[[], bool]) -> None:
        with (self.root / "log" / f"{name}.out").open("w") as log:
            proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.daemons.append((name, proc))

        def up() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"{name} exited ({proc.returncode}); logs in {self.root / 'log'}")
            return ready()

        wait_for(up, 60, f"{name} to start (logs in {self.root / 'log'})")

    def stop(self) -> None:
        """Cancel every job, wait for the queue to empty, stop the daemons (last started first)."""
        if any(name == "slurmctld" and proc.poll() is None for name, proc in self.daemons):
            self.run("scancel", f"--user={self.user}", check=False)
            deadline = time.monotonic() + 30
            while self.run("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        for _, proc in reversed(self.daemons):
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSlurm]:
    """A running single-node Slurm cluster (skips without Slurm or without root)."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = [p for p in PROGRAMS if shutil.which(p, path=path) is None]
    why = (f"Slurm is not installed (no {', '.join(missing)}): {INSTALL}" if missing else
           "the local Slurm cluster needs root (slurmd starts the jobs)" if os.geteuid() != 0 else None)
    if why and os.environ.get("QAF_REQUIRE_SLURM", "") not in ("", "0"):
        pytest.fail(why)
    if why:
        pytest.skip(why)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), path)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@dataclass
class RequeuedSweep:
    """A Slurm sweep, one of whose jobs was requeued while it ran, and what was seen meanwhile."""

    dir: Path
    cache: Path
    proc: subprocess.CompletedProcess
    slurm_id: str                    # the requeued job, <array id>_<task>
    squeue_at_requeue: str
    status_at_requeue: str           # qaf.report's status of the requeued job while it waited
    files_at_requeue: set[str]       # its job folder's files then
    cache_at_requeue: dict[str, int]  # factor cache entry -> mtime_ns, when the killed attempt was gone


def cache_entries(cache: Path) -> dict[str, int]:
    """Entry file name -> mtime_ns of a factor cache (temporary files left out)."""
    return {p.name: p.stat().st_mtime_ns for p in cache.glob("*.pt") if not p.name.startswith(".")}


def sweep_cmd(sweep_dir: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "run.py", "-m", *SWEEP, *extra, f"hydra.sweep.dir={sweep_dir}", f"cache.dir={cache}"]


@pytest.fixture(scope="module")
def requeued(slurm: LocalSlurm, tmp_path_factory: pytest.TempPathFactory) -> RequeuedSweep:
    """The sweep through ``hydra/launcher=slurm``; its admm_epc job is requeued after its first layer."""
    root = tmp_path_factory.mktemp("slurm_sweep")
    sweep_dir, cache, out = root / "sweep", root / "cache", root / "sweep.log"
    env = {**slurm.env, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    with out.open("w") as log:
        proc = subprocess.Popen(sweep_cmd(sweep_dir, cache, *LAUNCHER), cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, text=True)
    try:
        job = wait_for(lambda: next(sweep_dir.glob(f"*{REQUEUED}"), None), 300, "the admm_epc job to start")
        log_file = job / "run.log"
        wait_for(lambda: log_file.is_file() and "] - [1/" in log_file.read_text(), 300, "admm_epc's first layer")
        slurm_id = str(OmegaConf.load(job / ".hydra" / "hydra.yaml").hydra.job.id)
        slurm.run("scontrol", "requeue", slurm_id)
        # Back in the queue once Slurm has killed it (SIGTERM, which submitit ignores, then SIGKILL).
        wait_for(lambda: slurm.state(slurm_id) == "PENDING", 60, f"{slurm_id} to be pending again")
        squeue = slurm.run("squeue", "-o", "%i %T %r").stdout
        (state,) = [j.status for j in collect_sweep(sweep_dir) if j.path and j.path.name == job.name]
        files, entries = {p.name for p in job.iterdir()}, cache_entries(cache)
        # Slurm holds a requeued job for two minutes (its begin time); let it start now.
        slurm.run("scontrol", "update", f"JobId={slurm_id}", "StartTime=now")
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out.read_text(), "")
    return RequeuedSweep(sweep_dir, cache, done, slurm_id, squeue, state, files, entries)


@pytest.fixture(scope="module")
def basic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same sweep with Hydra's basic launcher, in one process, with its own factor cache."""
    root = tmp_path_factory.mktemp("basic_sweep")
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(sweep_cmd(root / "sweep", root / "cache"), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "sweep"


def results(job: Path) -> dict:
    """A job's metrics.json without the fields that say where and when it ran."""
    metrics = json.loads((job / "metrics.json").read_text())
    for key in WHERE_AND_WHEN:
        metrics.pop(key)
    for layer in metrics["layers"]:
        for key in LAYER_WHERE_AND_WHEN:
            layer.pop(key, None)  # CP methods' layers only
    return metrics


def attempts(job: Path) -> list[str]:
    """The job's run.log cut at each start of the pipeline (one part per attempt)."""
    parts = (job / "run.log").read_text().split("[qaf][INFO] - run ")
    return parts[1:]


def job_folders(sweep_dir: Path) -> dict[str, Path]:
    return {p.parent.parent.name: p.parent.parent for p in sweep_dir.glob("*/.hydra/config.yaml")}


def test_every_job_gives_what_the_basic_launcher_gives(requeued: RequeuedSweep, basic: Path) -> None:
    assert requeued.proc.returncode == 0, requeued.proc.stdout[-3000:]
    ours, theirs = job_folders(requeued.dir), job_folders(basic)
    assert sorted(ours) == sorted(theirs) and len(ours) == 3  # the same folder names: launcher keys name none
    for name in sorted(ours):
        a, b = results(ours[name]), results(theirs[name])
        assert a == b, name
        with np.load(ours[name] / "predictions.npz") as pa, np.load(theirs[name] / "predictions.npz") as pb:
            assert sorted(pa.files) == sorted(pb.files)
            for key in pa.files:
                np.testing.assert_array_equal(pa[key], pb[key])
        print(f"{name}: top1 {a['top1']} top5 {a['top5']} bops_pct {a['bops_pct']:.4f} size_bytes {a['size_bytes']} "
              f"config_hash {a['config_hash']} (slurm = basic)")


def test_the_requeued_job_resumes_from_the_factor_cache(requeued: RequeuedSweep, basic: Path) -> None:
    # While it waited: killed mid-compression, running.json of the dead attempt, no results.
    assert requeued.status_at_requeue == KILLED
    assert "running.json" in requeued.files_at_requeue and "metrics.json" not in requeued.files_at_requeue
    job = next(requeued.dir.glob(f"*{REQUEUED}"))
    first, second = attempts(job)
    assert "result: top-1" not in first and "result: top-1" in second
    done_before = [line.split("] - ", 1)[1] for line in first.splitlines() if "] - [" in line]
    logged_after = [line.split("] - ", 1)[1] for line in second.splitlines() if "] - [" in line]
    assert done_before and len(logged_after) == 6
    # Every layer the killed attempt factorized came from the cache in the second attempt ...
    for line in done_before:
        layer = line.split()[:2]  # "[k/6] name"
        (again,) = [after for after in logged_after if after.split()[:2] == layer]
        assert again.endswith("(cached)"), again
    # ... no entry stored before the requeue was written again, and the two attempts stored exactly
    # the entries one uninterrupted run stores (float accuracy and each layer's ALS, EPC, ADMM).
    final = cache_entries(requeued.cache)
    assert {name: final[name] for name in requeued.cache_at_requeue} == requeued.cache_at_requeue
    assert set(final) == set(cache_entries(basic.parent / "cache"))
    print(f"killed attempt: {len(done_before)} of 6 layers; cache entries at the requeue "
          f"{len(requeued.cache_at_requeue)}, at the end {len(final)}")


def test_nothing_is_lost_or_duplicated_and_the_report_counts_each_job_once(requeued: RequeuedSweep) -> None:
    assert requeued.proc.returncode == 0, requeued.proc.stdout[-3000:]
    assert "3 of 3 jobs finished" in requeued.proc.stdout  # the sweep's own report
    assert re.search(r"^\| (\*\*)?ADMM-EPC \(include=\[layer1\.\*\]\)(\*\*)? \| (\*\*)?4/8",
                     (requeued.dir / "table.md").read_text(), re.M)
    jobs = collect_sweep(requeued.dir)
    assert len(jobs) == 3 and all(j.status == OK for j in jobs)
    report = build_report([requeued.dir], requeued.dir.parent / "report")
    assert len(report.jobs) == 3 and "3 of 3 jobs finished" in report.markdown
    assert len((requeued.dir.parent / "report" / "results.csv").read_text().splitlines()) == 1 + 3
    assert "wandb" in requeued.files_at_requeue  # the killed attempt had started its W&B run
    for name, job in job_folders(requeued.dir).items():
        files = {p.name for p in job.iterdir()}
        assert {"metrics.json", "predictions.npz"} <= files and not files & {"failed.json", "running.json"}, name
        assert len(list(job.glob("wandb/offline-run-*"))) == 1, name  # one W&B run per job: the finished one
        moved = [p.name for p in job.glob(".replaced/*/*")]
        if name.endswith(REQUEUED):  # the killed attempt's W&B run, moved aside when the job ran again
            assert len(attempts(job)) == 2 and moved == ["wandb"], name
            assert len(list(job.glob(".replaced/*/wandb/offline-run-*"))) == 1
        else:
            assert len(attempts(job)) == 1 and moved == [], name


def test_slurm_accounting_and_submitit_show_the_requeue(requeued: RequeuedSweep, slurm: LocalSlurm) -> None:
    array_id, task = requeued.slurm_id.split("_")

    def records() -> dict[str, list[str]] | None:
        out = slurm.run("sacct", "-D", "-X", "-n", "-P", "-o", "JobID,State", "-j", array_id).stdout
        seen: dict[str, list[str]] = {}
        for line in out.split():
            job_id, state = line.split("|")
            seen.setdefault(job_id, []).append(state)
        return seen if all(states[-1] == "COMPLETED" for states in seen.values()) and len(seen) == 3 else None

    seen = wait_for(records, 60, "sacct to record the three completed jobs", interval=1)  # slurmdbd lags
    assert seen == {f"{array_id}_{i}": (["REQUEUED", "COMPLETED"] if str(i) == task else ["COMPLETED"])
                    for i in range(3)}
    # submitit ran the pickled job twice and stored one result.
    log = (requeued.dir / ".submitit" / requeued.slurm_id / f"{requeued.slurm_id}_0_log.out").read_text()
    lines = [line for line in log.splitlines() if line.startswith("submitit ")]  # Hydra's handler repeats them
    assert sum("Starting with JobEnvironment" in line for line in lines) == 2
    assert sum("Job completed successfully" in line for line in lines) == 1
    print("squeue at the requeue:\n" + requeued.squeue_at_requeue)
    print(slurm.run("sacct", "-D", "-X", "-o", "JobID,JobName,State,Start,End,ExitCode", "-j", array_id).stdout)
