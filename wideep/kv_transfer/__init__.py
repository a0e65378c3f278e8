"""P/D disaggregation, engine side: the KV connector (producer holds blocks, consumer pulls them over
a side channel) behind the scheduler's seam (base.py). NixlConnector-compatible `kv_transfer_params`
(params.py). The decode pod's routing sidecar is network tier: wideep.router.sidecar.

params.py and base.py stay torch-free: the router and the sidecar read the wire contract from them.
"""
