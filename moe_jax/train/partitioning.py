"""Device mesh ("data", "expert", "model") and THE table of logical -> mesh axis rules."""

from __future__ import annotations

MESH_AXES = ("data", "expert", "model")

# The only mapping from logical axis names (on every parameter and large activation) to mesh
# axes. Expert devices do data parallelism for the dense layers (batch over data AND expert);
# experts themselves live on "expert", so GSPMD inserts the all-to-all in MoeLayer.
LOGICAL_AXIS_RULES: tuple[tuple[str, object], ...] = (
    ("batch", ("data", "expert")),
    ("expert", "expert"),
    ("expert_group", "data"),
    ("embed", None),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("vocab", "model"),
    ("length", None),
    ("unmodeled", None),
    ("relpos_buckets", None),
)
