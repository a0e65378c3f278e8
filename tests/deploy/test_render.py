"""`wideep render`: every example, both targets, validates against the real CRD schemas (strict:
unknown fields rejected), built-in kinds are well formed, `kubectl kustomize` builds the folder,
and the 32xH200 LeaderWorkerSet render is pinned by a golden copy."""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from wideep.deploy.render import render_bundle, write_bundle
from wideep.deploy.spec import load_spec
from wideep.errors import ConfigError
from crd_validate import CRDValidators

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
GOLDEN = HERE / "golden" / "deepseek-r1-32xh200-lws"
CASES = [(p, t, prov, ms) for p in EXAMPLES for t in ("lws", "grove")
         for prov in ("none", "gke", "coreweave") for ms in ("wideep", "vllm")]
CRD_KINDS = {"LeaderWorkerSet", "PodCliqueSet", "InferencePool", "HTTPRoute"}


@pytest.fixture(scope="module")
def validators() -> CRDValidators:
    return CRDValidators(HERE / "schemas")


def _kubectl() -> str | None:
    return shutil.which("kubectl") or (
        "/usr/lib/google-cloud-sdk/bin/kubectl" if os.path.exists("/usr/lib/google-cloud-sdk/bin/kubectl") else None)


def _check_builtin(obj: dict) -> None:
    """Structural checks for kinds without a CRD schema here."""
    kind, meta = obj["kind"], obj["metadata"]
    assert meta["name"] and meta["namespace"]
    if kind == "Deployment":
        assert obj["apiVersion"] == "apps/v1"
        sel = obj["spec"]["selector"]["matchLabels"]
        tpl = obj["spec"]["template"]
        assert sel.items() <= tpl["metadata"]["labels"].items()
        names = {v["name"] for v in tpl["spec"].get("volumes", [])}
        for c in tpl["spec"]["containers"]:
            assert c["name"] and c["image"]
            for m in c.get("volumeMounts", []):
                assert m["name"] in names
            for p in c.get("ports", []):
                assert 1 <= p["containerPort"] <= 65535 and len(p["name"]) <= 15
    elif kind == "Service":
        assert obj["apiVersion"] == "v1"
        for p in obj["spec"]["ports"]:
            assert 1 <= p["port"] <= 65535 and p["name"]
    elif kind == "ConfigMap":
        assert all(isinstance(v, str) for v in obj["data"].values())
        if "config.yaml" in obj["data"]:
            cfg = yaml.safe_load(obj["data"]["config.yaml"])
            assert cfg["kind"] == "EndpointPickerConfig"
    elif kind == "PodMonitor":
        assert obj["apiVersion"] == "monitoring.coreos.com/v1"
        assert obj["spec"]["selector"]["matchLabels"]
        assert all(e["port"] and e["path"] == "/metrics" for e in obj["spec"]["podMetricsEndpoints"])
    elif kind in ("ServiceAccount", "Role", "RoleBinding"):
        pass
    else:
        raise AssertionError(f"unexpected kind {kind}")


def _pod_specs(obj: dict) -> list[dict]:
    if obj["kind"] == "LeaderWorkerSet":
        return [obj["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]]
    if obj["kind"] == "PodCliqueSet":
        return [c["spec"]["podSpec"] for c in obj["spec"]["template"]["cliques"]]
    return []


@pytest.mark.parametrize("path, target, provider, model_server", CASES,
                         ids=[f"{p.stem}-{t}-{pv}-{m}" for p, t, pv, m in CASES])
def test_render_validates(validators, path, target, provider, model_server):
    spec = load_spec(path)
    files = render_bundle(spec, target=target, provider=provider, model_server=model_server)
    kinds = set()
    for name, objs in files.items():
        if name == "kustomization.yaml":
            assert objs[0]["resources"] == [n for n in files if n != "kustomization.yaml"]
            continue
        for obj in objs:
            kinds.add(obj["kind"])
            if obj["kind"] in CRD_KINDS:
                assert validators.knows(obj), obj["kind"]
                assert validators.errors(obj) == []
            else:
                _check_builtin(obj)
            for pod in _pod_specs(obj):
                script = pod["containers"][0]["args"][0]
                assert ("exec vllm serve" if model_server == "vllm" else "exec wideep serve") in script
                assert "find /dev/shm -type f -delete" in script
    assert {"InferencePool", "Deployment", "Service", "ConfigMap"} <= kinds
    assert ("LeaderWorkerSet" if target == "lws" else "PodCliqueSet") in kinds
    assert ("HTTPRoute" in kinds) == (spec.gateway.mode == "gateway")
    assert ("PodMonitor" in kinds) == spec.monitoring.enabled


def test_strict_schema_rejects_unknown_fields(validators):
    spec = load_spec(ROOT / "examples" / "deepseek-r1-32xh200.yaml")
    lws = render_bundle(spec)["decode.yaml"][0]
    bad = copy.deepcopy(lws)
    bad["spec"]["leaderWorkerTemplate"]["restartPolicyy"] = "None"
    assert any("restartPolicyy" in e for e in validators.errors(bad))
    bad = copy.deepcopy(lws)
    bad["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["imagePullPolicyy"] = "x"
    assert validators.errors(bad)
    pool = render_bundle(spec)["inferencepool.yaml"][0]
    pool = copy.deepcopy(pool)
    pool["spec"]["targetPorts"] = [{"number": 8000 + i} for i in range(9)]
    assert any("targetPorts" in e for e in validators.errors(pool))


def test_lws_shape_32xh200():
    spec = load_spec(ROOT / "examples" / "deepseek-r1-32xh200.yaml")
    files = render_bundle(spec)
    decode = files["decode.yaml"][0]
    lwt = decode["spec"]["leaderWorkerTemplate"]
    assert lwt["size"] == 2 and lwt["restartPolicy"] == "RecreateGroupOnPodRestart"
    pod = lwt["workerTemplate"]["spec"]
    sidecar = pod["initContainers"][0]
    assert sidecar["restartPolicy"] == "Always" and sidecar["name"] == "routing-proxy"
    assert "--port=8000" in sidecar["args"] and "--vllm-port=8200" in sidecar["args"]
    main = pod["containers"][0]
    assert main["startupProbe"]["failureThreshold"] == 2700
    assert main["startupProbe"]["httpGet"] == {"path": "/health", "port": "supervisor"}
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert main["resources"]["limits"]["nvidia.com/gpu"] == "8"
    script = main["args"][0]
    assert "START_RANK=$(( ${LWS_WORKER_INDEX:-0} * DP_SIZE_LOCAL ))" in script
    assert "--data-parallel-start-rank $START_RANK" in script
    assert {"name": "DP_SIZE_LOCAL", "value": "8"} in main["env"]
    assert {v["name"]: v for v in pod["volumes"]}["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}
    pool = files["inferencepool.yaml"][0]
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == list(range(8000, 8008))
    assert pool["spec"]["endpointPickerRef"]["failureMode"] == "FailOpen"


def test_providers_patch_rdma():
    spec = load_spec(ROOT / "examples" / "deepseek-r1-32xh200.yaml")
    gke = render_bundle(spec, provider="gke")["prefill.yaml"][0]
    tpl = gke["spec"]["leaderWorkerTemplate"]["workerTemplate"]
    limits = tpl["spec"]["containers"][0]["resources"]["limits"]
    assert [limits[f"networking.gke.io.networks/rdma-{i}"] for i in range(8)] == ["0"] * 8
    assert tpl["metadata"]["annotations"]["networking.gke.io/default-interface"] == "eth0"
    cw = render_bundle(spec, provider="coreweave")["prefill.yaml"][0]
    c = cw["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["rdma/ib"] == "1"
    assert {"name": "NCCL_IB_HCA", "value": "ibp"} in c["env"]


def test_grove_gb200_shape():
    spec = load_spec(ROOT / "examples" / "deepseek-r1-gb200-grove.yaml")
    pcs = render_bundle(spec, target="grove", provider="gke")["podcliqueset.yaml"][0]
    t = pcs["spec"]["template"]
    cliques = {c["name"]: c for c in t["cliques"]}
    assert set(cliques) == {"prefill", "decode-leader", "decode-worker"}
    assert cliques["decode-worker"]["spec"]["replicas"] == 7 and cliques["decode-leader"]["spec"]["replicas"] == 1
    assert t["podCliqueScalingGroups"] == [{"name": "decode-sg", "cliqueNames": ["decode-leader", "decode-worker"],
                                            "replicas": 1, "minAvailable": 1}]
    assert t["topologyConstraint"] == {"topologyName": "cluster-topology", "pack": {"required": "rack"}}
    assert cliques["decode-leader"]["spec"]["startsAfter"] == ["prefill"]
    assert "decode-worker" not in str(cliques["decode-worker"]["spec"].get("startsAfter"))
    assert pcs["metadata"]["annotations"]["grove.io/mnnvl-group"] == "default"
    worker_script = cliques["decode-worker"]["spec"]["podSpec"]["containers"][0]["args"][0]
    assert "START_RANK=$(( (GROVE_PCLQ_POD_INDEX + 1) * DP_SIZE_LOCAL ))" in worker_script
    assert "GROVE_PCSG_TEMPLATE_NUM_PODS * DP_SIZE_LOCAL" in worker_script
    assert cliques["prefill"]["spec"]["podSpec"]["schedulerName"] == "kai-scheduler"


def test_vllm_model_server_uses_seed_command():
    spec = load_spec(ROOT / "examples" / "deepseek-r1-32xh200.yaml")
    lws = render_bundle(spec, model_server="vllm")["decode.yaml"][0]
    pod = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]
    script = pod["containers"][0]["args"][0]
    for piece in ["vllm serve deepseek-ai/DeepSeek-R1-0528", "--data-parallel-multi-port-external-lb",
                  "--data-parallel-supervisor-port 8208", "--all2all-backend deepep_low_latency",
                  "--enable-dbo", "--dbo-decode-token-threshold 32", "--moe-backend deep_gemm",
                  "--kv_transfer_config"]:
        assert piece in script
    assert pod["containers"][0]["image"] == "ghcr.io/llm-d/llm-d-cuda-dev:sha-a1bcf21"
    assert pod["initContainers"][0]["args"][0] == "sidecar"  # still the wideep sidecar + router


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
@pytest.mark.parametrize("target", ["lws", "grove"])
def test_kubectl_kustomize_builds(tmp_path, path, target):
    kubectl = _kubectl()
    if not kubectl:
        pytest.skip("kubectl not installed (needed for `kubectl kustomize`)")
    files = render_bundle(load_spec(path), target=target)
    write_bundle(files, tmp_path)
    out = subprocess.run([kubectl, "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert len(built) == sum(len(v) for k, v in files.items() if k != "kustomization.yaml")


def test_golden_32xh200_lws(tmp_path):
    spec = load_spec(ROOT / "examples" / "deepseek-r1-32xh200.yaml")
    files = render_bundle(spec, target="lws")
    write_bundle(files, tmp_path)
    if os.environ.get("WIDEEP_UPDATE_GOLDEN") == "1":
        shutil.rmtree(GOLDEN, ignore_errors=True)
        shutil.copytree(tmp_path, GOLDEN)
    assert sorted(p.name for p in GOLDEN.iterdir()) == sorted(files)
    for name in files:
        assert (tmp_path / name).read_text(encoding="utf-8") == (GOLDEN / name).read_text(encoding="utf-8"), (
            f"{name} differs from tests/deploy/golden; if intended, rerun with WIDEEP_UPDATE_GOLDEN=1")


def test_cli_render_writes_folder(tmp_path):
    from wideep.cli import main

    out = tmp_path / "out"
    assert main(["render", "-f", str(ROOT / "examples" / "deepseek-r1-24xh200.yaml"), "--target", "grove",
                 "--provider", "coreweave", "--out", str(out)]) == 0
    assert (out / "kustomization.yaml").is_file() and (out / "podcliqueset.yaml").is_file()
    assert (out / "httproute.yaml").is_file()


def _decode_script(spec, model_server: str = "wideep") -> str:
    lws = render_bundle(spec, model_server=model_server)["decode.yaml"][0]
    return lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["args"][0]


def test_kv_cross_layer_blocks_per_model_server():
    """wideep pods register one block-major KV region (cross-layer blocks); vLLM pods and an explicit
    `kv_cross_layer_blocks: false` (to pair with vLLM) stay per layer; true with vLLM is refused."""
    spec = load_spec(ROOT / "examples" / "deepseek-r1-32xh200.yaml")
    assert '"enable_cross_layers_blocks":true' in _decode_script(spec)
    assert "enable_cross_layers_blocks" not in _decode_script(spec, "vllm")
    spec.kv_cross_layer_blocks = False
    assert "enable_cross_layers_blocks" not in _decode_script(spec)
    spec.kv_cross_layer_blocks = True
    with pytest.raises(ConfigError, match="kv_cross_layer_blocks"):
        _decode_script(spec, "vllm")
