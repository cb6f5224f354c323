"""HTTP layer: the BentoML service, request schemas, metrics, batching and encoding.

No model math here: requests are validated, batched, handed to an engine from `models/`,
and the results encoded (JSON, PNG, Server-Sent Events).
"""
