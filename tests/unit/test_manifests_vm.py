"""CI checks for the VM flow and the image recipe (what cannot run here).

* the Vagrantfile parses (``ruby -c``; Debian's ``ruby``, in scripts/setup.sh);
* every shell script in the repository passes ``shellcheck`` (Debian's
  ``shellcheck``) at warning level, following sourced files;
* the Containerfile is the recipe the issue asks for (Debian 12, python3-bpfcc,
  the package, non-root by default) and every path it copies exists;
* the smoke check's manifests validate against the Kubernetes schemas and
  name the nodes the kind cluster creates.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def tool(name: str) -> str:
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: `make setup` installs it (scripts/setup.sh)")
    return found


def test_vagrantfile_parses() -> None:
    out = subprocess.run([tool("ruby"), "-c", str(REPO / "vagrant/Vagrantfile")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert "Syntax OK" in out.stdout


def test_ruby_check_is_not_a_rubber_stamp(tmp_path: Path) -> None:
    bad = tmp_path / "Vagrantfile"
    bad.write_text('Vagrant.configure("2") do |config|\n  config.vm.box = "x"\n')  # no `end`
    out = subprocess.run([tool("ruby"), "-c", str(bad)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode != 0


def shell_scripts() -> list[Path]:
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files", "*.sh", ".ci/run"],
                             capture_output=True, text=True, timeout=60, check=False).stdout
    paths = {REPO / p for p in tracked.split()}
    paths |= set((REPO / "vagrant").rglob("*.sh"))  # also before they are committed
    return sorted(p for p in paths if p.exists())


def test_there_are_scripts_to_check() -> None:
    names = {p.relative_to(REPO).as_posix() for p in shell_scripts()}
    assert {"scripts/setup.sh", "vagrant/provision/30-smoke.sh"} <= names


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_shell_script_passes_shellcheck(script: Path) -> None:
    out = subprocess.run([tool("shellcheck"), "-x", "-S", "warning", str(script)],
                         capture_output=True, text=True, timeout=60, check=False,
                         cwd=script.parent)
    assert out.returncode == 0, out.stdout + out.stderr


def test_provisioning_scripts_are_executable_and_listed_in_the_vagrantfile() -> None:
    vagrantfile = (REPO / "vagrant/Vagrantfile").read_text()
    listed = re.findall(r'"(\d\d-[a-z-]+\.sh)"', vagrantfile)
    assert listed == sorted(listed) and len(listed) == 4
    for name in listed:
        path = REPO / "vagrant/provision" / name
        assert path.exists(), name
        assert path.stat().st_mode & 0o111, f"{name} is not executable"


def test_containerfile_recipe() -> None:
    text = (REPO / "Containerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms and all(f.startswith("${DEBIAN}") for f in froms)
    assert re.search(r"^ARG DEBIAN=\S*debian:12", text, re.M)
    assert "python3-bpfcc" in text
    assert re.search(r"pip install /src", text)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert re.search(r'^ENTRYPOINT \["/opt/ztunnel-py/bin/ztunnel-py"\]', text, re.M)
    for src in re.findall(r"^COPY\s+(?!--from)(.+)\s+\S+$", text, re.M):
        for path in src.split():
            assert (REPO / path).exists(), f"Containerfile copies {path}, which does not exist"


def test_smoke_manifests_validate_and_match_the_kind_nodes() -> None:
    cluster = (REPO / "vagrant/provision/10-cluster.sh").read_text()
    workers = cluster.count("worker")  # the roles line names each worker once
    assert "control-plane worker worker" in cluster and workers >= 2
    lib = (REPO / "vagrant/provision/lib.sh").read_text()
    name = re.search(r"CLUSTER=\$\{CLUSTER:-([a-z0-9-]+)\}", lib)
    assert name is not None
    nodes = {f"{name.group(1)}-worker", f"{name.group(1)}-worker2"}
    used: set[str] = set()
    for path in sorted((REPO / "vagrant/manifests").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            if doc["apiVersion"].endswith("istio.io/v1") or "istio.io/" in doc["apiVersion"]:
                continue  # CRD kinds: checked against our CRDs in test_manifests.py
            kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
            if doc["kind"] == "Pod":
                used.add(doc["spec"]["nodeName"])
    assert used == nodes
