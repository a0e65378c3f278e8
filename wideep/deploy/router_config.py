"""The router's EndpointPickerConfig: the wide-EP default (llm-d `wide-ep-lws.values.yaml`) or a user file."""
from __future__ import annotations

from pathlib import Path

from wideep.deploy.spec import DeploySpec, SpecError


def default_config_path() -> Path:
    """The router package's copy of the wide-EP guide config (one file for both router and deploy)."""
    import wideep

    return Path(wideep.__file__).parent / "router" / "configs" / "wide-ep-lws.yaml"


def router_config_text(spec: DeploySpec, base_dir: Path | None = None) -> str:
    """The config file's text; a relative `router.config` path is read next to the spec file."""
    if spec.router.config == "default":
        return default_config_path().read_text()
    path = Path(spec.router.config)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_file():
        raise SpecError("router.config", f"{path} does not exist (use 'default' for the wide-EP config)")
    return path.read_text()
