"""One Prometheus page from several processes' pages: the Ray Serve app's `/metrics`.

On Ray Serve the metrics live in several processes: the ingress (requests by what named their
program), the control plane actor (program events, TTLs, tool predictions, pins) and every replica
(vLLM's own `vllm:*` metrics and its engine's). Each process renders its own registry; the ingress
merges the pages, labelling every series with the process it came from (`replica`: a replica id, or
"ingress" / "control-plane"), because two replicas' vLLM series are otherwise identical
(`engine="0"` in both). The trade-off: a dashboard sums over `replica` where the single server has
one series.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

SOURCE_LABEL = "replica"


class _Parsed:
    """A collector over already-parsed families (what `generate_latest` renders)."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self):
        return self.families


def merge(pages: dict[str, str]) -> str:
    """Prometheus text pages by source -> one page, every sample labelled with its source."""
    families: dict[str, Metric] = {}
    for source, page in pages.items():
        for family in text_string_to_metric_families(page):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            merged.samples += [Sample(s.name, {**s.labels, SOURCE_LABEL: source}, s.value, s.timestamp, s.exemplar)
                               for s in family.samples]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Parsed(list(families.values())))
    return generate_latest(registry).decode()


def this_process() -> str:
    """This process's registry as a Prometheus page."""
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY).decode()
