"""The wire contract between the daemon, the SDK and any firmware, and nothing else.

- ``topics``: topic names, the names inside them, and MQTT's rules for a topic name.
- ``models``: every payload as a pydantic model, error codes and id patterns.
- ``json_schema``: the JSON Schemas generated from the models (committed in ``schemas/``).
- ``PROTOCOL.md``: the contract in prose, with its numbered guarantees.

The daemon (``edge_sdk.serve``) and the SDK (``edge_sdk.client``) both import this package;
neither imports the other.
"""
