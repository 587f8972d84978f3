#!/usr/bin/python3
"""Checks Kubernetes objects (as rendered from deploy/k8s) without a cluster.

Usage:
  validate_k8s.py [--dashboard FILE] [--expect-kinds K,K...] YAML...
      Checks the objects of the YAML files ('-': standard input) as one set.
  validate_k8s.py --expect-reject YAML...
      Each file is a broken set: it must be rejected with every error that its
      '# expect: TEXT' lines name (TEXT is a part of the error's line).
  validate_k8s.py --self-test [--dashboard FILE] YAML
      The objects of YAML must be accepted; then each of the breakages in
      SELF_TEST below is applied to a copy of them, one at a time, and each
      copy must be rejected with the error the breakage names.
The last line printed is 'RESULT passed=N failed=M' (one case per set checked).

What is checked:
 1. Each object against the models of the Kubernetes API in python3-kubernetes
    (22.6: the API of Kubernetes 1.22). apiVersion and kind name the API group
    class (AppsV1Api, CoreV1Api, ...) whose create method takes the object; its
    body's model class (V1StatefulSet, ...) is the schema. The object is walked
    recursively against each model's openapi_types and attribute_map: a field
    the model does not have, a value of the wrong type (string, integer,
    boolean, number, list, map, nested object), an int-or-string that is
    neither, a quantity that does not parse, and a required field that is
    missing are errors. Each model is constructed with client-side validation
    on, so its own setters reject a missing required field (all of them are
    reported) and the few patterns they know. Fields the models type as
    `object` that are not int-or-string (free-form JSON) are not checked. The
    models know no enumerations: the values of the enumerated fields used
    here are checked against ENUMS, and a few ranges against RANGES.
 2. Kinds the models lack (the Prometheus Operator's ServiceMonitor) are
    checked the same strict way against LOCAL_MODELS, a schema written here of
    the fields these manifests use (a subset of the CRD's).
 3. What the API server would reject that the models do not say: names
    (DNS labels, subdomains, port names), label keys and values, workload
    selectors that do not match their pod template, duplicate names,
    requests above limits, extended resources (nvidia.com/gpu) that are not
    whole numbers or whose request differs from their limit.
 4. References between objects: a Service's selector matches a workload's pod
    labels and its targetPorts are ports those pods declare; a StatefulSet's
    serviceName is a Service; volume mounts name existing volumes (or volume
    claim templates) and every volume is mounted; probes point at a port the
    container declares; a ServiceMonitor selects a Service and names its port;
    with --dashboard, the ConfigMap generated from the dashboard exists once,
    is labelled grafana_dashboard: "1", holds the file unchanged, parses as a
    JSON object and fits in kubectl apply's last-applied annotation.
 5. This project's rules: no object names a namespace; every container runs as
    uid/gid 7450, non-root, without privilege escalation, with a read-only root
    file system and no capabilities, under a RuntimeDefault or Localhost
    seccomp profile, with CPU and memory requests and limits, from the image
    gpuq-broker or gpuq-worker with a tag; the command lines of gpuqd and
    gpuq-worker agree with the objects: gpuqd's endpoints are the ports its
    container declares, bound on all addresses; its store and cache lie on a
    writable volume; key files lie on mounted volumes that hold them; CURVE is
    on; gpuqd's probes are /healthz (liveness, startup) and /readyz
    (readiness) on its metrics port; --expect-workers is not used unless the
    Service publishes a pod that is not ready; gpuq-worker's --broker is a
    Service port that leads to gpuqd's --worker-listen; a pod that requests
    nvidia.com/gpu tolerates the nvidia.com/gpu taint and selects GPU nodes,
    and a nvidia.com/gpu.count node selector equals its request.
"""

import argparse
import copy
import datetime
import json
import os
import re
import sys

import yaml
from kubernetes import client
from kubernetes.utils import parse_quantity

VALIDATING = client.Configuration()
VALIDATING.client_side_validation = True
LENIENT = client.Configuration()
LENIENT.client_side_validation = False

# ----------------------------------------------------------------- schemas


class LocalModel:
    """A schema for a kind the Kubernetes models lack, shaped like a model
    class (openapi_types, attribute_map), with its required fields."""

    def __init__(self, name, fields, required=()):
        self.__name__ = name
        self.openapi_types = dict(fields)
        self.attribute_map = {f: f for f in fields}
        self.required = set(required)


# The Prometheus Operator's ServiceMonitor (monitoring.coreos.com/v1): the
# fields these manifests use, typed as in the CRD.
LOCAL_MODELS = {
    m.__name__: m
    for m in [
        LocalModel(
            "MonitoringV1ServiceMonitor",
            {"apiVersion": "str", "kind": "str", "metadata": "V1ObjectMeta",
             "spec": "MonitoringV1ServiceMonitorSpec"},
            required=["apiVersion", "kind", "metadata", "spec"]),
        LocalModel(
            "MonitoringV1ServiceMonitorSpec",
            {"selector": "V1LabelSelector", "endpoints": "list[MonitoringV1Endpoint]",
             "namespaceSelector": "MonitoringV1NamespaceSelector", "jobLabel": "str"},
            required=["selector", "endpoints"]),
        LocalModel(
            "MonitoringV1Endpoint",
            {"port": "str", "path": "str", "scheme": "str", "interval": "str",
             "scrapeTimeout": "str", "honorLabels": "bool"},
            required=["port"]),
        LocalModel(
            "MonitoringV1NamespaceSelector",
            {"any": "bool", "matchNames": "list[str]"}),
    ]
}
LOCAL_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"): "MonitoringV1ServiceMonitor"}

# Fields typed `object` by the models that are int-or-string in the API.
INT_OR_STRING = {
    ("V1HTTPGetAction", "port"), ("V1TCPSocketAction", "port"), ("V1ServicePort", "target_port"),
    ("V1NetworkPolicyPort", "port"),
    ("V1RollingUpdateDaemonSet", "max_surge"), ("V1RollingUpdateDaemonSet", "max_unavailable"),
    ("V1RollingUpdateDeployment", "max_surge"), ("V1RollingUpdateDeployment", "max_unavailable"),
    ("V1PodDisruptionBudgetSpec", "max_unavailable"), ("V1PodDisruptionBudgetSpec", "min_available"),
}
# Fields typed `str` (or maps of `str`) by the models that are quantities.
QUANTITY = {("V1ResourceFieldSelector", "divisor"), ("V1EmptyDirVolumeSource", "size_limit")}
QUANTITY_MAPS = {("V1ResourceRequirements", "limits"), ("V1ResourceRequirements", "requests")}

ENUMS = {
    ("V1Container", "image_pull_policy"): {"Always", "IfNotPresent", "Never"},
    ("V1Container", "termination_message_policy"): {"File", "FallbackToLogsOnError"},
    ("V1ContainerPort", "protocol"): {"TCP", "UDP", "SCTP"},
    ("V1ServicePort", "protocol"): {"TCP", "UDP", "SCTP"},
    ("V1ServiceSpec", "type"): {"ClusterIP", "NodePort", "LoadBalancer", "ExternalName"},
    ("V1ServiceSpec", "session_affinity"): {"ClientIP", "None"},
    ("V1ServiceSpec", "external_traffic_policy"): {"Cluster", "Local"},
    ("V1SeccompProfile", "type"): {"RuntimeDefault", "Localhost", "Unconfined"},
    ("V1PodSecurityContext", "fs_group_change_policy"): {"OnRootMismatch", "Always"},
    ("V1PodSpec", "restart_policy"): {"Always", "OnFailure", "Never"},
    ("V1PodSpec", "dns_policy"): {"ClusterFirst", "ClusterFirstWithHostNet", "Default", "None"},
    ("V1Toleration", "operator"): {"Exists", "Equal"},
    ("V1Toleration", "effect"): {"NoSchedule", "PreferNoSchedule", "NoExecute"},
    ("V1HTTPGetAction", "scheme"): {"HTTP", "HTTPS"},
    ("V1StatefulSetUpdateStrategy", "type"): {"RollingUpdate", "OnDelete"},
    ("V1DaemonSetUpdateStrategy", "type"): {"RollingUpdate", "OnDelete"},
    ("V1DeploymentStrategy", "type"): {"RollingUpdate", "Recreate"},
    ("V1StatefulSetSpec", "pod_management_policy"): {"OrderedReady", "Parallel"},
    ("V1PersistentVolumeClaimSpec", "access_modes"):
        {"ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"},
    ("V1PersistentVolumeClaimSpec", "volume_mode"): {"Filesystem", "Block"},
    ("V1LabelSelectorRequirement", "operator"): {"In", "NotIn", "Exists", "DoesNotExist"},
    ("V1NodeSelectorRequirement", "operator"): {"In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"},
    ("MonitoringV1Endpoint", "scheme"): {"http", "https"},
}
RANGES = {
    ("V1ContainerPort", "container_port"): (1, 65535),
    ("V1ServicePort", "port"): (1, 65535),
    ("V1ServicePort", "node_port"): (30000, 32767),
    ("V1SecretVolumeSource", "default_mode"): (0, 0o777),
    ("V1ConfigMapVolumeSource", "default_mode"): (0, 0o777),
    ("V1KeyToPath", "mode"): (0, 0o777),
    ("V1StatefulSetSpec", "replicas"): (0, 2**31 - 1),
}
# The CRD's pattern for Prometheus durations.
DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
PATTERNS = {
    ("MonitoringV1Endpoint", "interval"): DURATION,
    ("MonitoringV1Endpoint", "scrapeTimeout"): DURATION,
    ("MonitoringV1Endpoint", "path"): r"^/",
}

QUANTITY_RE = re.compile(
    r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+|Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")
PERCENT_RE = re.compile(r"^[0-9]+%$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


def describe(v):
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"boolean {str(v).lower()}"
    if isinstance(v, int):
        return f"integer {v}"
    if isinstance(v, float):
        return f"number {v}"
    if isinstance(v, str):
        return f"string {v!r}"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return f"{type(v).__name__} {v!r}"


def model_class(api_version, kind):
    """The model class of apiVersion/kind: the body type of the create method
    of the API group's class in the Python client (as kubernetes.utils maps
    them), or a LOCAL_MODELS entry, or None."""
    if (api_version, kind) in LOCAL_KINDS:
        return LOCAL_MODELS[LOCAL_KINDS[(api_version, kind)]]
    group, _, version = api_version.rpartition("/")
    group = "".join(group.rsplit(".k8s.io", 1)) if group else "core"
    api = getattr(client, "".join(w.capitalize() for w in group.split(".")) +
                  version.capitalize() + "Api", None)
    if api is None:
        return None
    snake = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", kind)
    snake = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", snake).lower()
    for method in ("create_namespaced_" + snake, "create_" + snake):
        fn = getattr(api, method, None)
        if fn is not None:
            m = re.search(r":param (\w+) body:", fn.__doc__ or "")
            return getattr(client, m.group(1), None) if m else None
    return None


class Checker:
    def __init__(self):
        self.errors = []

    def error(self, where, message):
        self.errors.append(f"{where}: {message}")

    @staticmethod
    def join(where, key):
        """where's child: 'Kind/name:' + 'spec' -> 'Kind/name: spec'."""
        return f"{where} {key}" if where.endswith(":") else f"{where}.{key}"

    # -- the schema walk

    def value(self, v, typ, where, owner):
        """Checks v against the type string typ; returns what to give a
        model's constructor (never None for a value that was given)."""
        m = re.fullmatch(r"list\[(.+)\]", typ)
        if m:
            if not isinstance(v, list):
                self.error(where, f"expected a list, got {describe(v)}")
                return v
            return [self.value(x, m.group(1), f"{where}[{i}]", owner) for i, x in enumerate(v)]
        m = re.fullmatch(r"dict\(([^,]+), (.+)\)", typ)
        if m:
            if not isinstance(v, dict):
                self.error(where, f"expected a map, got {describe(v)}")
                return v
            out = {}
            for k, x in v.items():
                if not isinstance(k, str):
                    self.error(where, f"map key {describe(k)} is not a string")
                if x is None:
                    self.error(self.join(where, k), "null is not a value")
                    continue
                out[k] = self.value(x, m.group(2), self.join(where, k), owner)
            return out
        if typ == "str":
            if not isinstance(v, str):
                self.error(where, f"expected a string, got {describe(v)}")
            return v
        if typ == "int":
            if isinstance(v, bool) or not isinstance(v, int):
                self.error(where, f"expected an integer, got {describe(v)}")
            return v
        if typ == "float":
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                self.error(where, f"expected a number, got {describe(v)}")
            return v
        if typ == "bool":
            if not isinstance(v, bool):
                self.error(where, f"expected a boolean, got {describe(v)}")
            return v
        if typ in ("datetime", "date"):
            if not isinstance(v, (str, datetime.date)):
                self.error(where, f"expected a time, got {describe(v)}")
            return v
        if typ == "int-or-string":
            if isinstance(v, bool) or not isinstance(v, (int, str)):
                self.error(where, f"expected an integer or a string, got {describe(v)}")
            elif isinstance(v, str) and owner[1] not in ("port", "target_port") \
                    and not PERCENT_RE.match(v):
                self.error(where, f"expected an integer or a percentage, got {describe(v)}")
            elif isinstance(v, str) and owner[1] in ("port", "target_port") \
                    and not IANA_SVC_NAME.match(v):
                self.error(where, f"expected a port number or name, got {describe(v)}")
            return v
        if typ == "quantity":
            if isinstance(v, bool) or not isinstance(v, (int, float, str)):
                self.error(where, f"expected a quantity, got {describe(v)}")
                return v
            text = str(v)
            try:
                if not QUANTITY_RE.match(text):
                    raise ValueError(text)
                parse_quantity(text)
            except ValueError:
                self.error(where, f"{describe(v)} is not a quantity")
            return str(v)
        if typ == "object":
            return v  # free-form JSON
        cls = LOCAL_MODELS.get(typ) or getattr(client, typ, None)
        if cls is None:
            self.error(where, f"no schema for type {typ}")
            return v
        return self.model(v, cls, where)

    def model(self, v, cls, where):
        name = cls.__name__
        if not isinstance(v, dict):
            self.error(where, f"expected an object ({name}), got {describe(v)}")
            return v
        attrs = {j: a for a, j in cls.attribute_map.items()}
        kwargs = {}
        for key, x in v.items():
            attr = attrs.get(key)
            path = self.join(where, key)
            if attr is None:
                self.error(path, f"unknown field ({name} has no field {key!r})")
                continue
            if x is None:
                continue  # null: the same as absent
            owner = (name, attr)
            typ = cls.openapi_types[attr]
            if owner in INT_OR_STRING:
                typ = "int-or-string"
            elif owner in QUANTITY:
                typ = "quantity"
            elif owner in QUANTITY_MAPS:
                typ = "dict(str, quantity)"
            kwargs[attr] = self.value(x, typ, path, owner)
            if owner in ENUMS:
                for item in (x if isinstance(x, list) else [x]):
                    if isinstance(item, str) and item not in ENUMS[owner]:
                        self.error(path, f"{item!r} is not one of {sorted(ENUMS[owner])}")
            if owner in RANGES and isinstance(x, int) and not isinstance(x, bool):
                lo, hi = RANGES[owner]
                if not lo <= x <= hi:
                    self.error(path, f"{x} is outside {lo}..{hi}")
            if owner in PATTERNS and isinstance(x, str) and not re.search(PATTERNS[owner], x):
                self.error(path, f"{x!r} does not match {PATTERNS[owner]}")
        if isinstance(cls, LocalModel):
            for attr in sorted(cls.required - kwargs.keys()):
                self.error(where, f"missing required field {attr!r} ({name})")
            return kwargs
        try:
            return cls(local_vars_configuration=VALIDATING, **kwargs)
        except ValueError:
            pass
        # Which fields: set each again, with validation on, on a model built
        # without it.
        obj = cls(local_vars_configuration=LENIENT, **kwargs)
        obj.local_vars_configuration = VALIDATING
        for attr in cls.openapi_types:
            try:
                setattr(obj, attr, kwargs.get(attr))
            except ValueError as e:
                if attr in kwargs:
                    self.error(self.join(where, cls.attribute_map[attr]), f"invalid value: {e}")
                else:
                    self.error(where, f"missing required field {cls.attribute_map[attr]!r} ({name})")
        return obj

    def schema(self, obj, where):
        api_version, kind = obj.get("apiVersion"), obj.get("kind")
        if not isinstance(api_version, str) or not isinstance(kind, str):
            self.error(where, "apiVersion and kind must be strings")
            return
        cls = model_class(api_version, kind)
        if cls is None:
            self.error(where, f"no schema for apiVersion {api_version!r}, kind {kind!r} "
                              "(not in the Kubernetes models nor in LOCAL_MODELS)")
            return
        self.model(obj, cls, where + ":")


# ------------------------------------------------------------ object access


def d(x):
    return x if isinstance(x, dict) else {}


def lst(x):
    return x if isinstance(x, list) else []


def dig(x, *keys):
    for k in keys:
        x = d(x).get(k)
    return x


def ident(o):
    return f"{o.get('kind')}/{dig(o, 'metadata', 'name')}"


WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


def pod_templates(objs):
    for o in objs:
        if o.get("kind") in WORKLOADS:
            yield o, d(dig(o, "spec", "template"))


def containers(pod_spec):
    for key in ("initContainers", "containers"):
        for i, c in enumerate(lst(pod_spec.get(key))):
            if isinstance(c, dict):
                yield f"spec.template.spec.{key}[{i}]", c


def subset(sel, labels):
    return bool(sel) and all(d(labels).get(k) == v for k, v in sel.items())


def port_map(container):
    """containerPort numbers by name, and the set of numbers."""
    names, numbers = {}, set()
    for p in lst(container.get("ports")):
        n = d(p).get("containerPort")
        if isinstance(n, int):
            numbers.add(n)
            if isinstance(d(p).get("name"), str):
                names[p["name"]] = n
    return names, numbers


def resolve_port(port, containers_):
    """The containerPort a port (number or name) refers to in any of the
    containers, or None."""
    for c in containers_:
        names, numbers = port_map(c)
        if isinstance(port, str) and port in names:
            return names[port]
        if isinstance(port, int) and not isinstance(port, bool) and port in numbers:
            return port
    return None


def argv(container):
    return [str(x) for x in lst(container.get("command")) + lst(container.get("args"))]


BOOL_FLAGS = {"--insecure", "--count", "--info", "--help", "-h"}


def flags(args):
    out = {}
    i = 1
    while i < len(args):
        a = args[i]
        if a.startswith("--") and "=" in a:
            k, v = a.split("=", 1)
            out[k] = v
        elif a in BOOL_FLAGS:
            out[a] = True
        elif a.startswith("-") and i + 1 < len(args):
            out[a] = args[i + 1]
            i += 1
        else:
            out[a] = True
        i += 1
    return out


def host_port(endpoint):
    """(scheme, host, port) of tcp://HOST:PORT or HOST:PORT, or None."""
    m = re.fullmatch(r"(?:(\w+)://)?(\[[^\]]*\]|[^:/]*):([0-9]+)", endpoint or "")
    return (m.group(1) or "", m.group(2), int(m.group(3))) if m else None


def quantity(v):
    try:
        return parse_quantity(v) if v is not None and not isinstance(v, bool) else None
    except ValueError:
        return None


# ----------------------------------------------------------- set checks


def check_names(ck, objs):
    def label_map(where, labels):
        for k, v in d(labels).items():
            prefix, _, name = str(k).rpartition("/")
            if (prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix))) \
                    or len(name) > 63 or not LABEL_NAME.match(name):
                ck.error(where, f"{k!r} is not a valid label key")
            if isinstance(v, str) and v and (len(v) > 63 or not LABEL_NAME.match(v)):
                ck.error(f"{where}.{k}", f"{v!r} is not a valid label value")

    seen = set()
    for o in objs:
        name = dig(o, "metadata", "name")
        who = ident(o)
        if not isinstance(name, str):
            ck.error(who, "metadata.name is missing")
            continue
        key = (o.get("apiVersion"), o.get("kind"), name)
        if key in seen:
            ck.error(who, "two objects have this kind and name")
        seen.add(key)
        rule = DNS1035_LABEL if o.get("kind") == "Service" else DNS1123_SUBDOMAIN
        limit = 63 if o.get("kind") == "Service" else 253
        if len(name) > limit or not rule.match(name):
            ck.error(who, f"metadata.name {name!r} is not a valid name for a {o.get('kind')}")
        label_map(f"{who}: metadata.labels", dig(o, "metadata", "labels"))
        if o.get("kind") == "Service":
            label_map(f"{who}: spec.selector", dig(o, "spec", "selector"))
        label_map(f"{who}: spec.selector.matchLabels", dig(o, "spec", "selector", "matchLabels"))
    for o, tpl in pod_templates(objs):
        who = ident(o)
        label_map(f"{who}: spec.template.metadata.labels", dig(tpl, "metadata", "labels"))
        label_map(f"{who}: spec.template.spec.nodeSelector", dig(tpl, "spec", "nodeSelector"))
        spec = d(tpl.get("spec"))
        for what, items, rule, limit in (
                ("container", [c for _, c in containers(spec)], DNS1123_LABEL, 63),
                ("volume", lst(spec.get("volumes")), DNS1123_LABEL, 63)):
            names = [d(x).get("name") for x in items]
            for n in names:
                if isinstance(n, str) and (len(n) > limit or not rule.match(n)):
                    ck.error(who, f"{what} name {n!r} is not a DNS label")
            for n in {n for n in names if names.count(n) > 1}:
                ck.error(who, f"two {what}s are named {n!r}")
        for path, c in containers(spec):
            pnames = [d(p).get("name") for p in lst(c.get("ports")) if d(p).get("name") is not None]
            for n in pnames:
                if not isinstance(n, str) or len(n) > 15 or not IANA_SVC_NAME.match(n) \
                        or "--" in n or not re.search("[a-z]", n):
                    ck.error(f"{who}: {path}.ports", f"port name {n!r} is not valid "
                             "(at most 15 of a-z, 0-9 and '-', with a letter)")
            for n in {n for n in pnames if pnames.count(n) > 1}:
                ck.error(f"{who}: {path}.ports", f"two ports are named {n!r}")
            mounts = [d(m).get("mountPath") for m in lst(c.get("volumeMounts"))]
            for m in {m for m in mounts if mounts.count(m) > 1}:
                ck.error(f"{who}: {path}.volumeMounts", f"two mounts at {m!r}")


def check_workloads(ck, objs):
    services = {dig(o, "metadata", "name"): o for o in objs if o.get("kind") == "Service"}
    for o, tpl in pod_templates(objs):
        who = ident(o)
        sel = dig(o, "spec", "selector", "matchLabels")
        if not d(sel):
            ck.error(who, "spec.selector.matchLabels is empty")
        elif not subset(d(sel), dig(tpl, "metadata", "labels")):
            ck.error(who, "spec.selector.matchLabels does not match spec.template.metadata.labels")
        if o.get("kind") == "StatefulSet":
            sn = dig(o, "spec", "serviceName")
            if sn not in services:
                ck.error(who, f"spec.serviceName {sn!r} is not a Service of this set")
        spec = d(tpl.get("spec"))
        claims = [dig(c, "metadata", "name") for c in lst(dig(o, "spec", "volumeClaimTemplates"))]
        volumes = {d(v).get("name"): d(v) for v in lst(spec.get("volumes"))}
        mounted = set()
        for path, c in containers(spec):
            for i, m in enumerate(lst(c.get("volumeMounts"))):
                n = d(m).get("name")
                mounted.add(n)
                if n not in volumes and n not in claims:
                    ck.error(f"{who}: {path}.volumeMounts[{i}]",
                             f"names volume {n!r}, which the pod does not have")
            names, numbers = port_map(c)
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                for action in ("httpGet", "tcpSocket"):
                    port = dig(c, probe, action, "port")
                    if port is None:
                        continue
                    if resolve_port(port, [c]) is None:
                        ck.error(f"{who}: {path}.{probe}.{action}.port",
                                 f"{describe(port)} is not a port this container declares")
            # Requests and limits.
            req, lim = d(dig(c, "resources", "requests")), d(dig(c, "resources", "limits"))
            for r in set(req) & set(lim):
                a, b = quantity(req[r]), quantity(lim[r])
                if a is not None and b is not None and a > b:
                    ck.error(f"{who}: {path}.resources", f"the request of {r} is above its limit")
            for r in set(req) | set(lim):
                prefix = r.split("/")[0] if "/" in r else ""
                if not prefix or prefix.endswith("kubernetes.io"):
                    continue
                for what, m in (("requests", req), ("limits", lim)):
                    q = quantity(m.get(r))
                    if r in m and (q is None or q != int(q)):
                        ck.error(f"{who}: {path}.resources.{what}.{r}",
                                 "an extended resource must be a whole number")
                if r not in lim:
                    ck.error(f"{who}: {path}.resources", f"extended resource {r} needs a limit")
                elif r in req and quantity(req[r]) != quantity(lim[r]):
                    ck.error(f"{who}: {path}.resources",
                             f"the request of extended resource {r} must equal its limit")
        for n in volumes:
            if n not in mounted:
                ck.error(who, f"volume {n!r} is not mounted by any container")
        for n in claims:
            if n not in mounted:
                ck.error(who, f"volume claim template {n!r} is not mounted by any container")


def selected_pods(objs, selector):
    return [(o, tpl) for o, tpl in pod_templates(objs)
            if subset(d(selector), dig(tpl, "metadata", "labels"))]


def check_services(ck, objs):
    for s in objs:
        if s.get("kind") != "Service":
            continue
        who = ident(s)
        sel = d(dig(s, "spec", "selector"))
        pods = selected_pods(objs, sel)
        if not sel:
            ck.error(who, "spec.selector is empty")
            continue
        if not pods:
            ck.error(who, "spec.selector matches the pod labels of no workload in this set")
        ports = lst(dig(s, "spec", "ports"))
        names = [d(p).get("name") for p in ports]
        if len(ports) > 1 and (None in names or len(set(names)) != len(names)):
            ck.error(who, "each port of a Service with several ports needs its own name")
        for i, p in enumerate(ports):
            target = d(p).get("targetPort", d(p).get("port"))
            for o, tpl in pods:
                cs = [c for _, c in containers(d(tpl.get("spec")))]
                if resolve_port(target, cs) is None:
                    ck.error(f"{who}: spec.ports[{i}].targetPort",
                             f"{describe(target)} is not a port declared by {ident(o)}")


def check_service_monitors(ck, objs):
    services = [o for o in objs if o.get("kind") == "Service"]
    for m in objs:
        if m.get("kind") != "ServiceMonitor":
            continue
        who = ident(m)
        sel = d(dig(m, "spec", "selector", "matchLabels"))
        matched = [s for s in services if subset(sel, dig(s, "metadata", "labels"))]
        if not matched:
            ck.error(who, "spec.selector matches the labels of no Service in this set")
        for i, e in enumerate(lst(dig(m, "spec", "endpoints"))):
            for s in matched:
                if d(e).get("port") not in [d(p).get("name") for p in lst(dig(s, "spec", "ports"))]:
                    ck.error(f"{who}: spec.endpoints[{i}].port",
                             f"{d(e).get('port')!r} is not a port name of {ident(s)}")


def check_dashboard(ck, objs, dashboard):
    key = os.path.basename(dashboard)
    with open(dashboard, encoding="utf-8") as f:
        text = f.read()
    maps = [o for o in objs if o.get("kind") == "ConfigMap" and key in d(o.get("data"))]
    if len(maps) != 1:
        ck.error("dashboard", f"{len(maps)} ConfigMaps hold {key}; one must")
        return
    cm = maps[0]
    who = ident(cm)
    if dig(cm, "metadata", "labels", "grafana_dashboard") != "1":
        ck.error(who, "metadata.labels.grafana_dashboard must be \"1\" (Grafana's sidecar)")
    value = cm["data"][key]
    if value != text:
        ck.error(f"{who}: data.{key}", f"differs from {dashboard}")
    try:
        parsed = json.loads(value)
        if not isinstance(parsed, dict):
            ck.error(f"{who}: data.{key}", "is JSON but not an object")
    except (TypeError, ValueError) as e:
        ck.error(f"{who}: data.{key}", f"does not parse as JSON: {e}")
    # kubectl apply (client side) stores the object in an annotation, and
    # annotations are limited to 256 KiB in all.
    if len(json.dumps(cm)) > 262144 - 4096:
        ck.error(who, "too large for kubectl apply's last-applied-configuration annotation "
                      "(256 KiB)")


def check_policy(ck, objs):
    for o in objs:
        if dig(o, "metadata", "namespace") is not None:
            ck.error(ident(o), "metadata.namespace is set: the manifests are namespace-agnostic")
    for o, tpl in pod_templates(objs):
        who = ident(o)
        spec = d(tpl.get("spec"))
        psc = d(spec.get("securityContext"))
        for field, want in (("runAsNonRoot", True), ("runAsUser", 7450), ("runAsGroup", 7450)):
            if psc.get(field) != want:
                ck.error(f"{who}: spec.template.spec.securityContext.{field}",
                         f"must be {json.dumps(want)}")
        if dig(psc, "seccompProfile", "type") not in ("RuntimeDefault", "Localhost"):
            ck.error(f"{who}: spec.template.spec.securityContext.seccompProfile.type",
                     "must be RuntimeDefault or Localhost")
        for path, c in containers(spec):
            sc = d(c.get("securityContext"))
            if sc.get("allowPrivilegeEscalation") is not False:
                ck.error(f"{who}: {path}.securityContext.allowPrivilegeEscalation", "must be false")
            if sc.get("readOnlyRootFilesystem") is not True:
                ck.error(f"{who}: {path}.securityContext.readOnlyRootFilesystem", "must be true")
            if sc.get("privileged"):
                ck.error(f"{who}: {path}.securityContext.privileged", "must not be true")
            if "ALL" not in lst(dig(sc, "capabilities", "drop")):
                ck.error(f"{who}: {path}.securityContext.capabilities.drop", "must hold ALL")
            for field in ("runAsUser", "runAsGroup"):
                if sc.get(field, 7450) != 7450:
                    ck.error(f"{who}: {path}.securityContext.{field}", "must be 7450")
            for what in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if dig(c, "resources", what, r) is None:
                        ck.error(f"{who}: {path}.resources.{what}", f"has no {r}")
            image = c.get("image")
            m = re.fullmatch(r"(?:[^/]+/)*(gpuq-broker|gpuq-worker)(?::([\w][\w.-]{0,127}))?"
                             r"(@sha256:[0-9a-f]{64})?", str(image))
            if not m:
                ck.error(f"{who}: {path}.image", f"{image!r} is not gpuq-broker or gpuq-worker")
            elif (not m.group(2) and not m.group(3)) or m.group(2) == "latest":
                ck.error(f"{who}: {path}.image", f"{image!r} has no tag (kustomization images:)")
            gpus = quantity(dig(c, "resources", "limits", "nvidia.com/gpu"))
            if gpus:
                check_gpu_pod(ck, f"{who}: spec.template.spec", spec, gpus)


def check_gpu_pod(ck, where, spec, gpus):
    if not any(d(t).get("key") == "nvidia.com/gpu" or
               (d(t).get("key") is None and d(t).get("operator") == "Exists")
               for t in lst(spec.get("tolerations"))):
        ck.error(f"{where}.tolerations", "a pod that requests nvidia.com/gpu must tolerate "
                                         "the nvidia.com/gpu taint")
    selector = d(spec.get("nodeSelector"))
    terms = lst(dig(spec, "affinity", "nodeAffinity",
                    "requiredDuringSchedulingIgnoredDuringExecution", "nodeSelectorTerms"))
    keys = set(selector) | {d(e).get("key") for t in terms for e in lst(d(t).get("matchExpressions"))}
    if not any(str(k).startswith("nvidia.com/") for k in keys):
        ck.error(where, "a pod that requests nvidia.com/gpu must select GPU nodes "
                        "(a nodeSelector or required node affinity on a nvidia.com/ label)")
    count = selector.get("nvidia.com/gpu.count")
    if count is not None and quantity(count) != gpus:
        ck.error(f"{where}.nodeSelector.nvidia.com/gpu.count",
                 f"{count!r} differs from the pod's nvidia.com/gpu request ({gpus})")


def mount_of(container, volumes, claims, path):
    """The volume mount whose mountPath holds path, its volume, and the
    path relative to it; or None."""
    best = None
    for m in lst(container.get("volumeMounts")):
        mp = str(d(m).get("mountPath", "")).rstrip("/")
        if path.startswith(mp + "/") and (best is None or len(mp) > len(best[0])):
            best = (mp, d(m))
    if best is None:
        return None
    mp, m = best
    volume = volumes.get(m.get("name"), {"persistentVolumeClaim": {}} if m.get("name") in claims else {})
    return m, volume, path[len(mp) + 1:]


def check_read_file(ck, where, flag, path, container, volumes, claims):
    found = mount_of(container, volumes, claims, path)
    if found is None:
        ck.error(where, f"{flag} {path} lies on no mounted volume")
        return
    _, volume, rel = found
    for kind in ("secret", "configMap"):
        if kind in volume and d(volume[kind]).get("items") is not None:
            paths = [d(i).get("path") for i in lst(volume[kind]["items"])]
            if rel not in paths:
                ck.error(where, f"{flag} {path}: the {kind} volume mounted there has no item "
                                f"{rel!r} (it has {paths})")


def check_write_file(ck, where, flag, path, container, volumes, claims):
    found = mount_of(container, volumes, claims, path)
    if found is None:
        ck.error(where, f"{flag} {path} lies on no mounted volume (the root file system is "
                        "read-only)")
        return
    m, volume, _ = found
    if m.get("readOnly") or any(k in volume for k in ("secret", "configMap")):
        ck.error(where, f"{flag} {path} lies on a read-only mount")


def check_command_lines(ck, objs):
    services = {dig(o, "metadata", "name"): o for o in objs if o.get("kind") == "Service"}
    for o, tpl in pod_templates(objs):
        who = ident(o)
        spec = d(tpl.get("spec"))
        volumes = {d(v).get("name"): d(v) for v in lst(spec.get("volumes"))}
        claims = {dig(c, "metadata", "name") for c in lst(dig(o, "spec", "volumeClaimTemplates"))}
        for path, c in containers(spec):
            args = argv(c)
            where = f"{who}: {path}"
            prog = os.path.basename(args[0]) if args else None
            if re.search(r"gpuq-(broker|worker)", str(c.get("image"))) and not args:
                ck.error(where, "sets no command: its command line cannot be checked")
            f = flags(args)
            if prog == "gpuqd":
                check_gpuqd(ck, where, o, tpl, c, f, volumes, claims, objs)
            elif prog == "gpuq-worker":
                if f.get("--insecure"):
                    ck.error(where, "--insecure: workers must use CURVE")
                for flag in ("--server-key", "--key"):
                    if flag not in f:
                        ck.error(where, f"{flag} is missing (CURVE)")
                    else:
                        check_read_file(ck, where, flag, str(f[flag]), c, volumes, claims)
                check_broker_address(ck, where, str(f.get("--broker")), services, objs)


def check_gpuqd(ck, where, o, tpl, c, f, volumes, claims, objs):
    names, numbers = port_map(c)
    bound = {}
    for flag, schemes in (("--listen", ("tcp",)), ("--worker-listen", ("tcp",)), ("--metrics", ("",))):
        hp = host_port(str(f.get(flag)))
        if hp is None or hp[0] not in schemes:
            ck.error(where, f"{flag} {f.get(flag)!r} is not "
                            f"{'tcp://HOST:PORT' if schemes[0] else 'HOST:PORT'}")
            continue
        if hp[1] not in ("0.0.0.0", "*", "[::]", ""):
            ck.error(where, f"{flag} binds {hp[1]}: other pods and the kubelet cannot reach it")
        if hp[2] not in numbers:
            ck.error(where, f"{flag} port {hp[2]} is not a port the container declares")
        bound[flag] = hp[2]
    for n in numbers - set(bound.values()):
        ck.error(where, f"container port {n} is bound by none of --listen, --worker-listen, --metrics")
    if f.get("--insecure"):
        ck.error(where, "--insecure: tcp endpoints must use CURVE")
    for flag in ("--curve-secret", "--allowed-keys", "--worker-keys"):
        if flag not in f:
            ck.error(where, f"{flag} is missing (CURVE)")
        else:
            check_read_file(ck, where, flag, str(f[flag]), c, volumes, claims)
    for flag in ("--store", "--cache", "--ready-file"):
        if flag in f:
            check_write_file(ck, where, flag, str(f[flag]), c, volumes, claims)
    for flag in ("--store", "--cache"):
        if flag not in f:
            ck.error(where, f"{flag} is missing: its default lies in the home directory, "
                            "not on the volume")
    if not dig(c, "resources", "limits", "nvidia.com/gpu") and str(f.get("--workers")) != "0":
        ck.error(where, "--workers must be 0: the broker's pod has no GPU (workers run in "
                        "their own pods)")
    metrics = bound.get("--metrics")
    for probe, want in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"),
                        ("startupProbe", "/healthz")):
        get = dig(c, probe, "httpGet")
        if get is None:
            if probe != "startupProbe":
                ck.error(where, f"has no {probe} (httpGet {want} on the metrics port)")
            continue
        if d(get).get("path") != want:
            ck.error(f"{where}.{probe}.httpGet.path", f"must be {want}")
        if metrics is not None and resolve_port(d(get).get("port"), [c]) != metrics:
            ck.error(f"{where}.{probe}.httpGet.port", f"must be the metrics port ({metrics})")
    try:
        expect = int(f.get("--expect-workers", 0))
    except ValueError:
        expect = 0
        ck.error(where, f"--expect-workers {f.get('--expect-workers')!r} is not a number")
    if expect > 0:
        labels = dig(tpl, "metadata", "labels")
        for s in objs:
            if s.get("kind") == "Service" and subset(d(dig(s, "spec", "selector")), labels) \
                    and not dig(s, "spec", "publishNotReadyAddresses"):
                ck.error(where, f"--expect-workers {expect}: the pod is not ready until workers "
                                f"attach, and {ident(s)} sends nothing to a pod that is not ready "
                                "(publishNotReadyAddresses)")


def check_broker_address(ck, where, address, services, objs):
    hp = host_port(address)
    if hp is None or hp[0] != "tcp":
        ck.error(where, f"--broker {address!r} is not tcp://SERVICE:PORT")
        return
    name = hp[1].split(".")[0]
    s = services.get(name)
    if s is None:
        ck.error(where, f"--broker {address}: {name!r} is not a Service of this set")
        return
    port = next((d(p) for p in lst(dig(s, "spec", "ports")) if d(p).get("port") == hp[2]), None)
    if port is None:
        ck.error(where, f"--broker {address}: {ident(s)} has no port {hp[2]}")
        return
    target = port.get("targetPort", port.get("port"))
    for o, tpl in selected_pods(objs, dig(s, "spec", "selector")):
        for _, c in containers(d(tpl.get("spec"))):
            args = argv(c)
            if not args or os.path.basename(args[0]) != "gpuqd":
                continue
            n = resolve_port(target, [c])
            f = flags(args)
            worker = host_port(str(f.get("--worker-listen")))
            if worker is None or n != worker[2]:
                other = [k for k in ("--listen", "--metrics")
                         if host_port(str(f.get(k))) and host_port(str(f.get(k)))[2] == n]
                ck.error(where, f"--broker {address} leads to "
                                f"{'port ' + str(n) if n else 'no port'} of {ident(o)}"
                                f"{' (its ' + other[0] + ')' if other else ''}, not to its "
                                "--worker-listen")


def validate(objs, dashboard=None, expect_kinds=()):
    ck = Checker()
    for i, o in enumerate(objs):
        if not isinstance(o, dict):
            ck.error(f"document {i}", f"is {describe(o)}, not an object")
    objs = [o for o in objs if isinstance(o, dict)]
    for o in objs:
        ck.schema(o, ident(o))
    check_names(ck, objs)
    check_workloads(ck, objs)
    check_services(ck, objs)
    check_service_monitors(ck, objs)
    check_policy(ck, objs)
    check_command_lines(ck, objs)
    if dashboard:
        check_dashboard(ck, objs, dashboard)
    kinds = {o.get("kind") for o in objs}
    for k in expect_kinds:
        if k not in kinds:
            ck.error("set", f"holds no {k}")
    return ck.errors


# ---------------------------------------------------------------- self-test


def find(objs, kind, name=None):
    for o in objs:
        if o.get("kind") == kind and (name is None or str(dig(o, "metadata", "name")).startswith(name)):
            return o
    raise KeyError(f"no {kind} {name or ''} to break")


def broker(objs):
    return find(objs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]


def worker(objs):
    return find(objs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]


def set_arg(c, flag, value):
    for key in ("command", "args"):
        a = c.get(key, [])
        if flag in a:
            a[a.index(flag) + 1] = value
            return
    c.setdefault("args", []).extend([flag, value])


def _drop(m, key):
    del m[key]


# Each: (what is broken, how, a part of the error it must cause).
SELF_TEST = [
    ("unknown field in a probe",
     lambda o: broker(o)["livenessProbe"]["httpGet"].update(pathh="/healthz"),
     "unknown field (V1HTTPGetAction has no field 'pathh')"),
    ("string for an integer",
     lambda o: broker(o)["ports"][0].update(containerPort="7450"),
     "containerPort: expected an integer, got string '7450'"),
    ("string for a boolean",
     lambda o: broker(o)["securityContext"].update(readOnlyRootFilesystem="true"),
     "readOnlyRootFilesystem: expected a boolean, got string 'true'"),
    ("boolean for a string (an unquoted label value)",
     lambda o: find(o, "DaemonSet")["spec"]["template"]["spec"]["nodeSelector"].update(
         {"nvidia.com/gpu.present": True}),
     "nodeSelector.nvidia.com/gpu.present: expected a string, got boolean true"),
    ("object for a list",
     lambda o: broker(o).update(args={"--curve-secret": "/etc/gpuq/broker.key"}),
     "args: expected a list, got an object"),
    ("missing required field",
     lambda o: _drop(broker(o), "name"),
     "missing required field 'name' (V1Container)"),
    ("missing required field in a list item",
     lambda o: _drop(find(o, "StatefulSet")["spec"]["template"]["spec"]["volumes"][0]["secret"]
                     ["items"][0], "key"),
     "missing required field 'key' (V1KeyToPath)"),
    ("boolean for an int-or-string",
     lambda o: broker(o)["readinessProbe"]["httpGet"].update(port=True),
     "expected an integer or a string, got boolean true"),
    ("bad quantity",
     lambda o: broker(o)["resources"]["limits"].update(memory="10 GiB"),
     "string '10 GiB' is not a quantity"),
    ("request above limit",
     lambda o: broker(o)["resources"]["requests"].update(memory="20Gi"),
     "the request of memory is above its limit"),
    ("GPU request differs from its limit",
     lambda o: worker(o)["resources"]["requests"].update({"nvidia.com/gpu": "4"}),
     "the request of extended resource nvidia.com/gpu must equal its limit"),
    ("GPU count selector differs from the request",
     lambda o: find(o, "DaemonSet")["spec"]["template"]["spec"]["nodeSelector"].update(
         {"nvidia.com/gpu.count": "4"}),
     "differs from the pod's nvidia.com/gpu request"),
    ("no GPU toleration",
     lambda o: _drop(find(o, "DaemonSet")["spec"]["template"]["spec"], "tolerations"),
     "must tolerate the nvidia.com/gpu taint"),
    ("enumeration",
     lambda o: find(o, "StatefulSet")["spec"]["template"]["spec"]["securityContext"]
     ["seccompProfile"].update(type="RuntimeDefualt"),
     "'RuntimeDefualt' is not one of"),
    ("wrong apiVersion for the kind",
     lambda o: find(o, "StatefulSet").update(apiVersion="v1"),
     "no schema for apiVersion 'v1', kind 'StatefulSet'"),
    ("Service selector matches no pod",
     lambda o: find(o, "Service")["spec"]["selector"].update(
         {"app.kubernetes.io/component": "brokr"}),
     "spec.selector matches the pod labels of no workload"),
    ("Service targetPort not declared",
     lambda o: find(o, "Service")["spec"]["ports"][1].update(targetPort="workers"),
     "string 'workers' is not a port declared by StatefulSet/gpuq-broker"),
    ("StatefulSet serviceName names no Service",
     lambda o: find(o, "StatefulSet")["spec"].update(serviceName="gpuq"),
     "spec.serviceName 'gpuq' is not a Service of this set"),
    ("workload selector does not match its pods",
     lambda o: find(o, "DaemonSet")["spec"]["selector"]["matchLabels"].update(
         {"app.kubernetes.io/component": "broker"}),
     "spec.selector.matchLabels does not match spec.template.metadata.labels"),
    ("volume mount names no volume",
     lambda o: find(o, "StatefulSet")["spec"]["template"]["spec"]["volumes"][0].update(name="key"),
     "names volume 'keys', which the pod does not have"),
    ("probe on an undeclared port",
     lambda o: broker(o)["readinessProbe"]["httpGet"].update(port="metric"),
     "string 'metric' is not a port this container declares"),
    ("probe on another path",
     lambda o: broker(o)["livenessProbe"]["httpGet"].update(path="/metrics"),
     "livenessProbe.httpGet.path: must be /healthz"),
    ("dashboard is not JSON",
     lambda o: find(o, "ConfigMap", "gpuq-dashboard")["data"].update(
         {"gpuq-dashboard.json": "{"}),
     "does not parse as JSON"),
    ("dashboard ConfigMap missing",
     lambda o: o.remove(find(o, "ConfigMap", "gpuq-dashboard")),
     "0 ConfigMaps hold gpuq-dashboard.json"),
    ("dashboard without the sidecar label",
     lambda o: _drop(find(o, "ConfigMap", "gpuq-dashboard")["metadata"]["labels"],
                     "grafana_dashboard"),
     "grafana_dashboard must be \"1\""),
    ("ServiceMonitor unknown field",
     lambda o: find(o, "ServiceMonitor")["spec"]["endpoints"][0].update(paht="/metrics"),
     "unknown field (MonitoringV1Endpoint has no field 'paht')"),
    ("ServiceMonitor wrong type",
     lambda o: find(o, "ServiceMonitor")["spec"]["endpoints"][0].update(interval=15),
     "interval: expected a string, got integer 15"),
    ("ServiceMonitor port not on the Service",
     lambda o: find(o, "ServiceMonitor")["spec"]["endpoints"][0].update(port="metrix"),
     "'metrix' is not a port name of Service/gpuq-broker"),
    ("ServiceMonitor missing selector",
     lambda o: _drop(find(o, "ServiceMonitor")["spec"], "selector"),
     "missing required field 'selector' (MonitoringV1ServiceMonitorSpec)"),
    ("worker connects to the client port",
     lambda o: set_arg(worker(o), "--broker", "tcp://gpuq-broker:7450"),
     "leads to port 7450 of StatefulSet/gpuq-broker (its --listen), not to its --worker-listen"),
    ("worker connects to no Service",
     lambda o: set_arg(worker(o), "--broker", "tcp://broker:7451"),
     "'broker' is not a Service of this set"),
    ("key file not in the Secret's items",
     lambda o: set_arg(worker(o), "--key", "/etc/gpuq/worker.pem"),
     "has no item 'worker.pem'"),
    ("store on the read-only root",
     lambda o: set_arg(broker(o), "--store", "/data/jobs.db"),
     "--store /data/jobs.db lies on no mounted volume"),
    ("metrics bound to loopback",
     lambda o: set_arg(broker(o), "--metrics", "127.0.0.1:9450"),
     "--metrics binds 127.0.0.1"),
    ("--expect-workers behind a Service that waits for readiness",
     lambda o: (set_arg(broker(o), "--expect-workers", "1"),
                find(o, "Service")["spec"].update(publishNotReadyAddresses=False)),
     "--expect-workers 1: the pod is not ready until workers attach"),
    ("namespace set",
     lambda o: find(o, "Service")["metadata"].update(namespace="gpuq"),
     "metadata.namespace is set"),
    ("privilege escalation",
     lambda o: worker(o)["securityContext"].update(allowPrivilegeEscalation=True),
     "allowPrivilegeEscalation: must be false"),
    ("untagged image",
     lambda o: broker(o).update(image="gpuq-broker"),
     "'gpuq-broker' has no tag"),
    ("unused volume",
     lambda o: broker(o)["volumeMounts"].pop(),
     "volume 'tmp' is not mounted by any container"),
]


def load(paths):
    objs = []
    for p in paths:
        text = sys.stdin.read() if p == "-" else open(p, encoding="utf-8").read()
        objs += [o for o in yaml.safe_load_all(text) if o is not None]
    return objs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--dashboard")
    ap.add_argument("--expect-kinds", default="")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--expect-reject", action="store_true")
    mode.add_argument("--self-test", action="store_true")
    a = ap.parse_args()
    kinds = [k for k in a.expect_kinds.split(",") if k]
    passed = failed = 0

    if a.expect_reject:
        for p in a.files:
            text = open(p, encoding="utf-8").read()
            expected = re.findall(r"^# expect: (.+)$", text, re.M)
            errors = validate(load([p]))
            missing = [e for e in expected if not any(e in x for x in errors)]
            if errors and expected and not missing:
                passed += 1
                print(f"ok: {p} is rejected ({len(errors)} errors, the {len(expected)} expected among them)")
            else:
                failed += 1
                print(f"FAIL: {p}: " + ("accepted" if not errors else f"not rejected as expected; "
                                        f"missing {missing}; got:"))
                for x in errors:
                    print(f"  {x}")
    else:
        objs = load(a.files)
        errors = validate(objs, a.dashboard, kinds)
        if errors:
            failed += 1
            print(f"FAIL: {' '.join(a.files)}: {len(errors)} errors")
            for x in errors:
                print(f"  {x}")
        else:
            passed += 1
            counts = {}
            for o in objs:
                counts[o["kind"]] = counts.get(o["kind"], 0) + 1
            print(f"ok: {' '.join(a.files)}: {len(objs)} objects ("
                  + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + ")")
        if a.self_test:
            for what, breakage, expected in SELF_TEST:
                broken = copy.deepcopy(objs)
                breakage(broken)
                errors = validate(broken, a.dashboard, kinds)
                if any(expected in x for x in errors):
                    passed += 1
                    print(f"ok: rejected: {what}")
                else:
                    failed += 1
                    print(f"FAIL: not rejected as expected: {what}: wanted {expected!r}, got:")
                    for x in errors or ["(no error)"]:
                        print(f"  {x}")
    print(f"RESULT passed={passed} failed={failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
