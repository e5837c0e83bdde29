"""The old home of the ``--to torch_dist`` target: now :mod:`vlconvert.targets.torch_dist` (names re-exported)."""

from vlconvert.targets.torch_dist import (  # noqa: F401 - re-exported: the old import names
    DATA_FILE,
    chunks,
    plan_torch_dist,
    torch_dist_plan,
    vocab_rows,
    write_torch_dist,
)
