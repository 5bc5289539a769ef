"""One cog per feature: ``imagine`` (the command and its buttons' flow) and ``admin``
(usage, quotas, the queue, the workers)."""
