"""KVzip: clients of the KVzip context-caching service (`kvzip.client`).

This package holds no server code and never imports torch: `pip install` the project and
`from kvzip.client import Client` to use a running server over HTTP.
"""
