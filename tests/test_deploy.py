"""deploy/ agrees with the code it deploys, so its files cannot rot.

The Kubernetes manifests are JSON (which kubectl takes as it takes YAML); the Dockerfile is
read line by line. Ports, probe paths, the Secret's variable and the drain time are checked
against rup serve's own options, defaults and code; the Grafana dashboard's queries against
the metrics a server really exports.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.cli import main as cli
from proxy.cli.ports import METRICS_PORT, PROXY_PORT
from proxy.cli.serve import TOKEN_KEY_ENV, KeySource, token_key_from_args
from proxy.server.health import HEALTHZ_PATH, READYZ_PATH
from proxy.server.metrics import METRICS_PATH, ServerMetrics
from proxy.server.settings import ServerSettings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def _manifest(name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((DEPLOY / "kubernetes" / name).read_text())
    return document


def _serve_args(argv: list[str]) -> argparse.Namespace:
    assert argv[0] == "serve"
    parser, _ = cli.command_parser("serve")
    return parser.parse_args(argv[1:])


@pytest.fixture
def container() -> dict[str, Any]:
    deployment = _manifest("deployment.json")
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(only)


def test_the_deployment_serves_on_the_cli_default_ports(container: dict[str, Any]) -> None:
    args = _serve_args(container["args"])
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert args.listen[1] == ports["upload"] == PROXY_PORT
    assert args.metrics is not None
    assert args.metrics[1] == ports["metrics"] == METRICS_PORT
    # the CLI's own default is the same port
    assert _serve_args(["serve"]).listen == ("127.0.0.1", PROXY_PORT)


def test_probes_ask_the_paths_the_metrics_listener_serves(container: dict[str, Any]) -> None:
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    liveness = container["livenessProbe"]["httpGet"]
    readiness = container["readinessProbe"]["httpGet"]
    assert liveness["path"] == HEALTHZ_PATH
    assert readiness["path"] == READYZ_PATH
    assert ports[liveness["port"]] == ports[readiness["port"]] == METRICS_PORT
    annotations = _manifest("deployment.json")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == METRICS_PATH
    assert int(annotations["prometheus.io/port"]) == METRICS_PORT


def test_the_token_key_comes_from_the_secret_under_the_name_serve_reads(
    container: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = _manifest("secret.json")
    env = {item["name"]: item["valueFrom"]["secretKeyRef"] for item in container["env"]}
    for reference in env.values():
        assert reference["name"] == secret["metadata"]["name"]
        assert reference["key"] in secret["stringData"]
    assert TOKEN_KEY_ENV in env
    assert "RUP_AUTH_TOKEN" in env
    # rup serve really reads that variable: with it set, the key is the given one
    monkeypatch.setenv(TOKEN_KEY_ENV, "a passphrase long enough for a key")
    _, source = token_key_from_args(_serve_args(container["args"]))
    assert source is KeySource.GIVEN
    assert "--token-key" not in container["args"]  # a secret never on the command line


def test_the_grace_period_outlasts_the_drain(container: dict[str, Any]) -> None:
    spec = _manifest("deployment.json")["spec"]["template"]["spec"]
    args = _serve_args(container["args"])
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    shutdown_grace = ServerSettings(token_key=bytes(32)).shutdown_grace
    assert spec["terminationGracePeriodSeconds"] > pre_stop + shutdown_grace + args.drain_timeout


def test_the_pod_runs_unprivileged(container: dict[str, Any]) -> None:
    pod = _manifest("deployment.json")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    context = container["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"]["drop"] == ["ALL"]


def test_service_and_budget_select_the_deployments_pods() -> None:
    deployment = _manifest("deployment.json")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    port_names = {port["name"] for port in container["ports"]}
    service = _manifest("service.json")
    assert service["spec"]["selector"].items() <= labels.items()
    assert {port["targetPort"] for port in service["spec"]["ports"]} == port_names
    service_ports = {port["name"]: port["port"] for port in service["spec"]["ports"]}
    assert service_ports == {"upload": PROXY_PORT, "metrics": METRICS_PORT}
    budget = _manifest("pdb.json")
    assert budget["kind"] == "PodDisruptionBudget"
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["replicas"] > budget["spec"]["maxUnavailable"]


def _dockerfile() -> dict[str, list[str]]:
    """Instruction -> its arguments, continuation lines joined (the last one of each wins)."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    instructions: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            instructions.setdefault(word.upper(), []).append(rest.strip())
    return instructions


def test_the_dockerfile_matches_the_cli(container: dict[str, Any]) -> None:
    docker = _dockerfile()
    assert docker["FROM"][0].startswith("python:3.11-slim")
    assert {int(port) for port in docker["EXPOSE"][0].split()} == {PROXY_PORT, METRICS_PORT}
    user = docker["USER"][-1].split(":")[0]
    assert user not in ("root", "0")
    pod = _manifest("deployment.json")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == int(user)
    assert json.loads(docker["ENTRYPOINT"][-1]) == ["rup"]
    command = json.loads(docker["CMD"][-1])
    args = _serve_args(command)
    assert args.listen == ("0.0.0.0", PROXY_PORT)
    assert args.metrics == ("0.0.0.0", METRICS_PORT)
    (healthcheck,) = docker["HEALTHCHECK"]
    assert f"http://127.0.0.1:{METRICS_PORT}{HEALTHZ_PATH}" in healthcheck
    assert any("pip install" in run for run in docker["RUN"])
    assert shlex.split(docker["RUN"][0])[:2] == ["pip", "install"]


def test_every_dashboard_query_names_metrics_the_server_exports() -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exported: set[str] = set()
    for family in text_string_to_metric_families(ServerMetrics().render().decode()):
        exported.update(sample.name for sample in family.samples)
    # series that appear after the first observation of a histogram bucket: all are present
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(dashboard["panels"]) >= 3
    functions = {"rate", "sum", "by", "histogram_quantile", "le", "method", "outcome", "reason",
                 "cause"}  # fmt: skip
    for expr in expressions:
        names = set(re.findall(r"\b[a-z_][a-z0-9_]*\b", re.sub(r"\{[^}]*\}|\"[^\"]*\"", "", expr)))
        metrics = {name for name in names - functions if name.startswith("rup_")}
        assert metrics, expr
        assert metrics <= exported, f"{expr}: {sorted(metrics - exported)} not exported"
