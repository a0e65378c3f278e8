"""Kubernetes manifests from a deployment spec: LeaderWorkerSet or Grove model servers, InferencePool,
the Endpoint Picker, gateway objects, monitoring, and a kustomization that builds them."""
from wideep.deploy.render.bundle import render_bundle, write_bundle

__all__ = ["render_bundle", "write_bundle"]
