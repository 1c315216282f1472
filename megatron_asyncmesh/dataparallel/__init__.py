"""AsyncMesh data axis: asynchronous sparse parameter averaging between replicas."""
