from klstore.report.aggregate import build  # noqa: F401  (split pending)
