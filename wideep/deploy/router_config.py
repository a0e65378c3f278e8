"""The router's EndpointPickerConfig: the wide-EP default (llm-d `wide-ep-lws.values.yaml`) or a user file."""
from __future__ import annotations

from pathlib import Path

from wideep.deploy.spec import DeploySpec, SpecError

# Prefill profile: prefix-cache 3, queue 2, active-request 2; decode profile: active-request.
# Every request is disaggregated (always-disagg-pd-decider), as in the wide-EP guide.
WIDE_EP_CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: always-disagg-pd-decider
- type: disagg-profile-handler
  parameters:
    deciders:
      prefill: always-disagg-pd-decider
- type: prefill-filter
- type: decode-filter
- type: prefix-cache-scorer
- type: queue-scorer
- type: active-request-scorer
schedulingProfiles:
- name: prefill
  plugins:
  - pluginRef: prefill-filter
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: active-request-scorer
    weight: 2
- name: decode
  plugins:
  - pluginRef: decode-filter
  - pluginRef: active-request-scorer
"""


def router_config_text(spec: DeploySpec, base_dir: Path | None = None) -> str:
    """The config file's text; a relative `router.config` path is read next to the spec file."""
    if spec.router.config == "default":
        return WIDE_EP_CONFIG
    path = Path(spec.router.config)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_file():
        raise SpecError("router.config", f"{path} does not exist (use 'default' for the wide-EP config)")
    return path.read_text()
