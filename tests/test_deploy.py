"""What fleets deploy: the DaemonSet (valid against the Kubernetes schemas, offline, and
holding only what netmon needs) and the container image netmon runs from."""
import os

import kubernetes_validate
import pytest
import yaml

import netmon

DATA = os.path.join(os.path.dirname(netmon.__file__), "data")
K8S_VERSION = "1.37.0"  # the newest schema kubernetes-validate ships


@pytest.fixture(scope="module")
def daemonset():
    with open(os.path.join(DATA, "netmon-daemonset.yaml")) as f:
        return yaml.safe_load(f)


def test_daemonset_is_valid_kubernetes(daemonset):
    kubernetes_validate.validate(daemonset, K8S_VERSION, strict=True)
    broken = yaml.safe_load(yaml.safe_dump(daemonset))
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnly"] = True
    with pytest.raises(kubernetes_validate.ValidationError):  # the check can fail
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_daemonset_runs_the_image_with_least_privilege(daemonset):
    pod = daemonset["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    registry, _, tag = c["image"].rpartition(":")
    assert registry == "registry.example.com/netmon/netmon" and tag == netmon.__version__
    assert "command" not in c and "pip" not in repr(c)  # nothing installed at start
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["BPF", "PERFMON", "NET_ADMIN"]}
    assert pod["hostPID"] is False and pod["automountServiceAccountToken"] is False
    assert all(m["readOnly"] for m in c["volumeMounts"])
    assert {"operator": "Exists"} in pod["tolerations"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
    assert set(c["resources"]["limits"]) == {"cpu", "memory"}
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["NETMON_ADDR"].startswith("127.0.0.1:")  # loopback, or a token from a Secret
    assert env["NETMON_CGROUP"] == "/host/cgroup"
    secret = [v for v in pod["volumes"] if "secret" in v]
    assert secret == [{"name": "token", "secret": {"secretName": "netmon-token",
                                                   "optional": True, "defaultMode": 0o400}}]
