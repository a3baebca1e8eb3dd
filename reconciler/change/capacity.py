"""Can the Ray cluster hold the fleet this plan leads to? Pure: the plan, the placed fleet and the
cluster's logical resources in; problems (file:line, the numbers, what to change) out.

Checked up front, so that a fleet Ray could never schedule is refused by plan/apply in seconds
instead of sitting in DEPLOYING: every resource a replica asks for must exist on some node (a
GPU's ``fleet_gpu_<i>``, a named node), and the whole fleet after this apply (its apps plus the
foreign apps kept) must not ask for more of a resource than the cluster has. What cannot be
known up front (another program holding a GPU) is caught while applying, from Serve's own
"cannot be scheduled" message (reconciler.change.apply.Unschedulable).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from reconciler.change.plan import Plan
from reconciler.desired.pipeline import DesiredState
from reconciler.errors import Location, Problem
from reconciler.live.serve_state import Cluster, Node
from serve_app.contract import HEAD_NODE_RESOURCE

EPS = 1e-6


def replica_demand(deployment: Mapping[str, Any]) -> dict[str, float]:
    """What one replica of a deployment asks Ray for (Ray's defaults: 1 CPU for actors unless set)."""
    opts = deployment.get("ray_actor_options") or {}
    demand = {"CPU": float(opts.get("num_cpus", 1)), "GPU": float(opts.get("num_gpus", 0) or 0)}
    for name, amount in (opts.get("resources") or {}).items():
        demand[name] = float(amount)
    return {k: v for k, v in demand.items() if v > 0}


def _deployments(apps: Iterable[Mapping[str, Any]]) -> Iterable[tuple[str, Mapping[str, Any]]]:
    for app in apps:
        for dep in app.get("deployments") or []:
            yield str(app.get("name")), dep


def check(plan: Plan, desired: DesiredState, cluster: Cluster | None) -> list[Problem]:
    if cluster is None or not cluster.nodes:
        return []
    problems: list[Problem] = []
    totals: dict[str, float] = defaultdict(float)
    for node in cluster.nodes:
        for name, amount in node.resources.items():
            totals[name] += amount
    needed: dict[str, float] = defaultdict(float)
    users: dict[str, list[str]] = defaultdict(list)
    for app, dep in _deployments(plan.put_config.get("applications") or []):
        demand = replica_demand(dep)
        replicas = int(dep.get("num_replicas") or 1) if dep.get("num_replicas") != "auto" else 1
        if not any(all(n.resources.get(r, 0.0) + EPS >= a for r, a in demand.items()) for n in cluster.nodes):
            problems.append(_no_node(app, demand, cluster, desired))
            continue
        for r, a in demand.items():
            needed[r] += a * replicas
            users[r].append(f"{app} {a * replicas:g}")
    for r, amount in sorted(needed.items()):
        if amount > totals.get(r, 0.0) + EPS:
            problems.append(Problem(None, "models", (
                f"the fleet needs {amount:g} {_what(r)} but the Ray cluster has {totals.get(r, 0.0):g} "
                f"({', '.join(users[r])}); {_advice(r)}")))
    return problems


def _no_node(app: str, demand: Mapping[str, float], cluster: Cluster, desired: DesiredState) -> Problem:
    missing = sorted(r for r, a in demand.items() if max(n.resources.get(r, 0.0) for n in cluster.nodes) + EPS < a)
    nodes = [r for r in missing if r.startswith("node:")]
    if nodes:  # the node itself is not in the cluster: say which nodes are
        listed = ", ".join(f"{n.ip} ({_gpus(n)})" for n in sorted(cluster.nodes, key=lambda n: n.ip))
        return Problem(_location(desired, app, "node"), f"models.{app}.node", (
            f"{_what(nodes[0])} is not in the Ray cluster, whose {len(cluster.nodes)} alive node(s) are {listed}. "
            f"{_advice(nodes[0])}"))
    have = sorted(r for r in {k for n in cluster.nodes for k in n.resources} if r.startswith(("fleet_gpu_", "CPU")))
    what = ", ".join(f"{_what(r)} ({demand[r]:g}, most on one node "
                     f"{max(n.resources.get(r, 0.0) for n in cluster.nodes):g})" for r in missing)
    return Problem(_location(desired, app), f"models.{app}", (
        f"no node of the Ray cluster can hold a replica: it needs {what}; the cluster's nodes have "
        f"{', '.join(have) or 'none of these'}. {_advice(missing[0] if missing else 'CPU')}"))


def _gpus(node: Node) -> str:
    n = sum(1 for r in node.resources if r.startswith("fleet_gpu_"))
    head = ", the head" if node.resources.get(HEAD_NODE_RESOURCE) else ""
    return f"{n} GPU{'s' if n != 1 else ''}{head}"


def _what(resource: str) -> str:
    if resource.startswith("fleet_gpu_"):
        return f"of GPU {resource.removeprefix('fleet_gpu_')} (Ray resource {resource})"
    if resource == HEAD_NODE_RESOURCE:
        return "the head node"
    if resource.startswith("node:"):
        return f"node {resource.removeprefix('node:')}"
    return {"CPU": "logical CPUs", "GPU": "Ray GPUs"}.get(resource, f"of Ray resource {resource}")


def _advice(resource: str) -> str:
    if resource.startswith("fleet_gpu_"):
        return ("put the model on a GPU the cluster has, lower gpu_memory, or declare the GPU on its node "
                f"(`ray start ... --resources '{{\"{resource}\": 1}}'`; `fleetctl up` declares one per GPU NVML sees)")
    if resource == HEAD_NODE_RESOURCE:
        return "the fleet's router runs on the Ray head: apply against a cluster whose head is alive"
    if resource.startswith("node:"):
        return ("check node: against the IPs `ray list nodes` shows, or join that machine to the cluster "
                "(`ray start --address=<head>:<port> --node-ip-address=<its IP>` on it)")
    return "lower replicas or remove a model, or start Ray with more (`ray start --num-cpus N`)"


def _location(desired: DesiredState, app: str, field: str = "gpus") -> Location | None:
    return desired.loaded.origins.of(("models", app, field), key=True)
