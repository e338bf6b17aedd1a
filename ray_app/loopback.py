"""Keep a private local run's Serve replicas on loopback.

Ray Serve 2.60 starts an inter-deployment gRPC server in every replica and binds it to ``[::]:0``
(every interface) whatever the node's address (``ray/serve/_private/replica.py``, ``_on_initialized``);
nothing in Serve's config changes that. On a node whose address is 127.0.0.1 (a private single-node
run, ``python -m ray_app.server``; see its module doc) nobody can reach that server from another
machine anyway, so :func:`keep_replica_grpc_on_loopback` makes the replica bind it to 127.0.0.1.
On any other node (a real cluster, whose nodes call each other) nothing changes.

``ray_app/__init__.py`` calls it when the package is imported inside a Serve replica, which happens
when the replica loads the deployment class, before the server starts.
"""
from __future__ import annotations

__all__ = ["keep_replica_grpc_on_loopback"]


def keep_replica_grpc_on_loopback() -> bool:
    """Rebind this replica's inter-deployment gRPC server from ``[::]`` to 127.0.0.1 when the node's
    address is 127.0.0.1; returns whether it did (False elsewhere, or when Serve's code has changed)."""
    import ray
    from ray.serve._private import replica

    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or not ray.is_initialized() or ray.util.get_node_ip_address() != "127.0.0.1":
        return False
    if getattr(original, "loopback_only", False):
        return True

    def bind(server, address: str) -> int:
        return original(server, "127.0.0.1" + address[len("[::]"):] if address.startswith("[::]:") else address)

    bind.loopback_only = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = bind
    return True
