"""P/D disaggregation: the KV connector (producer holds blocks, consumer pulls them over a side
channel) and the decode pod's routing sidecar. NixlConnector-compatible `kv_transfer_params`.

Nothing importable from this package root pulls in torch: the sidecar must run without it.
"""
